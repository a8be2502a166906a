"""`tessera-hub watch`: follow the fleet's telemetry, events and presence live, as a service identity.

It is an ordinary broker client: MQTT 5 over mutual TLS with a service identity's certificate (default `watch`,
a telemetry-reader), client id = its principal, so the broker's plugin decides what it may read exactly as for any
back end. paho, ssl and cryptography are imported only here, inside the command (CLI start-up stays cheap).
Payloads come from devices: every printed character is made safe for a terminal.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.markup import escape

from hub.cli.util import DirOpt, config, err, registry
from hub.cli.util import fail as _fail
from hub.registry.sql import json_values

KINDS = ("telemetry", "events", "status")
SUBSCRIBE_BATCH = 100  # topic filters per SUBSCRIBE packet
PIPE_WIDTH = 200  # payload characters per line when stdout is not a terminal
# C0/C1 controls, DEL, zero-width and bidirectional overrides: a payload must not drive or disguise the terminal
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def fail(message: str) -> NoReturn:
    _fail(message)
    raise AssertionError("unreachable")


def safe(text: str) -> str:
    """`text` with every control or invisible formatting character shown as an escape (\\n, \\x1b, \\u202e)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def _filters(device_ids: list[str] | None) -> list[str]:
    ids = device_ids if device_ids is not None else ["+"]
    return [f"devices/{d}/{k}" for d in ids for k in KINDS]


def _group_members(reg, group: str) -> list[str]:
    # A group is resolved to its members once, here, and each member gets its own subscriptions (not a wildcard
    # filtered on our side): the broker then sends only that group's traffic, which for a small group of a large
    # fleet is the difference between a few messages a second and the whole fleet's stream. Members added while
    # the watch runs are not followed (start it again).
    rows = reg.query(f"SELECT d.id FROM devices d, {json_values(reg.dialect, 'd.groups', 'g')} WHERE g.value = ? "
                     "AND d.status NOT IN ('revoked', 'decommissioned') ORDER BY d.id", [group])
    return [r["id"] for r in rows]


def _identity_files(cfg, name: str) -> tuple[Path, Path, Path]:
    from hub.authz.identities import IdentityError, check_identity_name, get_identity

    try:
        check_identity_name(name)
        ident = get_identity(registry(cfg), name)
    except IdentityError as exc:
        if exc.code != "unknown_identity":
            fail(str(exc))
        fail(f"no identity {name!r}; create it with: tessera-hub identity add {name} --role telemetry-reader")
    another = "create another one (tessera-hub identity add NAME --role telemetry-reader) and pass --identity NAME"
    if ident["status"] != "active":
        fail(f"identity {name!r} is {ident['status']}; {another}")
    d = cfg.root / "identities" / name
    cert, key, ca = d / f"{name}.pem", d / f"{name}.key", d / "ca.pem"
    if (d / f"{name}.key-uri").exists() and not key.exists():
        fail(f"identity {name!r} keeps its key in a PKCS#11 token; watch needs one with a file key: {another}")
    missing = [p for p in (cert, key, ca) if not p.is_file()]
    if missing:
        fail(f"identity {name!r} has no credentials in {d} ({missing[0].name} is missing; written elsewhere with "
             f"--out?); {another}")
    return cert, key, ca


