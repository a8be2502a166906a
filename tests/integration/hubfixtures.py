"""Fixtures and helpers for the `tessera-hub` integration tests (tests/integration/test_hub_*.py).

Every hub here is a real `tessera-hub serve` process (the venv's console script) bound to 127.0.0.1 on a free
port (and a free MQTT port), in its own directory made by `tessera-hub init --fleet acme`. It is stopped with
SIGTERM in teardown and must exit 0 within 10 s (SIGKILL only as a fallback, and then the teardown fails; see
Hub.stop for the re-delivery of a SIGTERM the hub missed). PR_SET_PDEATHSIG makes the hub go away if pytest
itself dies.

Token keys: the pytest process never opens a SoftHSM token. Keys and CSRs are made by hsm.worker (spawned
children); TLS with a token key runs in a `python -m tests.integration.hubfixtures` child (see main()).

Secrets: enrollment tokens are never put in argv. curl gets them from a 0600 `-K` config file.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import functools
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import ROOT, child_env, free_port

FLEET = "acme"
EST_PREFIX = "/.well-known/est"
CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
SIGTERM_GRACE = 3.0

#: fleet.toml settings for hubs shared by many tests: every test talks from 127.0.0.1, so the default
#: per-source limits (30 failures a minute) would turn later tests' answers into 429s.
LENIENT_LIMITS = {"rate_per_source": 100000.0, "rate_burst": 100000, "failures_per_minute": 100000}


def hub_binary() -> str:
    """The venv's `tessera-hub` console script (next to the running interpreter), else the one on PATH."""
    candidate = Path(sys.executable).with_name("tessera-hub")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("tessera-hub")
    if not found:
        raise RuntimeError("tessera-hub is not installed in this environment (pip install -e .)")
    return found


def cli_env() -> dict[str, str]:
    """Environment for `tessera-hub` children: repo importable, no inherited hub dir, terminal width unset, and an
    empty HOME of the test run's own (a developer's ~/.config/tessera/cli.toml or $TESSERA_HUB must not send the
    tests' commands to another hub)."""
    env = child_env()
    for name in ("TESSERA_HUB_DIR", "TESSERA_HUB", "TESSERA_PROFILE", "XDG_CONFIG_HOME", "COLUMNS", "LINES"):
        env.pop(name, None)
    env["HOME"] = _cli_home()
    return env


@functools.cache
def _cli_home() -> str:
    return tempfile.mkdtemp(prefix="tessera-cli-home-")


