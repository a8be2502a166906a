"""`tessera-hub manufacturer ...`: manufacturer CAs and factory birth certificates (IEEE 802.1AR IDevIDs) —
add a CA, list them, remove one, import a factory batch, allow a device to re-provision — as thin clients of the fleet API
(/api/v1/manufacturers, hub/api/manufacturerroutes.py). A device on an imported batch enrolls with the birth
certificate in its token (`tessera-agent enroll --birth-cert`), no enrollment token; see provisioning/README.md.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from urllib.parse import quote
from typing import NoReturn, Optional

import typer

from hub.cli.util import DirOpt, HubOpt, JsonOpt, ProfileOpt, api, device_id_arg, print_json, print_table, say
from hub.cli.util import fail as _fail

manufacturer_app = typer.Typer(help="Manufacturer CAs and factory birth certificates (IEEE 802.1AR IDevID "
                                    "enrollment without tokens).", no_args_is_help=True)

BASE = "/api/v1/manufacturers"
MAX_FILE = 8 * 1024 * 1024
COLUMNS = [("name", "name", 16), ("subject", "CA subject", 30), ("births", "births", 6), ("used", "used", 6),
           ("added", "added", 16)]


def fail(message: str) -> NoReturn:
    """One error line; the message is escaped (it holds paths and names)."""
    _fail(message)
    raise AssertionError("unreachable")


def _read(path: Path, what: str) -> str:
    try:
        if path.stat().st_size > MAX_FILE:
            fail(f"{path} is larger than {MAX_FILE // 1024 // 1024} MB")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read the {what} {path}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(f"the {what} {path} is not UTF-8 text")


@manufacturer_app.command("add")
def add(
    name: str = typer.Argument(..., help="The manufacturer's name (a-z, 0-9, '-')."),
    ca: Path = typer.Option(..., "--ca", help="The manufacturer CA certificate (PEM) that signs its birth "
                                              "certificates."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Trust a manufacturer CA for birth certificates (admin). Only devices of imported batches enroll with it."""
    pem = _read(ca, "CA file")
    with api(directory, hub, profile) as client:
        made = client.post(BASE, {"name": name, "ca": pem})
    if as_json:
        print_json(made)
    else:
        say(f"manufacturer {made['name']}: CA {made['subject']} (sha256 {made['ca_sha256']})")


@manufacturer_app.command("list")
def list_(
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Manufacturers, their CA and how many birth certificates are allowlisted and used."""
    with api(directory, hub, profile) as client:
        items = client.get(BASE)["items"]
    if as_json:
        print_json(items)
        return
    print_table([{**m, "added": m["added"][:16].replace("T", " ")} for m in items], COLUMNS)


@manufacturer_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="The manufacturer to stop trusting."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Stop trusting a manufacturer CA (admin): its allowlist goes and its birth certificates are refused at once;
    devices that enrolled through it keep their certificates, those that never did stay pending."""
    with api(directory, hub, profile) as client:
        done = client.delete(f"{BASE}/{quote(name, safe='')}")
    if as_json:
        print_json(done)
    else:
        say(f"manufacturer {done['name']} removed: {done['births']} birth certificates dropped ({done['used']} "
            f"enrolled and keep their certificates, {done['pending']} devices left pending)")


def read_batch(path: Path) -> list[dict]:
    """The batch CSV the factory writes (header serial,device_id,cert_sha256; device_id and cert_sha256 may be
    empty). A malformed file is one error line."""
    text = _read(path, "batch file")
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "serial" not in reader.fieldnames:
        fail(f"{path}: the first line must be the header serial,device_id,cert_sha256")
    extra = set(reader.fieldnames) - {"serial", "device_id", "cert_sha256"}
    if extra:
        fail(f"{path}: unknown columns {sorted(extra)}")
    rows = []
    for n, row in enumerate(reader, 2):
        if None in row or any(v is None for v in row.values()):
            fail(f"{path} line {n}: wrong number of fields")
        rows.append({k: v.strip() for k, v in row.items() if v and v.strip()})
    return rows


@manufacturer_app.command("import-batch")
def import_batch(
    name: str = typer.Argument(..., help="The manufacturer (from `manufacturer add`)."),
    batch_file: Path = typer.Argument(..., help="The factory's batch CSV (serial,device_id,cert_sha256)."),
    batch: str = typer.Option("", "--batch", help="The batch name kept with each entry \\[default: the file "
                                                  "name without extension, other characters than a-z 0-9 - as -]."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Allowlist a batch of birth certificates: each serial becomes a pending device (id from the file, else the
    serial in lower case) that enrolls once with its birth certificate. All or nothing."""
    rows = read_batch(batch_file)
    label = batch or re.sub(r"[^a-z0-9-]+", "-", batch_file.stem.lower()).strip("-")[:63] or "batch"
    with api(directory, hub, profile) as client:
        done = client.post(f"{BASE}/{quote(name, safe='')}/batches", {"batch": label, "rows": rows})
    if as_json:
        print_json(done)
    else:
        say(f"imported {done['imported']} birth certificates of {done['manufacturer']} (batch {done['batch']})")


@manufacturer_app.command("allow-reprovision")
def allow_reprovision(
    device_id: str = typer.Argument("", help="The device whose birth certificate may enroll once more."),
    batch: str = typer.Option("", "--batch", help="Instead: every device of this imported batch that enrolled "
                                                  "already (with --manufacturer)."),
    manufacturer: str = typer.Option("", "--manufacturer", help="The batch's manufacturer (with --batch)."),
    directory: Optional[Path] = DirOpt, hub: Optional[str] = HubOpt, profile: Optional[str] = ProfileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Let a device (or a whole batch) enroll with its birth certificate once more (e.g. after a factory reset);
    the next enrollment uses the permission up and replaces the device's certificate at once."""
    if bool(device_id) == bool(batch) or bool(batch) != bool(manufacturer):
        fail("give a device id, or --batch NAME with --manufacturer NAME")
    if batch:
        with api(directory, hub, profile) as client:
            done = client.post(f"{BASE}/{quote(manufacturer, safe='')}/batches/{quote(batch, safe='')}/reprovision")
        if as_json:
            print_json(done)
        else:
            say(f"{done['allowed']} devices of {done['manufacturer']} batch {done['batch']} may enroll once more")
        return
    device_id_arg(device_id)
    with api(directory, hub, profile) as client:
        birth = client.post(f"/api/v1/devices/{device_id}/reprovision")
    if as_json:
        print_json(birth)
    else:
        say(f"{birth['device_id']} may enroll once more with its {birth['manufacturer']} birth certificate "
            f"(serial {birth['serial']})")
