"""EST client (RFC 7030) over stdlib http.client, trusting only the fleet CA and accepting only serverAuth certs.

Also asks the hub about the device's own credential (`GET /tessera/v1/credential`, mTLS) when the broker refuses
the connection. That runs inside `tessera-agent run`, which stays without cryptography (about 9 MB of RSS): this
module imports it (and est/, which needs it) only for certificate work, and checks the server's extended key usage
with the small DER reader below.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from cryptography import x509

TIMEOUT = 20.0
CREDENTIAL_PATH = "/tessera/v1/credential"   # hub.est.service.CREDENTIAL_PATH
CREDENTIAL_STATUSES = ("active", "suspended", "revoked", "superseded", "expired", "unknown")
MAX_CREDENTIAL_BODY = 4096

_OID_EKU = bytes.fromhex("551d25")                   # 2.5.29.37 extKeyUsage
_OID_SERVER_AUTH = bytes.fromhex("2b06010505070301")  # 1.3.6.1.5.5.7.3.1 id-kp-serverAuth


class EstClientError(Exception):
    """Enrollment failed; `status` is the HTTP status (0 for transport errors), message says why."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Credential:
    """The hub's view of the certificate we connected with: `status` (one of CREDENTIAL_STATUSES) and the device
    the registry has it for (None when the hub does not know the certificate)."""

    status: str
    device: str | None


def client_context(cafile: str) -> ssl.SSLContext:
    """TLS >= 1.2, only `cafile` trusted (no system store), hostname checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=cafile)
    return ctx


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER element at `pos`; ValueError if it does not fit before `end`."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, length, pos = der[pos], der[pos + 1], pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or pos + size > end:
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(der[pos:pos + size], "big"), pos + size
    if pos + length > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out, pos = [], start
    while pos < end:
        out.append(_tlv(der, pos, end))
        pos = out[-1][2]
    return out


def has_server_auth_eku(der: bytes) -> bool:
    """True if the DER certificate has an extendedKeyUsage extension listing serverAuth. Anything that does not
    parse as a certificate is False (fail closed); the signature and chain are the TLS layer's to verify."""
    try:
        tag, start, end = _tlv(der, 0, len(der))
        tbs = _children(der, start, end)[0] if tag == 0x30 else None
        if tbs is None or tbs[0] != 0x30:
            return False
        for tag, start, end in _children(der, tbs[1], tbs[2]):
            if tag != 0xA3:                           # [3] EXPLICIT Extensions
                continue
            (seq, s, e), = _children(der, start, end)
            if seq != 0x30:
                return False
            for _, es, ee in _children(der, s, e):
                parts = _children(der, es, ee)        # Extension ::= SEQUENCE {OID, critical BOOLEAN?, OCTET STRING}
                if parts[0][0] == 0x06 and der[parts[0][1]:parts[0][2]] == _OID_EKU and parts[-1][0] == 0x04:
                    (eku, ks, ke), = _children(der, parts[-1][1], parts[-1][2])
                    return eku == 0x30 and any(t == 0x06 and der[a:b] == _OID_SERVER_AUTH
                                               for t, a, b in _children(der, ks, ke))
    except (ValueError, IndexError):
        return False
    return False


def _check_server_eku(sock: ssl.SSLSocket) -> None:
    if not has_server_auth_eku(sock.getpeercert(binary_form=True) or b""):
        raise EstClientError("the hub's certificate is not a TLS server certificate (no serverAuth EKU)")


def _refused(status: int, data: bytes) -> EstClientError:
    text = data[:300].decode("utf-8", "replace").strip()
    code = text.split(":", 1)[0] if ":" in text else ""
    return EstClientError(f"hub refused ({status}): {text}", status=status, code=code)


def _unverified(exc: ssl.SSLCertVerificationError, host: str, port: int) -> str:
    """What a failed check of the hub's certificate means, instead of a bare CERTIFICATE_VERIFY_FAILED."""
    why = exc.verify_message or exc.reason or str(exc)
    if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return (f"the hub's certificate is not valid for {host} ({why}): reach the hub by a name it was given "
                "(tessera-hub init --hostname)")
    return (f"the hub's certificate at {host}:{port} does not verify against the fleet root this device trusts "
            f"({why}): that root (--ca-file) is another fleet's, or this is another fleet's hub; the hub's own root "
            "is <hub dir>/ca/root.pem")


