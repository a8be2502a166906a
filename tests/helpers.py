"""Test helpers: a file-key CA, process helpers, pkcs11-tool over a pty, and code that runs in child processes.

Two kinds of children:

* functions named ``child_*`` run through ``hsm.worker.run_isolated`` (a spawned process importing this
  module), for python-pkcs11 work on a per-test token;
* ``python -m tests.helpers`` reads one JSON request on stdin and prints one JSON answer on stdout, for the
  TLS stack (hsm.tls loads the token key through pkcs11-provider or the libp11 engine, once per process; the
  route is given to each child explicitly, see child_env and selected_routes).

Neither ever puts a PIN in argv: children read it from the token's pin-source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# --- small utilities -------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the OpenSSL routes a run tests (hsm.tls: pkcs11-provider or the libp11 engine) ------------------------------

ROUTES = ("provider", "engine")   # hsm.tls.available_routes()' order: what the product picks first comes first
ROUTES_ENV = "TESSERA_TEST_ROUTES"
#: What a child must not inherit from the test run's environment: its token and TLS route are given explicitly.
#: ($TESSERA_PKCS11_PROVIDER, where this machine keeps pkcs11-provider, is inherited like PATH.)
_NOT_INHERITED = ("SOFTHSM2_CONF", "TESSERA_TLS_ROUTE", "PKCS11_PROVIDER_MODULE")


def selected_routes() -> tuple[str, ...]:
    """The TLS routes this run tests: $TESSERA_TEST_ROUTES = provider | engine | both (unset: both)."""
    value = os.environ.get(ROUTES_ENV, "").strip() or "both"
    if value == "both":
        return ROUTES
    if value in ROUTES:
        return (value,)
    raise ValueError(f"{ROUTES_ENV} must be one of provider, engine, both; not {value!r}")


def run_route() -> str | None:
    """The route of every TLS child not given one, when the run is forced to one route; None: the product's own
    choice (hsm.tls.choose_route: the best installed route)."""
    routes = selected_routes()
    return routes[0] if len(routes) == 1 else None


def one_tls_route(test):
    """Decorator for a test the route adds nothing to (it never puts the token key into TLS, or picks its routes
    itself): `tls_route` (tests/conftest.py) runs it on the first selected route only (the product's first
    choice), not on each."""
    import pytest

    return pytest.mark.parametrize("tls_route", selected_routes()[:1], indirect=True)(test)


def child_env(route: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a child process: the repository importable, nothing inherited that picks a token or a TLS
    route; TESSERA_TLS_ROUTE is `route`, else the run's forced route (run_route()), else unset."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    pp = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), pp) if p)
    chosen = route or run_route()
    if chosen:
        env["TESSERA_TLS_ROUTE"] = chosen
    env.update(extra)
    return env


def wait_for_text(path: Path, needle: str, timeout: float, proc: subprocess.Popen | None = None) -> str:
    """Poll the file at `path` until it contains `needle`; return its text. Fails on timeout or process exit."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before logging {needle!r}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not seen in {path} within {timeout} s:\n{text}")


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a process we started (its own process group), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def start_server(argv: list[str], log: Path, lifetime: int = 120, **kw) -> subprocess.Popen:
    """Start a server under coreutils `timeout` (so it stops by itself), stdout+stderr to `log`."""
    with open(log, "wb") as fh:
        return subprocess.Popen(["timeout", "-k", "5", str(lifetime), *argv], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kw)


# --- a throwaway CA with file keys -----------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_key(key, path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return path


