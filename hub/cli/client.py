"""The CLI's fleet API client: stdlib `http.client` + `ssl` only (the revoke command's hot path imports nothing heavy).

Where the CLI talks to, and as whom:
* remote: `--hub https://host:port` (or `hub = ...` in `~/.config/tessera/cli.toml`, `$XDG_CONFIG_HOME` honoured;
  `[profiles.NAME]` tables chosen with `--profile`) with the operator credential named there: `cert`, `key`, `ca`
  (PEM files as `tessera-hub identity add` writes them; the key file must be 0600).
* local (no hub URL anywhere): the hub directory's own operator identity `svc.local-admin` (tls/local-admin.pem
  and .key, made by `init`, ensured by `serve`), to https://127.0.0.1:<the port the running hub announced in
  `api.addr`, else fleet.toml's [api] port>. When nothing listens there (no hub running), the same API answers
  in-process (hub.cli.offline: the API's own handlers over the registry, with a broker stand-in).

TLS 1.2 at least; the server is verified against the fleet root (the `ca` file; locally ca/root.pem) and its name;
one keep-alive connection serves every call of a client. Errors: `ApiError` (an RFC 9457 problem: str() is its
one-line detail), `HubUnavailable` (nothing answered).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode, urlsplit

LOCAL_IDENTITY = "local-admin"  # principal svc.local-admin, role admin
ADDR_FILE = "api.addr"  # "<host> <port>", written by a running `serve`, removed when it stops
DEFAULT_PORT = 8444
TIMEOUT = 120.0


class ApiError(Exception):
    """The API answered with a problem (or the call could not be made); str() is the one-line detail."""

    def __init__(self, status: int, title: str, detail: str, body: Any = None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.body = status, title, detail, body

    def __str__(self) -> str:
        return " ".join(str(self.detail).split()) or self.title


class HubUnavailable(ApiError):
    """Nothing answered at the hub's address (connection refused, unreachable, TLS failure)."""

    def __init__(self, detail: str):
        super().__init__(0, "Hub unavailable", detail)


class CredentialError(ApiError):
    """cli.toml, the credential files or the hub URL are missing or wrong (nothing was sent)."""

    def __init__(self, detail: str):
        super().__init__(0, "Credentials", detail)


# --- where and as whom ------------------------------------------------------------------------------------------

class Target:
    """Where the API is and the credential to show it (a plain class: dataclasses costs the hot path ~20 ms)."""

    __slots__ = ("host", "port", "cert", "key", "ca", "local_dir")

    def __init__(self, host: str, port: int, cert: Path, key: Path, ca: Path, local_dir: Path | None = None):
        self.host, self.port, self.cert, self.key, self.ca = host, port, cert, key, ca
        self.local_dir = local_dir  # the hub directory (local use): no answer -> the API in-process

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tessera" / "cli.toml"


def _load_toml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CredentialError(f"{path} is not valid: {' '.join(str(exc).split())}") from None