def run_cli(*args: str, timeout: float = CLI_TIMEOUT, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `tessera-hub ARGS` (never with a secret in ARGS); returns the completed process (text)."""
    return subprocess.run([hub_binary(), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=cwd or ROOT, stdin=subprocess.DEVNULL)


def one_line(text: str) -> str:
    """Whitespace-normalised text (rich wraps long stderr lines at 80 columns when not on a terminal)."""
    return " ".join(text.split())


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to thread `tid` of process `pid` (glibc >= 2.30 tgkill)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise (ProcessLookupError if err == 3 else OSError)(err, os.strerror(err))


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- a hub directory and its process ---------------------------------------------------------------------------

@dataclasses.dataclass
class Hub:
    """A fleet directory and (once started) its `tessera-hub serve` process."""

    dir: Path
    port: int = 0
    mqtt_port: int = 0
    #: `serve --mqtt-port` when set (a RabbitMQ node's MQTT port, tests/integration/rabbitfixtures.py); 0: a free
    #: port chosen at start, for the hub's own Mosquitto
    broker_port: int = 0
    #: `serve --crl-port` (the plain-HTTP CRL listener): unless set, a free port chosen at start, so test hubs never
    #: contend for the default 8080 (new certificates still name fleet.toml's [crl] port: hub/serve/crlhttp.py)
    crl_port: int = 0
    #: `serve --api-port`: 0 (default) any free port, so test hubs never contend for 8444; None: not passed
    api_port: int | None = 0
    proc: subprocess.Popen | None = None
    stdout_path: Path | None = None
    stderr_path: Path | None = None
    sigterm_redelivered: bool = False

    # paths
    @property
    def root_pem(self) -> Path:
        return self.dir / "ca" / "root.pem"

    @property
    def device_ca_pem(self) -> Path:
        return self.dir / "ca" / "device-ca.pem"

    @property
    def registry_path(self) -> Path:
        return self.dir / "registry.sqlite3"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # CLI
    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """`tessera-hub ARGS --dir <this hub>`."""
        return run_cli(*args, "--dir", str(self.dir), timeout=timeout)

    def cli_ok(self, *args: str) -> str:
        proc = self.cli(*args)
        assert proc.returncode == 0, f"tessera-hub {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
        return proc.stdout

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli_ok(*args, "--json"))

    def add_device(self, device_id: str, *extra: str) -> str:
        """`tessera-hub device add ID`: returns the token (stdout is the token alone)."""
        out = self.cli_ok("device", "add", device_id, *extra)
        token = out.strip()
        assert out == token + "\n" and re.fullmatch(r"[A-Za-z0-9_-]{20,}", token), \
            f"device add should print only the token, got {out!r}"
        return token

    def new_token(self, device_id: str) -> str:
        out = self.cli_ok("device", "token", device_id)
        return out.strip()

    def show(self, device_id: str) -> dict:
        return self.cli_json("device", "show", device_id)

    def device_list(self) -> dict[str, dict]:
        return {row["id"]: row for row in self.cli_json("device", "list", "--all")}

    # database (read directly, for before/after comparisons)
    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        conn = sqlite3.connect(self.registry_path, timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def state(self) -> dict[str, list[dict]]:
        """Everything but the audit log: devices, certificates, tokens (to prove a refusal changed nothing)."""
        return {t: self.query(f"SELECT * FROM {t} ORDER BY rowid") for t in ("devices", "certificates", "tokens")}

    def cert_count(self, device_id: str | None = None) -> int:
        if device_id is None:
            return self.query("SELECT count(*) AS n FROM certificates")[0]["n"]
        return self.query("SELECT count(*) AS n FROM certificates WHERE device_id = ?", (device_id,))[0]["n"]

    def last_audit_id(self) -> int:
        return self.query("SELECT coalesce(max(id), 0) AS n FROM audit")[0]["n"]

    def audit_since(self, after_id: int, api_calls: bool = False) -> list[dict]:
        """Audit rows after `after_id`; without the fleet API's own per-call rows (`api.*`: every CLI command is
        an API call) unless `api_calls`."""
        if api_calls:
            return self.query("SELECT * FROM audit WHERE id > ? ORDER BY id", (after_id,))
        return self.query("SELECT * FROM audit WHERE id > ? AND action NOT LIKE 'api.%' ORDER BY id", (after_id,))

    def wait_audit(self, after_id: int, predicate, timeout: float = 10.0) -> list[dict]:
        """Audit rows after `after_id`, once one matches `predicate` (the hub may write it after answering)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.audit_since(after_id, api_calls=True)
            if any(predicate(r) for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching audit row within {timeout} s; new rows: {rows}")
            time.sleep(0.05)

    # fleet.toml
    def configure(self, **settings: Any) -> None:
        """Change [est]/[issuance] settings in fleet.toml (before `serve`)."""
        path = self.dir / "fleet.toml"
        text = path.read_text()
        for key, value in settings.items():
            rendered = json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
            text, n = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {rendered}", text)
            assert n == 1, f"{key} not found in fleet.toml"
        path.write_text(text)

    # process
    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None, "already started"
        self.port = free_port()
        self.mqtt_port = self.broker_port or free_port()
        while self.mqtt_port == self.port:
            self.mqtt_port = free_port()
        while not self.crl_port or self.crl_port in (self.port, self.mqtt_port):  # set beforehand: that port
            self.crl_port = free_port()
        self.stdout_path, self.stderr_path = self.dir.parent / "serve.stdout", self.dir.parent / "serve.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [hub_binary(), "serve", "--dir", str(self.dir), "--est-port", str(self.port),
                 "--mqtt-port", str(self.mqtt_port), "--host", "127.0.0.1", "--crl-port", str(self.crl_port),
                 *(["--api-port", str(self.api_port)] if self.api_port is not None else [])],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=cli_env(), cwd=ROOT,
                start_new_session=True, preexec_fn=_set_pdeathsig)
        # the announcement: "EST <spaces> https://127.0.0.1:PORT/.well-known/est/ ..."
        needle = f"https://127.0.0.1:{self.port}/.well-known/est/"
        line = re.compile(rf"(?m)^EST\s+{re.escape(needle)}")
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout_path.read_text(errors="replace")
            if line.search(text) and self._accepts():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"tessera-hub serve exited {self.proc.returncode} before announcing EST:\n"
                                     f"{text}\n{self.stderr_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"tessera-hub serve did not announce {needle!r} within {timeout} s:\n{text}")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (process-directed, like kill(1)); returns the exit status within `timeout` s, else SIGKILL and
        AssertionError.

        Guard against a hub bug seen during development (covered by test_hub_cli.py::
        test_sigterm_received_by_another_thread_stops_the_hub): when the kernel handed the SIGTERM to a thread
        other than the main one, `serve` only noticed it at its next 60 s wake-up. If the hub is still running
        after SIGTERM_GRACE s, the SIGTERM is sent again to its main thread (tgkill), `sigterm_redelivered` is set
        and running_hub() emits a warning: shared fixtures stay usable, the dedicated test shows the bug.
        """
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            deadline = time.monotonic() + timeout
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=min(SIGTERM_GRACE, timeout))
            except subprocess.TimeoutExpired:
                self.sigterm_redelivered = True
                with contextlib.suppress(ProcessLookupError):
                    tgkill(proc.pid, proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"tessera-hub serve did not exit within {timeout} s of SIGTERM "
                                     "(killed with SIGKILL)") from None
        return proc.returncode

    def signal_thread(self, tid: int, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to one thread of the hub process (as the kernel may do with a process-directed signal)."""
        tgkill(self.proc.pid, tid, sig)

    def threads(self) -> list[int]:
        """The hub process's thread ids (the main thread's is the pid)."""
        return sorted(int(p.name) for p in Path(f"/proc/{self.proc.pid}/task").iterdir())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path else ""


