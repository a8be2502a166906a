"""Move a fleet's CA keys from files into a PKCS#11 token, without changing any certificate."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime


from hsm.token import TokenConfig, open_session

from hub.ca.authority import KEYS_FORMAT, TOKEN_LABELS, CaError, CaPaths, load_ca, load_key_file
from hub.config import HubConfig


def _shred(path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())
    path.unlink()


def move_keys_to_token(cfg: HubConfig, token: TokenConfig, now: datetime) -> dict[str, str]:
    """Import root/device/service CA keys into `token`, prove each signs, then destroy the key files.

    All or nothing: on any failure the imported objects are destroyed and the files stay. Returns role -> URI.
    """
    from hsm.keys import find_private_key, find_public_key, import_private_key

    if cfg.ca_store != "file":
        raise CaError("the CA keys are already in a PKCS#11 token")
    paths = CaPaths(cfg.ca_dir)
    keys = {role: load_key_file(paths.key_file(role)) for role in TOKEN_LABELS}
    uris: dict[str, str] = {}
    with open_session(token, rw=True) as session:
        try:
            for role, label in TOKEN_LABELS.items():
                uris[role] = import_private_key(session, keys[role], label).uri
            record = {"format": KEYS_FORMAT, "token": session.token.label, "keys": uris}
            paths.keys_json.write_text(json.dumps(record, indent=2) + "\n")
            ca = load_ca(cfg.ca_dir, session=session)  # checks every token key against its certificate
            crl = ca.build_crl([], now, crl_number=1)  # and that the token really signs with the device CA key
            if not crl.is_signature_valid(ca.device_ca.public_key()):
                raise CaError("the token's device CA key does not produce valid signatures")
        except BaseException:
            paths.keys_json.unlink(missing_ok=True)
            for label in TOKEN_LABELS.values():
                for find in (find_private_key, find_public_key):
                    try:
                        find(session, label).destroy()
                    except Exception:
                        pass
            raise
    new = dataclasses.replace(cfg, ca_store="pkcs11", ca_token_label=token.label, ca_pin_source=token.pin_source,
                              ca_module=token.module, ca_softhsm_conf=token.softhsm_conf)
    new.save()
    for role in TOKEN_LABELS:
        _shred(paths.key_file(role))
    return uris


__all__ = ["move_keys_to_token"]
