"""`tessera-hub device ...`: add, list, show, suspend, resume, revoke, decommission and command devices."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Column, Table

from hub.cli.util import DirOpt, config, device_id_arg, err, errors, fail, now, out, registry
from hub.config import HubConfig

device_app = typer.Typer(help="Add, list, inspect, suspend, resume, revoke, decommission and command devices.",
                         no_args_is_help=True)



#: `device list` colours, one per registry status (hub.registry.store.DEVICE_STATUSES).
STATUS_COLOURS = {"pending": "cyan", "active": "green", "suspended": "yellow", "revoked": "red",
                  "decommissioned": "bright_black"}


def _parse_labels(labels: list[str]) -> dict[str, str]:
    result = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"label {item!r} is not key=value")
        result[key] = value
    return result


@device_app.command("add")
def device_add(
    device_id: str = typer.Argument(..., help="Device id: a-z, 0-9 and '-', up to 63 characters."),
    directory: Optional[Path] = DirOpt,
    label: list[str] = typer.Option([], "--label", help="key=value label (repeatable)."),
    group: list[str] = typer.Option([], "--group", help="Group membership (repeatable)."),
) -> None:
    """Register a device and print its one-time enrollment token (alone, on stdout)."""
    cfg = config(directory)
    device_id_arg(device_id)
    reg = registry(cfg)
    try:
        reg.add_device(device_id, cfg.fleet, now(), labels=_parse_labels(label), groups=list(group))
        token = reg.create_token(device_id, now(), cfg.policy.token_ttl)
    except errors() as exc:
        fail(str(exc))
    sys.stdout.write(token + "\n")


@device_app.command("token")
def device_token(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt) -> None:
    """Issue a fresh one-time enrollment token for an existing device (the previous unused one stops working)."""
    cfg = config(directory)
    device_id_arg(device_id)
    try:
        token = registry(cfg).create_token(device_id, now(), cfg.policy.token_ttl)
    except errors() as exc:
        fail(str(exc))
    sys.stdout.write(token + "\n")


def _device_rows(cfg: HubConfig) -> list[dict]:
    rows = []
    for d in registry(cfg).list_devices():
        rows.append({"id": d["id"], "status": d["status"], "online": bool(d["online"]),
                     "last_seen": d["last_seen"], "cert_expires": d.get("cert_not_after"),
                     "groups": d["groups"], "labels": d["labels"]})
    return rows


@device_app.command("list")
def device_list(directory: Optional[Path] = DirOpt,
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List devices: status, online, last seen, certificate expiry."""
    cfg = config(directory)
    rows = _device_rows(cfg)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("device", Column("status", no_wrap=True), "online", "last seen", "cert expires", "groups")
    for r in rows:
        colour = STATUS_COLOURS.get(r["status"], "default")
        table.add_row(r["id"], f"[{colour}]{r['status']}[/]", "yes" if r["online"] else "no",
                      (r["last_seen"] or "-")[:19], (r["cert_expires"] or "-")[:19], ", ".join(r["groups"]))
    out.print(table)
    out.print(f"{len(rows)} device(s)")


@device_app.command("show")
def device_show(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Everything about one device: status, certificates, recent audit entries."""
    cfg = config(directory)
    device_id_arg(device_id)
    reg = registry(cfg)
    try:
        dev = reg.require_device(device_id)
    except errors() as exc:
        fail(str(exc))
    certs = reg.certificates_of(device_id)
    events = reg.audit_log(limit=10, device_id=device_id)
    if as_json:
        out.print_json(json.dumps({"device": dev, "certificates": certs, "audit": events}))
        return
    t = Table(show_header=False, box=None)
    for key in ("id", "fleet", "status", "online", "last_seen", "created", "groups", "labels"):
        t.add_row(f"[bold]{key}[/]", str(dev.get(key)))
    out.print(t)
    ct = Table("serial", "status", "not before", "not after", "sha256")
    for c in certs:
        ct.add_row(c["serial"][:16] + "…", c["status"], c["not_before"][:19], c["not_after"][:19],
                   c["fingerprint_sha256"][:16] + "…")
    out.print(ct)


def _change_status(directory: Optional[Path], device_id: str, status: str, reason: str) -> None:
    from hub.cli.control import apply_status_change

    cfg = config(directory)
    device_id_arg(device_id)
    try:
        result = apply_status_change(cfg, device_id, status, reason, now())
    except errors() as exc:
        fail(str(exc))
    out.print(result)


@device_app.command("suspend")
def device_suspend(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                   reason: str = typer.Option("suspended by operator", help="Why (kept in the audit log).")) -> None:
    """Suspend a device: it can neither enroll nor connect until resumed."""
    _change_status(directory, device_id, "suspended", reason)


@device_app.command("resume")
def device_resume(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt) -> None:
    """Undo a suspension."""
    _change_status(directory, device_id, "active", "resumed by operator")


@device_app.command("revoke")
def device_revoke(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                  reason: str = typer.Option(..., "--reason", help="keyCompromise, cessationOfOperation, "
                                                                   "superseded, affiliationChanged or free text.")) -> None:
    """Revoke a device for good: its certificates go on the CRL and it can never enroll again."""
    _change_status(directory, device_id, "revoked", reason)


@device_app.command("decommission")
def device_decommission(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                        reason: str = typer.Option("decommissioned by operator",
                                                   help="Why (kept in the audit log).")) -> None:
    """Retire a device for good: certificates revoked (cessationOfOperation), tokens void; its record and audit
    trail are kept."""
    _change_status(directory, device_id, "decommissioned", reason)


@device_app.command("send")
def device_send(
    device_id: str = typer.Argument(...),
    command: str = typer.Argument(..., help="ping, report or renew (what the agent implements)."),
    directory: Optional[Path] = DirOpt,
    arg: list[str] = typer.Option([], "--arg", help="key=value argument (repeatable)."),
    wait: float = typer.Option(10.0, help="Seconds to wait for the device's acknowledgement (0: don't)."),
) -> None:
    """Send a command to a connected device through the running hub and print its acknowledgement."""
    import time

    from hub.serve import admin

    cfg = config(directory)
    device_id_arg(device_id)
    args = {k: (v.lower() == "true" if v.lower() in ("true", "false") else v)
            for k, v in _parse_labels(arg).items()}
    try:
        cid = admin.call(cfg.admin_socket, {"op": "send", "device": device_id, "command": command, "args": args})["id"]
        deadline = time.monotonic() + wait
        ack = None
        while wait and time.monotonic() < deadline:
            ack = admin.call(cfg.admin_socket, {"op": "ack", "id": cid})
            if ack:
                break
            time.sleep(0.1)
    except admin.AdminUnavailable:
        fail("the hub is not running (commands need a live broker)")
    except admin.AdminError as exc:
        fail(str(exc))
    if not wait:
        out.print(f"sent {command} to {device_id} (id {cid})")
    elif ack is None:
        fail(f"no acknowledgement from {device_id} within {wait:.0f} s (command id {cid})")
    else:
        sys.stdout.write(json.dumps(ack) + "\n")
        if not ack.get("ok"):
            raise typer.Exit(1)