def init_hub(base: Path, **settings: Any) -> Hub:
    """`tessera-hub init --fleet acme --dir base/hub`, then the fleet.toml `settings`. One EST worker process
    unless `workers` says otherwise: the limits and the denial audit then count exactly as fleet.toml says (with N
    workers each has 1/N of them; tests/integration/test_est_workers.py runs several), and a hub costs one spawn."""
    hub = Hub(dir=Path(base) / "hub")
    proc = run_cli("init", "--fleet", FLEET, "--dir", str(hub.dir))
    assert proc.returncode == 0, proc.stderr
    hub.configure(**{"workers": 1, **settings})
    return hub


@contextlib.contextmanager
def running_hub(base: Path, api_port: int | None = 0, **settings: Any):
    """An initialised, running hub (`serve --api-port api_port`, None: no option); on exit SIGTERM and assert a
    clean exit 0 within 10 s."""
    hub = init_hub(base, **settings)
    hub.api_port = api_port
    hub.start()
    try:
        yield hub
    finally:
        try:
            rc = hub.stop()
        finally:
            hub.kill()
        assert rc == 0, f"tessera-hub serve exited {rc} on SIGTERM:\n{hub.stderr_path.read_text(errors='replace')}"
        if hub.sigterm_redelivered:
            warnings.warn(f"tessera-hub serve ignored a process-directed SIGTERM for {SIGTERM_GRACE} s; it stopped "
                          "once the signal was sent to its main thread (hub/serve/supervisor.py regression, see "
                          "test_sigterm_received_by_another_thread_stops_the_hub)", stacklevel=1)
        assert "hub stopped" in hub.stdout_text()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One running hub shared by a test module (lenient rate limits; tests use distinct device ids)."""
    with running_hub(tmp_path_factory.mktemp("hub"), **LENIENT_LIMITS) as h:
        yield h


@pytest.fixture(scope="module")
def module_token(tmp_path_factory):
    """A SoftHSM2 token for a test module (only ever opened by spawned children)."""
    from hsm.softhsm import create_token

    token = create_token(tmp_path_factory.mktemp("softhsm"), label="tessera")
    try:
        yield token
    finally:
        token.destroy()


# --- keys, CSRs and certificates --------------------------------------------------------------------------------

def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key, cn: str | None, extensions: list[tuple[x509.ExtensionType, bool]] = ()) -> bytes:
    """A DER CSR for `key` with CN=cn (none when cn is None), signed with SHA-256."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def b64_body(der: bytes) -> bytes:
    """An EST request body: base64 DER with CRLF every 64 characters."""
    text = base64.b64encode(der)
    return b"".join(text[i:i + 64] + b"\r\n" for i in range(0, len(text), 64))


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return path


