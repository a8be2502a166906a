"""`tessera-hub device decommission` bites on the broker like a revocation, on both brokers: the device's live
session is cut, it is refused on every node afterwards ("revoked": its principal is no longer active), and a
bystander is not disturbed.

`target` (brokerkinds.py): this module's Mosquitto hub and the session's RabbitMQ cluster hub; device ids dec-*.
"""

from __future__ import annotations

import pytest

from tests.integration.brokerfixtures import add_identity, broker_hub, enroll_device, exchange, sessions
from tests.integration.brokerkinds import broker_kind, rabbit_cluster_hub, target  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-decommission")) as h:
        yield h


def test_decommissioned_device_is_cut_and_refused(target, tmp_path):
    hub = target.hub
    dev, bystander = enroll_device(hub, "dec-1", tmp_path), enroll_device(hub, "dec-by", tmp_path)
    cmd = add_identity(hub, "dec-cmd", "commander", tmp_path)
    mark = target.mark()
    with sessions(target.session(dev, 1), target.session(bystander, 2), target.session(cmd)) as (sd, sb, sc):
        assert sd.subscribe("devices/dec-1/commands") == 1 and sb.subscribe("devices/dec-by/commands") == 1
        hub.cli_ok("device", "decommission", dev.id, "--reason", "end of life")
        target.assert_cut(sd, "decommissioned")
        exchange(sc, sb, "devices/dec-by/commands", b"still here")
        assert sb.connected
    target.wait_kicked(mark, dev.id)
    target.assert_refused(dev, "revoked", principal=dev.id, in_crl=True)
    assert hub.show(dev.id)["device"]["status"] == "decommissioned"
