"""`tessera-hub`: the fleet manager's command line (typer + rich)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import typer
from hub.cli.util import (DirOpt, HubOpt, JsonOpt, ProfileOpt, api, config, device_id_arg, err, errors, fail, now,
                          out, print_json, registry, say)
from hub.config import hub_dir
from hub.cli.audit import audit_app
from hub.cli.broker import broker_app
from hub.cli.device import device_app
from hub.cli.identity import identity_app
from hub.cli.job import job_app
from hub.cli.manufacturer import manufacturer_app
from hub.cli.role import role_app
from hub.cli.report import report_app
from hub.cli.watch import watch
from hub.ca.policy import PolicyError

app = typer.Typer(
    name="tessera-hub",
    help="Tessera hub: runs your fleet's certificate authorities, device registry, EST enrollment service and "
         "MQTT broker, and manages devices (enrollment tokens, suspend, revoke).",
    no_args_is_help=True,
    add_completion=False,
)
BATCH = 10_000  # devices per POST /api/v1/devices (the API's limit, one transaction each)
token_app = typer.Typer(help="Enrollment tokens for factory batches.", no_args_is_help=True)
ca_app = typer.Typer(help="Certificate authority maintenance.", no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(token_app, name="token")
app.add_typer(ca_app, name="ca")
app.add_typer(identity_app, name="identity")
app.add_typer(role_app, name="role")
app.add_typer(report_app, name="report")
app.add_typer(job_app, name="job")
app.add_typer(audit_app, name="audit")
app.add_typer(manufacturer_app, name="manufacturer")
app.add_typer(broker_app, name="broker")


def _print_version(value: bool) -> None:
    if value:
        from hub.cli.entry import version

        print(f"tessera-hub {version()}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                            help="Print the version (from the installed package) and exit.")) -> None:
    # Everything the hub writes (registry, keys, CRLs, token CSVs) is private to its user.
    os.umask(0o077)


@app.command()
def init(
    fleet: str = typer.Option("", "--fleet", help="Fleet name (goes into every certificate as O=); required "
                                                   "unless --join."),
    directory: Optional[Path] = DirOpt,
    validity_days: int = typer.Option(30, help="Device certificate lifetime in days."),
    key_type: str = typer.Option("ec-p256", help="CA key type: ec-p256, ec-p384 or rsa-3072."),
    ca_key: str = typer.Option("", "--ca-key", help="Keep the CA keys in a PKCS#11 token: a pkcs11: URI naming "
                                                     "the token, e.g. 'pkcs11:token=fleet-ca'. Default: files."),
    ca_pin_source: str = typer.Option("", help="PIN source for --ca-key: file:/path (0600) or env:NAME."),
    ca_module: str = typer.Option("", help="PKCS#11 module for --ca-key \\[default: SoftHSM2]."),
    hostname: list[str] = typer.Option([], "--hostname", help="Extra DNS name or IP for the hub's server "
                                                              "certificate (repeatable)."),
    est_port: int = typer.Option(8443, help="EST HTTPS port."),
    mqtt_port: int = typer.Option(8883, help="MQTT mTLS port."),
    public_url: str = typer.Option("", "--public-url", help="Base URL of the https CRL distribution point of every "
                                                            "device certificate, e.g. https://crl.example.com "
                                                            "\\[default: https://<first --hostname or localhost>:<EST "
                                                            "port>]."),
    public_crl_url: str = typer.Option("", "--public-crl-url", help="Base URL of the plain-http CRL distribution "
                                                                    "point (listed first), e.g. http://crl.example.com "
                                                                    "\\[default: http://<first --hostname or "
                                                                    "localhost>:<fleet.toml \\[crl] http_port, "
                                                                    "8080>]."),
    join: Optional[Path] = typer.Option(None, "--join", help="Make a second hub of the fleet served from this hub "
                                                             "directory (PostgreSQL registry): its fleet.toml, CAs, "
                                                             "TLS files, audit key and broker secrets are copied."),
    as_json: bool = JsonOpt,
) -> None:
    """Create a fleet: root, device and service CAs, the hub's TLS certificate, an empty registry."""
    from hub.setup import create_fleet, join_fleet

    root = hub_dir(directory)
    if not fleet and join is None:
        fail("init needs --fleet NAME (a new fleet) or --join DIR (a second hub of an existing one)")
    if fleet and join is not None:
        fail("--join takes the fleet's name from the joined hub: drop --fleet")
    try:
        cfg = join_fleet(root, join) if join is not None else create_fleet(root, fleet, now(), validity_days=validity_days, key_type=key_type, ca_key=ca_key,
                           ca_pin_source=ca_pin_source, ca_module=ca_module, hostnames=hostname,
                           est_port=est_port, mqtt_port=mqtt_port, public_url=public_url,
                           public_crl_url=public_crl_url)
    except OSError as exc:  # one line naming the path, not a bare "[Errno 2] ..."
        fail(f"cannot create the fleet in {root}: {exc.filename or root}: {exc.strerror or exc}")
    except errors() as exc:
        fail(str(exc))
    if as_json:
        print_json({"fleet": cfg.fleet, "dir": str(cfg.root), "trust_anchor": str(cfg.ca_dir / "root.pem"),
                    "ca_store": cfg.ca_store,
                    "operator": f"svc.{cfg.local_operator}"})
        return
    out.print(f"fleet [bold]{cfg.fleet}[/] created in {cfg.root}")
    out.print(f"  trust anchor for devices: {cfg.ca_dir / 'root.pem'}")
    out.print(f"  CA keys: {'PKCS#11 token ' + cfg.ca_token_label if cfg.ca_store == 'pkcs11' else 'files (0600)'}")