class EstClient:
    """One EST server, e.g. EstClient("https://hub:8443", cafile="fleet-root.pem")."""

    def __init__(self, base_url: str, cafile: str, context: ssl.SSLContext | None = None, timeout: float = TIMEOUT,
                 check_eku: bool = True):
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise EstClientError(f"hub URL must be https://host[:port], not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 443
        self.context = context or client_context(cafile)
        self.timeout = timeout
        self.check_eku = check_eku

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 limit: int | None = None):
        if limit is None:
            import est

            limit = est.MAX_CERTS_BODY
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout)
        try:
            conn.connect()
            if self.check_eku:
                _check_server_eku(conn.sock)
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read(limit + 1)
            return resp.status, resp.getheader("Content-Type", ""), data
        except ssl.SSLCertVerificationError as exc:
            raise EstClientError(_unverified(exc, self.host, self.port)) from None
        except ssl.SSLError as exc:
            raise EstClientError(f"TLS with the hub failed: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise EstClientError(f"cannot reach the hub at {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()

    def _certs(self, status: int, ctype: str, data: bytes) -> list[x509.Certificate]:
        import est
        from est.errors import BadResponse

        if status != 200:
            raise _refused(status, data)
        if not est.is_certs_only_content_type(ctype):
            raise EstClientError(f"unexpected content type from the hub: {ctype!r}", status=status)
        try:
            return est.parse_certs_only(data)
        except BadResponse as exc:
            raise EstClientError(f"bad PKCS#7 from the hub: {exc.message}", status=status) from None

    def cacerts(self) -> list[x509.Certificate]:
        import est

        return self._certs(*self._request("GET", est.PATH_CACERTS))

    def credential(self) -> Credential:
        """What the hub says about the certificate this client context authenticates with (mTLS, as for
        simplereenroll). Raises EstClientError when the hub cannot be reached, refuses, or answers nonsense."""
        status, ctype, data = self._request("GET", CREDENTIAL_PATH, headers={"Accept": "application/json"},
                                            limit=MAX_CREDENTIAL_BODY)
        if status != 200:
            raise _refused(status, data)
        try:
            doc = json.loads(data[:MAX_CREDENTIAL_BODY].decode("utf-8"))
        except ValueError:
            raise EstClientError("the hub's credential answer is not JSON", status=status) from None
        state, device = (doc.get("status"), doc.get("device")) if isinstance(doc, dict) else (None, None)
        if state not in CREDENTIAL_STATUSES or not (device is None or isinstance(device, str)):
            raise EstClientError(f"unexpected credential answer from the hub: {data[:100]!r}", status=status)
        return Credential(state, device)

    def simpleenroll(self, csr_der: bytes, device_id: str, token: str) -> list[x509.Certificate]:
        """Enroll with a bootstrap token; returns [leaf, *chain] with the leaf first."""
        import est

        headers = {"Content-Type": est.CT_PKCS10, "Authorization": est.basic_auth_header(device_id, token)}
        return self._leaf_first(csr_der, self._certs(*self._request("POST", est.PATH_SIMPLEENROLL,
                                                                    self._body(csr_der), headers)))

    def simpleenroll_with_cert(self, csr_der: bytes) -> list[x509.Certificate]:
        """Enroll authenticated by the client context's certificate (a factory birth certificate, RFC 7030
        3.3.2): no Authorization header; returns [leaf, *chain] with the leaf first."""
        import est

        headers = {"Content-Type": est.CT_PKCS10}
        return self._leaf_first(csr_der, self._certs(*self._request("POST", est.PATH_SIMPLEENROLL,
                                                                    self._body(csr_der), headers)))

    def simplereenroll(self, csr_der: bytes) -> list[x509.Certificate]:
        """Re-enroll; the client context must carry the current certificate and key."""
        import est

        headers = {"Content-Type": est.CT_PKCS10}
        return self._leaf_first(csr_der, self._certs(*self._request("POST", est.PATH_SIMPLEREENROLL,
                                                                    self._body(csr_der), headers)))

    @staticmethod
    def _body(csr_der: bytes) -> bytes:
        import est
        from cryptography import x509

        return est.build_csr_request_body(x509.load_der_x509_csr(csr_der))

    @staticmethod
    def _leaf_first(csr_der: bytes, certs: list[x509.Certificate]) -> list[x509.Certificate]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        spki = x509.load_der_x509_csr(csr_der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        leaves = [c for c in certs if c.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == spki]
        if len(leaves) != 1:
            raise EstClientError("the hub's answer holds no certificate for our key")
        return leaves + [c for c in certs if c is not leaves[0]]


__all__ = ["Credential", "EstClient", "EstClientError", "client_context", "has_server_auth_eku"]
