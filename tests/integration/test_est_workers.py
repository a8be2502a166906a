"""EST worker processes (hub/est/pool.py): tokens exactly-once across processes, serve with 2 workers enrolls and
renews and counts every worker's events, a killed worker is replaced, nothing outlives serve, CA keys in a token.

Cost: about 50 s on 2 cores (one race of 6 processes on a registry, four hubs with 2 workers each).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.hubfixtures import (EST_PREFIX, LENIENT_LIMITS, b64_body, enroll, make_csr, new_key,
                                           parse_pkcs7, request, running_hub, write_key, write_pem)
from tests.integration.agentfixtures import wait_until
from tests.integration.test_api_metrics import MetricsHub

pytestmark = pytest.mark.integration

RACERS = 6
ROUNDS = 3


# --- the registry: one token, several processes -------------------------------------------------------------------

def _self_signed(cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))


def _racer(path: str, tokens: list[tuple[str, str]], barrier, results) -> None:
    """One process: for each (device, token), wait for the others, then enroll with it (issue() takes 30 ms: every
    process passes the read-only pre-check, signs, and then they all race to the one transaction that spends it)."""
    from hub.registry.store import Registry, TokenRejected

    registry = Registry(path)
    out = []
    for device_id, token in tokens:
        cert = _self_signed(device_id)

        def issue() -> x509.Certificate:
            time.sleep(0.03)
            return cert

        barrier.wait(timeout=60)
        try:
            registry.enroll(device_id, token, datetime.now(timezone.utc), issue, source=f"pid{os.getpid()}")
            out.append("ok")
        except TokenRejected as exc:
            out.append(exc.code)
        except Exception as exc:  # anything else is a failure of the test, reported (not a hang at the barrier)
            out.append(type(exc).__name__)
    registry.close()
    results.put(out)


def test_a_token_is_spent_once_across_processes(tmp_path):
    from hub.registry.store import Registry

    path = tmp_path / "registry.sqlite3"
    registry = Registry(path)
    now = datetime.now(timezone.utc)
    tokens = []
    for i in range(ROUNDS):
        registry.add_device(f"race-{i}", "acme", now)
        tokens.append((f"race-{i}", registry.create_token(f"race-{i}", now, timedelta(days=1))))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(path), tokens, barrier, results)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    for i in range(ROUNDS):
        got = sorted(out[i] for out in outcomes)
        assert got == ["ok"] + ["token_used"] * (RACERS - 1), f"token {i}: {got}"
        assert len(registry.certificates_of(f"race-{i}")) == 1
    rows = registry.query("SELECT count(*) AS n FROM audit WHERE action = 'enroll' AND outcome = 'ok'")
    assert rows[0]["n"] == ROUNDS
    assert registry.verify_audit().ok  # rows from six processes still chain
    registry.close()


# --- serve with two workers ----------------------------------------------------------------------------------------

def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of the processes whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append((int(entry.name), cmd))
    return out


def workers_of(hub) -> list[int]:
    return sorted(pid for pid, cmd in _children(hub.proc.pid) if "hub.est.worker" in cmd)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _enroll_new(hub, device_id: str, tmp_path: Path) -> tuple[Path, Path]:
    token = hub.add_device(device_id)
    key = new_key()
    resp = enroll(hub, device_id, token, make_csr(key, device_id))
    assert resp.status == 200, resp.text
    cert = parse_pkcs7(resp.body)[0]
    return write_pem(tmp_path / f"{device_id}.pem", cert), write_key(tmp_path / f"{device_id}.key", key)


@pytest.fixture(scope="module")
def pool_hub(tmp_path_factory):
    from tests.helpers import free_port

    port = free_port()
    with running_hub(tmp_path_factory.mktemp("workers"), api_port=port, workers=2, **LENIENT_LIMITS) as hub:
        mh = MetricsHub(hub, port)
        mh.identity("viewer", "viewer")
        yield mh


def test_two_workers_serve_the_port(pool_hub):
    hub = pool_hub.hub
    assert "(fleet acme, 2 worker processes)" in hub.stdout_text()
    assert len(workers_of(hub)) == 2


def test_two_workers_enroll_and_renew_and_every_event_is_counted(pool_hub, tmp_path):
    hub = pool_hub.hub
    before = {name: pool_hub.value(name) for name in ("tessera_enrollments_total", "tessera_renewals_total")}
    denied = pool_hub.value("tessera_est_denials_total", reason="bad_token")
    ids = [f"wk-{i}" for i in range(24)]
    tokens = {d: hub.add_device(d) for d in ids}
    keys = {d: new_key() for d in ids}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda d: enroll(hub, d, tokens[d], make_csr(keys[d], d)), ids))
    assert [a.status for a in answers] == [200] * len(ids), [a.text for a in answers if a.status != 200]
    log = hub.stderr_path.read_text(errors="replace")
    served = {w for w in ("[est-0]", "[est-1]") if any(w in line and "enrolled wk-" in line
                                                          for line in log.splitlines())}
    assert served == {"[est-0]", "[est-1]"}, "24 concurrent enrollments should reach both workers"
    # renew one over mTLS with its certificate
    cert = write_pem(tmp_path / "wk-0.pem", parse_pkcs7(answers[0].body)[0])
    key_path = write_key(tmp_path / "wk-0.key", keys["wk-0"])
    resp = request(hub, "POST", f"{EST_PREFIX}/simplereenroll", b64_body(make_csr(new_key(), "wk-0")),
                   {"Content-Type": "application/pkcs10"}, cert=cert, key=key_path)
    assert resp.status == 200, resp.text
    assert hub.cert_count("wk-0") == 2
    bad = enroll(hub, "wk-1", "not-the-token", make_csr(new_key(), "wk-1"))
    assert bad.status == 401
    # the workers' counters reach the supervisor's /metrics
    assert pool_hub.value("tessera_enrollments_total") == before["tessera_enrollments_total"] + len(ids)
    assert pool_hub.value("tessera_renewals_total") == before["tessera_renewals_total"] + 1
    assert pool_hub.value("tessera_est_denials_total", reason="bad_token") == denied + 1


def test_one_token_many_connections_one_certificate(pool_hub):
    hub = pool_hub.hub
    token = hub.add_device("wk-race")
    start = threading.Barrier(12)

    def attempt(_):
        key = new_key()
        csr = make_csr(key, "wk-race")
        start.wait(timeout=30)
        return enroll(hub, "wk-race", token, csr).status

    with ThreadPoolExecutor(12) as pool:
        statuses = sorted(pool.map(attempt, range(12)))
    assert statuses == [200] + [401] * 11
    assert hub.cert_count("wk-race") == 1


def test_a_killed_worker_is_replaced(pool_hub, tmp_path):
    hub = pool_hub.hub
    old = workers_of(hub)
    after = hub.last_audit_id()
    os.kill(old[0], signal.SIGKILL)
    new = wait_until(lambda: (lambda now: now if len(now) == 2 and old[0] not in now else None)(workers_of(hub)),
                     20, "a new EST worker")
    assert old[1] in new
    rows = hub.wait_audit(after, lambda r: r["action"] == "est.worker_died")
    assert any(f"pid {old[0]}" in r["detail"] for r in rows if r["action"] == "est.worker_died")
    wait_until(lambda: f"ready (pid {(set(new) - set(old)).pop()})" in hub.stderr_path.read_text(errors="replace"),
               30, "the new worker ready")
    for i in range(6):  # both workers serve again
        _enroll_new(hub, f"wk-after-{i}", tmp_path)


def test_sigterm_and_sigkill_leave_no_worker_behind(tmp_path):
    with running_hub(tmp_path / "a", workers=2) as hub:
        workers = workers_of(hub)
        assert len(workers) == 2
    assert not [pid for pid in workers if _alive(pid)], "EST workers outlived serve's SIGTERM"
    hub = None
    with running_hub(tmp_path / "b", workers=2) as hub:
        workers = workers_of(hub)
        port = hub.port
        tokens = {f"gone-{i}": hub.add_device(f"gone-{i}") for i in range(8)}
        # serve stopped, then killed with the workers' counts unread: they then read ECONNRESET, not EOF
        os.kill(hub.proc.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(lambda d: enroll(hub, d, tokens[d], make_csr(new_key(), d)).status, tokens)) == {200}
        time.sleep(0.2)  # the workers' reporters have sent their counts (into the stopped supervisor's queue)
        os.kill(hub.proc.pid, signal.SIGKILL)  # serve alone: its workers see the control socket close
        hub.proc.wait(timeout=10)
        wait_until(lambda: not [pid for pid in workers if _alive(pid)], 10, "EST workers gone after kill -9")
        with socket.socket() as sock:  # the port is free for the next serve
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
        hub.proc = None
        hub.start()  # and serve starts again on the same directory
        assert len(workers_of(hub)) == 2


def test_two_workers_sign_with_ca_keys_in_a_token(tmp_path):
    """Each worker opens its own PKCS#11 session (no session crosses a fork): both sign device certificates."""
    import subprocess

    from hsm.softhsm import create_token
    from tests.integration.hubfixtures import hub_binary, init_hub

    hub = init_hub(tmp_path, workers=2, **LENIENT_LIMITS)
    token = create_token(tmp_path / "tok", label="fleet-ca")
    res = subprocess.run([hub_binary(), "ca", "move-to-token", "--token-label", "fleet-ca", "--pin-source",
                          f"file:{token.pin_file}", "--dir", str(hub.dir)], capture_output=True, text=True,
                         env=dict(os.environ, SOFTHSM2_CONF=str(token.conf)), timeout=120)
    assert res.returncode == 0, res.stderr
    hub.start()
    try:
        device_ca = x509.load_pem_x509_certificate((hub.dir / "ca" / "device-ca.pem").read_bytes())
        ids = [f"tok-{i}" for i in range(16)]
        tokens = {d: hub.add_device(d) for d in ids}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda d: enroll(hub, d, tokens[d], make_csr(new_key(), d)), ids))
        assert [a.status for a in answers] == [200] * len(ids), [a.text for a in answers if a.status != 200]
        for a in answers:
            parse_pkcs7(a.body)[0].verify_directly_issued_by(device_ca)  # signed in the token
        log = hub.stderr_path.read_text(errors="replace")
        assert {w for w in ("[est-0]", "[est-1]") if any(w in line and "enrolled tok-" in line
                                                            for line in log.splitlines())} == {"[est-0]", "[est-1]"}
    finally:
        assert hub.stop() == 0
