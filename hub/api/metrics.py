"""Prometheus metrics of the fleet (prometheus-client): computed from the registry at each scrape, indexed counts.

tessera_devices{status}               devices by status
tessera_devices_online                devices connected now (presence from the broker)
tessera_certificates_expiring{within} active device certificates expiring within 7 and 30 days (not yet expired)
"""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hub.registry.store import DEVICE_STATUSES, _ts

EXPIRY_WINDOWS = (7, 30)


class FleetCollector:
    def __init__(self, api):
        self.api = api

    def describe(self):
        return []  # no collection at registration time

    def collect(self):
        reg, now = self.api.registry, self.api.clock()
        by_status = GaugeMetricFamily("tessera_devices", "Devices by status", labels=["status"])
        counts = {r["status"]: r["n"] for r in reg.query("SELECT status, COUNT(*) AS n FROM devices GROUP BY status")}
        for status in DEVICE_STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        online = reg.query("SELECT COUNT(*) AS n FROM devices WHERE online = 1")[0]["n"]
        yield GaugeMetricFamily("tessera_devices_online", "Devices connected now", value=online)
        expiring = GaugeMetricFamily("tessera_certificates_expiring",
                                     "Active device certificates expiring within N days", labels=["within"])
        for days in EXPIRY_WINDOWS:
            n = reg.query("SELECT COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? "
                          "AND not_after <= ?", [_ts(now), _ts(now + timedelta(days=days))])[0]["n"]
            expiring.add_metric([f"{days}d"], n)
        yield expiring


def render(api) -> tuple[bytes, str]:
    """The exposition text and its content type (one collector registry per API instance)."""
    registry = getattr(api, "_metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(api))
        api._metrics_registry = registry
    return generate_latest(registry), CONTENT_TYPE_LATEST
