"""EST client (RFC 7030) over stdlib http.client, trusting only the fleet CA and accepting only serverAuth certs."""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

import est
from est.errors import BadResponse, EstError

TIMEOUT = 20.0


class EstClientError(Exception):
    """Enrollment failed; `status` is the HTTP status (0 for transport errors), message says why."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status, self.code = status, code


def client_context(cafile: str) -> ssl.SSLContext:
    """TLS >= 1.2, only `cafile` trusted (no system store), hostname checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=cafile)
    return ctx


def _check_server_eku(sock: ssl.SSLSocket) -> None:
    der = sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = []
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise EstClientError("the hub's certificate is not a TLS server certificate (no serverAuth EKU)")


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

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout)
        try:
            conn.connect()
            if self.check_eku:
                _check_server_eku(conn.sock)
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read(est.MAX_CERTS_BODY + 1)
            return resp.status, resp.getheader("Content-Type", ""), data
        except ssl.SSLError as exc:
            raise EstClientError(f"TLS with the hub failed: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise EstClientError(f"cannot reach the hub at {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()

    def _certs(self, status: int, ctype: str, data: bytes) -> list[x509.Certificate]:
        if status != 200:
            text = data[:300].decode("utf-8", "replace").strip()
            code = text.split(":", 1)[0] if ":" in text else ""
            raise EstClientError(f"hub refused ({status}): {text}", status=status, code=code)
        if not est.is_certs_only_content_type(ctype):
            raise EstClientError(f"unexpected content type from the hub: {ctype!r}", status=status)
        try:
            return est.parse_certs_only(data)
        except BadResponse as exc:
            raise EstClientError(f"bad PKCS#7 from the hub: {exc.message}", status=status) from None

    def cacerts(self) -> list[x509.Certificate]:
        return self._certs(*self._request("GET", est.PATH_CACERTS))

    def simpleenroll(self, csr_der: bytes, device_id: str, token: str) -> list[x509.Certificate]:
        """Enroll with a bootstrap token; returns [leaf, *chain] with the leaf first."""
        headers = {"Content-Type": est.CT_PKCS10, "Authorization": est.basic_auth_header(device_id, token)}
        return self._leaf_first(csr_der, self._certs(*self._request("POST", est.PATH_SIMPLEENROLL,
                                                                    self._body(csr_der), headers)))

    def simplereenroll(self, csr_der: bytes) -> list[x509.Certificate]:
        """Re-enroll; the client context must carry the current certificate and key."""
        headers = {"Content-Type": est.CT_PKCS10}
        return self._leaf_first(csr_der, self._certs(*self._request("POST", est.PATH_SIMPLEREENROLL,
                                                                    self._body(csr_der), headers)))

    @staticmethod
    def _body(csr_der: bytes) -> bytes:
        return est.build_csr_request_body(x509.load_der_x509_csr(csr_der))

    @staticmethod
    def _leaf_first(csr_der: bytes, certs: list[x509.Certificate]) -> list[x509.Certificate]:
        spki = x509.load_der_x509_csr(csr_der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        leaves = [c for c in certs if c.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == spki]
        if len(leaves) != 1:
            raise EstClientError("the hub's answer holds no certificate for our key")
        return leaves + [c for c in certs if c is not leaves[0]]


__all__ = ["EstClient", "EstClientError", "EstError", "client_context"]
