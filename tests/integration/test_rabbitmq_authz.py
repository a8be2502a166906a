"""One table of connect cases, two enforcement points: the Mosquitto plugin (C) and hub/authz/decide.py (Python,
what the RabbitMQ auth back end decides with) must refuse the same credentials for the same reason.

The plugin runs in a bare broker (test_authz_plugin.py's Pki and Broker: real registry, real certificates); its
reason is read from its log line. Python's is `decide.connect` over the same registry file (and, for RabbitMQ's
name-only question, `decide.by_name` where the principal has no other usable certificate). No RabbitMQ needed:
seconds.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from hub.authz import decide
from tests.integration.test_authz_plugin import (NOT_AUTHORIZED, Broker, Pki, connack, utcnow)  # noqa: F401
from tests.integration.test_authz_plugin import broker, pki  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.integration


def python_reason(fleet: Pki, cred, client_id: str | None) -> str | None:
    with sqlite3.connect(f"file:{fleet.registry}?mode=ro", uri=True) as db:
        principal, reason = decide.connect(db, "device", cred.serial, cred.principal,
                                           client_id or cred.principal, utcnow())
    return reason


def test_one_table_both_enforcement_points(broker: Broker, pki: Pki) -> None:  # noqa: F811
    unknown, _ = pki.device_cert("tw-unknown")
    ok, revoked, suspended = pki.device("tw-ok"), pki.device("tw-revoked"), pki.device("tw-suspended")
    old = pki.device("tw-old")
    pki.reg.set_status("tw-revoked", "revoked", utcnow(), actor="test")
    pki.reg.set_status("tw-suspended", "suspended", utcnow(), actor="test")
    pki.renew(old, grace=timedelta(0))
    mismatch = pki.device("tw-mismatch")
    cases = [(ok, None, None), (unknown, None, "unknown certificate"), (revoked, None, "revoked"),
             (suspended, None, "suspended"), (old, None, "superseded"),
             (mismatch, "someone-else", "client id mismatch")]
    for cred, client_id, reason in cases:
        assert python_reason(pki, cred, client_id) == reason, (cred.principal, "python")
        code = connack(broker, cred, client_id)
        if reason is None:
            assert code == 0, cred.principal
            continue
        assert code == NOT_AUTHORIZED, (cred.principal, "plugin")
        principal = "-" if reason == "unknown certificate" else cred.principal
        broker.wait_log(f"refused principal={principal} serial={cred.serial} "
                        f"client_id={client_id or cred.principal}: {reason}")
    # RabbitMQ's name-only admission: the principal's status decides; a superseded certificate is the listener
    # CRL's business (the principal still holds a usable certificate)
    with sqlite3.connect(f"file:{pki.registry}?mode=ro", uri=True) as db:
        names = {name: decide.by_name(db, name, utcnow())[1]
                 for name in ("tw-ok", "tw-revoked", "tw-suspended", "tw-old", "tw-unknown")}
    assert names == {"tw-ok": None, "tw-revoked": "revoked", "tw-suspended": "suspended", "tw-old": None,
                     "tw-unknown": "unknown principal"}
