"""`tessera-hub identity ...`: service identities (back ends, operators) — add, list, show and revoke them.

A service identity is the principal `svc.<name>` with one role and a client certificate from the service CA.
`add` never leaves half an identity behind: every check runs first, the files are written to a private temporary
directory, the certificate is recorded in the registry, and only then are the files moved into place (an
existing file is never overwritten). Everything shown is escaped: names, subjects and reasons reach a terminal.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.markup import escape

from hub.cli.util import DirOpt, config, err, errors, now, out, registry
from hub.cli.util import fail as _fail_markup
from hub.config import HubConfig

identity_app = typer.Typer(help="Service identities: client certificates from the service CA for back ends and "
                                "operators (principal svc.<name>, one role).", no_args_is_help=True)

MAX_DAYS = 3650


def _say(text: str) -> None:
    out.print(escape(text), highlight=False)


def fail(message: str) -> NoReturn:
    """One error line; the message is escaped (it can hold names, paths and subjects)."""
    _fail_markup(escape(message))
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


def _write_files(tmp: Path, name: str, principal: str, cfg: HubConfig, cert, key, token: _TokenKey | None) -> None:
    import secrets

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509 import load_pem_x509_certificate

    from hub.ca.authority import _write_new

    pem = serialization.Encoding.PEM
    service_ca = (cfg.ca_dir / "service-ca.pem").read_bytes()
    root = (cfg.ca_dir / "root.pem").read_bytes()
    if token is None:
        _write_new(tmp / f"{name}.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), 0o600)
    _write_new(tmp / f"{name}.pem", cert.public_bytes(pem) + service_ca, 0o644)
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


@identity_app.command("add")
def identity_add(
    name: str = typer.Argument(..., help="Identity name (a-z, 0-9, '-'); the principal is svc.NAME."),
    role: str = typer.Option(..., "--role", help="telemetry-reader, commander or admin (MQTT); viewer or operator "
                                                 "(fleet API); or a role added with `role set`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory for the files [default: <hub dir>/"
                                                                "identities/NAME, created 0700]."),
    days: int = typer.Option(365, "--days", help="Certificate lifetime in days."),
    key_uri: str = typer.Option("", "--key-uri", help="Generate the key inside a PKCS#11 token instead of a file: "
                                                      "pkcs11:token=LABEL[;object=KEY-LABEL]."),
    pin_source: str = typer.Option("", "--pin-source", help="PIN source for --key-uri: file:/path (0600) or "
                                                            "env:NAME."),
    module: str = typer.Option("", "--module", help="PKCS#11 module for --key-uri [default: SoftHSM2]."),
    softhsm_conf: str = typer.Option("", envvar="SOFTHSM2_CONF", help="SoftHSM2 config (token directory)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    directory: Optional[Path] = DirOpt,
) -> None:
    """Issue a service identity's client certificate from the service CA and write its files."""
    from hub.authz.identities import add_identity, check_identity_name, check_role
    from hub.authz.policy import service_principal

    cfg = config(directory)
    reg = registry(cfg)
    try:
        check_identity_name(name)
        check_role(reg, role)
    except errors() as exc:
        fail(str(exc))
    if not 1 <= days <= MAX_DAYS:
        fail(f"--days must be between 1 and {MAX_DAYS}")
    if reg.query("SELECT 1 FROM identities WHERE name = ?", [name]):
        fail(f"identity {name!r} already exists")
    if (pin_source or module) and not key_uri:
        fail("--pin-source and --module go with --key-uri")
    token = _token_key(name, key_uri, pin_source, module, softhsm_conf) if key_uri else None
    principal = service_principal(name)
    target = _Target((out_dir or cfg.root / "identities" / name).absolute(), list(_describe(name, bool(token))))
    target.check()

    recorded = False
    try:
        cert, key = _issue(cfg, principal, days, token)
        _write_files(target.open(), name, principal, cfg, cert, key, token)
        add_identity(reg, name, role, cert, now(), actor="cli")
        recorded = True
        target.install()
    except BaseException as exc:
        if recorded:
            fail(f"identity {name!r} is recorded, but its files could not be moved to {target.dest}: {exc}; "
                 f"they are in {target.tmp}")
        target.discard()
        if token is not None and token.info is not None:
            _forget_token_key(token)
        if isinstance(exc, errors()):
            fail(str(exc))
        raise
    _report(name, principal, role, cert, target.dest, token, as_json)


def _issue(cfg: HubConfig, principal: str, days: int, token: _TokenKey | None):
    """The key (a file key in memory, or a new token key) and its certificate from the service CA."""
    from datetime import timedelta

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from hub.ca.authority import load_ca

    ca = load_ca(cfg.ca_dir, cfg.ca_token)
    try:
        if token is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public = key.public_key()
        else:
            from hsm import worker

            key = None
            token.info = worker.generate_key(token.config, token.label, "ec-p256", token.key_id)
            public = load_pem_public_key(token.info.public_key_pem.encode())
        return ca.issue_identity_cert(public, principal, now(), timedelta(days=days)), key
    finally:
        ca.close()


def _forget_token_key(token: _TokenKey) -> None:
    from hsm import worker

    try:
        worker.delete_key(token.config, token.label, token.info.id)
    except Exception as exc:  # noqa: BLE001  (best effort; the operator is told)
        err.print(escape(f"warning: could not delete the new token key {token.info.uri}: {exc}"), highlight=False)


