"""`tessera-hub` entry point: suspend / resume / revoke go to the fleet API without the CLI framework.

Cutting a stolen device off is the one command where start-up time is the operator's latency: typer (with
pydantic), rich, cryptography and sqlite-utils cost about half a second before the first byte reaches the hub.
`device suspend|resume|revoke ID [--reason R] [--dir D] [--hub URL] [--profile P] [--json]` needs only the stdlib
API client (hub.cli.client: http.client + ssl) and one POST; with no hub running locally the client answers
in-process (the heavy imports then happen, as they must). Anything else (help, bad arguments) goes through the
typer CLI in hub.cli.main, unchanged. `tessera-hub --version` alone is answered here too (package metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_DEFAULT_REASON = {"suspend": "suspended by operator", "resume": "resumed by operator", "revoke": None}


def status_fast_path(argv: list[str]) -> int | None:
    """Exit code if this was a well-formed status change (done through the API); None to hand it to typer."""
    if len(argv) < 3 or argv[0] != "device" or argv[1] not in _DEFAULT_REASON or {"-h", "--help"} & set(argv):
        return None
    ap = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    ap.add_argument("device_id")
    ap.add_argument("--dir", dest="directory")
    ap.add_argument("--reason")
    ap.add_argument("--hub", default=os.environ.get("TESSERA_HUB") or None)
    ap.add_argument("--profile", default=os.environ.get("TESSERA_PROFILE") or None)
    ap.add_argument("--json", dest="as_json", action="store_true")
    try:
        args, unknown = ap.parse_known_args(argv[2:])
    except argparse.ArgumentError:
        return None
    action = argv[1]
    reason = _DEFAULT_REASON[action] if action == "resume" else (args.reason or _DEFAULT_REASON[action])
    if unknown or reason is None or (action == "resume" and args.reason is not None) \
            or args.device_id.startswith("-"):
        return None  # typer says what is wrong
    from hub.cli.client import ApiError, connect
    from hub.cli.control import status_change, summary

    os.umask(0o077)
    try:  # (the API checks the device id: hub.ca.policy would cost this path ~8 ms of imports)
        with connect(args.directory, args.hub, args.profile) as client:
            result = status_change(client, args.device_id, action, reason)
            running = client.hub_running
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.as_json:
        print(json.dumps({**result, "hub_running": running}, indent=2))
    else:
        print(summary(result, running))
    return 0


def version() -> str:
    """The installed package's version (importlib.metadata: no CLI framework needed)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("tessera")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # without typer/rich: a version check costs an interpreter start only
        print(f"tessera-hub {version()}")
        raise SystemExit(0)
    code = status_fast_path(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    from hub.cli.main import app

    app()


if __name__ == "__main__":
    main()
