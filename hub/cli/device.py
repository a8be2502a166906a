"""`tessera-hub device ...`: add, list, show, edit, token, suspend, resume, revoke, decommission, send — each a thin
client of the fleet API (hub/cli/client.py: the local hub by default, `--hub URL` for a remote one)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from hub.cli.util import (DirOpt, HubOpt, JsonOpt, ProfileOpt, api, command_args, device_id_arg, fail, print_json,
                          print_table, say)

device_app = typer.Typer(help="Add, list, inspect, edit, suspend, resume, revoke, decommission and command devices.",
                         no_args_is_help=True)

DEVICES = "/api/v1/devices"
#: (key, header, minimum width): 80 columns hold a 20-character id, any status whole, last seen to the minute
#: ("live": connected to the broker now)
LIST_COLUMNS = [("id", "device", 20), ("status", "status", 14), ("online", "live"),
                ("last_seen", "last seen", 16), ("cert_expires", "cert until", 10), ("groups", "groups")]


def parse_labels(labels: list[str]) -> dict[str, str]:
    result = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"label {item!r} is not key=value")
        result[key] = value
    return result


#: `device show`'s names for the API's fields (the others: underscores as spaces)
SHOW_NAMES = {"cert_not_after": "cert until"}
_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def when(value: Optional[str], chars: int = 19) -> str:
    """An API timestamp (UTC, ISO 8601) as the tables show it: '2027-01-31 12:00:00' (`chars` of it)."""
    return (value or "-")[:chars].replace("T", " ")


def human(value: object) -> str:
    """A field of a device as a person reads it: lists comma-separated, labels k=v, yes/no, '-' for none,
    timestamps to the second."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(human(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={human(v)}" for k, v in value.items())
    if isinstance(value, str) and _ISO_TIME.match(value):
        return when(value)
    return str(value)


def _row(d: dict) -> dict:
    """A device as the CLI shows it (`cert_expires`: the active certificate's notAfter)."""
    return {"id": d["id"], "status": d["status"], "online": d["online"], "last_seen": d["last_seen"],
            "cert_expires": d.get("cert_not_after"), "created": d.get("created"), "groups": d["groups"],
            "labels": d["labels"]}


def _cells(r: dict) -> dict:
    return {**r, "online": "yes" if r["online"] else "no", "last_seen": (r["last_seen"] or "-")[:16].replace("T", " "),
            "cert_expires": (r["cert_expires"] or "-")[:10], "groups": ", ".join(r["groups"]) or "-"}


OutOpt = typer.Option(None, "--out", help="Write the token to this file (created 0600; an existing file is "
                                          "refused) instead of stdout.", show_default=False)


