"""The certificate expiry report against a real `tessera-hub serve`: the API route and `tessera-hub report expiring`
list the right devices with the right verdicts, page with cursors, export CSV and JSON, refuse bad input.

The fleet is created 60 days in the past (hub.setup.create_fleet with a backdated clock, so its CAs can sign
backdated certificates); device certificates of various ages come from that device CA (recorded as the devices'
enrollments, brokerfixtures' issue_with_hub_ca); presence from a real MQTT session that publishes `online`."""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import ssl
import time
from datetime import timedelta

import pytest

from tests.helpers import free_port
from tests.integration.brokerfixtures import (BROKER_LIMITS, enroll_device, issue_with_hub_ca, session, utcnow,
                                              wait_ready)
from tests.integration.hubfixtures import FLEET as FLEET_NAME
from tests.integration.hubfixtures import Hub

pytestmark = pytest.mark.integration
PATH = "/api/v1/reports/expiring"
DAY = timedelta(days=1)
#: device -> (days since not_before, lifetime days); renewal point at 2/3 of the lifetime
FLEET = {
    "rep-expired": (40, 30),   # expired 10 days ago
    "rep-offline": (25, 30),   # 5 days left, renewal due since day 20, never connected
    "rep-failing": (22, 30),   # 8 days left, past renewal, online (a live session below)
    "rep-healthy": (18, 30),   # 12 days left, renews in 2 days by itself
    "rep-later": (1, 30),      # 29 days left: outside a 14-day window
    "rep-held": (25, 30),      # like rep-offline but suspended: cut off on purpose, never listed
}
DEFAULT = [("rep-expired", "expired"), ("rep-offline", "offline"), ("rep-failing", "renewal_overdue")]


class Api:
    def __init__(self, hub, port: int):
        self.hub, self.port = hub, port
        self.hub.cli_ok("identity", "add", "viewer", "--role", "viewer")
        d = hub.dir / "identities" / "viewer"
        self.cred = (d / "viewer.pem", d / "viewer.key")

    def get(self, query: str = "", cred=None) -> tuple[int, str, str]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.hub.root_pem))
        ctx.load_cert_chain(*(str(p) for p in (cred or self.cred)))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        try:
            conn.request("GET", PATH + (f"?{query}" if query else ""))
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
        finally:
            conn.close()

    def page(self, query: str = "") -> dict:
        status, ctype, body = self.get(query)
        assert status == 200 and ctype.startswith("application/json"), (status, body)
        return json.loads(body)


@contextlib.contextmanager
def backdated_hub(base, created, api_port: int):
    """A fleet made at `created` (`tessera-hub init` in-process with that clock), served now."""
    from hub.setup import create_fleet

    old = os.umask(0o077)  # as `tessera-hub init`
    try:
        create_fleet(base / "hub", FLEET_NAME, created)
    finally:
        os.umask(old)
    hub = Hub(dir=base / "hub", api_port=api_port)
    hub.configure(**BROKER_LIMITS)
    hub.start()
    try:
        yield hub
    finally:
        try:
            rc = hub.stop()
        finally:
            hub.kill()
        assert rc == 0, hub.stderr_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    base = tmp_path_factory.mktemp("reporthub")
    with backdated_hub(base, utcnow() - 60 * DAY, free_port()) as hub:
        wait_ready(hub)
        now = utcnow()
        devs = {d: issue_with_hub_ca(hub, d, base, now - age * DAY, life * DAY, register=True)
                for d, (age, life) in FLEET.items()}
        enroll_device(hub, "rep-fresh", base)  # EST now: 30 days left
        hub.cli_ok("device", "suspend", "rep-held")
        s = session(hub, devs["rep-failing"])
        try:
            s.publish("devices/rep-failing/status", b"online", retain=True)
            deadline = time.monotonic() + 10
            while not hub.query("SELECT online FROM devices WHERE id = 'rep-failing'")[0]["online"]:
                assert time.monotonic() < deadline, "no presence for rep-failing"
                time.sleep(0.05)
            yield Api(hub, hub.api_port), devs
        finally:
            s.close()


def test_default_lists_devices_that_lose_their_certificate(rep):
    api, devs = rep
    page = api.page("days=14")
    assert [(i["device"], i["verdict"]) for i in page["items"]] == DEFAULT
    assert page["next_cursor"] is None and page["days"] == 14 and page["include_due"] is False
    by_id = {i["device"]: i for i in page["items"]}
    assert by_id["rep-expired"]["days_left"] == pytest.approx(-10, abs=0.01)
    assert by_id["rep-offline"]["online"] is False and by_id["rep-offline"]["last_seen"] is None
    assert by_id["rep-failing"]["online"] is True and by_id["rep-failing"]["last_seen"]
    assert by_id["rep-offline"]["serial"] == format(devs["rep-offline"].cert.serial_number, "x")
    assert by_id["rep-offline"]["not_after"].startswith(devs["rep-offline"].cert.not_valid_after_utc.strftime(
        "%Y-%m-%dT%H:%M:%S"))
    assert "reconnects" in by_id["rep-offline"]["reason"] and "failing" in by_id["rep-failing"]["reason"]


