"""Prometheus /metrics of a real `tessera-hub serve`: counters move with real enrollments, denials and revocations,
the broker's client count follows a real MQTT session, the read permission is enforced, and every metric name is
in an exposition that prometheus_client's own parser accepts. The count tables (triggers) are checked against
plain COUNT queries of the same registry."""

from __future__ import annotations

import http.client
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port
from tests.integration.agentfixtures import wait_until
from tests.integration.brokerfixtures import BROKER_LIMITS, enroll_device, session, sessions, wait_ready
from tests.integration.hubfixtures import enroll, make_csr, new_key, running_hub

pytestmark = pytest.mark.integration

FAMILIES = {  # family name (as the parser names it) -> type
    "tessera_devices": "gauge", "tessera_devices_online": "gauge", "tessera_certificates_expiring": "gauge",
    "tessera_enrollments": "counter", "tessera_renewals": "counter", "tessera_est_denials": "counter",
    "tessera_revocation_seconds": "histogram", "tessera_revocation_unconfirmed": "counter",
    "tessera_broker_connections": "gauge", "tessera_crl_age_seconds": "gauge",
    "tessera_crl_next_update_seconds": "gauge", "tessera_job_devices": "gauge",
}


class MetricsHub:
    def __init__(self, hub, port: int):
        self.hub, self.port = hub, port
        self.creds: dict[str, tuple[Path, Path]] = {}

    def identity(self, name: str, role: str) -> None:
        self.hub.cli_ok("identity", "add", name, "--role", role)
        d = self.hub.dir / "identities" / name
        self.creds[name] = (d / f"{name}.pem", d / f"{name}.key")

    def call(self, method: str, path: str, who="viewer", body: bytes | None = None) -> tuple[int, str]:
        cert, key = self.creds[who] if isinstance(who, str) else who
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.hub.root_pem))
        ctx.load_cert_chain(str(cert), str(key))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def scrape(self) -> dict[str, object]:
        status, text = self.call("GET", "/metrics")
        assert status == 200, text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float | None:
        for fam in self.scrape().values():
            for s in fam.samples:
                if s.name == sample and s.labels == labels:
                    return s.value
        return None


@pytest.fixture(scope="module")
def mh(tmp_path_factory):
    port = free_port()
    with running_hub(tmp_path_factory.mktemp("metricshub"), api_port=port, **BROKER_LIMITS) as hub:
        wait_ready(hub)
        m = MetricsHub(hub, port)
        m.identity("viewer", "viewer")
        m.identity("admin", "admin")
        m.identity("reader", "telemetry-reader")
        yield m


