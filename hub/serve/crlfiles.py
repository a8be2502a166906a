"""What the plain-HTTP CRL listener answers: the published CRLs by fixed name, as DER, with their cache validators.

No I/O beyond reading the two files of the CRL directory, no HTTP library: `answer()` turns (method, request
target, conditional headers, now) into a status, headers and body, so every rule here is tested without a socket
(tests/unit/test_crl_http.py).

- Only the names in ROUTES exist, matched byte for byte against the raw request target's path (the query string
  is ignored, an absolute-form target `http://host/crl/device.crl` is its path, RFC 9112 3.2.2): nothing is ever
  joined to a directory from a request, so `/crl/../fleet.toml`, `/crl/%2e%2e/...` or `/crl//device.crl` are 404
  whatever they would normalise to.
- GET and HEAD only (anything else: 405 with `Allow`), bodies only on 200.
- `ETag` is a hash of the DER; `Last-Modified` is the CRL's thisUpdate; `If-None-Match` (weak comparison, `*`) wins
  over `If-Modified-Since` (RFC 9110 13.2.2); either gives 304 with the validators and no body.
- `Cache-Control: max-age` is at most MAX_AGE and never past the CRL's nextUpdate: the hub republishes the device
  CRL at every revocation, so a cache must not keep one for the 7 days a CRL is valid.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hub.ca.crl import DER_NAME
from hub.ca.revocation import SERVICE_CRL

#: request path -> (file in the CRL directory, the status while it is missing). The device CRL is DER on disk, the
#: service CRL PEM: both go out as DER. `init` publishes the device CRL (missing: 503, a moment's gap); the service
#: CRL comes with serve's first publication after a change (until then there is none: 404).
ROUTES = {"/crl/device.crl": (DER_NAME, 503), "/crl/service.crl": (SERVICE_CRL, 404)}
CONTENT_TYPE = "application/pkix-crl"  # RFC 2585 3
#: The longest a cache may keep a CRL (seconds): a revocation reaches caching relying parties within this.
MAX_AGE = 300
ALLOW = "GET, HEAD"

_ETAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*(?:,|$)')


@dataclass(frozen=True)
class Snapshot:
    """One published CRL as served: its DER and what the caching headers say about it."""

    der: bytes
    etag: str                    # a strong entity tag, quoted
    last_modified: datetime      # the CRL's thisUpdate (UTC, whole seconds)
    next_update: datetime | None


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def snapshot(data: bytes) -> Snapshot:
    """The Snapshot of a CRL file's bytes (DER or PEM); ValueError if they are not a CRL."""
    if data.lstrip().startswith(b"-----BEGIN"):
        crl = x509.load_pem_x509_crl(data)
        der = crl.public_bytes(serialization.Encoding.DER)
    else:
        crl, der = x509.load_der_x509_crl(data), bytes(data)
    return Snapshot(der=der, etag='"' + hashlib.sha256(der).hexdigest()[:32] + '"',
                    last_modified=crl.last_update_utc.replace(microsecond=0), next_update=crl.next_update_utc)


class CrlFiles:
    """The CRLs of one CRL directory, re-read only when a file was replaced (its inode, size or mtime changed: the
    publisher renames a new file into place). Thread-safe."""

    def __init__(self, crl_dir: Path):
        self.crl_dir = Path(crl_dir)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], Snapshot]] = {}

    def get(self, name: str) -> Snapshot | None:
        """The current Snapshot of file `name`, None when it is missing or not a CRL."""
        path = self.crl_dir / name
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                with self._lock:
                    cached = self._cache.get(name)
                if cached is not None and cached[0] == key:
                    return cached[1]
                data = fh.read()
        except OSError:
            return None
        try:
            snap = snapshot(data)
        except ValueError:
            return None
        with self._lock:
            self._cache[name] = (key, snap)
        return snap


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match value (`*` or a list of entity tags) matches `etag` (weak comparison)."""
    value = if_none_match.strip()
    if value == "*":
        return True
    wanted = etag.strip('"')
    pos = 0
    while pos < len(value):
        match = _ETAG.match(value, pos)
        if match is None:
            return False  # not a list of entity tags: no match (the request is then unconditional)
        if match.group(1) == wanted:
            return True
        pos = match.end()
    return False


def modified_since(if_modified_since: str, last_modified: datetime) -> bool:
    """False when `last_modified` is not after the If-Modified-Since date; True also for a date that is not one."""
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError, IndexError):
        return True
    if since is None or since.tzinfo is None:
        return True
    return last_modified > since


def cache_headers(snap: Snapshot, now: datetime) -> dict[str, str]:
    """ETag, Last-Modified and Cache-Control (max-age: MAX_AGE at most, never past nextUpdate) for `snap`."""
    max_age = MAX_AGE
    if snap.next_update is not None:
        max_age = max(0, min(MAX_AGE, int((snap.next_update - now).total_seconds())))
    return {"ETag": snap.etag, "Last-Modified": format_datetime(snap.last_modified, usegmt=True),
            "Cache-Control": f"public, max-age={max_age}, no-transform"}


def answer(files: CrlFiles, method: str, target: str, if_none_match: str | None = None,
           if_modified_since: str | None = None, now: datetime | None = None) -> Answer:
    """The answer to one request: `target` is the raw request target (path and query, as received)."""
    if method not in ("GET", "HEAD"):
        return Answer(405, {"Allow": ALLOW})
    path = target.split("?", 1)[0]
    if path[:7].lower() == "http://":  # absolute-form: the path after the authority
        slash = path.find("/", 7)
        path = path[slash:] if slash >= 0 else "/"
    route = ROUTES.get(path)
    if route is None:
        return Answer(404)
    name, missing = route
    snap = files.get(name)
    if snap is None:
        return Answer(missing, {"Retry-After": "10"} if missing == 503 else {})
    headers = cache_headers(snap, now or datetime.now(timezone.utc))
    if if_none_match is not None:
        fresh = etag_matches(if_none_match, snap.etag)
    else:
        fresh = if_modified_since is not None and not modified_since(if_modified_since, snap.last_modified)
    if fresh:
        return Answer(304, headers)
    return Answer(200, {**headers, "Content-Type": CONTENT_TYPE}, snap.der)
