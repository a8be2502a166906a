"""Which device a token key belongs to: enrollment marks a key's CKA_ID with the device id, and a key marked for
(or recorded in identity.json as) another device is refused, never reused.

A marked id is ``b"tessera:" + device_id + b":" + 4 random bytes`` (unique per key, so a rotated key never shares
an id with the one it replaces); the key URI carries it percent-encoded. Keys made by other tools carry no mark and
are judged by identity.json alone.
"""

from __future__ import annotations

import secrets

PREFIX = b"tessera:"
RANDOM_BYTES = 4


def new_key_id(device_id: str) -> bytes:
    """A fresh CKA_ID that names `device_id`."""
    return PREFIX + device_id.encode("ascii") + b":" + secrets.token_bytes(RANDOM_BYTES)


def owner_of(key_id: bytes) -> str | None:
    """The device id a marked CKA_ID names; None for an unmarked id."""
    key_id = bytes(key_id)
    if not key_id.startswith(PREFIX):
        return None
    # the random tail is a fixed RANDOM_BYTES long and may itself hold b":", so cut it off by length, not by search
    body = key_id[len(PREFIX):]
    owner, sep = body[:-RANDOM_BYTES - 1], body[-RANDOM_BYTES - 1:-RANDOM_BYTES]
    if sep != b":" or not owner:
        return None
    try:
        return owner.decode("ascii")
    except UnicodeDecodeError:
        return None


def foreign_key_refusal(key_label: str, key_id: bytes, token_label: str, device_id: str,
                        recorded_device: str | None = None, recorded_label: str | None = None) -> str | None:
    """None if the key may serve `device_id`; else the one-line error.

    `recorded_device`/`recorded_label`: what identity.json in the state directory says (an unmarked key recorded
    there for another device is another device's key as well).
    """
    owner = owner_of(key_id)
    if owner is None and recorded_device and recorded_label == key_label:
        owner = recorded_device
    if owner is None or owner == device_id:
        return None
    return (f"token key {key_label!r} on token {token_label!r} belongs to device {owner!r}, not {device_id!r}; "
            f"refusing to enroll {device_id} with another device's key (give this device its own token, or a key "
            "label of its own: --set token.key_label=NAME)")
