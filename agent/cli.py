"""`tessera-agent`: the device-side command line (typer)."""

from __future__ import annotations

import typer

from .tokencli import key_app, token_app

app = typer.Typer(
    name="tessera-agent",
    help="Tessera device agent: keeps the device key in a PKCS#11 token, enrolls with the fleet hub over EST "
         "and talks to the hub's MQTT broker over mutual TLS.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(token_app, name="token")
app.add_typer(key_app, name="key")


if __name__ == "__main__":
    app()
