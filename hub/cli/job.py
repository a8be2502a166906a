"""`tessera-hub job ...`: create, list, show, devices, wait, pause, resume, cancel — a thin client of the fleet API's jobs
(/api/v1/jobs; hub/cli/client.py: the local hub by default, `--hub URL` for a remote one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hub.cli.util import DirOpt, HubOpt, JsonOpt, ProfileOpt, api, command_args, fail, print_json, print_table, say

job_app = typer.Typer(help="Roll a command out over a selector of devices (rate, timeout, abort threshold) and "
                           "follow, pause, resume or cancel it.", no_args_is_help=True)

JOBS = "/api/v1/jobs"
STATES = ("queued", "sent", "acked", "failed", "timed_out", "offline")
LIST_COLUMNS = [("id", "job"), ("name", "name", 12), ("command", "command"), ("state", "state", 9),
                ("progress", "done/total"), ("failed", "failed"), ("created_by", "by", 10), ("created", "created")]
DEVICE_COLUMNS = [("device_id", "device", 12), ("state", "state", 9), ("sent_at", "sent"),
                  ("finished_at", "finished"), ("detail", "detail", 10)]


def parse_args(items: list[str], args_json: Optional[str]) -> dict:
    """--arg key=value (a JSON value when it parses as one: true, 3, "x"; else the text; a bare key is true) and
    --args-json."""
    args: dict = {}
    if args_json is not None:
        try:
            args = json.loads(args_json)
        except ValueError:
            fail("--args-json is not valid JSON")
        if not isinstance(args, dict):
            fail("--args-json must be a JSON object")
    for key, value in command_args(items).items():
        try:
            args[key] = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            args[key] = value
    return args


def selector(ids: list[str], group: Optional[str], label: Optional[str], status: Optional[str],
             online: Optional[bool], id_prefix: Optional[str]) -> dict:
    if ids:
        if any(v is not None for v in (group, label, status, online, id_prefix)):
            fail("--id is a selector by itself: give either --id or filters")
        return {"ids": [i for item in ids for i in item.split(",") if i]}
    sel = {k: v for k, v in (("group", group), ("label", label), ("status", status), ("id_prefix", id_prefix))
           if v is not None}
    if online is not None:
        sel["online"] = "true" if online else "false"
    if not sel:
        fail("select the devices: --id, --group, --label, --status, --online or --id-prefix")
    return sel


def _progress(job: dict) -> dict:
    c = job["counts"]
    done = job["total"] - c["queued"] - c["sent"]
    return {**job, "progress": f"{done}/{job['total']}", "failed": c["failed"] + c["timed_out"],
            "created": (job.get("created") or "")[:16]}


def _show(job: dict) -> None:
    c = job["counts"]
    say(f"job {job['id']}  {job['name']}")
    say(f"  state      {job['state']}" + (f" ({job['reason']})" if job.get("reason") else ""))
    say(f"  command    {job['command']} {json.dumps(job['args'], sort_keys=True)}")
    say(f"  selector   {json.dumps(job['selector'], sort_keys=True)}")
    say(f"  policy     {job['rate_per_minute']}/min, timeout {job['timeout_s']} s, abort > {job['abort_percent']}% "
        f"failed, offline devices: {job['offline']}" + (f" until {job['deadline']}" if job.get("deadline") else ""))
    ramp, extra = job.get("ramp"), []
    if ramp:
        extra.append(f"ramp from {ramp['start_per_minute']}/min x{ramp['factor']} every {ramp['every_acked']} acked")
    if job.get("max_in_flight"):
        extra.append(f"at most {job['max_in_flight']} in flight")
    if job.get("retries"):
        extra.append(f"{job['retries']} retries after a timeout")
    if extra:
        say(f"             {'; '.join(extra)}")
    say(f"  devices    {job['total']}: " + ", ".join(f"{s} {c[s]}" for s in STATES))
    say(f"  created    {job['created']} by {job['created_by']}")
    say(f"  started    {job.get('started') or '-'}")
    say(f"  finished   {job.get('finished') or '-'}")


@job_app.command("create")
def job_create(
    name: str = typer.Argument(..., help="A name for the job (printable ASCII, up to 100 characters)."),
    command: str = typer.Option(..., "--command", help="ping, report, renew or another command the agents know."),
    arg: list[str] = typer.Option([], "--arg", help="Command argument key=value, or key alone for key=true, "
                                                    "e.g. rotate_key (repeatable)."),
    args_json: Optional[str] = typer.Option(None, "--args-json", help="The command's arguments as a JSON object."),
    ids: list[str] = typer.Option([], "--id", help="Device id(s), comma-separated or repeated."),
    group: Optional[str] = typer.Option(None, "--group", help="Devices in this group."),
    label: Optional[str] = typer.Option(None, "--label", help="Devices with this label key=value."),
    status: Optional[str] = typer.Option(None, "--status", help="Devices in this status."),
    online: Optional[bool] = typer.Option(None, "--online/--offline-now", help="Devices connected (or not) now."),
    id_prefix: Optional[str] = typer.Option(None, "--id-prefix", help="Device ids starting with this."),
    rate: float = typer.Option(60, "--rate", help="Devices per minute."),
    timeout: float = typer.Option(60, "--timeout", help="Seconds a device has to ack."),
    abort_percent: float = typer.Option(20, "--abort-percent", help="Abort when more than this % of finished "
                                                                     "devices failed or timed out."),
    min_finished: Optional[int] = typer.Option(None, "--min-finished", help="Finished devices needed before the "
                                                                            "abort rule applies \\[min(total, 10)]."),
    offline: str = typer.Option("fail", "--offline", help="fail: offline devices fail at once; wait: wait for them."),
    deadline: Optional[str] = typer.Option(None, "--deadline", help="With --offline wait: stop waiting then "
                                                                    "(ISO 8601, e.g. 2027-01-31T00:00:00Z)."),
    ramp_start: Optional[float] = typer.Option(None, "--ramp-start", help="Start at this many devices per minute "
                                                                           "and speed up to --rate as devices ack."),
    ramp_factor: float = typer.Option(2.0, "--ramp-factor", help="With --ramp-start: multiply the rate by this ..."),
    ramp_every: int = typer.Option(10, "--ramp-every", help="... for every this many acked devices."),
    max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight", help="Devices sent and not yet answered, "
                                                                              "at most."),
    retries: int = typer.Option(0, "--retries", help="Send a device that timed out again, this many times at most."),
    confirm_count: Optional[int] = typer.Option(None, "--confirm-count", help="The dry run's device count: create "
                                                                              "the job if it still matches."),
    yes: bool = typer.Option(False, "--yes", help="Create it with the count the dry run just found."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Create a job. Without --confirm-count or --yes it is a dry run: it says how many devices match."""
    body = {"name": name, "command": command, "args": parse_args(arg, args_json),
            "selector": selector(ids, group, label, status, online, id_prefix), "rate_per_minute": rate,
            "timeout_s": timeout, "abort_percent": abort_percent, "offline": offline}
    if min_finished is not None:
        body["min_finished"] = min_finished
    if deadline is not None:
        body["deadline"] = deadline
    if ramp_start is not None:
        body["ramp"] = {"start_per_minute": ramp_start, "factor": ramp_factor, "every_acked": ramp_every}
    if max_in_flight is not None:
        body["max_in_flight"] = max_in_flight
    if retries:
        body["retries"] = retries
    with api(directory, hub, profile) as client:
        if confirm_count is None:
            dry = client.post(JOBS, body)
            if not yes:
                if as_json:
                    print_json(dry)
                else:
                    say(f"dry run: {dry['matched']} devices match; create the job with --confirm-count "
                        f"{dry['matched']}")
                return
            confirm_count = dry["matched"]
        job = client.post(JOBS, {**body, "confirm_count": confirm_count})
    if as_json:
        print_json(job)
    else:
        say(f"job {job['id']} created: {job['command']} to {job['total']} devices, state {job['state']}")


