"""`tessera-agent`: the device-side command line (typer)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from .tokencli import err, fail, key_app, out_console, token_app

app = typer.Typer(
    name="tessera-agent",
    help="Tessera device agent: keeps the device key in a PKCS#11 token, enrolls with the fleet hub over EST "
         "and talks to the hub's MQTT broker over mutual TLS.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(token_app, name="token")
app.add_typer(key_app, name="key")


def _print_version(value: bool) -> None:
    if value:
        from .entry import version

        sys.stdout.write(f"tessera-agent {version()}\n")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                            help="Print the version (from the installed package) and exit.")) -> None:
    pass



# help strings are Rich markup: a default named in one is written \[default: ...] or Rich eats it as a tag
ConfigOpt = typer.Option(None, "--config", "-c", envvar="TESSERA_AGENT_CONFIG",
                         help="Agent configuration file \\[default: /etc/tessera/agent.toml].", show_default=False)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Log debug messages too (to stderr).")
PinSourceOpt = typer.Option("", "--pin-source", help="Where the token's user PIN is: file:/path (0600) or env:NAME "
                                                     "\\[default: token.pin_source from the config].")
SetOpt = typer.Option([], "--set", help="Override a configuration key: key=value or section.key=value "
                                        "(repeatable).")


def _config_path(config: Optional[Path]) -> Path:
    from .config import config_path

    return config_path(config)


def _known_device_id(token_file: Path, state: Path) -> str:
    """The device id a factory bundle (agent.toml next to the token file) or an earlier enrollment names; ''."""
    import tomllib

    from .state import load_identity

    try:
        bundle = tomllib.loads((token_file.parent / "agent.toml").read_text())
        if isinstance(bundle.get("device_id"), str) and bundle["device_id"]:
            return bundle["device_id"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    try:
        ident = load_identity(state)
    except _errors():
        return ""
    return ident.device_id if ident else ""


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _cfg(config: Optional[Path], overrides: list[str], missing_ok: bool = False):
    from .config import ConfigError, load

    try:
        return load(config, overrides, missing_ok=missing_ok)
    except ConfigError as exc:
        fail(str(exc))


def _errors():
    from hsm.errors import HsmError

    from .config import ConfigError
    from .enroll import EnrollError
    from .spool import SpoolError
    from .state import StateError
    from .telemetry import TelemetryError

    return (HsmError, ConfigError, EnrollError, StateError, SpoolError, TelemetryError, OSError)


@app.command()
def enroll(
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="The one-time enrollment token (0600); "
                                                                         "destroyed after a successful enrollment."),
    birth_cert: bool = typer.Option(False, "--birth-cert", help="Enroll with the factory birth certificate in the "
                                                                "token (IEEE 802.1AR IDevID, token.key_label) "
                                                                "instead of a token file; the hub names the device."),
    hub: str = typer.Option("", "--hub", help="Hub EST URL, e.g. https://hub:8443 "
                                              "\\[default: hub_url from the config]."),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", help="The fleet root CA certificate (PEM)."),
    ca_fingerprint: str = typer.Option("", "--ca-fingerprint", help="Or: the fleet root's SHA-256 fingerprint "
                                                                    "to pin (fetched from /cacerts)."),
    device_id: str = typer.Option("", "--device-id", help="Device id, as given to `tessera-hub device add` "
                                                          "\\[default: device_id from the config, else from the "
                                                          "agent.toml next to the token file (a factory bundle), "
                                                          "else from the identity of an earlier enrollment]."),
    pin_source: str = PinSourceOpt,
    config: Optional[Path] = ConfigOpt, overrides: list[str] = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Generate the device key in the token, get a certificate from the hub (EST) and store it."""
    from .enroll import AlreadyEnrolled, enroll as do_enroll, enroll_birth

    _logging(verbose)
    if birth_cert == (token_file is not None):
        fail("give --token-file (a one-time enrollment token) or --birth-cert (the factory birth certificate)")
    extra = [f"hub_url={hub}"] if hub else []
    extra += [f"device_id={device_id}"] if device_id else []
    extra += [f"token.pin_source={pin_source}"] if pin_source else []
    cfg = _cfg(config, [*overrides, *extra], missing_ok=True)
    if ca_file is None and not ca_fingerprint and Path(cfg.ca_file).is_file():
        ca_file = Path(cfg.ca_file)  # the fleet root shipped in the factory bundle
    if not birth_cert and not cfg.device_id:
        found = _known_device_id(token_file, cfg.state)
        if not found:
            fail("no device id: give --device-id (the id given to `tessera-hub device add`) or set device_id in "
                 f"the agent configuration ({_config_path(config)})")
        cfg = _cfg(config, [*overrides, *extra, f"device_id={found}"], missing_ok=True)
    try:
        ident = (enroll_birth(cfg, ca_file, ca_fingerprint or None) if birth_cert
                 else do_enroll(cfg, token_file, ca_file, ca_fingerprint or None))
    except AlreadyEnrolled as exc:
        out_console.print(str(exc))
        return
    except _errors() as exc:
        fail(str(exc))
    how = " with its birth certificate" if birth_cert else ""
    out_console.print(f"enrolled [bold]{ident.device_id}[/]{how}: certificate {ident.serial[:16]}… valid until "
                      f"{ident.not_after[:19]}Z; key {ident.key_uri}")
    if birth_cert:  # the hub chose the device id (from the factory batch): the written config names it
        cfg = _cfg(config, [*overrides, *extra, f"device_id={ident.device_id}"], missing_ok=True)
    _write_missing_config(_config_path(config), cfg)


