"""Factory bundles: one directory per device with agent.toml, the fleet root and its one-time token (0600)."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from hub.ca.policy import check_device_id

AGENT_TOML = """\
# Tessera agent configuration for {device_id} (factory bundle). Every key: docs/agent-toml.md.
device_id = "{device_id}"
hub_url = "{hub_url}"
mqtt_host = "{mqtt_host}"
mqtt_port = {mqtt_port}
ca_file = "/var/lib/tessera-agent/fleet-root.pem"
state_dir = "/var/lib/tessera-agent"

[token]
module = "{module}"
label = "{token_label}"
pin_source = "file:/etc/tessera/token-pin"
softhsm_conf = "{softhsm_conf}"
key_label = "device-key"
key_type = "ec-p256"

[telemetry]
interval = 30.0
source = "builtin"
"""


class BundleError(Exception):
    """The token CSV or the output directory is not usable."""


#: a DNS name or an IPv4 address (what devices put in a TLS connect and agent.toml holds), or [IPv6]
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?|\[[0-9A-Fa-f:.]{2,45}\]")


def check_hub_url(url: str) -> str:
    """The EST URL devices use: https://host[:port] (a trailing '/' dropped); BundleError otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = 0
    host = parts.netloc.rsplit(":", 1)[0] if port else parts.netloc  # (userinfo, spaces, quotes: no host match)
    if parts.scheme != "https" or port == 0 or not _HOST_RE.fullmatch(host) or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise BundleError(f"--hub-url must be an https URL with a host, like https://hub.example.com:8443, not "
                          f"{url[:200]!r}")
    return url.rstrip("/")


def check_host(host: str, what: str = "--mqtt-host") -> str:
    """A host name or address for agent.toml; BundleError otherwise."""
    if not _HOST_RE.fullmatch(host):
        raise BundleError(f"{what} must be a host name or IP address, not {host[:200]!r}")
    return host


def read_tokens(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["device_id", "token"]:
            raise BundleError(f"{path} is not a token file from `tessera-hub token create`")
        for row in reader:
            if len(row) != 2:
                raise BundleError(f"{path}: malformed row")
            yield check_device_id(row[0]), row[1]


def write_bundles(tokens_csv: Path, out: Path, root_pem: Path, hub_url: str, mqtt_host: str, mqtt_port: int,
                  module: str = "", softhsm_conf: str = "/var/lib/tessera-agent/softhsm/softhsm2.conf",
                  progress: Callable[[int], None] = lambda n: None) -> int:
    """Write out/<device>/{agent.toml, fleet-root.pem, enroll-token}; returns how many bundles. The URL and host
    are checked before anything is written."""
    hub_url = check_hub_url(hub_url)
    if mqtt_host:
        check_host(mqtt_host)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty; refusing to mix batches")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    count = 0
    for device_id, token in read_tokens(tokens_csv):
        d = out / device_id
        d.mkdir(mode=0o700)
        (d / "agent.toml").write_text(AGENT_TOML.format(device_id=device_id, hub_url=hub_url, mqtt_host=mqtt_host,
                                                        mqtt_port=mqtt_port, module=module,
                                                        token_label=device_id[:32], softhsm_conf=softhsm_conf))
        shutil.copyfile(root_pem, d / "fleet-root.pem")
        fd = os.open(d / "enroll-token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        count += 1
        progress(count)
    return count
