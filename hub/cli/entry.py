"""`tessera-hub` entry point: suspend / resume / revoke through a running hub start without the CLI framework.

Cutting a stolen device off is the one command where start-up time is the operator's latency: typer (with
pydantic), rich, cryptography and sqlite-utils cost about half a second before the first byte reaches the hub.
With a hub running, `device suspend|resume|revoke ID [--reason R] [--dir D]` needs only the admin socket; anything
else (help, bad arguments, no hub running: the offline path) goes through the typer CLI in hub.cli.main, unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

_STATUS = {"suspend": ("suspended", "suspended by operator"), "resume": ("active", "resumed by operator"),
           "revoke": ("revoked", None)}


def status_fast_path(argv: list[str]) -> int | None:
    """Exit code if this was a status change the running hub handled; None to hand the command to typer."""
    if len(argv) < 3 or argv[0] != "device" or argv[1] not in _STATUS or {"-h", "--help"} & set(argv):
        return None
    ap = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    ap.add_argument("device_id")
    ap.add_argument("--dir", dest="directory")
    ap.add_argument("--reason")
    try:
        args, unknown = ap.parse_known_args(argv[2:])
    except argparse.ArgumentError:
        return None
    status, default_reason = _STATUS[argv[1]]
    reason = default_reason if argv[1] == "resume" else (args.reason or default_reason)
    if unknown or reason is None or (argv[1] == "resume" and args.reason is not None):
        return None  # typer says what is wrong
    from hub.serve import admin
    from hub.config import ConfigError, hub_dir, load_config
    from hub.cli.control import apply_status_change
    from hub.ca.policy import PolicyError, check_device_id

    os.umask(0o077)
    try:
        check_device_id(args.device_id)
        cfg = load_config(hub_dir(args.directory))
        if not cfg.admin_socket.exists():
            return None
        print(apply_status_change(cfg, args.device_id, status, reason, datetime.now(timezone.utc)))
        return 0
    except admin.AdminUnavailable:
        return None
    except (admin.AdminError, ConfigError, PolicyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main() -> None:
    code = status_fast_path(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    from hub.cli.main import app

    app()


if __name__ == "__main__":
    main()
