"""Certificate renewal in a short-lived child of `tessera-agent run` (JSON request on stdin, JSON answer out).

Renewal needs cryptography, python-pkcs11 (through hsm.worker) and a second TLS context with the token key;
doing it in a child keeps the long-running session small (about 29 MB instead of 50) and its PKCS#11 state
untouched. The parent re-reads identity.json afterwards.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime


def main() -> int:
    import logging

    from .config import load_dict
    from .enroll import renew

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    req = json.loads(sys.stdin.read())
    try:
        ident = renew(load_dict(req["config"]), rotate_key=bool(req.get("rotate")),
                      now=datetime.fromisoformat(req["now"]))
    except Exception as exc:  # the parent logs it and retries later
        print(json.dumps({"ok": False, "error": str(exc) or exc.__class__.__name__}))
        return 1
    print(json.dumps({"ok": True, "serial": ident.serial, "not_after": ident.not_after}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
