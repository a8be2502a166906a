"""The `[est]` limits are the hub's, exact across EST worker processes (hub/est/sharedlimits.py).

Each test sends part of a source's requests to one worker and the rest to the other: the worker not meant to
answer is stopped (SIGSTOP) while the other serves, so which worker answers is known, not left to the kernel.
With the budget split 1/N per worker (the old design: ceil(3/2) = 2 each) a budget of 3 met 2 + 2 requests
would admit all 4; held by the supervisor, it admits 3 and answers the 4th 429 with Retry-After.

Cost: two hubs with 2 workers each, about 10 s on 2 cores.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.hubfixtures import (EST_PREFIX, b64_body, enroll, make_csr, new_key, request, running_hub,
                                           tls_context)
from tests.integration.agentfixtures import wait_until
from tests.integration.test_est_workers import workers_of

pytestmark = pytest.mark.integration

ENROLL = f"{EST_PREFIX}/simpleenroll"


def _state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "T"  # a thread that ended


@contextmanager
def only(hub, index: int):
    """While inside, only worker `index` (of 2) takes connections: the other one is stopped."""
    other = workers_of(hub)[1 - index]
    os.kill(other, signal.SIGSTOP)  # delivered asynchronously: wait until every thread of it has stopped
    wait_until(lambda: all(_state(task) in ("T", "t") for task in Path(f"/proc/{other}/task").iterdir()), 10,
               f"EST worker {other} stopped")
    try:
        yield
    finally:
        os.kill(other, signal.SIGCONT)


def served_by_both(hub, what: str) -> bool:
    lines = [line for line in hub.stderr_path.read_text(errors="replace").splitlines() if what in line]
    return all(any(f"[est-{i}]" in line for line in lines) for i in (0, 1))


def test_a_burst_spread_over_both_workers_admits_exactly_the_burst(tmp_path):
    with running_hub(tmp_path, workers=2, rate_per_source=0.001, rate_burst=3) as hub:
        ids = [f"ex-b{i}" for i in range(4)]
        tokens = {d: hub.add_device(d) for d in ids}
        answers = []
        for index, batch in ((0, ids[:2]), (1, ids[2:])):
            with only(hub, index):
                answers += [enroll(hub, d, tokens[d], make_csr(new_key(), d)) for d in batch]
        assert [a.status for a in answers] == [200, 200, 200, 429], [a.text for a in answers]
        assert 1 <= int(answers[-1].headers["retry-after"])
        assert served_by_both(hub, "ex-b")
        assert hub.cert_count("ex-b3") == 0


@pytest.fixture(scope="module")
def strict_hub(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("exact"), workers=2, failures_per_minute=3,
                     max_connections_per_source=3) as hub:
        yield hub


def test_failures_spread_over_both_workers_spend_one_budget_and_the_challenge_is_free(strict_hub):
    hub = strict_hub
    token = hub.add_device("ex-f")
    statuses = []
    for index, attempts in ((0, 2), (1, 2)):
        with only(hub, index):
            # the 401 challenge (no credentials yet) is no failure: one before each worker's attempts
            challenge = request(hub, "POST", ENROLL, b64_body(make_csr(new_key(), "ex-f")),
                                {"Content-Type": "application/pkcs10"})
            assert challenge.status == 401 and "www-authenticate" in challenge.headers
            statuses += [enroll(hub, "ex-f", f"wrong-{index}-{i}-xxxxxxxxxxxxxxxxxxxx",
                                make_csr(new_key(), "ex-f")).status for i in range(attempts)]
    assert statuses == [401, 401, 401, 429]
    with only(hub, 0):  # the budget is spent for both workers: even the right token waits
        resp = enroll(hub, "ex-f", token, make_csr(new_key(), "ex-f"))
    assert resp.status == 429 and 1 <= int(resp.headers["retry-after"]) <= 60
    assert hub.cert_count("ex-f") == 0
    assert served_by_both(hub, "denied for 'ex-f'")


def _tls(hub, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", hub.port), timeout=10, source_address=(source, 0))
    return tls_context(hub).wrap_socket(raw, server_hostname="127.0.0.1")


def test_connections_open_at_once_are_counted_across_workers(strict_hub):
    hub = strict_hub
    source = "127.0.0.7"
    held = []
    try:
        for index in (0, 1):
            with only(hub, index):
                held += [_tls(hub, source) for _ in range(2 if index == 0 else 1)]
        with only(hub, 1):  # the 4th connection at once from this source: closed before TLS
            with pytest.raises((ssl.SSLError, ConnectionError)):
                held.append(_tls(hub, source))
    finally:
        for sock in held:
            sock.close()
