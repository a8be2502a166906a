"""`tessera-hub audit`: the audit log (newest first, filtered) and `audit verify`, the hash chain's check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from hub.cli.util import DirOpt, HubOpt, JsonOpt, ProfileOpt, api, print_json, print_table, say

audit_app = typer.Typer(help="The audit log: every enroll, renew, revoke, change and denial; `audit verify` checks "
                             "its hash chain.")


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    directory: Optional[Path] = DirOpt,
    device: Optional[str] = typer.Option(None, help="Only rows about this device."),
    actor: Optional[str] = typer.Option(None, help="Only rows by this principal (e.g. svc.alice, est, hub)."),
    action: Optional[str] = typer.Option(None, help="Only rows of this action (e.g. device.revoked)."),
    since: Optional[str] = typer.Option(None, help="Only rows at or after this time (ISO 8601, e.g. 2027-01-31)."),
    limit: int = typer.Option(50, min=1, max=1000, help="How many entries (newest first)."),
    cursor: Optional[str] = typer.Option(None, "--cursor", help="Continue with older rows (the hint)."),
    calls: bool = typer.Option(False, "--calls", help="Also the fleet API's own row for every call (api.*: each "
                                                      "CLI command is one)."),
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Show the audit log: every enroll, renew, revoke, change and denial (newest first; --calls: API calls too)."""
    if ctx.invoked_subcommand is not None:
        return
    from hub.cli.device import _time_opt

    include = calls or (action or "").startswith("api.")
    params = {"device": device, "actor": actor, "action": action, "since": _time_opt(since, "--since"),
              "limit": limit, "cursor": cursor, "api_calls": "include" if include else "exclude"}
    with api(directory, hub, profile) as client:
        page = client.get("/api/v1/audit", params)
    rows = page["items"]
    if as_json:
        print_json(rows)
    else:
        print_table([{**r, "at": r["at"][:19].replace("T", " ")} for r in rows],
                    [("at", "at", 19), ("actor", "actor", 12), ("action", "action", 14), ("device_id", "device", 8),
                     ("outcome", "outcome", 6), ("detail", "detail")])
    if page["next_cursor"]:
        sys.stderr.write(f"more: --cursor {page['next_cursor']}\n")


@audit_app.command("verify")
def verify(
    directory: Optional[Path] = DirOpt,
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Recompute the audit log's hash chain (admin); exit 1 at the first row that does not verify."""
    with api(directory, hub, profile) as client:
        v = client.get("/api/v1/audit/verify", {})
    if as_json:
        print_json(v)
    elif v["ok"]:
        older = f" ({v['before_chain']} older row(s) from before the chain)" if v["before_chain"] else ""
        say(f"audit chain intact: {v['checked']} row(s) verified{older}")
        if v["head_id"] is not None:
            say(f"head: row {v['head_id']} mac {v['head_mac']}")
            say("keep the head: a later head that does not extend it means rows were cut off the end")
    else:
        say(f"audit chain BROKEN at row {v['broken_at']}: {v['why']} ({v['checked']} row(s) before it verify)")
    if not v["ok"]:
        raise typer.Exit(1)