@app.command()
def serve(
    directory: Optional[Path] = DirOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    est_port: Optional[int] = typer.Option(None, help="EST HTTPS port \\[default: from fleet.toml]."),
    mqtt_port: Optional[int] = typer.Option(None, help="MQTT mTLS port \\[default: from fleet.toml]."),
    api_port: Optional[int] = typer.Option(None, help="Fleet API HTTPS port \\[default: from fleet.toml, 8444]."),
    crl_port: Optional[int] = typer.Option(None, min=0, max=65535, help="Plain-HTTP CRL port, 0: off \\[default: "
                                           "fleet.toml \\[crl] http_port, 8080]. New certificates keep naming "
                                           "fleet.toml's port."),
    est_workers: Optional[int] = typer.Option(None, min=1, max=64, help="EST worker processes on the EST port "
                                              "\\[default: fleet.toml \\[est] workers; 0 there: one per CPU, at most 8]."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run the hub: EST enrollment, the MQTT broker with its authorization plugin, the fleet API, CRL publishing."""
    from hub.serve.supervisor import run

    cfg = config(directory)
    try:
        run(cfg, host=host, est_port=est_port or cfg.est_port, mqtt_port=mqtt_port or cfg.mqtt_port,
            api_port=api_port, est_workers=est_workers, crl_port=crl_port, verbose=verbose,
            announce=lambda msg: out.print(msg, highlight=False))
    except errors() as exc:
        fail(str(exc))


@app.command()
def crl(directory: Optional[Path] = DirOpt, as_json: bool = JsonOpt) -> None:
    """Re-issue the device CRL now from the registry and show what it holds."""
    from hub.ca.authority import load_ca
    from hub.ca.revocation import publish_crl

    cfg = config(directory)
    try:
        ca = load_ca(cfg.ca_dir, cfg.ca_token)
        path = publish_crl(ca, registry(cfg), cfg.crl_dir, now())
    except errors() as exc:
        fail(str(exc))
    from cryptography import x509

    c = x509.load_der_x509_crl(path.read_bytes())
    if as_json:
        print_json({"path": str(path), "revoked": len(c), "issued": c.last_update_utc.isoformat(),
                    "next_update": c.next_update_utc.isoformat()})
        return
    out.print(f"CRL {path}: {len(c)} revoked, issued {c.last_update_utc:%Y-%m-%d %H:%M}Z, "
              f"next update {c.next_update_utc:%Y-%m-%d %H:%M}Z")


app.command("watch")(watch)


# --- factory tokens ----------------------------------------------------------------------------------------------

@token_app.command("create")
def token_create(
    count: int = typer.Option(..., "--count", min=1, max=1_000_000, help="How many devices."),
    prefix: str = typer.Option(..., "--prefix", help="Device id prefix; ids are <prefix>-00001, ..."),
    out_file: Path = typer.Option(..., "--out", help="CSV file to write (device_id,token), created 0600."),
    directory: Optional[Path] = DirOpt,
    group: list[str] = typer.Option([], "--group", help="Group for every device of the batch (repeatable)."),
    start: int = typer.Option(1, help="First number."),
    hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Register a factory batch of devices with one-time tokens, written to a 0600 CSV (10,000 per API call)."""
    from rich.progress import Progress

    from hub.cli.client import ApiError

    width = max(5, len(str(start + count - 1)))
    ids = [f"{prefix}-{n:0{width}d}" for n in range(start, start + count)]
    for device_id in (ids[0], ids[-1]):
        device_id_arg(device_id)
    if out_file.exists():
        fail(f"{out_file} exists; refusing to overwrite a token file")
    tmp = out_file.with_name(out_file.name + ".tmp")
    done = 0
    expires = None
    with api(directory, hub, profile) as client:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            fail(f"{tmp}: {exc.strerror or exc}")
        try:
            with os.fdopen(fd, "w", newline="") as fh, Progress(console=err, transient=True) as progress:
                task = progress.add_task("creating devices and tokens", total=count)
                writer = csv.writer(fh, lineterminator="\n")  # LF: the file is for shells and editors too
                writer.writerow(["device_id", "token"])
                for n in range(0, count, BATCH):
                    batch = [{"id": i, "groups": list(group)} for i in ids[n:n + BATCH]]
                    result = client.post("/api/v1/devices", {"devices": batch})
                    expires = result["token_expires"]
                    writer.writerows([d["id"], d["token"]] for d in result["devices"])
                    fh.flush()
                    done += result["created"]
                    progress.update(task, completed=done)
        except (ApiError, OSError) as exc:
            if not done:
                tmp.unlink(missing_ok=True)
                fail(str(exc))
            os.replace(tmp, out_file)
            fail(f"{exc}; {done} of {count} devices were registered before, their tokens are in {out_file}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out_file)
    if as_json:
        print_json({"created": done, "file": str(out_file), "first": ids[0], "last": ids[-1],
                    "token_expires": expires})
        return
    out.print(f"{count} devices registered; tokens in {out_file} (mode 0600)", highlight=False)


if __name__ == "__main__":
    app()


@app.command()
def bundle(
    tokens: Path = typer.Option(..., "--tokens", help="CSV from `tessera-hub token create`."),
    out_dir: Path = typer.Option(..., "--out", help="Directory for the per-device bundles (created 0700)."),
    hub_url: str = typer.Option(..., "--hub-url", help="EST URL the devices use, e.g. https://hub.example:8443."),
    mqtt_host: str = typer.Option("", help="Broker host for devices \\[default: the hub URL's host]."),
    mqtt_port: Optional[int] = typer.Option(None, help="Broker port \\[default: from fleet.toml]."),
    module: str = typer.Option("", help="PKCS#11 module on the devices \\[default: SoftHSM2]."),
    directory: Optional[Path] = DirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Turn a token batch into per-device bundles (agent.toml, fleet root, one-time token) for the factory."""
    from rich.progress import Progress

    from hub.est.bundle import BundleError, write_bundles

    cfg = config(directory)
    try:
        total = sum(1 for _ in open(tokens)) - 1
        with Progress(console=err) as progress:
            task = progress.add_task("writing bundles", total=max(total, 0))
            n = write_bundles(tokens, out_dir, cfg.ca_dir / "root.pem", hub_url, mqtt_host,
                              mqtt_port or cfg.mqtt_port, module=module,
                              progress=lambda k: progress.update(task, completed=k))
    except (BundleError, PolicyError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"bundles": n, "dir": str(out_dir)})
        return
    say(f"{n} bundles in {out_dir}; for each device copy its bundle onto it (e.g. to /boot/tessera-bundle), then "
        "run there: sudo provisioning/raspberry-pi/install.sh --bundle /boot/tessera-bundle, then sudo "
        "provisioning/factory/provision-device.sh (see provisioning/README.md)")


@ca_app.command("move-to-token")
def ca_move_to_token(
    token_label: str = typer.Option(..., "--token-label", help="Label of the (initialized) PKCS#11 token."),
    pin_source: str = typer.Option(..., "--pin-source", help="file:/path (0600) or env:NAME."),
    module: str = typer.Option("", help="PKCS#11 module \\[default: SoftHSM2]."),
    softhsm_conf: str = typer.Option("", envvar="SOFTHSM2_CONF", help="SoftHSM2 config (token directory)."),
    directory: Optional[Path] = DirOpt,
) -> None:
    """Move the CA keys from files into a PKCS#11 token (certificates unchanged); the key files are destroyed.

    Stop `tessera-hub serve` first; it loads the CA keys at start.
    """
    from hsm.token import TokenConfig

    from hub.serve import admin
    from hub.ca.move import move_keys_to_token

    cfg = config(directory)
    try:
        admin.call(cfg.admin_socket, {"op": "ping"}, timeout=2)
        fail("the hub is running; stop `tessera-hub serve` before moving its CA keys")
    except admin.AdminUnavailable:
        pass
    token = TokenConfig(label=token_label, pin_source=pin_source, module=module, softhsm_conf=softhsm_conf)
    try:
        uris = move_keys_to_token(cfg, token, now())
    except errors() as exc:
        fail(str(exc))
    registry(cfg).audit("ca.move_to_token", "ok", now(), actor="cli", detail=f"token={token_label}")
    for role, uri in uris.items():
        out.print(f"{role:8} {uri}")
    out.print("CA keys now live in the token; the key files were overwritten and removed")


if __name__ == "__main__":
    app()