@job_app.command("list")
def job_list(
    state: Optional[str] = typer.Option(None, "--state", help="Only jobs in this state."),
    limit: int = typer.Option(50, "--limit", help="How many (newest first)."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Jobs, newest first."""
    if not 1 <= limit <= 1000:
        fail("--limit must be 1-1000")
    params = {"limit": limit, **({"state": state} if state else {})}
    with api(directory, hub, profile) as client:
        items = client.get(JOBS, params)["items"]
    if as_json:
        print_json(items)
        return
    print_table([_progress(j) for j in items], LIST_COLUMNS)


@job_app.command("show")
def job_show(job_id: int = typer.Argument(..., help="Job id."), directory: Optional[Path] = DirOpt,
             hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """One job: spec, state, progress per device state."""
    with api(directory, hub, profile) as client:
        job = client.get(f"{JOBS}/{job_id}")
    if as_json:
        print_json(job)
        return
    _show(job)


@job_app.command("devices")
def job_devices(
    job_id: int = typer.Argument(..., help="Job id."),
    state: Optional[str] = typer.Option(None, "--state", help="Only devices in this state."),
    limit: int = typer.Option(1000, "--limit", help="At most this many devices (by id)."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """A job's devices and where each one is."""
    if limit < 1:
        fail("--limit must be at least 1")
    rows: list[dict] = []
    with api(directory, hub, profile) as client:
        cursor = None
        while len(rows) < limit:
            params = {"limit": min(1000, limit - len(rows)), **({"state": state} if state else {}),
                      **({"cursor": cursor} if cursor else {})}
            page = client.get(f"{JOBS}/{job_id}/devices", params)
            rows += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    if as_json:
        print_json(rows)
        return
    print_table([{**r, "sent_at": (r["sent_at"] or "")[11:19], "finished_at": (r["finished_at"] or "")[11:19]}
                 for r in rows], DEVICE_COLUMNS)


@job_app.command("wait")
def job_wait(
    job_id: int = typer.Argument(..., help="Job id."),
    timeout: float = typer.Option(600, "--timeout", help="Give up after this many seconds (exit 2)."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Wait until a job has finished: exit 0 when it completed, 1 when it was aborted or cancelled, 2 on timeout."""
    import time

    deadline = time.monotonic() + timeout
    with api(directory, hub, profile) as client:
        while True:
            job = client.get(f"{JOBS}/{job_id}")
            if job["state"] in ("completed", "aborted", "cancelled") or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    if as_json:
        print_json(job)
    else:
        _show(job)
    if job["state"] not in ("completed", "aborted", "cancelled"):
        raise typer.Exit(2)
    if job["state"] != "completed":
        raise typer.Exit(1)


def _action(action: str, job_id: int, directory, hub, profile, as_json: bool) -> None:
    with api(directory, hub, profile) as client:
        job = client.post(f"{JOBS}/{job_id}/{action}")
    if as_json:
        print_json(job)
        return
    say(f"job {job['id']}: {job['state']}")


@job_app.command("pause")
def job_pause(job_id: int = typer.Argument(...), directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt,
              profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Stop sending (devices already sent still report)."""
    _action("pause", job_id, directory, hub, profile, as_json)


@job_app.command("resume")
def job_resume(job_id: int = typer.Argument(...), directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt,
               profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """Go on sending."""
    _action("resume", job_id, directory, hub, profile, as_json)


@job_app.command("cancel")
def job_cancel(job_id: int = typer.Argument(...), directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt,
               profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt) -> None:
    """End the job for good (queued devices are not sent)."""
    _action("cancel", job_id, directory, hub, profile, as_json)