def _parse_url(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise CredentialError(f"--hub {url!r} is not a URL like https://hub.example:8444") from None
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.username or parts.password:
        raise CredentialError(f"--hub {url!r} is not a URL like https://hub.example:8444")
    return parts.hostname, port


def _file(section: dict, key: str, base: Path, where: str) -> Path:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise CredentialError(f"{where} needs {key} = \"/path/to/file\" (a PEM file as `identity add` writes it)")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def check_key_file(path: Path) -> None:
    """The operator's private key: a regular file of ours, 0600 (or stricter); CredentialError otherwise."""
    try:
        st = path.stat()
    except OSError as exc:
        raise CredentialError(f"key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise CredentialError(f"key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"chmod 600 {path}")


def resolve(directory: Path | None, hub: str | None, profile: str | None = None) -> Target:
    """The API to talk to and the credential to use (see the module docstring)."""
    path = config_path()
    conf = _load_toml(path)
    section: dict = conf
    where = str(path)
    if profile:
        profiles = conf.get("profiles")
        if not isinstance(profiles, dict) or not isinstance(profiles.get(profile), dict):
            raise CredentialError(f"no profile {profile!r} in {path} (a [profiles.{profile}] table)")
        section, where = profiles[profile], f"{path} [profiles.{profile}]"
    url = hub or section.get("hub")
    if url:
        if not isinstance(url, str):
            raise CredentialError(f"{where}: hub must be a URL string")
        host, port = _parse_url(url)
        if not (section.get("cert") or section.get("key") or section.get("ca")):
            raise CredentialError(f"a remote hub needs an operator credential: cert, key and ca in {where}")
        base = path.parent
        cert, key, ca = (_file(section, k, base, where) for k in ("cert", "key", "ca"))
        for p in (cert, ca):
            if not p.is_file():
                raise CredentialError(f"{p} does not exist (named in {where})")
        check_key_file(key)
        return Target(host, port, cert, key, ca)
    return local_target(directory)


def local_target(directory: Path | None) -> Target:
    """The hub directory's API and operator identity. Reads only what it needs (hub.config's checks of fleet.toml
    run where the registry is opened: the hub, or the in-process API), to keep the revoke path lean."""
    root = Path(directory or os.environ.get("TESSERA_HUB_DIR") or "tessera-hub").absolute()  # as hub.config.hub_dir
    if not (root / "fleet.toml").is_file():
        raise CredentialError(f"{root} is not a Tessera fleet directory (no fleet.toml); "
                              "run `tessera-hub init` or pass --dir / set TESSERA_HUB_DIR")
    host, port = "127.0.0.1", 0  # port 0: no hub of this directory announced its API, so none runs
    try:
        h, p = (root / ADDR_FILE).read_text().split()
        host, port = ("127.0.0.1" if h in ("0.0.0.0", "::", "") else h), int(p)
    except (OSError, ValueError):
        pass
    tls = root / "tls"
    return Target(host, port, tls / f"{LOCAL_IDENTITY}.pem", tls / f"{LOCAL_IDENTITY}.key", root / "ca" / "root.pem",
                  local_dir=root)


# --- the client ---------------------------------------------------------------------------------------------------

def _context(target: Target) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(target.ca))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"CA file {target.ca}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        ctx.load_cert_chain(str(target.cert), str(target.key))
    except FileNotFoundError:
        missing = next((p for p in (target.cert, target.key) if not p.exists()), target.cert)
        if target.local_dir is not None:
            raise CredentialError(f"the hub's local operator identity is missing ({missing}); restart "
                                  "`tessera-hub serve` (it makes it), or use --hub with a credential") from None
        raise CredentialError(f"{missing} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"credential {target.cert} / {target.key} is not a PEM certificate and its key "
                              f"({getattr(exc, 'strerror', None) or exc})") from None
    return ctx