def _report(name: str, principal: str, role: str, cert, dest: Path, token: _TokenKey | None, as_json: bool) -> None:
    from hub.registry.store import serial_hex

    files = {n: str(dest / n) for n in _describe(name, bool(token))}
    expires = cert.not_valid_after_utc
    if as_json:
        out.print_json(json.dumps({"name": name, "principal": principal, "client_id": principal, "role": role,
                                   "serial": serial_hex(cert.serial_number), "subject": cert.subject.rfc4514_string(),
                                   "not_after": expires.isoformat(), "dir": str(dest), "files": files,
                                   "key_uri": token.uri() if token else None}))
        return
    _say(f"identity {name}: principal {principal}, role {role}")
    _say(f"  MQTT client id: {principal}")
    _say(f"  certificate {serial_hex(cert.serial_number)} expires {expires:%Y-%m-%d %H:%M}Z")
    if token is not None:
        _say(f"  key in the token: {token.uri()}")
    _say(f"  files in {dest}:")
    for n, what in _describe(name, bool(token)).items():
        _say(f"    {n:<{max(map(len, files)) + 2}}{what}")


# --- list, show, revoke ------------------------------------------------------------------------------------------

@identity_app.command("list")
def identity_list(directory: Optional[Path] = DirOpt,
                  as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List service identities (and the hub's own): principal, role, status, certificate expiry."""
    from rich.table import Table

    from hub.authz.identities import list_identities

    rows = list_identities(registry(config(directory)))
    for r in rows:
        r["principal"] = r["name"] if r["kind"] == "hub" else f"svc.{r['name']}"
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("principal", "role", "status", "cert expires")
    for r in rows:
        table.add_row(*(escape(str(v)) for v in (r["principal"], r["role"], r["status"],
                                                  _when(r["cert_not_after"]))),
                      style="red" if r["status"] != "active" else "")
    out.print(table)
    _say(f"{len(rows)} identit{'y' if len(rows) == 1 else 'ies'}")


def _when(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


def _audit_of(reg, principal: str, limit: int = 20) -> list[dict]:
    # identity audit rows name the principal at the start of their detail (names hold no LIKE wildcards)
    return reg.query("SELECT * FROM audit WHERE action LIKE 'identity.%' AND (detail LIKE ? OR detail LIKE ?) "
                     "ORDER BY id DESC LIMIT ?", [f"identity={principal} %", f"identity={principal};%", limit])


@identity_app.command("show")
def identity_show(name: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                  as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Everything about one identity: role, status, certificates, recent audit entries."""
    from rich.table import Table

    from hub.authz.identities import get_identity

    reg = registry(config(directory))
    try:
        ident = get_identity(reg, name)
    except errors() as exc:
        fail(str(exc))
    ident["audit"] = _audit_of(reg, ident["principal"])
    if as_json:
        out.print_json(json.dumps(ident))
        return
    certs = ident["certificates"]
    t = Table(show_header=False, box=None)
    fields = {**{k: ident.get(k) for k in ("name", "principal", "kind", "role", "status", "created", "revoked_at",
                                           "description")}, "subject": certs[0]["subject"] if certs else None}
    for key, value in fields.items():
        t.add_row(f"[bold]{key}[/]", escape(str(value or "-")))
    out.print(t)
    ct = Table("serial", "status", "not before", "not after")
    for c in certs:
        ct.add_row(*(escape(v) for v in (c["serial"][:20] + "…", c["status"], _when(c["not_before"]),
                                         _when(c["not_after"]))))
    out.print(ct)


@identity_app.command("revoke")
def identity_revoke(name: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                    reason: str = typer.Option("", "--reason", help="keyCompromise, cessationOfOperation, "
                                                                    "superseded or free text (audit log, CRL).")) -> None:
    """Revoke a service identity for good: the broker cuts its sessions and refuses its certificates."""
    from hub.serve import admin
    from hub.authz.identities import revoke_identity

    cfg = config(directory)
    reg = registry(cfg)
    try:
        ident = revoke_identity(reg, name, now(), actor="cli", reason=reason)
    except errors() as exc:
        fail(str(exc))
    n = sum(1 for c in ident["certificates"] if c["revoked_at"] == ident["revoked_at"])
    summary = f"{ident['principal']}: revoked; {n} certificate(s) revoked"
    try:  # the doorbell: the plugin also finds the change by itself within about 100 ms
        sync = admin.call(cfg.admin_socket, {"op": "authz_sync"}, timeout=5)
        summary += f"; enforced by the running broker in {sync['ms']:.0f} ms ({sync['kicked']} live session(s) cut)"
    except admin.AdminUnavailable:
        summary += "; the hub is not running: recorded, the broker enforces it from the registry when it starts"
        _publish_service_crl(cfg, reg)
    except admin.AdminError as exc:
        summary += f"; the running hub did not confirm ({exc}): the broker applies it on its next tick"
    _say(summary)


def _publish_service_crl(cfg: HubConfig, reg) -> None:
    """Offline: re-issue the service CRL now (for third parties; a running hub does this in the background)."""
    from hub.ca.authority import load_ca
    from hub.ca.revocation import publish_service_crl

    try:
        ca = load_ca(cfg.ca_dir, cfg.ca_token)
        try:
            publish_service_crl(ca, reg, cfg.crl_dir, now(), force=True)
        finally:
            ca.close()
    except errors() as exc:
        err.print(escape(f"warning: the service CRL was not re-issued ({exc}); the hub does it when it starts"),
                  highlight=False)
