"""What a PKCS#11 module writes to stderr during one call, kept so that a refusal can quote the module's reason.

PKCS#11 return codes name no attribute; modules such as tpm2-pkcs11 say which one on stderr
("User specified and TPM specified attr mismatch: 0x10a"). Used only in the key worker child (hsm.worker), one
call at a time: file descriptor 2 is pointed at a temporary file for the call and restored after it, and what
the module wrote is passed on to the real stderr unchanged, so nothing is hidden from the log.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

_MAX = 160


class ModuleOutput:
    """Filled in when the `captured` block ends: all the module wrote, and its first line (escaped, cut short)."""

    def __init__(self) -> None:
        self.text = ""
        self.reason = ""


@contextlib.contextmanager
def captured() -> Iterator[ModuleOutput]:
    out = ModuleOutput()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: run the call as it is
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            raw = tmp.read(64 * 1024)
            if raw:
                os.write(2, raw)
            out.text = raw.decode("utf-8", "replace")
            lines = [line.strip() for line in out.text.splitlines() if line.strip()]
            if lines:
                # the reason: the first error line (later ones say "failed to ..." about the caller)
                errors = [x for x in lines if x.upper().startswith("ERROR") and "failed to" not in x.lower()]
                own = [x for x in errors if x.startswith("ERROR: ")]  # the module's own words, not its TSS's
                line = (own or errors or lines)[0].encode("unicode_escape").decode("ascii")
                out.reason = line if len(line) <= _MAX else line[: _MAX - 1] + "…"
