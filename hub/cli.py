"""`tessera-hub`: the fleet manager's command line (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tessera-hub",
    help="Tessera hub: runs your fleet's certificate authorities, device registry, EST enrollment service and "
         "MQTT broker, and manages devices (enroll tokens, suspend, revoke).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the Tessera version."""
    from importlib.metadata import version as _v

    typer.echo(_v("tessera"))


if __name__ == "__main__":
    app()
