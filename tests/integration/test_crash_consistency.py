"""Crash consistency of enrollment: `kill -9` of `tessera-hub serve` at random moments of bursts of concurrent EST
simpleenrolls, then a restart on the same directory and ports, and what must hold after each crash.

500 devices get single-use tokens (`tessera-hub token create`), file keys and CSRs (no SoftHSM: the load is the
point). Each round serves the hub, fires simpleenroll for every device not done yet (CLIENTS connections at once)
and SIGKILLs the serve process alone (as the OOM killer would; its Mosquitto is left to die by PR_SET_PDEATHSIG)
after a random number of answers plus a random delay, while devices that hold a certificate are revoked through
the fleet API (so CRL publications run too). The moments come from a seeded random.Random: the seed is printed, and
TESSERA_CRASH_SEED=<seed> replays a failing run (thread timing still varies). The last round is not killed.

After every crash, with the hub down:
- no certificate without its registry row: every certificate a client received is in `certificates` (same PEM,
  its device, active) and its device is active. The hub commits the certificate row and the token's use before
  it answers. The reverse is acceptable and expected: a row (and a used token) for a certificate the client never
  got, because the hub died between the commit and the answer; such a device needs a new token;
- no token used twice: each device has at most one certificate; a device has one exactly when its token is used,
  and one `enroll ok` audit row; every revoke the API answered is in the registry;
- no half-written file: the device and service CRLs parse and verify under their CA, fleet.toml loads, every
  private key in ca/ and tls/ loads and matches its certificate;
- the audit chain verifies (`tessera-hub audit verify` on the dead hub's directory: stale api.addr and admin.sock);
then, restarted: the hub serves on the same ports (no child of the killed hub left: Mosquitto, EST workers), no
temporary file of the killed process is left in the hub directory, the device CRL soon lists exactly the
registry's revoked certificates, a device whose token the registry holds used is refused when it retries (401) and
the others enroll. At the end one more device enrolls and the audit chain is intact.

Bugs this found, each also pinned by a deterministic test: a revocation committed just before the kill never reached
the CRL (the new process only looked at the CRL's age) and a publication cut short left temp files and a PEM behind
its DER (both below); an EST worker whose supervisor was killed with unread counts in its socket served on for ever,
holding the port (tests/unit/test_est_worker_control.py); requests in flight when a worker stopped were answered
403/500 on its closed registry (tests/unit/test_est_server_drain.py).

Cost: ~30-60 s for the burst test, ~15 s for the two others, on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.brokerfixtures import BROKER_LIMITS
from tests.integration.fleetfixtures import Api, FleetHub
from tests.integration.hubfixtures import cn_of, enroll, init_hub, make_csr, new_key, parse_pkcs7

pytestmark = pytest.mark.integration

N = 500
CLIENTS = 32
KILL_ROUNDS = 4
PREFIX = "cr"
SETTINGS = {**BROKER_LIMITS, "max_connections_per_source": 256, "source_failures_per_minute": 100000,
            "global_failures_per_minute": 100000}
#: names of temporary files the hub writes before a rename (hub/ca/crl.py, revocation.py, identityroutes.py,
#: config.py, the broker driver)
TEMP_PATTERNS = ("*.tmp", "*.new")


def seed() -> int:
    value = os.environ.get("TESSERA_CRASH_SEED")
    return int(value) if value else random.SystemRandom().randrange(2 ** 32)


class Burst:
    """simpleenroll for each (device, token, csr) from CLIENTS threads; outcomes by device as they come."""

    def __init__(self, hub, jobs: list[tuple[str, str, bytes]]):
        self.hub, self.jobs = hub, jobs
        self.outcomes: dict[str, tuple] = {}
        self.lock = threading.Lock()
        self.answered = 0  # answers with an HTTP status (not connection errors)
        self.children: dict[int, str] = {}  # of the serve process, when it was killed

    def one(self, job: tuple[str, str, bytes]) -> None:
        device_id, token, csr = job
        try:
            resp = enroll(self.hub, device_id, token, csr)
        except Exception as exc:  # noqa: BLE001  (the hub died under this request: no answer)
            outcome = ("error", f"{type(exc).__name__}: {exc}")
        else:
            if resp.status == 200:
                outcome = ("cert", parse_pkcs7(resp.body)[0])
            else:
                outcome = ("refused", resp.status, resp.text[:200])
        with self.lock:
            self.outcomes[device_id] = outcome
            if outcome[0] != "error":
                self.answered += 1

    def run(self, kill_after: int | None, delay: float) -> float:
        """Run the burst; with `kill_after`, SIGKILL the serve process once that many answers came (+ `delay`).
        Returns the seconds from the start to the kill (or to the end)."""
        t0 = time.monotonic()
        killed_at = None
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(self.one, j) for j in self.jobs]
            if kill_after is not None:
                while self.answered < kill_after and not all(f.done() for f in futures):
                    time.sleep(0.002)
                time.sleep(delay)
                self.children = children_of(self.hub.proc.pid)
                os.kill(self.hub.proc.pid, signal.SIGKILL)  # the serve process alone, not its process group
                killed_at = time.monotonic() - t0
                self.hub.proc.wait(timeout=10)
            for f in futures:
                f.result()
        return killed_at if killed_at is not None else time.monotonic() - t0


def check_at_rest(hub, client_certs: dict[str, x509.Certificate], revoked_answered: set[str]) -> dict:
    """The invariants of the module docstring on the stopped hub's directory; returns a few counts."""
    from hub.ca.crl import validate_crl
    from hub.config import load_config

    certs = {r["serial"]: r for r in hub.query("SELECT serial, device_id, status, pem FROM certificates")}
    devices = {r["id"]: r for r in hub.query("SELECT id, status FROM devices WHERE id LIKE ?", (f"{PREFIX}-%",))}
    tokens = hub.query("SELECT device_id, used_at FROM tokens WHERE device_id LIKE ?", (f"{PREFIX}-%",))
    enroll_ok = hub.query("SELECT device_id, count(*) AS n FROM audit WHERE action = 'enroll' AND outcome = 'ok' "
                          "GROUP BY device_id")
    revoked = {d for d, r in devices.items() if r["status"] == "revoked"}
    assert revoked_answered <= revoked, f"revokes the API answered, not in the registry: {revoked_answered - revoked}"

    # every certificate a client holds is in the registry, with its device
    for device_id, cert in client_certs.items():
        row = certs.get(format(cert.serial_number, "x"))
        assert row is not None, f"{device_id} holds certificate {cert.serial_number:x}, which the registry lacks"
        assert row["device_id"] == device_id == cn_of(cert), row
        assert row["status"] == ("revoked" if device_id in revoked else "active"), (device_id, row["status"])
        assert x509.load_pem_x509_certificate(row["pem"].encode()) == cert
    # every certificate row belongs to a device; one per device at most, exactly when its one token is used
    per_device: dict[str, int] = {}
    for row in certs.values():
        assert row["device_id"] in devices, f"certificate {row['serial']} of an unknown device {row['device_id']}"
        per_device[row["device_id"]] = per_device.get(row["device_id"], 0) + 1
    assert max(per_device.values(), default=0) <= 1, \
        f"devices with two certificates (a token used twice): {[d for d, n in per_device.items() if n > 1][:5]}"
    assert len(tokens) == len(devices) == N, (len(tokens), len(devices))
    used = {t["device_id"] for t in tokens if t["used_at"] is not None}
    assert used == set(per_device), (f"token used without a certificate: {sorted(used - set(per_device))[:5]}; "
                                     f"certificate without a used token: {sorted(set(per_device) - used)[:5]}")
    assert {r["device_id"]: r["n"] for r in enroll_ok if r["device_id"] in devices} == per_device, \
        "the audit's enroll rows do not match the certificates"
    for device_id, row in devices.items():
        expected = "pending" if device_id not in per_device else "revoked" if device_id in revoked else "active"
        assert row["status"] == expected, row

    # files: CRLs, fleet.toml, keys
    cfg = load_config(hub.dir)
    tomllib.loads((hub.dir / "fleet.toml").read_text())
    now = datetime.now(timezone.utc)
    device_ca = x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())
    service_ca = x509.load_pem_x509_certificate((hub.dir / "ca" / "service-ca.pem").read_bytes())
    validate_crl((cfg.crl_dir / "device.crl").read_bytes(), device_ca, now)
    pem_crl = x509.load_pem_x509_crl((cfg.crl_dir / "device.crl.pem").read_bytes())
    assert pem_crl.is_signature_valid(device_ca.public_key())
    if (cfg.crl_dir / "service.crl.pem").exists():  # published with the device CRL after the first change
        service_crl = x509.load_pem_x509_crl((cfg.crl_dir / "service.crl.pem").read_bytes())
        assert service_crl.is_signature_valid(service_ca.public_key())
    for key_path in sorted([*cfg.ca_dir.glob("*.key"), *cfg.tls_dir.glob("*.key")]):
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        cert_path = key_path.with_suffix(".pem")
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            assert cert.public_key().public_numbers() == key.public_key().public_numbers(), \
                f"{key_path} does not match {cert_path}"

    # the audit chain, by the operator's command on the dead hub's directory (its api.addr and admin.sock stale)
    verify = hub.cli("audit", "verify", "--json")
    assert verify.returncode == 0, f"audit verify exited {verify.returncode}: {verify.stdout}{verify.stderr}"
    verdict = json.loads(verify.stdout)
    assert verdict["ok"], verdict
    return {"certificates": len(certs), "client_certs": len(client_certs), "revoked": len(revoked),
            "audit_rows": verdict["checked"]}