class _Watch:
    """paho callbacks: print each message, count, and remember why the session ended."""

    def __init__(self, principal: str, filters: list[str], as_json: bool, count: int) -> None:
        self.principal, self.filters, self.as_json, self.count = principal, filters, as_json, count
        self.seen = 0
        self.done = False
        self.error = ""
        self.connected = False
        self.pending: dict[int, list[str]] = {}
        self.width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 0

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.stop(f"the broker refused {self.principal}: {reason_code} (is the identity revoked, or its "
                      "certificate expired?)")
            return
        self.connected = True
        for i in range(0, len(self.filters), SUBSCRIBE_BATCH):
            batch = self.filters[i:i + SUBSCRIBE_BATCH]
            rc, mid = client.subscribe([(f, 1) for f in batch])
            self.pending[mid] = batch

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        batch = self.pending.pop(mid, [])
        refused = [(f, rc) for f, rc in zip(batch, reason_codes) if rc.is_failure]
        if refused:
            f, rc = refused[0]
            self.stop(f"the broker refused the subscription to {f}: {rc} ({self.principal} needs a role that may "
                      "read it, e.g. telemetry-reader)")
        elif not self.pending:
            shown = f"{len(self.filters)} topic filters" if len(self.filters) > 3 else ", ".join(self.filters)
            err.print(escape(f"watching {shown} as {self.principal} (Ctrl-C to stop)"), highlight=False)

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.done:
            when = "" if self.connected else " before accepting the connection"
            self.stop(f"the broker closed the connection{when}: {reason_code}")

    def on_message(self, client, userdata, msg) -> None:
        if self.done:
            return
        parts = msg.topic.split("/", 2)
        device, kind = (parts[1], parts[2]) if len(parts) == 3 else ("?", msg.topic)
        users = dict(getattr(msg.properties, "UserProperty", None) or [])
        if kind == "status":  # a will skips the broker's stamping (Mosquitto 2.0.11): only the device writes here
            users = {"tessera-sender": device, "tessera-role": "device"}
        at = datetime.now(timezone.utc)
        payload = bytes(msg.payload)
        if self.as_json:
            text = payload.decode("utf-8", "replace")
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            line = json.dumps({"at": at.isoformat(timespec="milliseconds"), "topic": msg.topic, "device": device,
                               "kind": kind, "retained": bool(msg.retain), "qos": msg.qos,
                               "sender": users.get("tessera-sender"), "role": users.get("tessera-role"),
                               "payload": body})  # ensure_ascii: nothing but printable ASCII reaches the terminal
        else:
            head = f"{at:%H:%M:%S}.{at.microsecond // 1000:03d} {safe(device):<20} {safe(kind):<9} "
            if msg.retain:
                head += "(retained) "
            body = safe(payload.decode("utf-8", "replace"))
            line = head + truncate(body, max((self.width or len(head) + PIPE_WIDTH) - len(head), 20))
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.stop("")
            return
        self.seen += 1
        if self.count and self.seen >= self.count:
            self.stop("")

    def stop(self, error: str) -> None:
        if not self.done:
            self.done, self.error = True, error


def watch(
    device: str = typer.Option("", "--device", help="Only this device."),
    group: str = typer.Option("", "--group", help="Only the members of this group (as they are when the watch "
                                                  "starts)."),
    identity: str = typer.Option("watch", "--identity", help="Service identity to connect as (files in "
                                                              "<hub dir>/identities/NAME/)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line, with the full payload."),
    count: int = typer.Option(0, "--count", help="Exit after this many messages \\[default: run until Ctrl-C]."),
    host: str = typer.Option("", "--host", help="Broker address \\[default: fleet.toml \\[est] host]."),
    port: Optional[int] = typer.Option(None, "--port", help="Broker port \\[default: fleet.toml \\[mqtt] port]."),
    directory: Optional[Path] = DirOpt,
) -> None:
    """Follow telemetry, events and presence live: one line per message (time in UTC, device, kind, payload)."""
    from hub.authz.policy import AuthzError, check_name, service_principal

    cfg = config(directory)
    if device and group:
        fail("give --device or --group, not both")
    if count < 0:
        fail("--count must be 0 or more")
    try:
        for value, what in ((device, "device id"), (group, "group name")):
            if value:
                check_name(value, what)
    except AuthzError as exc:
        fail(str(exc))
    cert, key, ca = _identity_files(cfg, identity)
    ids = [device] if device else None
    if group:
        reg = registry(cfg)
        try:
            ids = _group_members(reg, group)
        finally:
            reg.close()
        if not ids:
            fail(f"no device is in group {group!r}")
    principal = service_principal(identity)
    state = _Watch(principal, _filters(ids), as_json, count)
    _run(state, host or cfg.est_host, port or cfg.mqtt_port, principal, cert, key, ca)
    if state.error:
        fail(state.error)


def _run(state: _Watch, host: str, port: int, principal: str, cert: Path, key: Path, ca: Path) -> None:
    import ssl

    import paho.mqtt.client as mqtt

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the broker against the fleet root, and its name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        fail(f"cannot load the credentials of {principal}: {exc}")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=principal, protocol=mqtt.MQTTv5,
                         reconnect_on_failure=False)
    client.tls_set_context(ctx)
    client.on_connect, client.on_subscribe = state.on_connect, state.on_subscribe
    client.on_message, client.on_disconnect = state.on_message, state.on_disconnect
    previous = signal.signal(signal.SIGTERM, lambda *_: state.stop(""))
    try:
        try:
            client.connect(host, port, keepalive=30, clean_start=True)
        except (OSError, ssl.SSLError) as exc:
            fail(f"cannot connect to the broker at {host}:{port} as {principal}: {exc}")
        while not state.done:
            rc = client.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS and not state.done:
                when = "" if state.connected else " before accepting the connection"
                state.stop(f"the broker closed the connection{when} ({mqtt.error_string(rc)})")
    except KeyboardInterrupt:
        state.stop("")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state.connected:
            try:
                client.disconnect()
                client.loop(timeout=0.2)
            except Exception:  # noqa: BLE001  (leaving anyway)
                pass
