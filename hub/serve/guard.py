"""What `serve` checks before it touches anything: one serve per hub directory, private keys private, ports free.

Each check raises ConfigError with one line that says what is wrong and what to do; none of them changes a file
of a running hub (a second `serve` on the same directory used to rewrite the running broker's configuration).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from hub.config import ConfigError, HubConfig

LOCK_NAME = "serve.lock"


class DirectoryLock:
    """An exclusive flock on <hub>/serve.lock held for the life of `serve`; the file names the holder's PID."""

    def __init__(self, cfg: HubConfig):
        self.path = cfg.root / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another tessera-hub serve (pid {holder}) is running on {self.path.parent}; stop it "
                              f"first (nothing was changed)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def private_files(cfg: HubConfig) -> list[Path]:
    """Every secret of the hub directory: the TLS and CA private keys, the audit key, PIN files under the dir."""
    found = [p for d in (cfg.tls_dir, cfg.ca_dir) if d.is_dir() for p in sorted(d.glob("*.key"))]
    found += [p for p in (cfg.root / "audit.key",) if p.exists()]
    return found


def check_private_files(cfg: HubConfig) -> None:
    """Refuse to start when a private key file is readable or writable by others, or owned by another user."""
    for path in private_files(cfg):
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"{path} is mode {st.st_mode & 0o777:04o}: private keys must be readable by the hub's "
                              f"user only (chmod 600 {path})")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to the hub's user (uid {os.geteuid()})")


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Each named listener's port must be free on `host` (0: any port, not checked)."""
    for name, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners bind: TIME_WAIT is fine
            try:
                sock.bind((host, port))
            except OSError as exc:
                why = "in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise ConfigError(f"the {name} port {host}:{port} is {why}; stop that program or choose another "
                                  f"port (fleet.toml or --{name.lower()}-port)") from None


def check_registry(cfg: HubConfig, registry) -> None:
    """On a shared (PostgreSQL) registry: this hub must be of the registry's fleet — the same fleet name, root CA
    and audit key as the hub that first served it (recorded then in `meta`). Another fleet's hub would issue
    certificates the others cannot verify; another audit key would break the chain for every hub. SQLite: a file
    of this directory, nothing to check."""
    if registry.dialect != "postgresql":
        return
    import hashlib
    import hmac

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from hub.registry import audit as audit_chain
    from hub.registry.sql import safe_url

    root = x509.load_pem_x509_certificate((cfg.ca_dir / "root.pem").read_bytes())
    mine = {"fleet": cfg.fleet, "fleet_root_sha256": root.fingerprint(hashes.SHA256()).hex(),
            "audit_key_id": hmac.new(audit_chain.load_key(registry.path), b"tessera audit key id",
                                     hashlib.sha256).hexdigest()[:32]}
    with registry.write() as db:
        for key, value in mine.items():
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", [key, value])
        recorded = {r["key"]: r["value"] for r in db.query(
            "SELECT key, value FROM meta WHERE key IN (?, ?, ?)", list(mine))}
        what = {"fleet": f"fleet {recorded.get('fleet')!r}, not {cfg.fleet!r}",
                "fleet_root_sha256": "a fleet with another root CA than this hub's ca/root.pem",
                "audit_key_id": "a fleet with another audit key than this hub's audit.key"}
        for key, value in mine.items():
            if recorded.get(key) != value:  # raised inside the transaction: rolled back, nothing recorded
                raise ConfigError(f"the registry {safe_url(registry.url)} belongs to {what[key]}: a second hub "
                                  "copies the first one's files (tessera-hub init --join, docs/scale-out.md); "
                                  "nothing was changed")
