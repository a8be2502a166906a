"""Benchmarks for token-backed keys (SoftHSM2): key generation, signing, and full mTLS handshakes.

Every PKCS#11 user runs in its own process, as in the agent: python-pkcs11 work through hsm.worker.run_isolated
(spawned children), the TLS comparison in a ``python -m bench.hsm_bench`` subprocess that holds the token key
through the libp11 engine (hsm.tls.client_context). No PIN is ever in argv: children read the token's PIN file.

The handshake benchmark runs a Python ssl server thread (file key, client certificate required, no session
tickets) and a client in the same subprocess; every handshake is a new TCP connection with no session passed in,
so each one is a full handshake in which the client signs once (CertificateVerify). Token and file clients
alternate so drift (CPU frequency, caches) hits both equally.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Result:
    name: str
    samples: list[float]  # seconds
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


# --- helpers ----------------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF",)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class _MiniCA:
    """A throwaway EC P-256 CA with file keys (enough for the handshake benchmark)."""

    def __init__(self, directory: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = self._name("Tessera Bench Root")
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = self._write_cert(self.cert, "ca.pem")

    @staticmethod
    def _name(cn: str):
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def _write_cert(self, cert, name: str) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.dir / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def _write_key(self, key, name: str) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        return path

    def issue(self, cn: str, public_key, server: bool, name: str) -> Path:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(self._name(cn)).issuer_name(self.cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return self._write_cert(builder.sign(self.key, hashes.SHA256()), name)

    def issue_with_file_key(self, cn: str, server: bool, name: str) -> tuple[Path, Path]:
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        return self.issue(cn, key.public_key(), server, f"{name}.pem"), self._write_key(key, f"{name}.key")


# --- children run through hsm.worker.run_isolated ---------------------------------------------------------------

def _child_keygen(cfg, key_type: str, n: int) -> list[float]:
    from hsm.keys import generate_keypair
    from hsm.token import open_session

    times = []
    with open_session(cfg, rw=True) as session:
        for i in range(n):
            t0 = time.perf_counter()
            generate_keypair(session, f"bench-{key_type}-{i}", key_type)
            times.append(time.perf_counter() - t0)
    return times


def _child_sign(cfg, label: str, n: int) -> list[float]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    from hsm.keys import load_private_key
    from hsm.token import open_session

    with open_session(cfg) as session:
        key = load_private_key(session, label)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            def sign(data):
                return key.sign(data, ec.ECDSA(hashes.SHA256()))
        else:
            def sign(data):
                return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        for i in range(5):  # warm-up
            sign(b"warm-up %d" % i)
        times = []
        for i in range(n):
            data = b"message %d" % i
            t0 = time.perf_counter()
            sign(data)
            times.append(time.perf_counter() - t0)
    return times


# --- the handshake child (python -m bench.hsm_bench) ------------------------------------------------------------

def _server_thread(ctx: ssl.SSLContext, listener: socket.socket, stop: threading.Event, errors: list) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                data = tls.recv(1)
                if data:
                    tls.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            if not stop.is_set():
                errors.append(repr(exc))


def _handshake(ctx: ssl.SSLContext, port: int) -> tuple[float, bool]:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"x")  # the server answers only after verifying our certificate
            if tls.recv(1) != b"x":
                raise RuntimeError("server did not echo")
            reused = tls.session_reused
    return time.perf_counter() - t0, reused


def tls_child(req: dict) -> dict:
    from hsm.tls import client_context
    from hsm.token import TokenConfig

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(req["server_cert"], req["server_key"])
    server.load_verify_locations(req["cafile"])
    server.verify_mode = ssl.CERT_REQUIRED
    server.options |= ssl.OP_NO_TICKET
    server.num_tickets = 0  # TLS 1.3: no tickets, so nothing to resume

    version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[req.get("tls", "1.3")]
    token_ctx = client_context(req["cafile"], req["token_cert"], req["key_uri"], TokenConfig(**req["token"]))
    file_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    file_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    file_ctx.load_verify_locations(cafile=req["cafile"])
    file_ctx.load_cert_chain(req["file_cert"], req["file_key"])
    for ctx in (token_ctx, file_ctx):
        ctx.minimum_version = ctx.maximum_version = version

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(30)  # the server thread ends by itself if the client goes away
    port = listener.getsockname()[1]
    stop, errors = threading.Event(), []
    thread = threading.Thread(target=_server_thread, args=(server, listener, stop, errors), daemon=True)
    thread.start()
    samples: dict[str, list[float]] = {"token": [], "file": []}
    reused = 0
    try:
        for _ in range(req.get("warmup", 10)):
            _handshake(token_ctx, port)
            _handshake(file_ctx, port)
        for i in range(req["n"]):
            order = (("token", token_ctx), ("file", file_ctx)) if i % 2 == 0 else (("file", file_ctx), ("token", token_ctx))
            for name, ctx in order:
                seconds, was_reused = _handshake(ctx, port)
                samples[name].append(seconds)
                reused += was_reused
    finally:
        stop.set()
        listener.close()
        thread.join(5)
    return {"samples": samples, "reused": reused, "server_errors": errors[:5]}


# --- the benchmarks -----------------------------------------------------------------------------------------------

def _token(tmpdir: Path):
    from hsm.softhsm import create_token

    return create_token(tmpdir / "softhsm", label="bench")


def bench_keygen(n: int = 5) -> list[Result]:
    """Key generation time in the token (inside one session), EC P-256 and RSA-2048; plus one worker round trip."""
    from hsm import worker

    results = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        token = _token(Path(tmp))
        try:
            for key_type in ("ec-p256", "rsa-2048"):
                times = worker.run_isolated(_child_keygen, token.config, key_type, n)
                results.append(Result(f"keygen {key_type} (in session)", times))
            spawned = []
            for i in range(3):
                t0 = time.perf_counter()
                worker.generate_key(token.config, f"worker-{i}", "ec-p256")
                spawned.append(time.perf_counter() - t0)
            results.append(Result("keygen ec-p256 (worker.generate_key)", spawned, "incl. process spawn"))
        finally:
            token.destroy()
    return results


def bench_sign(n: int = 300) -> list[Result]:
    """Time per signature with a token key wrapped as a cryptography private key (SHA-256 hashed on the host)."""
    from hsm import worker

    results = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        token = _token(Path(tmp))
        try:
            for key_type, what in (("ec-p256", "ECDSA P-256"), ("rsa-2048", "RSA-2048 PKCS#1 v1.5")):
                worker.generate_key(token.config, f"sign-{key_type}", key_type)
                times = worker.run_isolated(_child_sign, token.config, f"sign-{key_type}", n)
                results.append(Result(f"sign {what}", times))
        finally:
            token.destroy()
    return results


def bench_tls(n: int = 200, tls: str = "1.3") -> list[Result]:
    """Full mTLS handshakes (new connection, no resumption): token client key vs file client key, both EC P-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from hsm import worker

    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        tmpdir = Path(tmp)
        token = _token(tmpdir)
        try:
            ca_dir = tmpdir / "ca"
            ca_dir.mkdir()
            ca = _MiniCA(ca_dir)
            server_cert, server_key = ca.issue_with_file_key("localhost", True, "server")
            file_cert, file_key = ca.issue_with_file_key("bench-file", False, "file-client")
            info = worker.generate_key(token.config, "tls", "ec-p256")
            public = serialization.load_pem_public_key(info.public_key_pem.encode())
            csr = x509.load_der_x509_csr(worker.make_csr(token.config, "tls", common_name="bench-token"))
            assert csr.is_signature_valid and csr.public_key() == public
            token_cert = ca.issue("bench-token", public, False, "token-client.pem")
            req = {"cafile": str(ca.path), "server_cert": str(server_cert), "server_key": str(server_key),
                   "file_cert": str(file_cert), "file_key": str(file_key), "token_cert": str(token_cert),
                   "key_uri": info.uri, "token": dataclasses.asdict(token.config), "n": n, "tls": tls}
            proc = subprocess.run([sys.executable, "-m", "bench.hsm_bench"], input=json.dumps(req), text=True,
                                  capture_output=True, cwd=ROOT, env=_env(), timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"handshake child failed:\n{proc.stderr[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            token.destroy()
    if out["server_errors"]:
        raise RuntimeError(f"server errors: {out['server_errors']}")
    if out["reused"]:
        raise RuntimeError(f"{out['reused']} handshakes resumed a session; the comparison needs full handshakes")
    tok = Result(f"TLS {tls} mTLS handshake, token key", out["samples"]["token"], "libp11 engine, SoftHSM")
    fil = Result(f"TLS {tls} mTLS handshake, file key", out["samples"]["file"], "same server, same CA")
    return [tok, fil]


def tls_ratio(results: list[Result]) -> float:
    token = next(r for r in results if r.name.endswith("token key"))
    file_ = next(r for r in results if r.name.endswith("file key"))
    return token.median / file_.median


def run(quick: bool = False) -> list[dict]:
    """Rows for the combined table (`python -m bench`): keygen, sign and the token/file handshake ratio."""
    keygen = bench_keygen(2 if quick else 5)
    sign = bench_sign(100 if quick else 300)
    tls = bench_tls(100 if quick else 300)
    rows = [{"metric": f"{r.name} (median)", "value": round(r.median * 1000, 3), "unit": "ms", "goal": "",
             "pass": None} for r in [*keygen, *sign, *tls]]
    ratio = tls_ratio(tls)
    rows.append({"metric": "mTLS handshake time, token key / file key (EC P-256)", "value": round(ratio, 3),
                 "unit": "x", "goal": "<= 1.05", "pass": ratio <= 1.05})
    return rows


def main() -> int:
    """Entry point of the handshake child: one JSON request on stdin, one JSON answer on stdout."""
    req = json.loads(sys.stdin.read())
    print(json.dumps(tls_child(req)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