@device_app.command("add")
def device_add(
    device_id: str = typer.Argument(..., help="Device id: a-z, 0-9 and '-', up to 63 characters."),
    directory: Optional[Path] = DirOpt,
    label: list[str] = typer.Option([], "--label", help="key=value label (repeatable)."),
    group: list[str] = typer.Option([], "--group", help="Group membership (repeatable)."),
    out_file: Optional[Path] = OutOpt,
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Register a device and print its one-time enrollment token (alone, on stdout; or into --out, 0600)."""
    device_id_arg(device_id)
    body = {"id": device_id, "groups": list(group), "labels": parse_labels(label)}
    with _token_out(out_file) as deliver, api(directory, hub, profile) as client:
        result = client.post(DEVICES, body)
        token = result["devices"][0]["token"]
        if as_json:  # with --out, the token goes only into the file
            shown = result["devices"][0] | {"token_expires": result["token_expires"]}
            print_json(shown if out_file is None else {k: v for k, v in shown.items() if k != "token"}
                       | {"token_file": str(out_file)})
            if out_file is None:
                return
        deliver(token)


@contextlib.contextmanager
def _token_out(path: Optional[Path]):
    """Where a token goes: stdout, or a new 0600 file, created before the hub is asked (so a file that cannot be
    made costs no token) and removed again if the call fails."""
    if path is None:
        yield lambda token: sys.stdout.write(token + "\n")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{path} exists; refusing to overwrite a token file")
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}")
    done = False

    def deliver(token: str) -> None:
        nonlocal done
        os.write(fd, (token + "\n").encode())
        done = True

    try:
        yield deliver
    finally:
        os.close(fd)
        if not done:
            path.unlink(missing_ok=True)


@device_app.command("token")
def device_token(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                 out_file: Optional[Path] = OutOpt,
                 hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Issue a fresh one-time enrollment token for an existing device (the previous unused one stops working)."""
    device_id_arg(device_id)
    with _token_out(out_file) as deliver, api(directory, hub, profile) as client:
        result = client.post(f"{DEVICES}/{device_id}/token")
        if as_json:  # with --out, the token goes only into the file
            print_json(result if out_file is None else {k: v for k, v in result.items() if k != "token"}
                       | {"token_file": str(out_file)})
            if out_file is None:
                return
        deliver(result["token"])


def _time_opt(value: Optional[str], option: str) -> Optional[str]:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{option} must be an ISO 8601 date or time, e.g. 2027-01-31 or 2027-01-31T00:00:00Z")
    return (when if when.tzinfo else when.replace(tzinfo=__import__("datetime").timezone.utc)).isoformat()


@device_app.command("list")
def device_list(
    directory: Optional[Path] = DirOpt,
    status: Optional[str] = typer.Option(None, "--status", help="pending, active, suspended, revoked or "
                                                                "decommissioned."),
    group: Optional[str] = typer.Option(None, "--group", help="Members of this group."),
    label: Optional[str] = typer.Option(None, "--label", help="key=value label."),
    online: Optional[bool] = typer.Option(None, "--online/--offline", help="Connected to the broker now, or not.",
                                          show_default=False),
    id_prefix: Optional[str] = typer.Option(None, "--id-prefix", help="Device ids starting with this."),
    expires_before: Optional[str] = typer.Option(None, "--expires-before",
                                                 help="Active certificate expires before this date/time."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, max=1000, help="Devices per page \\[default: 100; "
                                                                                "1000 with --all].",
                                        show_default=False),
    sort: Optional[str] = typer.Option(None, "--sort", help="Order: id (the default), created, last_seen or "
                                                            "cert_expires; a leading '-' reverses it (--sort=-created).",
                                       show_default=False),
    cursor: Optional[str] = typer.Option(None, "--cursor", help="Continue after a previous page (its hint)."),
    every: bool = typer.Option(False, "--all", help="Every matching device (all pages)."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV of every matching device (streamed)."),
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """List devices (filters; a page at a time, --all for every page): status, online, last seen, cert expiry."""
    params = {"status": status, "group": group, "label": label, "online": online, "id_prefix": id_prefix,
              "cert_expires_before": _time_opt(expires_before, "--expires-before"), "sort": sort}
    if as_csv:
        with api(directory, hub, profile) as client:
            for chunk in client.stream(DEVICES, {**params, "format": "csv", "cursor": cursor}):
                sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        return
    limit = limit or (1000 if every else 100)
    rows: list[dict] = []
    shown = 0
    with api(directory, hub, profile) as client:
        while True:
            page = client.get(DEVICES, {**params, "limit": limit, "cursor": cursor})
            batch = [_row(d) for d in page["items"]]
            cursor = page["next_cursor"]
            if every:  # a page at a time: memory stays flat at 1M devices
                (_print_json_page if as_json else _print_page)(batch, first=shown == 0)
            else:
                rows = batch
            shown += len(batch)
            if not every or cursor is None:
                break
    if every and as_json:
        sys.stdout.write("[]\n" if not shown else "\n]\n")
    elif as_json:
        print_json(rows)
    else:
        if not every:
            _print_page(rows, first=True)
        say(f"{shown} device(s)")
    if cursor is not None and not every:
        again = f" --sort={sort}" if sort else ""
        sys.stderr.write(f"more: --cursor {cursor}{again} (or --all)\n")


def _print_json_page(rows: list[dict], first: bool) -> None:
    """One page of a streamed JSON array (`--all --json`): '[' before the first device, ']' after the last."""
    import json

    if rows:
        sys.stdout.write(("[\n" if first else ",\n") + ",\n".join(json.dumps(r) for r in rows))


_widths: list[int] = []


def _print_page(rows: list[dict], first: bool) -> None:
    """A page of the listing; later pages (--all) keep the first page's column widths."""
    from hub.cli.util import table_lines, table_width, table_widths

    cells = [_cells(r) for r in rows]
    if first:
        phantom = {c[0]: "x" * c[2] for c in LIST_COLUMNS if len(c) > 2}  # room for later pages' wider cells
        _widths[:] = table_widths([*cells, phantom], LIST_COLUMNS, table_width())
        print_table(cells, LIST_COLUMNS, _widths)
    elif cells:
        sys.stdout.write("\n".join(table_lines(cells, LIST_COLUMNS, header=False, widths=_widths)) + "\n")


@device_app.command("show")
def device_show(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Everything about one device: status, certificates, recent audit entries."""
    device_id_arg(device_id)
    with api(directory, hub, profile) as client:
        detail = client.get(f"{DEVICES}/{device_id}")
        events = client.get("/api/v1/audit", {"device": device_id, "limit": 10, "api_calls": "exclude"})["items"]
    certs = detail.pop("certificates", [])
    if as_json:
        print_json({"device": detail, "certificates": certs, "audit": events})
        return
    print_table([{"key": SHOW_NAMES.get(k, k.replace("_", " ")), "value": human(v)} for k, v in detail.items()],
                [("key", "device"), ("value", "")])
    if certs:
        print_table([{**c, "not_after": when(c["not_after"], 16)} for c in certs],
                    [("serial", "certificate serial", 16), ("status", "status", 10), ("not_after", "not after", 16),
                     ("revocation_reason", "revocation reason")])
    if events:
        print_table([{**e, "at": when(e["at"])} for e in events],
                    [("at", "at", 19), ("actor", "actor", 12), ("action", "action", 14), ("outcome", "outcome", 6),
                     ("detail", "detail")])


@device_app.command("edit")
def device_edit(
    device_id: str = typer.Argument(...),
    directory: Optional[Path] = DirOpt,
    group: list[str] = typer.Option([], "--group", help="The device's groups: replaces them (repeatable)."),
    no_groups: bool = typer.Option(False, "--no-groups", help="Remove the device from every group."),
    label: list[str] = typer.Option([], "--label", help="The device's key=value labels: replaces them "
                                                        "(repeatable)."),
    no_labels: bool = typer.Option(False, "--no-labels", help="Remove every label."),
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Replace a device's groups and/or labels (group rights change in its live sessions at once)."""
    device_id_arg(device_id)
    body: dict = {}
    if group and no_groups or label and no_labels:
        fail("--group goes without --no-groups, --label without --no-labels")
    if group or no_groups:
        body["groups"] = list(group)
    if label or no_labels:
        body["labels"] = parse_labels(label)
    if not body:
        fail("nothing to change: give --group/--no-groups and/or --label/--no-labels")
    with api(directory, hub, profile) as client:
        detail = client.patch(f"{DEVICES}/{device_id}", body)
    if as_json:
        print_json(detail)
        return
    say(f"{device_id}: groups {', '.join(detail['groups']) or '-'}; labels "
        f"{', '.join(f'{k}={v}' for k, v in detail['labels'].items()) or '-'}")


def _change_status(directory: Optional[Path], hub: Optional[str], profile: Optional[str], device_id: str,
                   action: str, reason: str, as_json: bool) -> None:
    from hub.cli.control import status_change, summary

    device_id_arg(device_id)
    with api(directory, hub, profile) as client:
        result = status_change(client, device_id, action, reason)
        running = client.hub_running
    if as_json:
        print_json({**result, "hub_running": running})
    else:
        say(summary(result, running))


@device_app.command("suspend")
def device_suspend(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                   reason: str = typer.Option("suspended by operator", help="Why (kept in the audit log)."),
                   hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Suspend a device: it can neither enroll nor connect until resumed."""
    _change_status(directory, hub, profile, device_id, "suspend", reason, as_json)


@device_app.command("resume")
def device_resume(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                  hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Undo a suspension."""
    _change_status(directory, hub, profile, device_id, "resume", "resumed by operator", as_json)


@device_app.command("revoke")
def device_revoke(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                  reason: str = typer.Option(..., "--reason", help="keyCompromise, cessationOfOperation, "
                                                                   "superseded, affiliationChanged or free text."),
                  hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Revoke a device for good: its certificates go on the CRL and it can never enroll again."""
    _change_status(directory, hub, profile, device_id, "revoke", reason, as_json)


@device_app.command("decommission")
def device_decommission(device_id: str = typer.Argument(...), directory: Optional[Path] = DirOpt,
                        reason: str = typer.Option("decommissioned by operator",
                                                   help="Why (kept in the audit log)."),
                        hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
                        as_json: bool = JsonOpt) -> None:
    """Retire a device for good: certificates revoked (cessationOfOperation), tokens void; its record and audit
    trail are kept."""
    from hub.cli.control import NOT_RUNNING_NOTE

    device_id_arg(device_id)
    with api(directory, hub, profile) as client:
        result = client.delete(f"{DEVICES}/{device_id}", {"reason": reason})
        running = client.hub_running
    if as_json:
        print_json({**result, "hub_running": running})
        return
    line = f"{device_id}: {result['status']}"
    if result["revoked_serials"]:
        line += f"; {len(result['revoked_serials'])} certificate(s) revoked"
    if not running:
        line += "; " + NOT_RUNNING_NOTE
    elif result["sessions_cut"]:
        line += f"; {result['sessions_cut']} live session(s) cut"
    say(line)


@device_app.command("send")
def device_send(
    device_id: str = typer.Argument(...),
    command: str = typer.Argument(..., help="ping, report or renew (what the agent implements)."),
    directory: Optional[Path] = DirOpt,
    arg: list[str] = typer.Option([], "--arg", help="Command argument key=value, or key alone for key=true, e.g. "
                                                    "rotate_key (repeatable)."),
    wait: float = typer.Option(10.0, help="Seconds to wait for the device's acknowledgement (0: don't; at most "
                                          "30)."),
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
) -> None:
    """Send a command to a connected device through the running hub and print its acknowledgement (JSON)."""
    import json

    device_id_arg(device_id)
    args = {k: (v.lower() == "true" if isinstance(v, str) and v.lower() in ("true", "false") else v)
            for k, v in command_args(arg).items()}
    if not 0 <= wait <= 30:
        fail("--wait must be between 0 and 30 seconds")
    with api(directory, hub, profile) as client:
        result = client.post(f"{DEVICES}/{device_id}/commands", {"command": command, "args": args, "wait_s": wait})
        if not client.hub_running:
            fail("the hub is not running (commands need a live broker)")
    ack = result.get("ack") if isinstance(result, dict) else None
    if not wait:
        say(f"sent {command} to {device_id} (id {result.get('id')})")
    elif ack is None:
        fail(f"no acknowledgement from {device_id} within {wait:.0f} s (command id {result.get('id')})")
    else:
        sys.stdout.write(json.dumps(ack) + "\n")
        if not ack.get("ok"):
            raise typer.Exit(1)