def test_every_metric_is_present_and_parses(mh):
    status, text = mh.call("GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: families[name].type for name in FAMILIES if name in families} == FAMILIES
    reasons = {s.labels["reason"] for s in families["tessera_est_denials"].samples if s.name.endswith("_total")}
    assert reasons == {"bad_token", "rate_limited", "bad_csr", "bad_certificate", "suspended", "revoked",
                       "connection", "other"}
    actions = {s.labels["action"] for s in families["tessera_revocation_seconds"].samples}
    assert actions == {"suspend", "revoke", "decommission"}
    assert {s.labels["within"] for s in families["tessera_certificates_expiring"].samples} == {"7d", "30d"}


def test_metrics_need_the_read_permission(mh, tmp_path):
    dev = enroll_device(mh.hub, "met-devcert", tmp_path)
    status, body = mh.call("GET", "/metrics", who=(dev.chain, dev.key))
    assert status == 403 and "service" in body
    status, _ = mh.call("GET", "/metrics", who="reader")  # a role without API permissions
    assert status == 403


def test_an_enrollment_counts_once(mh, tmp_path):
    before = mh.value("tessera_enrollments_total")
    enroll_device(mh.hub, "met-enroll-1", tmp_path)
    assert mh.value("tessera_enrollments_total") == before + 1


def test_a_bad_token_is_a_denial_with_its_reason(mh):
    token = mh.hub.add_device("met-badtoken")
    before = {r: mh.value("tessera_est_denials_total", reason=r) for r in ("bad_token", "bad_csr")}
    enrollments = mh.value("tessera_enrollments_total")
    resp = enroll(mh.hub, "met-badtoken", token[:-2] + "xx", make_csr(new_key(), "met-badtoken"))
    assert resp.status == 401
    assert mh.value("tessera_est_denials_total", reason="bad_token") == before["bad_token"] + 1
    resp = enroll(mh.hub, "met-badtoken", token, make_csr(new_key(), "someone-else"))  # CN is not the device
    assert resp.status in (400, 403), resp.text
    assert mh.value("tessera_est_denials_total", reason="bad_csr") == before["bad_csr"] + 1
    assert mh.value("tessera_enrollments_total") == enrollments


def _revoke_body(device_id: str, confirm: bool = True) -> bytes:
    import json

    return json.dumps({"selector": {"ids": [device_id]}, "reason": "test",
                       **({"confirm_count": 1} if confirm else {})}).encode()


def test_revocations_are_timed_commit_to_broker_confirmation(mh, tmp_path):
    a = enroll_device(mh.hub, "met-rev-a", tmp_path)
    enroll_device(mh.hub, "met-rev-b", tmp_path)
    count = lambda action: mh.value("tessera_revocation_seconds_count", action=action)  # noqa: E731
    before = {action: count(action) for action in ("revoke", "suspend", "decommission")}
    with sessions(session(mh.hub, a)):  # a live session to cut
        status, body = mh.call("POST", "/api/v1/devices/actions/revoke", who="admin", body=_revoke_body(a.id))
        assert status == 200 and '"changed": 1' in body, body
    assert count("revoke") == before["revoke"] + 1
    status, body = mh.call("POST", "/api/v1/devices/actions/suspend", who="admin", body=_revoke_body("met-rev-b"))
    assert status == 200, body
    status, body = mh.call("DELETE", "/api/v1/devices/met-rev-b?reason=gone", who="admin")
    assert status == 200, body
    assert count("suspend") == before["suspend"] + 1
    assert count("decommission") == before["decommission"] + 1
    # a dry run changes nothing and times nothing
    mh.call("POST", "/api/v1/devices/actions/revoke", who="admin", body=_revoke_body(a.id, confirm=False))
    assert count("revoke") == before["revoke"] + 1
    total = mh.value("tessera_revocation_seconds_sum", action="revoke")
    assert total is not None and 0 < total < 10


def test_a_single_device_status_change_is_timed(mh, tmp_path):
    import json

    dev = enroll_device(mh.hub, "met-single", tmp_path)
    count = lambda action: mh.value("tessera_revocation_seconds_count", action=action)  # noqa: E731
    before = {action: count(action) for action in ("revoke", "suspend")}
    with sessions(session(mh.hub, dev)):
        status, body = mh.call("POST", f"/api/v1/devices/{dev.id}/status", who="admin",
                               body=json.dumps({"action": "suspend"}).encode())
        assert status == 200 and json.loads(body)["changed"] is True, body
    assert count("suspend") == before["suspend"] + 1
    status, body = mh.call("POST", f"/api/v1/devices/{dev.id}/status", who="admin",
                           body=json.dumps({"action": "resume"}).encode())  # resume: not a revocation
    status, body = mh.call("POST", f"/api/v1/devices/{dev.id}/status", who="admin",
                           body=json.dumps({"action": "resume"}).encode())  # no change: nothing timed
    assert status == 200 and json.loads(body)["changed"] is False
    assert mh.hub.cli("device", "revoke", dev.id, "--reason", "stolen").returncode == 0  # the CLI's one-device path
    assert (count("suspend"), count("revoke")) == (before["suspend"] + 1, before["revoke"] + 1)


def test_broker_connections_follow_a_device_session(mh, tmp_path):
    dev = enroll_device(mh.hub, "met-conn", tmp_path)
    base = wait_until(lambda: mh.value("tessera_broker_connections"), 30, "a broker client count")
    assert base >= 1  # the hub's own session
    with sessions(session(mh.hub, dev)):
        wait_until(lambda: (mh.value("tessera_broker_connections") or 0) >= base + 1, 30,
                 "the device's session in the broker's client count")


def _registry_counts(mh) -> dict[str, int]:
    rows = mh.hub.query("SELECT status, COUNT(*) AS n FROM devices GROUP BY status")
    counts = {r["status"]: r["n"] for r in rows}
    counts["online"] = mh.hub.query("SELECT COUNT(*) AS n FROM devices WHERE online = 1")[0]["n"]
    return counts


def test_device_counts_match_the_registry(mh, tmp_path):
    from hub.registry.store import Registry

    reg = Registry(mh.hub.registry_path)  # another process writing the registry: the triggers count it too
    try:
        reg.create_devices_with_tokens([(f"met-batch-{i}", None, None) for i in range(25)], "acme",
                                       datetime.now(timezone.utc), timedelta(days=1))
    finally:
        reg.close()
    dev = enroll_device(mh.hub, "met-online", tmp_path)
    with sessions(session(mh.hub, dev)) as (s,):
        s.publish(f"devices/{dev.id}/status", b"online", retain=True)
        wait_until(lambda: mh.hub.query("SELECT online FROM devices WHERE id = ?", (dev.id,))[0]["online"], 10,
                 "presence")
        families = mh.scrape()
        want = _registry_counts(mh)
        got = {s.labels["status"]: s.value for s in families["tessera_devices"].samples}
        assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if k != "online"}
        assert families["tessera_devices_online"].samples[0].value == want["online"] >= 1
    from hub.registry.store import _ts

    now = datetime.now(timezone.utc)
    for days in (7, 30):
        exact = mh.hub.query("SELECT COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? "
                             "AND not_after <= ?", (_ts(now), _ts(now + timedelta(days=days))))
        assert mh.value("tessera_certificates_expiring", within=f"{days}d") == exact[0]["n"]