@app.command()
def bootstrap(
    bundle: Path = typer.Option(..., "--bundle", help="The device's factory bundle (from `tessera-hub bundle`): "
                                                      "agent.toml, fleet-root.pem, enroll-token."),
    config: Optional[Path] = ConfigOpt, overrides: list[str] = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """From a factory bundle to an enrolled device: PIN file, SoftHSM2 token, key, enrollment, agent.toml.

    Each step runs only if it is still to do, so a re-run changes nothing (and says so)."""
    from .bootstrap import BootstrapError, bootstrap as do_bootstrap

    _logging(verbose)
    path = _config_path(config)
    try:
        report = do_bootstrap(bundle, path, overrides)
    except BootstrapError as exc:
        fail(str(exc))
    for line in report.lines:
        sys.stdout.write(f"  {line}\n")
    if not report.changed:
        sys.stdout.write("bootstrap: everything was in place; nothing changed\n")
    run_cmd = "systemctl enable --now tessera-agent" if path == Path("/etc/tessera/agent.toml") else \
        f"tessera-agent run --config {path}"
    sys.stdout.write(f"next: {run_cmd}   (then: tessera-agent status --config {path})\n")


def _write_missing_config(path: Path, cfg) -> None:
    """Enrolled without a configuration file (options only): write one, so `run` and `status` find the same
    settings (hub, device id, token, PIN source)."""
    from .config import save

    if path.exists():
        return
    try:
        save(cfg, path, "enroll")
    except OSError as exc:
        err.print(f"warning: cannot write {path} ({exc.strerror or exc}); `run` and `status` need these settings "
                  "there (or the same options again)", highlight=False)
        return
    out_console.print(f"wrote {path}: `tessera-agent run` and `status` use it", highlight=False)


@app.command()
def run(config: Optional[Path] = ConfigOpt, overrides: list[str] = SetOpt,
        verbose: bool = VerboseOpt) -> None:
    """Run the MQTT session: telemetry, commands, store-and-forward, renewal. Stops cleanly on SIGTERM."""
    from .session import Agent

    _logging(verbose)
    cfg = _cfg(config, overrides)
    try:
        code = Agent(cfg).run()
    except _errors() as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command()
def renew(rotate_key: bool = typer.Option(False, "--rotate-key", help="Generate a fresh token key first."),
          pin_source: str = PinSourceOpt,
          wait: float = typer.Option(30.0, "--wait", min=0.0, help="Seconds to wait for a running agent to "
                                                                  "switch its session to the new certificate."),
          config: Optional[Path] = ConfigOpt, overrides: list[str] = SetOpt, verbose: bool = VerboseOpt) -> None:
    """Renew the certificate now (EST simplereenroll over mTLS with the current certificate); a running agent
    switches its session to the new certificate within seconds, and this says whether it did."""
    from .enroll import renew as do_renew

    _logging(verbose)
    cfg = _cfg(config, [*overrides, *([f"token.pin_source={pin_source}"] if pin_source else [])])
    try:
        ident = do_renew(cfg, rotate_key=rotate_key)
    except _errors() as exc:
        fail(str(exc))
    out_console.print(f"renewed: certificate {ident.serial[:16]}… valid until {ident.not_after[:19]}Z"
                      + (f"; new key {ident.key_uri}" if rotate_key else ""), highlight=False)
    out_console.print(_running_agent_switch(cfg.state, ident.serial, wait), highlight=False)


def _running_agent_switch(state: Path, serial: str, wait: float) -> str:
    """Whether the agent running on `state` reconnected with certificate `serial` within `wait` s (status.json:
    the session's certificate, written when it is online)."""
    import time

    from .state import read_status

    st = read_status(state)
    pid = st.get("pid")
    if not _alive(pid) or st.get("state") in ("stopped", "failed"):
        return "no agent is running: `tessera-agent run` will use the new certificate"
    deadline = time.monotonic() + wait
    while True:
        st = read_status(state)
        if st.get("pid") == pid and st.get("session_serial") == serial and st.get("state") == "online":
            return f"the running agent (pid {pid}) switched its session to the new certificate"
        if time.monotonic() >= deadline or not _alive(pid):
            return (f"the running agent (pid {pid}) has not switched yet (state {st.get('state', 'unknown')}); it "
                    "uses the new certificate from its next connection")
        time.sleep(0.1)


@app.command()
def status(config: Optional[Path] = ConfigOpt, overrides: list[str] = SetOpt,
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Identity, certificate expiry, key URI, connection state and spool depth."""
    from .config import config_path
    from .state import SPOOL, load_identity, read_status

    cfg = _cfg(config, overrides)
    try:
        ident = load_identity(cfg.state)
    except _errors() as exc:
        fail(str(exc))
    path = config_path(config)
    if ident is None and not path.exists():  # nothing configured, nothing enrolled: an empty table says nothing
        fail(f"no agent configuration: {path} does not exist (give --config FILE or set TESSERA_AGENT_CONFIG), "
             f"and {cfg.state} holds no enrolled identity; see README 'Enroll a device'")
    st = read_status(cfg.state)
    running = _alive(st.get("pid")) and st.get("state") != "stopped"
    depth = st.get("spool_depth") if running else None  # the running agent holds the spool locked
    if not running and (cfg.state / SPOOL).exists():
        import sqlite3

        try:
            with sqlite3.connect(f"file:{cfg.state / SPOOL}?mode=ro", uri=True) as db:
                depth = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        except sqlite3.Error:
            depth = None
    now = datetime.now(timezone.utc)
    data = {
        "device_id": ident.device_id if ident else cfg.device_id or None,
        "enrolled": ident is not None,
        "cert_serial": ident.serial if ident else None,
        "cert_not_after": ident.not_after if ident else None,
        "cert_expired": bool(ident and datetime.fromisoformat(ident.not_after) <= now),
        "key_uri": ident.key_uri if ident else None,
        "connection": st.get("state", "not running") if running or st.get("state") == "stopped" else
        (f"not running (last state: {st['state']})" if st.get("state") else "not running"),
        "pid": st.get("pid") if running else None,
        "since": st.get("since"), "last_error": st.get("last_error") or None,
        # the broker and the MQTT protocol of the current (or, stopped, the last) connection: "5" or "3.1.1"
        "broker": st.get("broker"), "mqtt_protocol": st.get("mqtt_protocol"),
        "spool_depth": depth,
    }
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for key, value in data.items():
        out_console.print(f"[bold]{key:15}[/] {value if value is not None else '-'}", highlight=False)



@app.command("tls-config")
def tls_config(out: Path = typer.Option(..., "--out", help="Directory for openssl-pkcs11.cnf (0600) and "
                                                             "device-key.pem (the key's URI file)."),
               config: Optional[Path] = ConfigOpt, overrides: list[str] = SetOpt) -> None:
    """Files and command lines for mosquitto_pub / openssl s_client with the device key (pkcs11-provider)."""
    import os

    from . import tlsconfig
    from .state import CERT, ROOT, load_identity

    cfg = _cfg(config, overrides)
    try:
        ident = load_identity(cfg.state)
    except _errors() as exc:
        fail(str(exc))
    if ident is None:
        fail(f"{cfg.state} holds no enrolled identity: run `tessera-agent enroll` first")
    from hsm.tls import provider_path

    provider = provider_path()
    if provider is None:
        fail("pkcs11-provider is not installed (apt-get install pkcs11-provider; Debian 12: from "
             "bookworm-backports); see docs/tokens.md")
    tok = cfg.token_config
    setup = tlsconfig.tool_setup(out, device_id=ident.device_id, key_uri=ident.key_uri, module=tok.module_path,
                                 softhsm_conf=tok.softhsm_conf or "", cert=cfg.state / CERT, ca=cfg.state / ROOT,
                                 host=cfg.broker_host, port=cfg.mqtt_port)
    setup.env.update({k: os.environ[k] for k in tlsconfig.MODULE_ENV if os.environ.get(k)})
    try:
        tlsconfig.write(setup, ident.key_uri, tok.module_path, tok.pin_source, provider)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    sys.stdout.write(f"wrote {setup.conf_path} and {setup.key_path} (run this again after a key rotation)\n"
                     f"publish:   {setup.shell(setup.mosquitto_pub)}\n"
                     f"handshake: {setup.shell(setup.s_client)}\n")

def _alive(pid) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    app()
