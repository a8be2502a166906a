"""Audit flooding: denials are audited aggregated, at most one row per (source, reason) a minute with a count.

The first denial of a (source, reason) is a row at once; the rest of that minute is one row "... (xN in 60 s)"
written when the minute ends or when the hub stops. Successful enrollments stay one row each.
"""

from __future__ import annotations

import http.client
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.hubfixtures import (
    EST_PREFIX, ForeignCA, basic, enroll, make_csr, new_key, request, running_hub, tls_context,
)

pytestmark = pytest.mark.integration

ENROLL = f"{EST_PREFIX}/simpleenroll"
BAD_REQUESTS = 500
COUNT = re.compile(r" \(x(\d+) in \d+ s\)$")


def row_count(detail: str) -> int:
    """How many denials an audit row stands for: "... (x17 in 60 s)" is 17, any other row 1."""
    match = COUNT.search(detail)
    return int(match.group(1)) if match else 1


def _bad_csrs(hub, n: int) -> list[int]:
    """n POSTs, each on its own connection, whose body is no base64 CSR (device ids flood-0..6)."""
    ctx, statuses = tls_context(hub), []
    for i in range(n):
        conn = http.client.HTTPSConnection("127.0.0.1", hub.port, context=ctx, timeout=30)
        try:
            conn.request("POST", ENROLL, body=b"MIIB!!notbase64**\r\n", headers={
                "Content-Type": "application/pkcs10", "Authorization": basic(f"flood-{i % 7}", "t" * 32)})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        finally:
            conn.close()
    return statuses


def test_500_bad_requests_are_a_handful_of_rows_whose_counts_add_up(tmp_path):
    # no budget in the way (this is about the audit): every one of the 500 is a 400 however fast they come
    with running_hub(tmp_path, failures_per_minute=100000, rate_per_source=100000.0, rate_burst=100000) as hub:
        token = hub.add_device("flood-ok")
        mark = hub.last_audit_id()
        with ThreadPoolExecutor(4) as pool:
            statuses = [s for part in pool.map(lambda n: _bad_csrs(hub, n), [BAD_REQUESTS // 4] * 4) for s in part]
        foreign_cert, foreign_key = ForeignCA(tmp_path / "foreign").client("flood-ok")
        foreign = 30
        for _ in range(foreign):  # a client certificate from another CA: refused in the handshake, every time
            with pytest.raises(OSError):
                request(hub, "GET", f"{EST_PREFIX}/cacerts", cert=foreign_cert, key=foreign_key)
        ok = enroll(hub, "flood-ok", token, make_csr(new_key(), "flood-ok"))
        assert ok.status == 200, ok.text
        live = hub.audit_since(mark)
        print(f"\n{BAD_REQUESTS} bad requests + {foreign} foreign-CA handshakes: {len(live)} audit rows while "
              f"running; statuses {sorted(set(statuses))}")
    # stopped: the counts still open were written at shutdown
    rows = [r for r in hub.audit_since(mark) if r["outcome"] == "denied"]
    for r in rows:
        print(f"  {r['action']:<8} {r['source']:<10} {r['detail'][:90]}")
    enroll_rows = [r for r in rows if r["action"] == "enroll"]
    tls_rows = [r for r in rows if r["action"] == "tls"]
    assert statuses == [400] * BAD_REQUESTS
    assert sum(row_count(r["detail"]) for r in enroll_rows) == BAD_REQUESTS
    assert 1 <= len(enroll_rows) <= 3  # one per minute, plus the one written at shutdown
    assert all(r["detail"].startswith("bad_base64:") for r in enroll_rows)
    assert any(COUNT.search(r["detail"]) for r in enroll_rows)
    assert sum(row_count(r["detail"]) for r in tls_rows) == foreign and 1 <= len(tls_rows) <= 3
    # successful enrollments are still one row each
    assert [(r["action"], r["outcome"]) for r in hub.audit_since(mark) if r["outcome"] == "ok"
            and r["action"] == "enroll"] == [("enroll", "ok")]
    assert all("t" * 32 not in r["detail"] for r in rows)


def test_429s_are_aggregated_too(tmp_path):
    with running_hub(tmp_path, failures_per_minute=3) as hub:
        mark = hub.last_audit_id()
        statuses = _bad_csrs(hub, 60)
        # three real failures per device id (7 ids), then only 429s; none of them is a new failure
        assert statuses.count(400) == 21 and statuses.count(429) == 39, statuses
    rows = [r for r in hub.audit_since(mark) if r["outcome"] == "denied"]
    by_code: dict[str, int] = {}
    for r in rows:
        code = r["detail"].split(":", 1)[0]
        by_code[code] = by_code.get(code, 0) + row_count(r["detail"])
    assert by_code == {"bad_base64": 21, "rate_limited": 39}, rows
    assert len(rows) <= 4


def test_token_guesses_over_many_device_ids_are_aggregated(tmp_path):
    """Refusals the registry decides (unknown or used tokens, devices not active) go through the same aggregation:
    a guesser spreading 200 wrong tokens over 40 registered device ids writes a handful of rows, not 200."""
    with running_hub(tmp_path, failures_per_minute=100000, source_failures_per_minute=100000,
                     rate_per_source=100000.0, rate_burst=100000) as hub:
        out = tmp_path / "tokens.csv"
        hub.cli_ok("token", "create", "--count", "40", "--prefix", "guess", "--out", str(out))
        ids = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
        mark = hub.last_audit_id()
        guesses = [(ids[n % len(ids)], f"guess-{n:04d}-{'x' * 24}") for n in range(200)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda g: enroll(hub, g[0], g[1], make_csr(new_key(), g[0])), guesses))
        assert {a.status for a in answers} == {401} and {a.code for a in answers} == {"unauthorized"}
        while_running = [r for r in hub.audit_since(mark) if r["outcome"] == "denied"]
        assert len(while_running) <= 2, while_running
    rows = [r for r in hub.audit_since(mark) if r["outcome"] == "denied"]
    assert all(r["action"] == "enroll" and r["detail"].startswith("unknown_token:") for r in rows), rows
    assert sum(row_count(r["detail"]) for r in rows) == len(guesses)
    assert 1 <= len(rows) <= 3
    assert all(hub.cert_count(device_id) == 0 for device_id in ids[:3])
