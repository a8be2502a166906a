"""`tessera-hub identity ...`: service identities (back ends, operators) — add, list, show and revoke them, as
thin clients of the fleet API (/api/v1/identities; writes need the admin role).

A service identity is the principal `svc.<name>` with one role and a client certificate from the service CA.
`add` makes the key here (a file key in memory, or in a PKCS#11 token with --key-uri) and sends only a CSR: the
private key never crosses the network (the hub decides every field of the certificate). It never leaves half an
identity behind: every local check runs first, the files are written to a private temporary directory, the hub
issues and records the certificate, and only then are the files moved into place (an existing file is never
overwritten). Everything shown is escaped: names, subjects and reasons reach a terminal.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.markup import escape

from hub.cli.util import DirOpt, HubOpt, JsonOpt, ProfileOpt, api, err, print_json, print_table, say
from hub.cli.util import fail as _fail

identity_app = typer.Typer(help="Service identities: client certificates from the service CA for back ends and "
                                "operators (principal svc.<name>, one role).", no_args_is_help=True)

MAX_DAYS = 3650


def _say(text: str) -> None:
    say(text)


def fail(message: str) -> NoReturn:
    """One error line; the message is escaped (it can hold names, paths and subjects)."""
    _fail(message)
    raise AssertionError("unreachable")


@dataclass
class _Target:
    """Where an identity's files go, and the private temporary directory they are written to first."""

    dest: Path
    names: list[str]
    tmp: Path | None = None
    created: list[Path] = field(default_factory=list)  # directories made for it (removed again on failure)

    def check(self) -> None:
        existing = next(p for p in (self.dest, *self.dest.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            fail(f"{existing} exists and is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            fail(f"cannot write to {existing}")
        for n in self.names:
            if (self.dest / n).exists() or (self.dest / n).is_symlink():
                fail(f"{self.dest / n} already exists; refusing to overwrite it")

    def open(self) -> Path:
        import tempfile

        if self.dest.is_dir():  # an existing --out directory: its permissions are the operator's
            self.tmp = Path(tempfile.mkdtemp(prefix=".tessera-identity-", dir=self.dest))
            return self.tmp
        missing = [p for p in (self.dest.parent, *self.dest.parent.parents) if not p.exists()]
        for d in reversed(missing):
            d.mkdir(mode=0o700)
            self.created.append(d)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=self.dest.parent))  # 0700
        return self.tmp

    def install(self) -> None:
        """Move the files into place, never over an existing file."""
        assert self.tmp is not None
        if self.tmp.parent == self.dest:
            for n in self.names:
                os.link(self.tmp / n, self.dest / n)  # FileExistsError rather than a silent overwrite
            shutil.rmtree(self.tmp)
        else:
            os.chmod(self.tmp, 0o700)
            os.rename(self.tmp, self.dest)  # refused if a non-empty directory appeared meanwhile
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break


@dataclass
class _TokenKey:
    """--key-uri: where the identity's key is generated (in a PKCS#11 token, through the spawned key worker)."""

    config: Any  # hsm.token.TokenConfig
    label: str
    key_id: bytes | None
    info: Any = None  # hsm.keys.KeyInfo, once generated

    def uri(self) -> str:
        from hsm.uri import parse

        uri = parse(self.info.uri)
        return str(uri.with_(module_path=self.config.module) if self.config.module else uri)


def _token_key(name: str, key_uri: str, pin_source: str, module: str, softhsm_conf: str) -> _TokenKey:
    from hsm.token import TokenConfig
    from hsm.uri import UriError, parse

    try:
        uri = parse(key_uri)
    except UriError as exc:
        fail(f"--key-uri: {exc}")
    if not uri.token:
        fail("--key-uri must name the token, e.g. pkcs11:token=services")
    if uri.pin_value is not None:
        fail("--key-uri must not carry the PIN (pin-value); give --pin-source file:/path or env:NAME")
    if uri.type not in (None, "private"):
        fail(f"--key-uri names a {uri.type} object; the identity's key is a private key")
    pin = pin_source or uri.pin_source or ""
    if not pin:
        fail("--key-uri needs --pin-source (file:/path, 0600, or env:NAME)")
    cfg = TokenConfig(label=uri.token, pin_source=pin, module=module or uri.module_path or "",
                      softhsm_conf=softhsm_conf)
    return _TokenKey(cfg, uri.object or f"svc.{name}", uri.id)


def _write_files(tmp: Path, name: str, principal: str, issued: dict, key, token: _TokenKey | None) -> None:
    import secrets

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509 import load_pem_x509_certificate

    from hub.ca.authority import _write_new

    service_ca, root = issued["chain"].encode(), issued["root"].encode()
    cert = load_pem_x509_certificate(issued["certificate"].encode())
    if token is None:
        _write_new(tmp / f"{name}.key", key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), 0o600)
    _write_new(tmp / f"{name}.pem", issued["certificate"].encode() + service_ca, 0o644)
    _write_new(tmp / "ca.pem", root, 0o644)
    if token is not None:
        _write_new(tmp / f"{name}.key-uri", (token.uri() + "\n").encode(), 0o644)
        return
    passphrase = secrets.token_urlsafe(24)  # never printed, never in argv: only in the 0600 .pass file
    chain = [load_pem_x509_certificate(service_ca), load_pem_x509_certificate(root)]
    p12 = pkcs12.serialize_key_and_certificates(principal.encode(), key, cert, chain,
                                                serialization.BestAvailableEncryption(passphrase.encode()))
    _write_new(tmp / f"{name}.p12.pass", (passphrase + "\n").encode(), 0o600)
    _write_new(tmp / f"{name}.p12", p12, 0o600)