def revoked_serials(hub) -> set[int]:
    return {int(r["serial"], 16) for r in hub.query("SELECT serial FROM certificates WHERE status = 'revoked'")}


def wait_crl_converges(hub, timeout: float = 10.0) -> None:
    """The running hub's device CRL lists exactly the registry's revoked certificates (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while (listed := crl_serials(hub)) != (want := revoked_serials(hub)):
        assert time.monotonic() < deadline, \
            f"the CRL lags the registry {timeout} s after the restart: missing {len(want - listed)}, extra " \
            f"{len(listed - want)}"
        time.sleep(0.1)


class Revoker(threading.Thread):
    """Revokes random devices that hold a certificate, through the fleet API, every ~30 ms until stopped or the
    hub stops answering; `answered` are the revokes the API confirmed."""

    def __init__(self, hub, candidates: list[str], rng: random.Random):
        super().__init__(name="revoker", daemon=True)
        self.api, self.candidates, self.rng = local_admin_api(hub), candidates, rng
        self.answered: set[str] = set()
        self.failure: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.03) and self.candidates:
            device_id = self.candidates.pop(self.rng.randrange(len(self.candidates)))
            try:
                ans = self.api.call("POST", f"/api/v1/devices/{device_id}/status",
                                    {"action": "revoke", "reason": "keyCompromise"}, timeout=10)
            except Exception:  # noqa: BLE001  (the hub died under this request)
                return
            if ans.status != 200:
                self.failure = f"revoke {device_id}: {ans.status} {ans.body[:300]!r}"
                return
            self.answered.add(device_id)


def temp_files(hub) -> list[str]:
    return sorted(str(p.relative_to(hub.dir)) for pattern in TEMP_PATTERNS for p in hub.dir.rglob(pattern))


def children_of(pid: int) -> dict[int, str]:
    """The process's children (EST workers, Mosquitto): {pid: command line}."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            for child in (task / "children").read_text().split():
                out[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_children_gone(children: dict[int, str], timeout: float = 10.0) -> None:
    """The killed hub's children exit by themselves: Mosquitto by PR_SET_PDEATHSIG, the EST workers when their
    control socket ends. A leftover is killed (by pid) and fails the test."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in children if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"outlived the killed hub by {timeout} s: {[children[p] for p in left]}"


def test_kill_9_during_enrollment_bursts_loses_nothing(tmp_path):
    s = seed()
    rng = random.Random(s)
    print(f"\ncrash consistency: seed {s} (TESSERA_CRASH_SEED={s} replays this run)", flush=True)
    t_start = time.monotonic()
    plain = init_hub(tmp_path, **SETTINGS)
    hub = FleetHub(dir=plain.dir, api_port=None)
    out = tmp_path / "tokens.csv"
    hub.cli_ok("token", "create", "--count", str(N), "--prefix", PREFIX, "--out", str(out))
    with open(out, newline="") as fh:
        tokens = {r["device_id"]: r["token"] for r in csv.DictReader(fh)}
    assert len(tokens) == N
    csrs = {d: make_csr(new_key(), d) for d in tokens}

    client_certs: dict[str, x509.Certificate] = {}
    retried_used: set[str] = set()  # devices whose used token was presented again after a restart
    revoke_asked: set[str] = set()
    revoked_answered: set[str] = set()
    try:
        for rnd in range(KILL_ROUNDS + 1):
            hub.proc = None
            hub.start()
            leftover = temp_files(hub)
            assert not leftover, f"round {rnd}: temporary files of the killed hub left in place: {leftover}"
            wait_crl_converges(hub)
            used_before = {r["device_id"] for r in hub.query(
                "SELECT device_id FROM tokens WHERE used_at IS NOT NULL AND device_id LIKE ?", (f"{PREFIX}-%",))}
            # not done: no certificate in hand, and a used token not yet presented again
            todo = [d for d in tokens if d not in client_certs and d not in retried_used]
            rng.shuffle(todo)
            last = rnd == KILL_ROUNDS
            kill_after = None if last else rng.randrange(1, max(2, len(todo) * 3 // 4))
            delay = rng.uniform(0.0, 0.05)
            revoker = None
            if not last:  # revocations (and so CRL publications) go on during the burst, from one before it on
                revoker = Revoker(hub, sorted(set(client_certs) - revoke_asked), random.Random(rng.random()))
                revoker.start()
                deadline = time.monotonic() + 10
                while revoker.is_alive() and not revoker.answered and time.monotonic() < deadline:
                    time.sleep(0.01)
            burst = Burst(hub, [(d, tokens[d], csrs[d]) for d in todo])
            took = burst.run(kill_after, delay)
            if revoker is not None:
                revoker.halt.set()
                revoker.join(timeout=15)
                assert revoker.failure is None, revoker.failure
                revoke_asked |= set(client_certs) - set(revoker.candidates)
                revoked_answered |= revoker.answered
            for device_id, outcome in burst.outcomes.items():
                if device_id in used_before:
                    assert outcome[0] != "cert", f"{device_id}: a used token enrolled again after the restart"
                    if outcome[0] == "refused":
                        assert outcome[1] == 401, (device_id, outcome)
                        retried_used.add(device_id)
                elif outcome[0] == "cert":
                    client_certs[device_id] = outcome[1]
                elif outcome[0] == "refused":
                    raise AssertionError(f"round {rnd}: {device_id} with an unused token refused: {outcome}")
            if last:
                assert all(o[0] != "error" for o in burst.outcomes.values()), \
                    [o for o in burst.outcomes.values() if o[0] == "error"][:3]
                hub.stop_clean()
            else:
                wait_children_gone(burst.children)
            counts = check_at_rest(hub, client_certs, revoked_answered)
            errors = sum(1 for o in burst.outcomes.values() if o[0] == "error")
            print(f"round {rnd}: {len(todo)} tried, {'killed' if not last else 'ended'} after {took:.2f} s "
                  f"({kill_after} answers + {delay * 1000:.0f} ms), {errors} unanswered, {counts['client_certs']} "
                  f"certificates held by clients, {counts['certificates']} rows, {counts['revoked']} revoked "
                  f"({len(revoked_answered)} answered), {counts['audit_rows']} audit rows verified", flush=True)

        # every device ends enrolled, or refused after a crash took its answer; the hub serves again
        lost_answers = set(tokens) - set(client_certs)
        assert lost_answers == retried_used, sorted(lost_answers ^ retried_used)[:5]
        hub.proc = None
        hub.start()
        wait_crl_converges(hub)
        token = hub.add_device("cx-after-crashes")
        resp = enroll(hub, "cx-after-crashes", token, make_csr(new_key(), "cx-after-crashes"))
        assert resp.status == 200, resp.text
        assert hub.cert_count("cx-after-crashes") == 1
        hub.stop_clean()
        verify = hub.cli("audit", "verify")
        assert verify.returncode == 0 and "audit chain intact" in verify.stdout, verify.stdout + verify.stderr
    finally:
        hub.kill()
    print(f"crash consistency: seed {s}, {KILL_ROUNDS} kills, {len(client_certs)} certificates answered, "
          f"{len(retried_used)} lost with the hub (their token refused on retry), {len(revoked_answered)} revokes "
          f"answered, {time.monotonic() - t_start:.1f} s", flush=True)


def crl_serials(hub) -> set[int]:
    return {e.serial_number for e in x509.load_der_x509_crl((hub.dir / "crl" / "device.crl").read_bytes())}


def local_admin_api(hub) -> Api:
    """The fleet API as the hub directory's own operator (tls/local-admin.*, made by init and serve)."""
    return Api(hub, hub.dir / "tls" / "local-admin.pem", hub.dir / "tls" / "local-admin.key")


def test_a_revocation_the_hub_committed_reaches_the_crl_after_a_crash(tmp_path):
    """A revoke the API answered, then kill -9 before the background publisher wrote the CRL (it runs every 0.5 s:
    the kill follows the answer by a few ms): the restarted hub must publish it by itself (it used to wait for
    the CRL's half-life, 3.5 days, since nothing told the new process that the CRL lagged the registry)."""
    plain = init_hub(tmp_path, **SETTINGS)
    hub = FleetHub(dir=plain.dir, api_port=None)
    try:
        hub.start()
        api = local_admin_api(hub)
        stale = None
        for n in range(5):  # the publisher may win the race with the kill now and then: take another device
            device_id = f"rv-{n}"
            token = hub.add_device(device_id)
            resp = enroll(hub, device_id, token, make_csr(new_key(), device_id))
            assert resp.status == 200, resp.text
            serial = parse_pkcs7(resp.body)[0].serial_number
            answer = api.ok("POST", f"/api/v1/devices/{device_id}/status", {"action": "revoke", "reason": "test"})
            children = children_of(hub.proc.pid)
            os.kill(hub.proc.pid, signal.SIGKILL)
            hub.proc.wait(timeout=10)
            assert answer["revoked_serials"] == [format(serial, "x")], answer
            wait_children_gone(children)
            if serial not in crl_serials(hub):
                stale = serial
                break
            hub.proc = None
            hub.start()
        assert stale is not None, "the CRL was published before each of 5 kills: the race was never lost"
        hub.proc = None
        hub.start()
        deadline = time.monotonic() + 10
        while stale not in crl_serials(hub):
            assert time.monotonic() < deadline, \
                f"revoked certificate {stale:x} not in the CRL 10 s after the restart (the registry has it revoked)"
            time.sleep(0.1)
        hub.stop_clean()
    finally:
        hub.kill()


def test_a_crl_publication_cut_short_is_repaired_at_the_next_start(tmp_path):
    """What a kill -9 in the middle of a CRL publication leaves (hub/ca/crl.py writes temp files, then renames the
    DER and the PEM one after the other): its temp files, and a PEM one CRL behind the DER when the kill fell
    between the two renames. The next `serve` removes the temp files and publishes again."""
    from hub.ca.crl import pem_armor

    plain = init_hub(tmp_path, **SETTINGS)
    hub = FleetHub(dir=plain.dir, api_port=None)
    crl_dir = hub.dir / "crl"
    older_pem = (crl_dir / "device.crl.pem").read_bytes()
    time.sleep(2.5)  # the new CRL's thisUpdate past the margin after init's registry changes (whole seconds)
    hub.cli_ok("crl")  # a newer CRL (DER and PEM)
    assert (crl_dir / "device.crl.pem").read_bytes() != older_pem
    (crl_dir / "device.crl.pem").write_bytes(older_pem)  # as if killed between the DER's rename and the PEM's
    planted = [crl_dir / ".device.crl.k3j2x9.tmp", crl_dir / ".device.crl.pem.p0q1r2.tmp",
               crl_dir / ".service.crl.pem.a1b2c3.tmp", crl_dir / "service.crl.pem.tmp"]
    for path in planted:
        path.write_bytes(b"-----BEGIN X509 CRL-----\nMIIB")  # half written
    try:
        hub.start()
        deadline = time.monotonic() + 10
        while temp_files(hub) or \
                pem_armor((crl_dir / "device.crl").read_bytes()) != (crl_dir / "device.crl.pem").read_bytes():
            assert time.monotonic() < deadline, \
                (f"10 s after the start: temp files {temp_files(hub)}, PEM "
                 f"{'still behind the DER' if (crl_dir / 'device.crl.pem').read_bytes() == older_pem else 'ok'}")
            time.sleep(0.1)
        hub.stop_clean()
    finally:
        hub.kill()
