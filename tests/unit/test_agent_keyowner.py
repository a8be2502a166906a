"""agent.keyowner: a token key's CKA_ID names its device; another device's key is refused, never reused."""

from __future__ import annotations

import pytest

from agent.keyowner import PREFIX, foreign_key_refusal, new_key_id, owner_of


def test_a_new_key_id_names_its_device_and_is_unique():
    a, b = new_key_id("sensor-0001"), new_key_id("sensor-0001")
    assert a != b and a.startswith(PREFIX)
    assert owner_of(a) == owner_of(b) == "sensor-0001"


@pytest.mark.parametrize("tail", [b"\xea\xb4:\t", b"::::", b":abc", b"abc:"])
def test_a_random_tail_holding_colons_still_names_the_device(tail):
    # CI once drew b"\xea\xb4:\t": a search for the last b":" took the tail's colon for the separator
    assert owner_of(PREFIX + b"sensor-0001:" + tail) == "sensor-0001"


@pytest.mark.parametrize("key_id", [b"\x01" * 8, b"tessera:", b"tessera:x", b"tessera::\x00\x01", b"tessera:\xff:1"])
def test_unmarked_ids_have_no_owner(key_id):
    assert owner_of(key_id) is None


def test_the_same_device_may_reuse_its_key():
    assert foreign_key_refusal("device-key", new_key_id("d1"), "tok", "d1") is None
    assert foreign_key_refusal("device-key", b"\x07" * 8, "tok", "d1") is None  # unmarked, nothing recorded
    assert foreign_key_refusal("device-key", b"\x07" * 8, "tok", "d1", "d1", "device-key") is None


def test_another_devices_key_is_refused_naming_both():
    msg = foreign_key_refusal("device-key", new_key_id("d1"), "tok", "d2")
    assert msg and "belongs to device 'd1', not 'd2'" in msg and "\n" not in msg
    # an unmarked key that identity.json records for another device
    msg = foreign_key_refusal("device-key", b"\x07" * 8, "tok", "d2", "d1", "device-key")
    assert msg and "'d1'" in msg
    # identity.json records another label: this key is not that device's
    assert foreign_key_refusal("other-key", b"\x07" * 8, "tok", "d2", "d1", "device-key") is None
