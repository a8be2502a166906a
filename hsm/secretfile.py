"""Reading secret files (PINs, tokens, key files): regular files that group and others cannot access."""

from __future__ import annotations

import stat
from pathlib import Path


class PrivateFileError(ValueError):
    """The secret file is missing, not a regular file, or too widely readable; the message says which."""


def read_private_file(path: str | Path, what: str) -> bytes:
    """The bytes of `path`, refusing a file with any group/other permission bit ("refusing ... 0600")."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise PrivateFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PrivateFileError(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise PrivateFileError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; refusing to use it: it must "
                               f"be 0600 or tighter (chmod 600 {path})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PrivateFileError(f"cannot read {what} {path}: {exc.strerror}") from None
