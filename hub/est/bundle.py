"""Factory bundles: one directory per device with agent.toml, the fleet root and its one-time token (0600)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from hub.ca.policy import check_device_id

AGENT_TOML = """\
# Tessera agent configuration for {device_id} (factory bundle). See agent/config.py for every key.
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
    """Write out/<device>/{agent.toml, fleet-root.pem, enroll-token}; returns how many bundles."""
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
