"""`tessera-hub report expiring`: the certificate expiry report, a thin client of GET /api/v1/reports/expiring
(hub/api/reportroutes.py; the local hub by default, `--hub URL` for a remote one)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from hub.cli.util import DirOpt, HubOpt, JsonOpt, ProfileOpt, api, print_json, print_table, say, table_lines

report_app = typer.Typer(help="Fleet reports (certificate expiry).", no_args_is_help=True)

EXPIRING = "/api/v1/reports/expiring"
COLUMNS = [("device", "device", 12), ("verdict", "verdict", 15), ("expires", "expires", 16), ("left", "days", 5),
           ("online", "online"), ("last_seen", "last seen", 16)]


def _cells(r: dict) -> dict:
    return {"device": r["device"], "verdict": r["verdict"], "expires": r["not_after"][:16].replace("T", " "),
            "left": f"{r['days_left']:.1f}", "online": "yes" if r["online"] else "no",
            "last_seen": (r["last_seen"] or "never")[:16].replace("T", " ")}


@report_app.command("expiring")
def expiring(
    directory: Optional[Path] = DirOpt,
    days: int = typer.Option(14, "--days", min=0, max=3650, help="Certificates expiring within this many days "
                                                                 "(expired ones are listed too)."),
    include_due: bool = typer.Option(False, "--include-due", help="Also devices that will renew by themselves "
                                                                  "(verdict renewal_due)."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="Devices per page."),
    cursor: Optional[str] = typer.Option(None, "--cursor", help="Continue after a previous page (its hint)."),
    every: bool = typer.Option(False, "--all", help="Every listed device (all pages)."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV of every listed device (streamed)."),
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Active devices that will lose their certificate without action, soonest first, and why: expired,
    offline (cannot renew until it reconnects), renewal_overdue (online but failing to renew); with
    --include-due also renewal_due (renews by itself)."""
    params = {"days": days, "include_due": "true" if include_due else None}
    if as_csv:
        with api(directory, hub, profile) as client:
            for chunk in client.stream(EXPIRING, {**params, "format": "csv", "cursor": cursor}):
                sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        return
    rows: list[dict] = []
    shown = 0
    with api(directory, hub, profile) as client:
        while True:
            page = client.get(EXPIRING, {**params, "limit": limit, "cursor": cursor})
            cursor = page["next_cursor"]
            if as_json or not every:
                rows += page["items"]
            else:  # a page at a time: memory stays flat however many are listed
                _print_page(page["items"], header=shown == 0)
            shown += len(page["items"])
            if not every or cursor is None:
                break
    if as_json:
        print_json(rows)
    else:
        if not every:
            _print_page(rows, header=True)
        say(f"{shown} device(s) with a certificate expiring within {days} day(s)" if include_due else
            f"{shown} device(s) lose their certificate within {days} day(s) without action")
    if cursor is not None and not every:
        sys.stderr.write(f"more: --cursor {cursor} (or --all)\n")


def _print_page(rows: list[dict], header: bool) -> None:
    if header:
        print_table([_cells(r) for r in rows], COLUMNS)
    elif rows:
        sys.stdout.write("\n".join(table_lines([_cells(r) for r in rows], COLUMNS)[1:]) + "\n")
