"""Per-source rate limits from fleet.toml: failed enrollments and request bursts end in 429 for that source only.

Each test runs its own hub (the limits are read at `serve`). Requests from 127.0.0.2 count as another source.
"""

from __future__ import annotations

import pytest

from tests.integration.hubfixtures import enroll, make_csr, new_key, running_hub

pytestmark = pytest.mark.integration


def test_failures_per_minute_then_429(tmp_path):
    with running_hub(tmp_path, failures_per_minute=4) as hub:
        token = hub.add_device("rl-1")
        hub.add_device("rl-2")
        token2 = hub.new_token("rl-2")
        for attempt in range(4):
            resp = enroll(hub, "rl-1", f"wrong-token-{attempt:02d}-xxxxxxxxxxxxxxxx", make_csr(new_key(), "rl-1"))
            assert (resp.status, resp.code) == (401, "unknown_token"), (attempt, resp.text)
        state, mark = hub.state(), hub.last_audit_id()

        # even the right token is refused now: this source has spent its failure budget
        resp = enroll(hub, "rl-1", token, make_csr(new_key(), "rl-1"))

        assert (resp.status, resp.code) == (429, "rate_limited"), resp.text
        assert hub.state() == state  # the token was not consumed, nothing issued
        rows = hub.audit_since(mark)
        assert [(r["action"], r["outcome"], r["source"]) for r in rows] == [("enroll", "denied", "127.0.0.1")]
        assert rows[0]["detail"].startswith("rate_limited:")
        # another source is not affected
        resp = enroll(hub, "rl-2", token2, make_csr(new_key(), "rl-2"), source="127.0.0.2")
        assert resp.status == 200, resp.text
        assert hub.cert_count("rl-2") == 1 and hub.cert_count("rl-1") == 0
        # and this one stays blocked
        resp = enroll(hub, "rl-1", token, make_csr(new_key(), "rl-1"))
        assert resp.status == 429


def test_failures_below_the_limit_are_not_rate_limited(tmp_path):
    """Control for the test above: with the default budget (30/min), 5 failures do not block the right token."""
    with running_hub(tmp_path) as hub:
        token = hub.add_device("rl-3")
        for attempt in range(5):
            resp = enroll(hub, "rl-3", f"wrong-token-{attempt:02d}-xxxxxxxxxxxxxxxx", make_csr(new_key(), "rl-3"))
            assert resp.status == 401, resp.text
        resp = enroll(hub, "rl-3", token, make_csr(new_key(), "rl-3"))
        assert resp.status == 200, resp.text


def test_request_burst_then_429(tmp_path):
    with running_hub(tmp_path, rate_per_source=0.01, rate_burst=3) as hub:
        tokens = {d: hub.add_device(d) for d in ("rl-b1", "rl-b2", "rl-b3", "rl-b4")}
        for device_id in ("rl-b1", "rl-b2", "rl-b3"):
            resp = enroll(hub, device_id, tokens[device_id], make_csr(new_key(), device_id))
            assert resp.status == 200, resp.text
        resp = enroll(hub, "rl-b4", tokens["rl-b4"], make_csr(new_key(), "rl-b4"))
        assert (resp.status, resp.code) == (429, "rate_limited"), resp.text
        assert hub.cert_count("rl-b4") == 0
        resp = enroll(hub, "rl-b4", tokens["rl-b4"], make_csr(new_key(), "rl-b4"), source="127.0.0.2")
        assert resp.status == 200, resp.text