def _describe(name: str, token: bool) -> dict[str, str]:
    if token:
        return {f"{name}.pem": "certificate + service CA", "ca.pem": "fleet root (verifies the broker)",
                f"{name}.key-uri": "PKCS#11 URI of the key in the token (no PIN)"}
    return {f"{name}.key": "private key (PKCS#8 PEM, 0600)", f"{name}.pem": "certificate + service CA",
            "ca.pem": "fleet root (verifies the broker)",
            f"{name}.p12": "PKCS#12: key + chain, for browsers and tools (0600)",
            f"{name}.p12.pass": "the PKCS#12 passphrase (0600)"}


def _check_name(name: str) -> None:
    from hub.authz.identities import IdentityError, check_identity_name

    try:
        check_identity_name(name)
    except IdentityError as exc:
        fail(str(exc))


@identity_app.command("add")
def identity_add(
    name: str = typer.Argument(..., help="Identity name (a-z, 0-9, '-'); the principal is svc.NAME."),
    role: str = typer.Option(..., "--role", help="telemetry-reader, commander or admin (MQTT); viewer or operator "
                                                 "(fleet API); or a role added with `role set`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory for the files \\[default: <hub dir>/"
                                                                "identities/NAME, created 0700; remote: ./NAME]."),
    days: int = typer.Option(365, "--days", help="Certificate lifetime in days."),
    key_uri: str = typer.Option("", "--key-uri", help="Generate the key inside a PKCS#11 token instead of a file: "
                                                      "pkcs11:token=LABEL[;object=KEY-LABEL]."),
    pin_source: str = typer.Option("", "--pin-source", help="PIN source for --key-uri: file:/path (0600) or "
                                                            "env:NAME."),
    module: str = typer.Option("", "--module", help="PKCS#11 module for --key-uri \\[default: SoftHSM2]."),
    softhsm_conf: str = typer.Option("", envvar="SOFTHSM2_CONF", help="SoftHSM2 config (token directory)."),
    as_json: bool = JsonOpt,
    directory: Optional[Path] = DirOpt,
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
) -> None:
    """Issue a service identity's client certificate from the service CA (for a key made here) and write its files."""
    from hub.authz.policy import service_principal
    from hub.config import hub_dir

    _check_name(name)
    if not 1 <= days <= MAX_DAYS:
        fail(f"--days must be between 1 and {MAX_DAYS}")
    if (pin_source or module) and not key_uri:
        fail("--pin-source and --module go with --key-uri")
    token = _token_key(name, key_uri, pin_source, module, softhsm_conf) if key_uri else None
    principal = service_principal(name)

    recorded = False
    with api(directory, hub, profile) as client:
        default = hub_dir(directory) / "identities" / name if client.target.local_dir else Path(name)
        target = _Target((out_dir or default).absolute(), list(_describe(name, bool(token))))
        if _exists(client, name):
            fail(f"identity {name!r} already exists")
        target.check()
        try:
            key, csr = _key_and_csr(principal, token)
            issued = client.post("/api/v1/identities", {"name": name, "role": role, "days": days, "csr": csr})
            recorded = True
            _write_files(target.open(), name, principal, issued, key, token)
            target.install()
        except BaseException as exc:
            if recorded:
                fail(f"identity {name!r} is recorded, but its files could not be written to {target.dest}: {exc}"
                     + (f"; they are in {target.tmp}" if target.tmp else ""))
            target.discard()
            if token is not None and token.info is not None:
                _forget_token_key(token)
            from hub.ca.authority import CaError
            from hsm.errors import HsmError

            if isinstance(exc, (CaError, HsmError, OSError)):
                fail(str(exc))
            raise
    _report(name, issued, target.dest, token, as_json)


def _exists(client, name: str) -> bool:
    from hub.cli.client import ApiError

    try:
        client.get(f"/api/v1/identities/{name}")
        return True
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise


def _key_and_csr(principal: str, token: _TokenKey | None):
    """The identity's key (a file key in memory, or a new token key) and a PEM CSR proving possession of it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if token is None:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal)]))
               .sign(key, hashes.SHA256()))
        return key, csr.public_bytes(serialization.Encoding.PEM).decode()
    from hsm import worker

    token.info = worker.generate_key(token.config, token.label, "ec-p256", token.key_id)
    der = worker.make_csr(token.config, token.label, token.info.id, principal)
    return None, x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def _forget_token_key(token: _TokenKey) -> None:
    from hsm import worker

    try:
        worker.delete_key(token.config, token.label, token.info.id)
    except Exception as exc:  # noqa: BLE001  (best effort; the operator is told)
        err.print(escape(f"warning: could not delete the new token key {token.info.uri}: {exc}"), highlight=False)


def _report(name: str, issued: dict, dest: Path, token: _TokenKey | None, as_json: bool) -> None:
    files = {n: str(dest / n) for n in _describe(name, bool(token))}
    principal, role = issued["principal"], issued["role"]
    if as_json:
        print_json({"name": name, "principal": principal, "client_id": principal, "role": role,
                    "serial": issued["serial"], "subject": issued["subject"],
                    "not_after": _iso(issued["not_after"]), "dir": str(dest), "files": files,
                    "key_uri": token.uri() if token else None})
        return
    _say(f"identity {name}: principal {principal}, role {role}")
    _say(f"  MQTT client id: {principal}")
    _say(f"  certificate {issued['serial']} expires {_when(issued['not_after'])}Z")
    if token is not None:
        _say(f"  key in the token: {token.uri()}")
    _say(f"  files in {dest}:")
    for n, what in _describe(name, bool(token)).items():
        _say(f"    {n:<{max(map(len, files)) + 2}}{what}")


def _iso(ts: str) -> str:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).isoformat()


# --- list, show, revoke ------------------------------------------------------------------------------------------

@identity_app.command("list")
def identity_list(directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt,
                  profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """List service identities (and the hub's own): principal, role, status, certificate expiry."""
    with api(directory, hub, profile) as client:
        rows = client.get("/api/v1/identities")["items"]
    if as_json:
        print_json(rows)
        return
    print_table([{**r, "cert_not_after": _when(r["cert_not_after"])} for r in rows],
                [("principal", "principal"), ("role", "role"), ("status", "status"),
                 ("cert_not_after", "cert expires")])
    _say(f"{len(rows)} identit{'y' if len(rows) == 1 else 'ies'}")


def _when(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


@identity_app.command("show")
def identity_show(name: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                  hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
                  as_json: bool = JsonOpt) -> None:
    """Everything about one identity: role, status, certificates, recent audit entries."""
    if name != "tessera-hub":
        _check_name(name)
    with api(directory, hub, profile) as client:
        ident = client.get(f"/api/v1/identities/{name}")
    if as_json:
        print_json(ident)
        return
    certs = ident["certificates"]
    fields = {**{k: ident.get(k) for k in ("name", "principal", "kind", "role", "status", "created", "revoked_at",
                                           "description")}, "subject": certs[0]["subject"] if certs else None}
    print_table([{"key": k, "value": v} for k, v in fields.items()], [("key", "identity"), ("value", "")])
    print_table([{**c, "not_before": _when(c["not_before"]), "not_after": _when(c["not_after"])} for c in certs],
                [("serial", "serial"), ("status", "status"), ("not_before", "not before"),
                 ("not_after", "not after")])


@identity_app.command("revoke")
def identity_revoke(name: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                    reason: str = typer.Option("", "--reason", help="keyCompromise, cessationOfOperation, "
                                                                    "superseded or free text (audit log, CRL)."),
                    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
                    as_json: bool = JsonOpt) -> None:
    """Revoke a service identity for good: the broker cuts its sessions and refuses its certificates."""
    from hub.cli.control import NOT_RUNNING_NOTE

    _check_name(name)
    with api(directory, hub, profile) as client:
        ident = client.post(f"/api/v1/identities/{name}/revoke", {"reason": reason})
        running = client.hub_running
    if as_json:
        print_json({**ident, "hub_running": running})
        return
    summary = f"{ident['principal']}: revoked; {ident['revoked_certificates']} certificate(s) revoked"
    if not running:
        summary += "; " + NOT_RUNNING_NOTE
    elif ident["sessions_cut"] is None:
        summary += f"; the running hub did not confirm ({ident['broker_note']}): the broker applies it on its next tick"
    else:
        summary += (f"; enforced by the running broker in {ident['sync_ms']:.0f} ms "
                    f"({ident['sessions_cut']} live session(s) cut)")
    _say(summary)
