"""`tessera-agent token` and `tessera-agent key`: initialize a token, generate and inspect token keys."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hsm.errors import HsmError
from hsm.keys import DEFAULT_KEY_TYPE, KEY_TYPES, KeyInfo
from hsm.token import TokenConfig, default_module, read_pin

console = Console(soft_wrap=True)
out_console = console
err = Console(stderr=True, soft_wrap=True)

token_app = typer.Typer(help="Initialize PKCS#11 tokens (PINs from files or environment, never from argv).",
                        no_args_is_help=True)
key_app = typer.Typer(help="Generate and inspect key pairs inside the PKCS#11 token.", no_args_is_help=True)

ModuleOpt = typer.Option("", "--module", envvar="TESSERA_PKCS11_MODULE",
                         help="PKCS#11 module path \\[default: the platform's SoftHSM2].")
LabelOpt = typer.Option("tessera", "--token-label", envvar="TESSERA_TOKEN_LABEL", help="Token label.")
PinOpt = typer.Option(..., "--pin-source", envvar="TESSERA_PIN_SOURCE",
                      help="Where the user PIN is: file:/path (mode 0600) or env:NAME.")
ConfOpt = typer.Option("", "--softhsm-conf", envvar="SOFTHSM2_CONF",
                       help="SoftHSM2 config (token directory); `token init` creates a missing one (0600, with "
                            "tokens/ next to it, 0700).")


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _cfg(module: str, label: str, pin_source: str, softhsm_conf: str) -> TokenConfig:
    return TokenConfig(label=label, pin_source=pin_source, module=module, softhsm_conf=softhsm_conf)


def show_key(info: KeyInfo, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps({"token": info.token_label, "label": info.label, "id": info.id.hex(),
                                       "type": info.key_type, "uri": info.uri, "attributes": dict(info.attributes),
                                       "public_key": info.public_key_pem}))
        return
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in (("uri", info.uri), ("token", info.token_label), ("label", info.label),
                        ("id", info.id.hex()), ("type", info.key_type)):
        table.add_row(f"[bold]{name}[/]", value)
    table.add_row("[bold]attributes[/]", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info.attributes))
    console.print(table)
    console.print(info.public_key_pem.rstrip(), highlight=False)


@token_app.command("init")
def token_init(
    label: str = LabelOpt, pin_source: str = PinOpt, module: str = ModuleOpt, softhsm_conf: str = ConfOpt,
    so_pin_source: str = typer.Option("", help="Security Officer PIN source; default: a random SO PIN that is "
                                               "not kept (fine for SoftHSM; keep one for a secure element)."),
) -> None:
    """Initialize the first free token slot with the --token-label label and the user PIN from --pin-source."""
    import os

    from hsm.softhsm import ensure_conf
    from hsm.tokeninit import init_token

    try:
        pin = read_pin(pin_source)
        so_pin = read_pin(so_pin_source) if so_pin_source else secrets.token_hex(16)
        if softhsm_conf and ensure_conf(softhsm_conf):  # after the PINs: a bad PIN source creates nothing
            console.print(f"SoftHSM2 config {softhsm_conf} created (token directory next to it)", highlight=False)
        env = dict(os.environ, **({"SOFTHSM2_CONF": softhsm_conf} if softhsm_conf else {}))
        init_token(module or default_module(), label, so_pin=so_pin, user_pin=pin, env=env)
    except HsmError as exc:
        fail(str(exc))
    console.print(f"token [bold]{label}[/] initialized")


@key_app.command("generate")
def key_generate(
    label: str = typer.Option(..., "--label", help="Label of the new key pair (must not exist yet)."),
    key_type: str = typer.Option(DEFAULT_KEY_TYPE, "--type", help=f"One of {', '.join(KEY_TYPES)}."),
    token_label: str = LabelOpt, pin_source: str = PinOpt, module: str = ModuleOpt, softhsm_conf: str = ConfOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Generate a non-extractable, sign-only key pair inside the token and print its PKCS#11 URI."""
    from hsm.worker import generate_key

    try:
        info = generate_key(_cfg(module, token_label, pin_source, softhsm_conf), label, key_type)
    except HsmError as exc:
        fail(str(exc))
    show_key(info, as_json)


@key_app.command("show")
def key_show(
    label: str = typer.Option(..., "--label", help="Key label."),
    token_label: str = LabelOpt, pin_source: str = PinOpt, module: str = ModuleOpt, softhsm_conf: str = ConfOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a token key: URI, type, security attributes, public key."""
    from hsm.worker import describe_key

    try:
        info = describe_key(_cfg(module, token_label, pin_source, softhsm_conf), label)
    except HsmError as exc:
        fail(str(exc))
    show_key(info, as_json)


@key_app.command("csr")
def key_csr(
    label: str = typer.Option(..., "--label", help="Key label."),
    common_name: str = typer.Option("", "--cn", help="Subject CN to request (the hub decides the final subject)."),
    out: Path = typer.Option(..., "--out", help="Where to write the PEM CSR."),
    token_label: str = LabelOpt, pin_source: str = PinOpt, module: str = ModuleOpt, softhsm_conf: str = ConfOpt,
) -> None:
    """Write a PKCS#10 certificate request signed by the token key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from hsm.worker import make_csr

    try:
        der = make_csr(_cfg(module, token_label, pin_source, softhsm_conf), label, common_name=common_name or None)
    except HsmError as exc:
        fail(str(exc))
    out.write_bytes(x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM))
    console.print(f"CSR written to {out}")