def write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class CA:
    """An EC P-256 root CA whose key is a file; issues client (clientAuth) and server (serverAuth) certificates."""

    def __init__(self, directory: Path, cn: str = "Tessera Test Root"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = write_cert(self.cert, self.dir / "ca.pem")

    def _issue(self, subject: x509.Name, public_key, eku, san: list | None = None) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_client(self, subject, cn: str | None = None, name: str = "client") -> Path:
        """A clientAuth certificate for a CSR (DER bytes or object), a public key, or a public-key PEM string.

        The subject is `cn` when given, else the CSR's subject. Returns the PEM path (leaf, then the CA).
        """
        if isinstance(subject, (bytes, bytearray)):
            subject = x509.load_der_x509_csr(bytes(subject))
        if isinstance(subject, str):
            subject = serialization.load_pem_public_key(subject.encode())
        if isinstance(subject, x509.CertificateSigningRequest):
            if not subject.is_signature_valid:
                raise ValueError("CSR signature is not valid")
            name_ = _name(cn) if cn else subject.subject
            public_key = subject.public_key()
        else:
            if not cn:
                raise ValueError("give a common name with a bare public key")
            name_, public_key = _name(cn), subject
        cert = self._issue(name_, public_key, ExtendedKeyUsageOID.CLIENT_AUTH)
        path = self.dir / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_file_client(self, cn: str, name: str | None = None) -> tuple[Path, Path]:
        """A clientAuth certificate with a fresh EC P-256 file key: (cert PEM path, key PEM path)."""
        name = name or cn
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(_name(cn), key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH)
        return write_cert(cert, self.dir / f"{name}.pem"), write_key(key, self.dir / f"{name}.key")

    def issue_server(self, name: str = "server") -> tuple[Path, Path]:
        """A serverAuth certificate for 127.0.0.1 / localhost with an EC P-256 file key: (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = self._issue(_name("localhost"), key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, san)
        return write_cert(cert, self.dir / f"{name}.pem"), write_key(key, self.dir / f"{name}.key")


# --- pkcs11-tool with the PIN typed on a pseudo-terminal -------------------------------------------------------

def pkcs11_tool(token, *args: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run `pkcs11-tool --module M --token-label L --login ARGS`, answering the PIN prompt through a pty.

    Returns (exit status, output). The PIN is read from the token's PIN file and only ever written to the pty.
    """
    argv = ["pkcs11-tool", "--module", token.module, "--token-label", token.label, "--login", *args]
    env = dict(os.environ, **token.env)
    pin = token.pin_file.read_text().splitlines()[0]
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                so_far = out.decode(errors="replace").replace(pin, "<PIN>")
                raise AssertionError(f"pkcs11-tool timed out; output so far:\n{so_far}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if not sent and b"PIN" in out:
                # Type the PIN only once the prompt has switched echo off (and flushed pending input),
                # otherwise it is echoed back or thrown away.
                echo_deadline = time.monotonic() + 10
                while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < echo_deadline:
                    time.sleep(0.005)
                os.write(fd, pin.encode() + b"\n")
                sent = True
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace").replace("\r\n", "\n")
    if pin in text:
        raise AssertionError("pkcs11-tool echoed the PIN (output withheld)")
    return os.waitstatus_to_exitcode(status), text


@dataclasses.dataclass
class P11Object:
    kind: str           # e.g. "Private Key Object; EC"
    fields: dict[str, str]

    @property
    def label(self) -> str | None:
        return self.fields.get("label")

    @property
    def id(self) -> str | None:
        return self.fields.get("ID")

    def flags(self, name: str) -> set[str]:
        """A comma-separated field ('Usage', 'Access') as a set of words."""
        value = self.fields.get(name, "")
        return {part.strip() for part in value.split(",") if part.strip() and part.strip() != "none"}


def parse_objects(text: str) -> list[P11Object]:
    """Parse `pkcs11-tool -O` output into objects (header line, then indented 'name: value' lines)."""
    objects: list[P11Object] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if "Object;" in line:
                objects.append(P11Object(line.strip(), {}))
            continue
        if objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1].fields[key.strip()] = value.strip()
    return objects


# --- functions run in a spawned child through hsm.worker.run_isolated ------------------------------------------

def _pem(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def child_export_attempts(cfg, label: str) -> dict[str, tuple[str, str]]:
    """Try every export path on the token key; {attempt: (exception class, message)} ("" when nothing raised)."""
    import copy
    import pickle

    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from hsm.keys import load_private_key
    from hsm.token import open_session

    results: dict[str, tuple[str, str]] = {}

    def attempt(name, fn):
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001  (we report whatever was raised)
            results[name] = (type(exc).__name__, str(exc))
        else:
            results[name] = ("", repr(value)[:80])

    with open_session(cfg) as session:
        key = load_private_key(session, label)
        for name, enc, fmt in (("PEM/PKCS8", serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
                               ("DER/PKCS8", serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
                               ("PEM/TraditionalOpenSSL", serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL)):
            attempt(f"private_bytes/{name}",
                    lambda enc=enc, fmt=fmt: key.private_bytes(enc, fmt, serialization.NoEncryption()))
        attempt("private_numbers", key.private_numbers)
        attempt("pickle", lambda: pickle.dumps(key))
        attempt("deepcopy+private_bytes",
                lambda: copy.deepcopy(key).private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        if isinstance(key, ec.EllipticCurvePrivateKey):
            peer = ec.generate_private_key(key.curve).public_key()
            attempt("ecdh", lambda: key.exchange(ec.ECDH(), peer))
        else:
            assert isinstance(key, rsa.RSAPrivateKey)
            ct = key.public_key().encrypt(b"secret", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
            attempt("rsa_decrypt_oaep",
                    lambda: key.decrypt(ct, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)))
            ct2 = key.public_key().encrypt(b"secret", padding.PKCS1v15())
            attempt("rsa_decrypt_pkcs1", lambda: key.decrypt(ct2, padding.PKCS1v15()))
    return results


def _signing_args(mode: str):
    from cryptography.hazmat.primitives.asymmetric import padding

    if mode == "ec":
        return {}
    if mode == "rsa-pkcs1":
        return {"rsa_padding": padding.PKCS1v15()}
    if mode == "rsa-pss":
        return {"rsa_padding": padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)}
    raise ValueError(mode)


def child_self_signed(cfg, label: str, mode: str, cn: str) -> bytes:
    """A self-signed CA certificate for the token key, built by cryptography's CertificateBuilder (DER)."""
    from hsm.keys import load_private_key
    from hsm.token import open_session

    with open_session(cfg) as session:
        key = load_private_key(session, label)
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256(), **_signing_args(mode))
        )
        return cert.public_bytes(serialization.Encoding.DER)


def child_sign(cfg, label: str, data: bytes, mode: str, hash_name: str = "sha256") -> tuple[bytes, str]:
    """Sign `data` with the token key: (signature, public key PEM as the session sees it)."""
    from cryptography.hazmat.primitives.asymmetric import padding

    from hsm.keys import load_private_key
    from hsm.token import open_session

    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[hash_name]
    with open_session(cfg) as session:
        key = load_private_key(session, label)
        if mode == "ec":
            sig = key.sign(data, ec.ECDSA(algorithm))
        elif mode == "rsa-pkcs1":
            sig = key.sign(data, padding.PKCS1v15(), algorithm)
        elif mode == "rsa-pss":
            sig = key.sign(data, padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH),
                           algorithm)
        else:
            raise ValueError(mode)
        return sig, _pem(key.public_key())


# --- `python -m tests.helpers`: a TLS client in its own process ------------------------------------------------

def run_tls_child(request: dict, timeout: float = 60.0, env: dict[str, str] | None = None,
                  route: str | None = None) -> dict:
    """Run one TLS client request in a fresh interpreter (on `route`, else as child_env says); returns its JSON
    answer (with its stderr)."""
    proc = subprocess.run([PYTHON, "-m", "tests.helpers"], input=json.dumps(request), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env or child_env(route))
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"TLS child gave no JSON (rc={proc.returncode}):\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}") from None
    answer["_stderr"] = proc.stderr
    answer["_returncode"] = proc.returncode
    return answer


