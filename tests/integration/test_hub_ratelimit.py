"""Rate limits from fleet.toml: failures count per (source, device), 429 says Retry-After and is never a failure.

Each test runs its own hub (the limits are read at `serve`). Requests from 127.0.0.2 count as another source. A
factory line (or a reverse proxy) is many devices behind one address: it must not lock itself out, and neither
must libest's estclient flow (a first request without credentials, answered with the 401 challenge, then the
retry with them).
"""

from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor

import pytest

from hub.est.denials import row_count
from tests.integration.hubfixtures import (
    EST_PREFIX, b64_body, basic, enroll, make_csr, new_key, request, running_hub, tls_context,
)

pytestmark = pytest.mark.integration

ENROLL = f"{EST_PREFIX}/simpleenroll"
CT = "application/pkcs10"


def test_failures_per_minute_then_429(tmp_path):
    with running_hub(tmp_path, failures_per_minute=4) as hub:
        token = hub.add_device("rl-1")
        hub.add_device("rl-2")
        token2 = hub.new_token("rl-2")
        for attempt in range(4):
            resp = enroll(hub, "rl-1", f"wrong-token-{attempt:02d}-xxxxxxxxxxxxxxxx", make_csr(new_key(), "rl-1"))
            assert (resp.status, resp.code) == (401, "unauthorized"), (attempt, resp.text)
        state, mark = hub.state(), hub.last_audit_id()

        # even the right token is refused now: this device, from this source, has spent its failure budget
        resp = enroll(hub, "rl-1", token, make_csr(new_key(), "rl-1"))

        assert (resp.status, resp.code) == (429, "rate_limited"), resp.text
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        assert hub.state() == state  # the token was not consumed, nothing issued
        rows = hub.audit_since(mark)
        assert [(r["action"], r["outcome"], r["source"]) for r in rows] == [("enroll", "denied", "127.0.0.1")]
        assert rows[0]["detail"].startswith("rate_limited:")
        # another source is not affected
        resp = enroll(hub, "rl-2", token2, make_csr(new_key(), "rl-2"), source="127.0.0.2")
        assert resp.status == 200, resp.text
        assert hub.cert_count("rl-2") == 1 and hub.cert_count("rl-1") == 0
        # and this one stays blocked: its 429s are not new failures, but the four failures are still recent
        for _ in range(10):
            resp = enroll(hub, "rl-1", token, make_csr(new_key(), "rl-1"))
            assert resp.status == 429


def test_request_burst_then_429(tmp_path):
    with running_hub(tmp_path, rate_per_source=0.01, rate_burst=3) as hub:
        tokens = {d: hub.add_device(d) for d in ("rl-b1", "rl-b2", "rl-b3", "rl-b4")}
        for device_id in ("rl-b1", "rl-b2", "rl-b3"):
            resp = enroll(hub, device_id, tokens[device_id], make_csr(new_key(), device_id))
            assert resp.status == 200, resp.text
        resp = enroll(hub, "rl-b4", tokens["rl-b4"], make_csr(new_key(), "rl-b4"))
        assert (resp.status, resp.code) == (429, "rate_limited"), resp.text
        assert int(resp.headers["retry-after"]) >= 1
        assert hub.cert_count("rl-b4") == 0
        resp = enroll(hub, "rl-b4", tokens["rl-b4"], make_csr(new_key(), "rl-b4"), source="127.0.0.2")
        assert resp.status == 200, resp.text


def challenge_first_enroll(hub, device_id: str, token: str) -> tuple[int, int]:
    """libest estclient's flow: POST without credentials, expect the 401 challenge, POST again with Basic."""
    body, ctx = b64_body(make_csr(new_key(), device_id)), tls_context(hub)
    statuses = []
    for headers in ({"Content-Type": CT}, {"Content-Type": CT, "Authorization": basic(device_id, token)}):
        conn = http.client.HTTPSConnection("127.0.0.1", hub.port, context=ctx, timeout=30)
        try:
            conn.request("POST", ENROLL, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            if resp.status == 401:
                assert resp.getheader("WWW-Authenticate", "").startswith("Basic realm=")
        finally:
            conn.close()
    return statuses[0], statuses[1]


def test_a_factory_line_behind_one_address_enrolls_with_the_challenge_first_flow(tmp_path):
    """100 devices, one source, each first challenged: all enroll (the challenges are not failures); then one
    device's few failures, below its budget, do not block its right token."""
    with running_hub(tmp_path) as hub:  # default limits: 30 failures a minute per device, 300 per source
        out = tmp_path / "tokens.csv"
        hub.cli_ok("token", "create", "--count", "100", "--prefix", "line", "--out", str(out))
        pairs = [line.split(",")[:2] for line in out.read_text().splitlines()[1:]]
        assert len(pairs) == 100
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda p: challenge_first_enroll(hub, *p), pairs))
        assert results == [(401, 200)] * 100, [r for r in results if r != (401, 200)][:5]
        assert hub.query("SELECT COUNT(*) AS n FROM certificates")[0]["n"] == 100

        # control for test_failures_per_minute_then_429: 5 failures (of 30 a minute) do not block the right token
        token = hub.add_device("rl-3")
        for attempt in range(5):
            resp = enroll(hub, "rl-3", f"wrong-token-{attempt:02d}-xxxxxxxxxxxxxxxx", make_csr(new_key(), "rl-3"))
            assert resp.status == 401, resp.text
        resp = enroll(hub, "rl-3", token, make_csr(new_key(), "rl-3"))
        assert resp.status == 200, resp.text


def test_one_guesser_is_limited_while_its_neighbours_enroll(tmp_path):
    """A device guessing tokens gets 429 + Retry-After; the other devices behind the same address still enroll."""
    with running_hub(tmp_path, failures_per_minute=5) as hub:
        out = tmp_path / "tokens.csv"
        hub.cli_ok("token", "create", "--count", "20", "--prefix", "nat", "--out", str(out))
        pairs = [line.split(",")[:2] for line in out.read_text().splitlines()[1:]]
        guesser = pairs[0][0]
        answers = [enroll(hub, guesser, f"guess-{i:03d}-{'x' * 24}", make_csr(new_key(), guesser)) for i in range(12)]
        assert [a.status for a in answers] == [401] * 5 + [429] * 7, [a.text for a in answers]
        assert all(1 <= int(a.headers["retry-after"]) <= 60 for a in answers[5:])
        assert {a.code for a in answers[:5]} == {"unauthorized"}  # never "unknown_token": the audit has that
        rows = hub.query("SELECT detail FROM audit WHERE action = 'enroll' AND outcome = 'denied' AND device_id = ?",
                         (guesser,))
        assert [r["detail"].split(":")[0] for r in rows].count("unknown_token") == 1  # first at once, rest counted
        for device_id, token in pairs[1:]:
            resp = enroll(hub, device_id, token, make_csr(new_key(), device_id))
            assert resp.status == 200, (device_id, resp.text)
        # the guesser's real token is refused while its failures are recent (nothing consumed)
        resp = enroll(hub, guesser, pairs[0][1], make_csr(new_key(), guesser))
        assert resp.status == 429 and hub.cert_count(guesser) == 0
        assert request(hub, "GET", f"{EST_PREFIX}/cacerts").status == 200
    rows = hub.query("SELECT detail FROM audit WHERE action = 'enroll' AND outcome = 'denied' AND detail LIKE "
                     "'unknown_token:%'")
    assert sum(row_count(r["detail"]) for r in rows) == 5  # written aggregated by the time the hub stopped