def write_secret_file(path: Path, text: str) -> Path:
    """A file created 0600 from the start (curl -K configs holding a token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def cn_of(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def org_of(cert: x509.Certificate) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]


def eku_of(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


class ForeignCA:
    """A CA that is not the fleet's, impersonating it: same subject as the real device CA (O=acme)."""

    def __init__(self, directory: Path, subject_cn: str = f"{FLEET} Device CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FLEET),
                          x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))

    def client(self, cn: str) -> tuple[Path, Path]:
        """A clientAuth certificate O=acme, CN=cn with a fresh key: (cert path, key path)."""
        key = new_key()
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FLEET),
                                         x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return write_pem(self.dir / f"{cn}.pem", cert), write_key(self.dir / f"{cn}.key", key)


# --- talking to the hub -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def code(self) -> str:
        """The machine code word at the start of an error body ('bad_base64: ...' -> 'bad_base64')."""
        return self.text.split(":", 1)[0] if ":" in self.text else ""


def tls_context(hub: Hub, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client TLS trusting only the fleet root, optionally with a client certificate (file key)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(hub.root_pem))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(hub: Hub, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            cert: Path | None = None, key: Path | None = None, source: str | None = None,
            timeout: float = 20.0) -> Response:
    """One HTTPS request to the hub (stdlib http.client)."""
    conn = http.client.HTTPSConnection("127.0.0.1", hub.port, context=tls_context(hub, cert, key), timeout=timeout,
                                       source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def enroll(hub: Hub, device_id: str, token: str, csr_der: bytes, source: str | None = None) -> Response:
    """POST simpleenroll with Basic device_id:token and a base64 CSR."""
    return request(hub, "POST", f"{EST_PREFIX}/simpleenroll", b64_body(csr_der),
                   {"Content-Type": "application/pkcs10", "Authorization": basic(device_id, token)}, source=source)


def raw_request(hub: Hub, head: bytes, body: bytes = b"", timeout: float = 20.0) -> Response:
    """Send exactly `head` (+ `body`) over TLS and read the answer until the server closes."""
    ctx = tls_context(hub)
    with socket.create_connection(("127.0.0.1", hub.port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(head + body)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    head_part, _, rest = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return Response(status, headers, rest[:length])


def parse_pkcs7(body: bytes) -> list[x509.Certificate]:
    """The certificates of an EST certs-only body, end-entity certificates first. The wire order is no order: the
    PKCS#7 SET OF is sorted by encoding (est/pkcs7.py), so which comes first depends on the certificates' sizes."""
    import est

    def is_ca(cert: x509.Certificate) -> bool:
        try:
            return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            return False

    return sorted(est.parse_certs_only(body), key=is_ca)


def openssl(*args: str, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, timeout=timeout, input=input)


def openssl_verify(hub: Hub, leaf: Path, *extra: str) -> subprocess.CompletedProcess:
    return openssl("verify", "-CAfile", str(hub.root_pem), "-untrusted", str(hub.device_ca_pem), *extra, str(leaf))


# --- token-key TLS in a child process ---------------------------------------------------------------------------

def token_reenroll_child(hub: Hub, cert_chain: Path, key_uri: str, token_cfg, csr_der: bytes,
                         timeout: float = 90.0) -> dict:
    """simplereenroll over mTLS with a token key (hsm.tls.client_context) in `python -m` this module."""
    req = {"op": "reenroll", "url": hub.url, "cafile": str(hub.root_pem), "cert": str(cert_chain),
           "key_uri": key_uri, "token": dataclasses.asdict(token_cfg),
           "csr": base64.b64encode(csr_der).decode()}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.hubfixtures"], input=json.dumps(req),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"child gave no JSON (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from None
    answer["_stderr"] = proc.stderr
    return answer


def _child_reenroll(req: dict) -> dict:
    from agent.estclient import EstClient, EstClientError
    from hsm.tls import client_context
    from hsm.token import TokenConfig

    ctx = client_context(req["cafile"], req["cert"], req["key_uri"], TokenConfig(**req["token"]))
    try:
        certs = EstClient(req["url"], req["cafile"], context=ctx).simplereenroll(base64.b64decode(req["csr"]))
    except EstClientError as exc:
        return {"ok": False, "status": exc.status, "code": exc.code, "error": str(exc)}
    return {"ok": True, "pems": [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]}


def main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        answer = {"reenroll": _child_reenroll}[req["op"]](req)
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which asserts on it)
        answer = {"ok": False, "status": None, "error_type": type(exc).__name__, "error": str(exc)}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
