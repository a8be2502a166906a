"""Benchmarks per token type, SoftHSM2 and TPM 2.0 (swtpm through tpm2-pkcs11): key generation (ec-p256, ec-p384,
rsa-2048), signing, and the mTLS handshake with a TPM key divided by the same with a SoftHSM key.

`./dev.sh bench tokens` (or `python -m bench tokens [--quick]`). The TPM is the test stack
(tests/integration/tpmfixtures.py: swtpm on loopback, tpm2-abrmd on a private D-Bus, a tpm2-pkcs11 store of its
own), started and stopped here; swtpm emulates a TPM in software, so these are software-TPM figures (a hardware
TPM on a Raspberry Pi HAT generates RSA keys in seconds and signs in tens of milliseconds).

How it measures (the machinery of bench.hsm_bench, reused):
- key generation and signing run in spawned children (hsm.worker.run_isolated), many operations in one session;
- handshakes run in a `python -m bench.hsm_bench` child per token type and OpenSSL route (one PKCS#11 module per
  process: the libp11 engine and pkcs11-provider each load one), every handshake a new TCP connection without
  resumption (the client signs once per handshake), alternating the token client with a file-key client. The
  two token types' children alternate in rounds, so drift on a shared machine hits both. Two ratios: the direct
  one (TPM median / SoftHSM median) and the file-normalised one ((TPM / file) / (SoftHSM / file): each token
  against a file key measured in the same child at the same time), which is the steadier on a busy machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.hsm_bench import ROOT, Result, _child_keygen, _child_sign, _env, _MiniCA

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
SIGN_TYPES = (("ec-p256", "ECDSA P-256"), ("ec-p384", "ECDSA P-384"), ("rsa-2048", "RSA-2048 PKCS#1 v1.5"))


@dataclasses.dataclass
class Token:
    kind: str            # "softhsm" | "tpm"
    config: object       # hsm.token.TokenConfig
    env: dict            # what the token's module needs in a child's environment


def _tokens(tmp: Path):
    """(tokens, stop): a SoftHSM2 token and a TPM token on a fresh TPM stack (None, with the reason, if missing)."""
    from hsm.softhsm import create_token
    from tests.integration.tpmfixtures import TpmStack, create_tpm_token, missing_reason

    soft = create_token(tmp / "softhsm", label="bench")
    tokens = [Token("softhsm", soft.config, {"SOFTHSM2_CONF": str(soft.conf)})]
    reason = missing_reason()
    if reason:
        raise RuntimeError(f"no TPM token: {reason}")
    stack = TpmStack(tmp / "tpm-stack").start()
    try:
        tpm = create_tpm_token(stack, tmp / "tpm", label="bench")
    except Exception:
        stack.stop()
        raise
    tokens.append(Token("tpm", tpm.config, tpm.env))
    return tokens, stack.stop


@contextlib.contextmanager
def _token_env(token: Token):
    """The token's environment in place meanwhile (the spawned key workers inherit it)."""
    saved = {k: os.environ.get(k) for k in token.env}
    os.environ.update(token.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_env(token: Token, fn, *args):
    """fn(*args) in a spawned worker with the token's environment."""
    from hsm import worker

    with _token_env(token):
        return worker.run_isolated(fn, *args, timeout=300)


def bench_keygen(tokens: list[Token], n: int) -> list[Result]:
    return [Result(f"keygen {kt}, {t.kind}", _in_env(t, _child_keygen, t.config, kt, n))
            for kt in KEY_TYPES for t in tokens]


def bench_sign(tokens: list[Token], n: int) -> list[Result]:
    from hsm import worker

    results = []
    for key_type, what in SIGN_TYPES:
        for t in tokens:
            label = f"sign-{key_type}"
            with _token_env(t):
                worker.generate_key(t.config, label, key_type)
            results.append(Result(f"sign {what}, {t.kind}", _in_env(t, _child_sign, t.config, label, n)))
    return results


def _handshake_child(req: dict, token: Token, route: str) -> dict:
    env = dict(_env(), **token.env, TESSERA_TLS_ROUTE=route)
    proc = subprocess.run([sys.executable, "-m", "bench.hsm_bench"], input=json.dumps(req), text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"handshake child ({token.kind}, {route}) failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["server_errors"] or out["reused"]:
        raise RuntimeError(f"handshake child ({token.kind}, {route}): server errors {out['server_errors']}, "
                           f"{out['reused']} resumed sessions (the comparison needs full handshakes)")
    return out["samples"]


def bench_tls(tokens: list[Token], tmp: Path, n: int, rounds: int, route: str) -> dict[str, dict[str, list[float]]]:
    """{token kind: {"token": [...], "file": [...]}}: n handshakes per token type and route, in `rounds` rounds."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_dir = tmp / f"ca-{route}"
    ca_dir.mkdir()
    ca = _MiniCA(ca_dir)
    server_cert, server_key = ca.issue_with_file_key("localhost", True, "server")
    file_cert, file_key = ca.issue_with_file_key("bench-file", False, "file-client")
    from hsm import worker

    reqs = {}
    for t in tokens:
        label = f"tls-{route}"
        with _token_env(t):
            info = worker.generate_key(t.config, label, "ec-p256")
            csr = x509.load_der_x509_csr(worker.make_csr(t.config, label, common_name=f"bench-{t.kind}"))
        public = serialization.load_pem_public_key(info.public_key_pem.encode())
        assert csr.is_signature_valid and csr.public_key() == public
        cert = ca.issue(f"bench-{t.kind}", public, False, f"{t.kind}-{route}-client.pem")
        reqs[t.kind] = {"cafile": str(ca.path), "server_cert": str(server_cert), "server_key": str(server_key),
                        "file_cert": str(file_cert), "file_key": str(file_key), "token_cert": str(cert),
                        "key_uri": info.uri, "token": dataclasses.asdict(t.config), "n": max(1, n // rounds),
                        "tls": "1.3", "warmup": 5}
    samples = {t.kind: {"token": [], "file": []} for t in tokens}
    for r in range(rounds):
        for t in (tokens if r % 2 == 0 else tokens[::-1]):
            got = _handshake_child(reqs[t.kind], t, route)
            for side in ("token", "file"):
                samples[t.kind][side] += got[side]
    return samples


def _row(name: str, value: float, unit: str, goal: str = "", ok: bool | None = None) -> dict:
    return {"metric": name, "value": value, "unit": unit, "goal": goal, "pass": ok}


def run(quick: bool = False) -> list[dict]:
    from hsm.tls import available_routes

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-tokens-") as tmpname:
        tmp = Path(tmpname)
        tokens, stop = _tokens(tmp)
        try:
            for r in bench_keygen(tokens, 2 if quick else 5):
                rows.append(_row(f"{r.name} (median)", round(r.median * 1000, 2), "ms"))
            for r in bench_sign(tokens, 50 if quick else 200):
                rows.append(_row(f"{r.name} (median)", round(r.median * 1000, 3), "ms"))
            for route in available_routes():
                s = bench_tls(tokens, tmp, 60 if quick else 300, 2 if quick else 6, route)
                med = {k: {side: statistics.median(v) for side, v in d.items()} for k, d in s.items()}
                for kind in ("softhsm", "tpm"):
                    rows.append(_row(f"TLS 1.3 mTLS handshake, {kind} key, {route} (median)",
                                     round(med[kind]["token"] * 1000, 3), "ms"))
                rows.append(_row(f"mTLS handshake, TPM key / SoftHSM key, {route}",
                                 round(med["tpm"]["token"] / med["softhsm"]["token"], 3), "x"))
                normalised = (med["tpm"]["token"] / med["tpm"]["file"]) / (med["softhsm"]["token"] /
                                                                           med["softhsm"]["file"])
                rows.append(_row(f"mTLS handshake, TPM key / SoftHSM key, {route}, each vs a file key",
                                 round(normalised, 3), "x"))
        finally:
            stop()
    return rows


if __name__ == "__main__":  # spawned workers import __main__; `python -m bench tokens` is the entry point
    print("run: python -m bench tokens", file=sys.stderr)
    raise SystemExit(2)
