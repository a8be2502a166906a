"""The hub's EST service logic: one request in, one response out, no sockets (the HTTP server is hub.est.server).

It ties the EST message layer (est/), the issuance policy, the CA and the registry together and decides every
answer: 200 with a certs-only PKCS#7, or a precise 4xx with an audit entry and nothing issued.

Besides EST, `GET /tessera/v1/credential` tells a device what the registry says about the certificate it presents
(TLS client certificate): the broker refuses every connection with the same CONNACK code, so a refused agent asks
here whether it is suspended, revoked, superseded... Read-only and never audited (refused devices poll it), but
rate limited per source like every other request.

Refusals (hardening): token problems (unknown, used, expired, another device's) all get one generic 401 -- the
registry's audit row keeps the precise reason; the 401 challenge to a request without credentials (libest's
estclient asks first) is not a failure; a 429 is never a new failure and says Retry-After; a repeated
Authorization (or other single-valued) header is a 400. Denials are audited aggregated (hub.est.denials); the
Prometheus counters (hub.serve.stats) still count each one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509

import est
from est.errors import BadRequest, EstError, Forbidden, PayloadTooLarge, TooManyRequests, Unauthorized

from hub.ca.authority import FleetCA
from hub.ca.policy import Policy, PolicyError, check_device_id
from hub.est.denials import DenialAudit
from hub.est.methods import idevid, token
from hub.est.ratelimit import RateLimiter
from hub.serve import stats
from hub.registry.store import SUPERSEDE_GRACE, CertRejected, DeviceNotActive, Registry, RegistryError

log = logging.getLogger("tessera.hub.est")

CT_CRL = "application/pkix-crl"
CRL_PATH = "/crl/device.crl"
CREDENTIAL_PATH = "/tessera/v1/credential"   # agent.estclient.CREDENTIAL_PATH
CT_JSON = "application/json"
_CREDENTIAL_SQL = ("SELECT c.status AS cert_status, c.not_after, c.not_before, c.grace_until, "
                   "d.status AS device_status, d.id FROM certificates c JOIN devices d ON d.id = c.device_id "
                   "WHERE c.serial = ?")
#: Token refusals answered alike, so that a guesser never learns that a token exists (the audit has the code).
_TOKEN_CODES = frozenset({"unknown_token", "token_device_mismatch", "token_used", "token_expired"})
_GENERIC_401 = Unauthorized("unauthorized", "the device id and enrollment token were not accepted")
#: The answer to a request without credentials: the challenge of RFC 7030 3.2.3, not a failure.
_CHALLENGE = "missing_auth"
RETRY_AFTER_STOPPING = 5  # seconds: a request that met the registry closed by a stopping process


@dataclass
class EstRequest:
    method: str
    path: str
    headers: dict[str, str]          # lower-case names
    body: bytes
    source: str                      # client IP
    peer_cert_der: bytes | None = None
    repeated: tuple[str, ...] = ()   # single-valued headers sent more than once (lower-case names)


@dataclass
class EstResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> EstResponse:
    return EstResponse(status, f"{code}: {message}\n".encode(), headers=headers or {})


def credential_status(row: dict | None, device_id: str, now: datetime) -> str:
    """The credential status for a registry row of `_CREDENTIAL_SQL` (None: unknown serial) presented by `device_id`:
    'suspended' / 'revoked' (the device's status wins; decommissioned reads 'revoked'), then the certificate's 'revoked' / 'superseded' (also while
    its grace lasts: the device holds an old certificate), then 'expired' outside its validity, else 'active'."""
    if row is None or row["id"] != device_id:
        return "unknown"
    if row["device_status"] in ("suspended", "revoked"):
        return row["device_status"]
    if row["device_status"] == "decommissioned":
        return "revoked"  # final too; the agent's statuses (agent.estclient.CREDENTIAL_STATUSES) stay as they are
    if row["device_status"] != "active":  # 'pending' with a certificate cannot happen (enrolling makes it active)
        return "unknown"
    if row["cert_status"] in ("revoked", "superseded"):
        return row["cert_status"]
    if not datetime.fromisoformat(row["not_before"]) <= now < datetime.fromisoformat(row["not_after"]):
        return "expired"
    return "active" if row["cert_status"] == "active" else "unknown"


class EstService:
    """Answers EST requests for one fleet. Thread-safe (the registry gives each thread its own connection)."""

    def __init__(self, ca: FleetCA, registry: Registry, policy: Policy, crl_dir: Path, crl_urls: str | Sequence[str],
                 limiter: RateLimiter, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 monotonic: Callable[[], float] = time.monotonic, supersede_grace: timedelta = SUPERSEDE_GRACE):
        self.ca, self.registry, self.policy = ca, registry, policy
        self.supersede_grace = supersede_grace
        # the distribution points of the certificates issued here (HubConfig.crl_urls: http first, then https)
        self.crl_dir, self.limiter = crl_dir, limiter
        self.crl_urls = (crl_urls,) if isinstance(crl_urls, str) else tuple(crl_urls)
        self.clock, self.monotonic = clock, monotonic
        self.denials = DenialAudit(registry, clock, monotonic)
        self.trust = idevid.ManufacturerTrust(registry, monotonic)  # birth certificates' CAs (hub/est/methods)
        self.key_policy = est.KeyPolicy(ec_curves=frozenset(policy.ec_curves), min_rsa_bits=policy.rsa_min_bits)
        self._cacerts = est.certs_only_response([ca.root, ca.device_ca, ca.service_ca])
        self._csrattrs = est.csrattrs_response()

    # --- dispatch --------------------------------------------------------------------------------------------
    def handle(self, req: EstRequest) -> EstResponse:
        path = req.path.split("?", 1)[0]
        if req.repeated:
            return self._deny("request", req, BadRequest("duplicate_header", f"more than one {req.repeated[0]} "
                                                         "header (send it once)"), None)
        routes = {
            ("GET", est.PATH_CACERTS): self._cacerts_response,
            ("GET", est.PATH_CSRATTRS): self._csrattrs_response,
            ("POST", est.PATH_SIMPLEENROLL): self._simpleenroll,
            ("POST", est.PATH_SIMPLEREENROLL): self._simplereenroll,
            ("GET", CRL_PATH): self._crl,
            ("GET", CREDENTIAL_PATH): self._credential,
        }
        handler = routes.get((req.method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                return _error(405, "method_not_allowed", f"{req.method} is not allowed on {path}")
            return _error(404, "not_found", f"no EST resource at {path[:100]!r}")
        try:
            return handler(req)
        except RegistryError as exc:
            if exc.code != "closed":
                raise
            # the registry was closed under this request (its process is stopping): nothing was decided, and
            # the device must try again, not take it as a refusal (nothing audited or counted: no registry)
            log.warning("%s %s from %s: the registry is closed (stopping); answered 503", req.method, path,
                        req.source)
            return _error(503, "unavailable", "the hub is stopping; retry in a few seconds",
                          {"Retry-After": str(RETRY_AFTER_STOPPING)})

    # --- read-only resources -----------------------------------------------------------------------------------
    def _cacerts_response(self, req: EstRequest) -> EstResponse:
        return EstResponse(200, self._cacerts, est.CT_PKCS7_CERTS_ONLY, {"Content-Transfer-Encoding": "base64"})

    def _csrattrs_response(self, req: EstRequest) -> EstResponse:
        return EstResponse(200, self._csrattrs, est.CT_CSRATTRS, {"Content-Transfer-Encoding": "base64"})

    def _crl(self, req: EstRequest) -> EstResponse:
        try:
            return EstResponse(200, (self.crl_dir / "device.crl").read_bytes(), CT_CRL)
        except OSError:
            return _error(503, "crl_unavailable", "the CRL has not been published yet")

    # --- enrollment ----------------------------------------------------------------------------------------------
    def _deny(self, action: str, req: EstRequest, exc: EstError, device_id: str | None,
              audit: bool = True, audit_code: str | None = None) -> EstResponse:
        """The error response. Counts a failure for (source, device) unless it is a 429 or the 401 challenge;
        audits 'denied' (aggregated: the registry's own refusals too, which it is told not to audit) if `audit`
        (False for the never-audited credential status); token problems are answered with one generic 401."""
        if exc.status != 429 and exc.code != _CHALLENGE:
            self.limiter.fail(req.source, device_id, self.monotonic())
        stats.of(self.registry).denied(exc.code, exc.status)
        if audit:  # audit_code: the registry's precise reason where the answer is more general
            self.denials.denied(action, req.source, audit_code or exc.code, exc.message, device_id)
        log.warning("%s denied for %r from %s: %s %s", action, device_id or "?", req.source, exc.status, exc.code)
        shown = _GENERIC_401 if exc.code in _TOKEN_CODES else idevid.GENERIC if idevid.is_birth_refusal(exc.code) \
            else exc
        headers = {"WWW-Authenticate": est.www_authenticate()} if shown.status == 401 else {}
        if isinstance(exc, TooManyRequests):
            headers["Retry-After"] = str(exc.retry_after)
        return _error(shown.status, shown.code, shown.message, headers)

    def refused(self, action: str, source: str, exc: EstError, count_failure: bool = False) -> None:
        """A refusal decided by the listener itself (connection limits, deadlines, TLS, body size): counted in
        the metrics, audited aggregated, and a failure of the source if `count_failure`."""
        if count_failure:
            self.limiter.fail(source, None, self.monotonic())
        stats.of(self.registry).denied(exc.code, exc.status)
        self.denials.denied(action, source, exc.code, exc.message)

    def _issued(self, cert: x509.Certificate) -> EstResponse:
        body = est.certs_only_response([cert, self.ca.device_ca])
        return EstResponse(200, body, est.CT_PKCS7_CERTS_ONLY, {"Content-Transfer-Encoding": "base64"})

    def _admit(self, req: EstRequest) -> None:
        """The request budget of the source (429 when spent) and the body size."""
        wait = self.limiter.admit(req.source, self.monotonic())
        if wait:
            raise TooManyRequests("rate_limited", "too many requests from this source; retry later",
                                  retry_after=wait)
        length = req.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > est.MAX_CSR_BODY * 2:
            raise PayloadTooLarge("body_too_large", f"request body over {est.MAX_CSR_BODY * 2} bytes")

    def _budget(self, req: EstRequest, device_id: str) -> None:
        """The failure budgets of (source, device), of the source and of the hub (429 when spent)."""
        wait = self.limiter.check(req.source, device_id, self.monotonic())
        if wait:
            raise TooManyRequests("rate_limited", "too many failed attempts; retry later", retry_after=wait)

    def _simpleenroll(self, req: EstRequest) -> EstResponse:
        """simpleenroll: by a birth certificate (a TLS client certificate and no Authorization header:
        hub/est/methods/idevid.py), else by a bootstrap token (HTTP Basic: hub/est/methods/token.py)."""
        if req.peer_cert_der and "authorization" not in req.headers:
            return idevid.simpleenroll(self, req, self.trust)
        return token.simpleenroll(self, req)

    def _client_cert(self, req: EstRequest, what: str) -> tuple[x509.Certificate, str]:
        """The TLS client certificate (the listener verified it against the device CA) and its CN, the device id.
        Raises Unauthorized without one, Forbidden without a single CN, PolicyError for an invalid id."""
        if not req.peer_cert_der:
            raise Unauthorized("client_cert_required",
                               f"{what} needs the current device certificate as TLS client certificate")
        current = x509.load_der_x509_certificate(req.peer_cert_der)
        try:  # the listener also trusts manufacturer CAs (birth certificates): only the device CA counts here
            current.verify_directly_issued_by(self.ca.device_ca)
        except Exception:  # noqa: BLE001
            raise Forbidden("not_device_cert", f"{what} needs a certificate from this fleet's device CA, not "
                            f"{current.issuer.rfc4514_string()[:120]}'s") from None
        cns = current.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise Forbidden("bad_client_cert", "client certificate has no single CN")
        return current, check_device_id(str(cns[0].value))

    def _credential(self, req: EstRequest) -> EstResponse:
        device_id = None
        try:
            self._admit(req)
            current, device_id = self._client_cert(req, "the credential status")
            self._budget(req, device_id)
        except EstError as exc:
            return self._deny("credential", req, exc, device_id, audit=False)
        except PolicyError as exc:
            return self._deny("credential", req, Forbidden("bad_client_cert", str(exc)), device_id, audit=False)
        rows = self.registry.query(_CREDENTIAL_SQL, [format(current.serial_number, "x")])
        status = credential_status(rows[0] if rows else None, device_id, self.clock())
        log.debug("credential of %s from %s: %s", device_id, req.source, status)
        body = json.dumps({"status": status, "device": device_id if status != "unknown" else None}).encode()
        return EstResponse(200, body, CT_JSON, {"Cache-Control": "no-store"})

    def _simplereenroll(self, req: EstRequest) -> EstResponse:
        device_id = None
        try:
            self._admit(req)
            current, device_id = self._client_cert(req, "simplereenroll")
            self._budget(req, device_id)
            csr = est.parse_enroll_request(req.headers.get("content-type"), req.body, device_id,
                                           key_policy=self.key_policy)
            now = self.clock()
            cert = self.registry.reenroll(
                device_id, format(current.serial_number, "x"), now,
                lambda: self.ca.issue_device_cert(csr.public_key(), device_id, self.policy, now, self.crl_urls),
                source=req.source, grace=self.supersede_grace, audit_denied=False)
        except EstError as exc:
            return self._deny("reenroll", req, exc, device_id)
        except PolicyError as exc:
            return self._deny("reenroll", req, Forbidden("bad_client_cert", str(exc)), device_id)
        except (CertRejected, DeviceNotActive) as exc:
            return self._deny("reenroll", req, Forbidden(getattr(exc, "code", "device_not_active"), str(exc)),
                              device_id)
        except RegistryError as exc:
            if exc.code == "closed":
                raise  # handle(): 503
            return self._deny("reenroll", req, Forbidden(getattr(exc, "code", "registry"), str(exc)), device_id)
        log.info("re-enrolled %s from %s (serial %x)", device_id, req.source, cert.serial_number)
        stats.of(self.registry).renewed()
        return self._issued(cert)
