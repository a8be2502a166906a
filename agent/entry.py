"""`tessera-agent` entry point: `run` (the long-lived daemon) starts without the CLI framework.

typer, rich and pydantic add about 14 MB to a process that runs for months on a 512 MB device; `run` needs none
of them. Every other command (and `run --help`) goes through the typer CLI in agent.cli.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def run_daemon(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tessera-agent run", add_help=False)
    ap.add_argument("-c", "--config", type=Path, default=os.environ.get("TESSERA_AGENT_CONFIG"))
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("-v", "--verbose", action="store_true")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print(f"error: unknown option {unknown[0]} (see tessera-agent run --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from hsm.errors import HsmError

    from .config import ConfigError, load
    from .spool import SpoolError
    from .state import StateError
    from .telemetry import TelemetryError

    try:
        from .session import Agent
        from .sessionrenew import RESTART_EXIT, reexec, take_resume

        agent = Agent(load(args.config, args.overrides), resume=take_resume())
        rc = agent.run()
        if rc == RESTART_EXIT:  # a new key this process' PKCS#11 module cannot see (agent.sessionrenew)
            reexec(agent.resume_state())
        return rc
    except (HsmError, ConfigError, StateError, SpoolError, TelemetryError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def version() -> str:
    """The installed package's version (importlib.metadata: no CLI framework needed)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("tessera")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        print(f"tessera-agent {version()}")
        raise SystemExit(0)
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv):
        raise SystemExit(run_daemon(argv[1:]))
    from .cli import app

    app()


if __name__ == "__main__":
    main()
