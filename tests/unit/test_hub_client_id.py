"""Which MQTT client ids a principal may use: its name; the hub principal also tessera-hub.<hub-id> (several hubs
of one fleet), never another principal's name; and the hub directory's own id (HubConfig.admin_client_id)."""

from __future__ import annotations

import pytest

from hub.authz.policy import client_id_allowed
from hub.config import HubConfig


@pytest.mark.parametrize("principal, client_id, ok", [
    ("tessera-hub", "tessera-hub", True), ("tessera-hub", "tessera-hub.0a1b2c3d", True),
    ("tessera-hub", "tessera-hub.0A1B2C3D", False), ("tessera-hub", "tessera-hub.0a1b", False),
    ("tessera-hub", "tessera-hub.", False), ("tessera-hub", "sensor-1", False),
    ("sensor-1", "sensor-1", True), ("sensor-1", "sensor-1.0a1b2c3d", False), ("sensor-1", "tessera-hub", False),
    ("svc.ops", "svc.ops", True), ("svc.ops", "svc.ops.0a1b2c3d", False),
])
def test_client_ids(principal, client_id, ok):
    assert client_id_allowed(principal, client_id) is ok


def test_a_joined_hub_has_a_client_id_of_its_own(tmp_path):
    cfg = HubConfig(root=tmp_path, fleet="acme")
    assert (cfg.admin_client_id, cfg.local_operator) == ("tessera-hub", "local-admin")
    (tmp_path / "hub-id").write_text("0a1b2c3d\n")
    assert (cfg.admin_client_id, cfg.local_operator) == ("tessera-hub.0a1b2c3d", "local-admin-0a1b2c3d")


def test_a_damaged_hub_id_is_one_line(tmp_path):
    from hub.config import ConfigError

    (tmp_path / "hub-id").write_text("tessera-hub; x\n")
    with pytest.raises(ConfigError, match="8 hex digits"):
        HubConfig(root=tmp_path, fleet="acme").admin_client_id