def test_crl_age_and_next_update(mh):
    age = wait_until(lambda: mh.value("tessera_crl_age_seconds", crl="device") is not None, 30, "the device CRL")
    assert age
    assert 0 <= mh.value("tessera_crl_age_seconds", crl="device") < 3600
    assert 0 < mh.value("tessera_crl_next_update_seconds", crl="device") <= 8 * 86400


# --- the collector over a registry file (no hub), with and without the jobs tables ---------------------------------

def _collect(tmp_path, jobs: str | None) -> dict:
    from hub.api.metrics import FleetCollector, apply_schema
    from hub.api.queries import apply_schema as apply_api_schema
    from hub.registry.store import Registry

    reg = Registry(tmp_path / "registry.sqlite3")
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    try:
        apply_api_schema(reg)
        apply_schema(reg, now)
        if jobs == "hub.jobs":  # the jobs engine's own tables: per-state counters on the job row
            from hub.jobs.schema import apply_schema as apply_jobs_schema

            apply_jobs_schema(reg)
            with reg.write() as db:
                for state, n_acked in (("running", 5), ("completed", 9)):
                    db.execute("INSERT INTO jobs (name, command, selector, rate_per_minute, timeout_s, abort_percent, "
                               "offline, state, total, n_queued, n_sent, n_acked, created_by, created) VALUES "
                               "('r', 'reboot', '{}', 60, 30, 10, 'fail', ?, 10, 3, 2, ?, 'test', '2026-12-01')",
                               [state, n_acked])
        elif jobs == "minimal":  # another shape: the devices are counted
            with reg.write() as db:
                db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT, state TEXT)")
                db.execute("CREATE TABLE job_devices (job_id INTEGER, device_id TEXT, state TEXT)")
                db.execute("INSERT INTO jobs VALUES (1, 'reboot', 'running'), (2, 'old', 'completed')")
                db.conn.executemany("INSERT INTO job_devices VALUES (?, ?, ?)",
                                    [(1, "a", "acked"), (1, "b", "acked"), (1, "c", "sent"), (2, "d", "acked")])
        api = SimpleNamespace(registry=reg, clock=lambda: now, live=SimpleNamespace(admin=None),
                              cfg=SimpleNamespace(crl_dir=tmp_path / "crl"))
        return {f.name: f for f in FleetCollector(api).collect()}
    finally:
        reg.close()