def token_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _context(req: dict):
    import ssl

    from hsm.tls import client_context
    from hsm.token import TokenConfig

    ctx = client_context(req["cafile"], req["cert"], req["key_uri"], TokenConfig(**req["token"]))
    if req.get("max_tls"):  # "TLSv1.2": no newer version offered
        ctx.maximum_version = ssl.TLSVersion[req["max_tls"].replace(".", "_")]
    return ctx


def _route(ctx) -> dict:
    from hsm.tls import route_of

    return {"route": route_of(ctx)}


def _op_context(req: dict) -> dict:
    return _route(_context(req))


def _op_https_get(req: dict) -> dict:
    import http.client

    ctx = _context(req)
    conn = http.client.HTTPSConnection(req["host"], req["port"], context=ctx, timeout=20)
    try:
        conn.connect()
        version = conn.sock.version()  # before the response: an HTTP/1.0 server closes the connection after it
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return {"status": resp.status, "body": body, "tls_version": version, **_route(ctx)}
    finally:
        conn.close()


def _op_mqtt_publish(req: dict) -> dict:
    import threading

    import paho.mqtt.client as mqtt

    ctx = _context(req)
    connected = threading.Event()
    result: dict = _route(ctx)

    def on_connect(client, userdata, flags, reason_code, properties):
        result["connect_reason"] = str(reason_code)
        result["connect_failure"] = bool(reason_code.is_failure)
        connected.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=req["client_id"], protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.tls_set_context(ctx)
    client.connect(req["host"], req["port"], keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(20):
            raise TimeoutError("no CONNACK within 20 s")
        if result["connect_failure"]:
            return result
        info = client.publish(req["topic"], req["payload"].encode(), qos=1)
        info.wait_for_publish(timeout=20)
        result["published"] = info.is_published()
        result["rc"] = int(info.rc)
    finally:
        client.disconnect()
        client.loop_stop()
    return result


_OPS = {"context": _op_context, "https_get": _op_https_get, "mqtt_publish": _op_mqtt_publish}


def main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        answer = {"ok": True, **_OPS[req["op"]](req)}
    except Exception as exc:  # noqa: BLE001  (the parent asserts on type and message)
        answer = {"ok": False, "error_type": type(exc).__name__,
                  "error_mro": [c.__name__ for c in type(exc).__mro__], "error": str(exc)}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
