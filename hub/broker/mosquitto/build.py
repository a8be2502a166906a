"""Compile the Mosquitto authorization plugin (tessera_authz.c, next to this file) into a cached shared object.

`plugin_path(dest_dir)` returns `dest_dir/tessera_authz-<hash>.so`, where the hash covers the source and the
compiler command, so an edited source gets a new file and an unchanged one is reused. The build writes a temporary
file in `dest_dir` and renames it into place: a broker never loads a half-written plugin, and two hubs building at
once both end with a complete file. Importing this module does nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .. import BrokerError

SOURCE = Path(__file__).with_name("tessera_authz.c")
COMPILER = "cc"
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra")
LIBS = ("-lsqlite3", "-lcrypto")
#: What a Debian system needs to build the plugin.
BUILD_PACKAGES = "gcc libsqlite3-dev libssl-dev mosquitto-dev libmosquitto-dev uthash-dev"
BUILD_TIMEOUT = 120.0


def _missing(what: str) -> BrokerError:
    return BrokerError(f"cannot build the Mosquitto plugin: {what}; install the Debian packages {BUILD_PACKAGES}")


def plugin_path(dest_dir: Path) -> Path:
    """The plugin built from the current source, in `dest_dir` (built now unless that exact build is there).

    Raises BrokerError (one line) if the compiler or a header or library is missing, or the build fails."""
    source = SOURCE.read_bytes()
    command = (COMPILER, *CFLAGS, *LIBS)
    digest = hashlib.sha256(source + b"\0" + "\0".join(command).encode()).hexdigest()[:16]
    dest_dir = Path(dest_dir)
    dest = dest_dir / f"tessera_authz-{digest}.so"
    if dest.exists():
        return dest
    if shutil.which(COMPILER) is None:
        raise _missing(f"no C compiler ({COMPILER})")
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tessera_authz-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([COMPILER, *CFLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True,
                                  text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BrokerError(f"cannot build the Mosquitto plugin: {COMPILER} took over {BUILD_TIMEOUT:.0f} s") \
                from None
        if proc.returncode != 0:
            header = re.search(r"fatal error: ([\w./+-]+): No such file", proc.stderr)
            library = re.search(r"cannot find (-l\w+)", proc.stderr)
            if header or library:
                raise _missing(f"{header.group(1) if header else library.group(1)} not found")
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
            raise BrokerError(f"cannot build the Mosquitto plugin {SOURCE.name}: {first.strip()}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