class ApiClient:
    """Calls to one fleet API over one keep-alive HTTPS connection. Use as a context manager (or call close())."""

    def __init__(self, target: Target, timeout: float = TIMEOUT):
        self.target, self.timeout = target, timeout
        self._ctx: ssl.SSLContext | None = None
        self._conn: http.client.HTTPSConnection | None = None
        self._used = False
        self._host, self._port = target.host, target.port
        self.offline = None  # the in-process API (hub.cli.offline.OfflineHub) when no hub answered locally

    # connection
    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            if self._port == 0 and self.offline is None:  # local, and no hub announced its API: none runs
                self._go_offline()
            if self._ctx is None:
                if self.target.local_dir is None:
                    check_key_file(self.target.key)
                elif self.offline is None and not (self.target.cert.exists() and self.target.key.exists()):
                    self._local_identity_missing()
                self._ctx = _context(self.target)
            self._conn = http.client.HTTPSConnection(self._host, self._port, context=self._ctx,
                                                     timeout=self.timeout)
            try:
                self._conn.connect()
            except ConnectionRefusedError:
                self._conn = None
                if self.target.local_dir is None or self.offline is not None:
                    raise HubUnavailable(f"no fleet API answers at {self.target.url} (connection refused)") from None
                self._go_offline()
                return self._connection()
            except ssl.SSLCertVerificationError as exc:
                self._conn = None
                if self.target.local_dir is not None and self.offline is None:  # a stale api.addr, port reused
                    self._go_offline()
                    return self._connection()
                raise HubUnavailable(f"{self.target.url} is not this fleet's hub: {exc.verify_message}") from None
            except (ssl.SSLError, OSError) as exc:
                self._conn = None
                raise HubUnavailable(f"cannot reach the fleet API at {self.target.url}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._used = False
        return self._conn

    def _local_identity_missing(self) -> None:
        """An older hub directory without tls/local-admin.*: the in-process API makes it (`serve` does too, at start),
        unless a hub is running there (then it is that hub's to make)."""
        try:
            socket.create_connection((self._host, self._port), timeout=2).close()
        except ConnectionRefusedError:
            self._go_offline()
            return
        except OSError:
            pass
        raise CredentialError(f"the hub's local operator identity is missing ({self.target.cert.name}); restart "
                              "`tessera-hub serve` (it makes it), or use --hub with a credential")

    def _go_offline(self) -> None:
        try:
            from hub.cli.offline import OfflineHub

            self.offline = OfflineHub(self.target.local_dir)
        except Exception as exc:  # noqa: BLE001  (CA, token or registry trouble: one line for the operator)
            raise HubUnavailable(f"the hub is not running, and its API could not start here: "
                                 f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        self._host, self._port = "127.0.0.1", self.offline.port

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.offline is not None:
            offline, self.offline = self.offline, None
            offline.close()  # (publishes the CRLs if anything changed)

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hub_running(self) -> bool:
        """False once the API answered in-process (no hub was running)."""
        return self.offline is None

    # requests
    def _send(self, method: str, path: str, body: Any, params: dict | None) -> http.client.HTTPResponse:
        url = path + (("?" + urlencode({k: _param(v) for k, v in params.items() if v is not None}))
                      if params and any(v is not None for v in params.values()) else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._connection()
            reused = self._used
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                self._used = True
                return resp
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                self._conn = None
                if attempt == 1 and reused:  # the server closed an idle keep-alive connection: once more
                    continue
                raise HubUnavailable(f"the fleet API at {self.target.url} closed the connection without answering "
                                     "(was the client certificate refused? it must be a service identity's, with "
                                     "its chain, from this fleet)") from None
            except (socket.timeout, TimeoutError):
                conn.close()
                self._conn = None
                raise HubUnavailable(f"the fleet API at {self.target.url} did not answer within "
                                     f"{self.timeout:.0f} s") from None
            except (ssl.SSLError, OSError) as exc:
                conn.close()
                self._conn = None
                raise HubUnavailable(f"the fleet API at {self.target.url}: {getattr(exc, 'strerror', None) or exc}"
                                     ) from None
        raise AssertionError("unreachable")

    def _json(self, resp: http.client.HTTPResponse) -> Any:
        raw = resp.read()
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if resp.status >= 400:
            raise _problem(resp.status, resp.reason, ctype, raw)
        if ctype != "application/json":
            return raw.decode("utf-8", "replace")
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(resp.status, "Bad answer", f"the fleet API answered {resp.status} with invalid JSON"
                           ) from None

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        return self._json(self._send(method, path, body, params))

    def get(self, path: str, params: dict | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, params: dict | None = None) -> Any:
        return self.request("POST", path, {} if body is None else body, params)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str, params: dict | None = None) -> Any:
        return self.request("DELETE", path, params=params)

    def stream(self, path: str, params: dict | None = None, chunk: int = 64 * 1024) -> Iterator[bytes]:
        """GET a streamed answer (the CSV export), a chunk at a time; ApiError before the first chunk on a problem."""
        resp = self._send("GET", path, None, params)
        if resp.status >= 400:
            raw = resp.read()
            raise _problem(resp.status, resp.reason, (resp.getheader("Content-Type") or "").split(";")[0], raw)

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    data = resp.read1(chunk) if hasattr(resp, "read1") else resp.read(chunk)
                    if not data:
                        return
                    yield data
            except (OSError, http.client.HTTPException) as exc:
                self._conn = None
                raise HubUnavailable(f"the fleet API at {self.target.url} broke off the answer ({exc})") from None
        return chunks()


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _problem(status: int, reason: str, ctype: str, raw: bytes) -> ApiError:
    body: Any = None
    try:
        body = json.loads(raw)
    except ValueError:
        pass
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return ApiError(status, str(body.get("title") or reason), body["detail"], body)
    text = raw.decode("utf-8", "replace").strip()
    return ApiError(status, reason, f"the fleet API answered {status} {reason}" + (f": {text[:200]}" if text else ""),
                    body)


def connect(directory: Path | None, hub: str | None, profile: str | None = None) -> ApiClient:
    """A client for the hub `hub` (URL; else cli.toml's), or the local hub of `directory` (see the module docstring).
    CredentialError (an ApiError) for a missing or invalid configuration or credential file."""
    return ApiClient(resolve(directory, hub, profile))