def test_include_due_and_the_window(rep):
    api, _ = rep
    items = api.page("days=14&include_due=true")["items"]
    assert [(i["device"], i["verdict"]) for i in items] == [*DEFAULT, ("rep-healthy", "renewal_due")]
    devices = [i["device"] for i in api.page("days=31&include_due=true")["items"]]
    assert devices[-2:] == ["rep-later", "rep-fresh"] or devices[-2:] == ["rep-fresh", "rep-later"]
    assert "rep-held" not in devices
    assert [i["device"] for i in api.page("days=0")["items"]] == ["rep-expired"]


def test_keyset_pages(rep):
    api, _ = rep
    seen, cursor = [], None
    while True:
        page = api.page("days=14&include_due=true&limit=1" + (f"&cursor={cursor}" if cursor else ""))
        assert len(page["items"]) <= 1
        seen += [i["device"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [d for d, _ in DEFAULT] + ["rep-healthy"]


def test_csv_streams_every_row(rep):
    api, _ = rep
    status, ctype, body = api.get("days=14&format=csv&limit=1")
    assert status == 200 and ctype.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [(r["device"], r["verdict"]) for r in rows] == DEFAULT
    assert rows[2]["online"] == "true" and rows[0]["groups"] == ""


@pytest.mark.parametrize("query, param", [
    ("days=-1", "days"), ("days=abc", "days"), ("days=3651", "days"), ("limit=0", "limit"),
    ("format=xml", "format"), ("include_due=yes", "include_due"), ("cursor=%21%21", "cursor"),
    ("cursor=WyJhIiwgImIiXQ", "cursor"), ("status=active", "status"), ("days=1&days=2", "days"),
])
def test_bad_input_is_a_400_problem(rep, query, param):
    api, _ = rep
    status, ctype, body = api.get(query)
    assert status == 400 and ctype.startswith("application/problem+json"), (status, body)
    problem = json.loads(body)
    assert problem.get("param") == param and "\n" not in problem["detail"]


def test_a_device_certificate_gets_403(rep):
    api, devs = rep
    status, _, _ = api.get("days=14", cred=(devs["rep-later"].chain, devs["rep-later"].key))
    assert status == 403


# --- the CLI, a client of the same route ------------------------------------------------------------------------------

def test_cli_table(rep):
    api, _ = rep
    proc = api.hub.cli("report", "expiring", "--days", "14")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split()[:2] == ["device", "verdict"]
    assert [line.split()[:2] for line in lines[1:4]] == [list(x) for x in DEFAULT]
    assert "3 device(s)" in lines[-1]


def test_cli_json_and_include_due(rep):
    api, _ = rep
    rows = api.hub.cli_json("report", "expiring", "--days", "14", "--include-due")
    assert [(r["device"], r["verdict"]) for r in rows] == [*DEFAULT, ("rep-healthy", "renewal_due")]
    assert api.hub.cli_json("report", "expiring", "--days", "14") == api.page("days=14")["items"]


def test_cli_paging_and_csv(rep):
    api, _ = rep
    proc = api.hub.cli("report", "expiring", "--days", "14", "--limit", "1")
    assert proc.returncode == 0 and "more: --cursor" in proc.stderr, proc.stderr
    cursor = proc.stderr.split("--cursor ")[1].split()[0]
    proc = api.hub.cli("report", "expiring", "--days", "14", "--limit", "5", "--cursor", cursor, "--json")
    assert [r["device"] for r in json.loads(proc.stdout)] == ["rep-offline", "rep-failing"]
    proc = api.hub.cli("report", "expiring", "--days", "14", "--all", "--limit", "1")
    assert proc.returncode == 0 and [ln.split()[0] for ln in proc.stdout.splitlines()[1:4]] == [
        d for d, _ in DEFAULT]
    proc = api.hub.cli("report", "expiring", "--days", "14", "--csv")
    assert proc.returncode == 0
    assert [(r["device"], r["verdict"]) for r in csv.DictReader(io.StringIO(proc.stdout))] == DEFAULT


def test_cli_bad_cursor_is_one_line(rep):
    api, _ = rep
    proc = api.hub.cli("report", "expiring", "--cursor", "garbage!")
    assert proc.returncode == 1 and "invalid cursor" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_without_a_running_hub(tmp_path):
    """No hub running: the CLI answers from the same route in its own process (hub.cli.offline)."""
    from tests.integration.hubfixtures import init_hub

    hub = init_hub(tmp_path)
    rows = hub.cli_json("report", "expiring", "--days", "30", "--include-due")
    assert rows == []
    proc = hub.cli("report", "expiring", "--days", "abc")
    assert proc.returncode != 0 and "days" in proc.stderr