def test_job_devices_without_the_jobs_tables(tmp_path):
    families = _collect(tmp_path, jobs=None)
    assert families["tessera_job_devices"].samples == []
    assert families["tessera_broker_connections"].samples == []  # unknown: no sample, not a made-up 0


def test_job_devices_from_the_job_counters(tmp_path):
    samples = _collect(tmp_path, jobs="hub.jobs")["tessera_job_devices"].samples
    assert {(s.labels["job_id"], s.labels["state"]): s.value for s in samples} == {
        ("1", "queued"): 3, ("1", "sent"): 2, ("1", "acked"): 5, ("1", "failed"): 0, ("1", "timed_out"): 0,
        ("1", "offline"): 0}


def test_job_devices_counted_without_counters(tmp_path):
    samples = _collect(tmp_path, jobs="minimal")["tessera_job_devices"].samples
    assert sorted((s.labels["job_id"], s.labels["state"], s.value) for s in samples) == [("1", "acked", 2),
                                                                                     ("1", "sent", 1)]


def test_counts_are_recounted_at_start(tmp_path):
    """A writer that bypassed the triggers (here: they are dropped) leaves wrong counts only until the next start."""
    from hub.api.metrics import apply_schema
    from hub.registry.store import Registry

    reg = Registry(tmp_path / "registry.sqlite3")
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    try:
        apply_schema(reg, now)
        with reg.write() as db:
            db.execute("DROP TRIGGER metrics_devices_insert")
        reg.create_devices_with_tokens([(f"r-{i}", None, None) for i in range(3)], "acme", now, timedelta(days=1))
        count = lambda: {r["key"]: r["n"] for r in reg.query("SELECT key, n FROM metrics_counts")}  # noqa: E731
        assert count().get("status:pending", 0) == 0
        apply_schema(reg, now)
        assert count()["status:pending"] == 3
        reg.create_devices_with_tokens([("r-9", None, None)], "acme", now, timedelta(days=1))  # triggers back
        assert count()["status:pending"] == 4
        with reg.write() as db:  # an active certificate written behind the expiry triggers' back
            db.execute("DROP TRIGGER metrics_certs_insert")
            db.execute("INSERT INTO certificates (serial, device_id, subject, not_before, not_after, "
                       "fingerprint_sha256, status, issued_at, pem) VALUES ('1', 'r-1', 'CN=r-1', "
                       "'2026-12-01T00:00:00.000000+00:00', '2026-12-05T10:30:00.000000+00:00', 'f', 'active', "
                       "'2026-12-01T00:00:00.000000+00:00', 'pem')")
        assert reg.query("SELECT COUNT(*) AS n FROM metrics_expiry")[0]["n"] == 0
        apply_schema(reg, now)
        assert reg.query("SELECT hour, n FROM metrics_expiry") == [{"hour": "2026-12-05T10", "n": 1}]
    finally:
        reg.close()


@pytest.mark.parametrize("code, status, reason", [
    ("unknown_token", 401, "bad_token"), ("token_used", 401, "bad_token"), ("bad_auth_scheme", 401, "bad_token"),
    ("rate_limited", 429, "rate_limited"), ("bad_csr", 400, "bad_csr"), ("name_mismatch", 403, "bad_csr"),
    ("body_too_large", 413, "bad_csr"), ("bad_content_type", 415, "bad_csr"),
    ("device_suspended", 403, "suspended"), ("device_revoked", 403, "revoked"), ("cert_revoked", 403, "revoked"),
    ("cert_superseded", 403, "bad_certificate"), ("client_cert_required", 401, "bad_certificate"),
    ("too_many_connections", 503, "connection"), ("request_timeout", 408, "connection"),
    ("registry", 403, "other"), ("a free text the service never sends\n", None, "other"),
])
def test_denial_reasons_are_a_fixed_set(code, status, reason):
    from hub.serve.stats import DENIAL_REASONS, denial_reason

    assert denial_reason(code, status) == reason and reason in DENIAL_REASONS
