"""Every bad enrollment is refused with a precise status and code word, changes nothing, and is audited.

Token problems (unknown, used, expired, another device's) share one generic 401 `unauthorized`; the audit row has
the precise reason. Each case talks from its own loopback address: denials are audited once per (source, reason)
a minute (hub.est.denials), and several cases share a reason.

Also: one token used by eight clients at once gives exactly one certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.estclient import EstClient, EstClientError
from tests.integration.hubfixtures import (  # noqa: F401  (hub is a fixture)
    EST_PREFIX, b64_body, basic, enroll, hub, make_csr, new_key, parse_pkcs7, raw_request, request,
)

pytestmark = pytest.mark.integration

ENROLL = f"{EST_PREFIX}/simpleenroll"
CT = "application/pkcs10"


@dataclass
class Case:
    """One bad request: `send(hub, device_id, token)` returns the Response."""

    status: int
    code: str
    send: Callable
    #: code at the start of the audit row's detail, when the audit is more precise than the HTTP answer
    audit_code: str | None = None
    #: the audit row names the device (False when the device id never got past authentication)
    audit_device: bool = True
    audit_action: str = "enroll"
    #: prepare(hub, device_id, token) -> token to use (e.g. use it up, expire it, suspend the device)
    prepare: Callable | None = None
    #: after the refusal the same token still enrolls (it was not consumed)
    token_survives: bool = True
    extra: dict = field(default_factory=dict)


def post(body: bytes, ct: str | None = CT, auth: str | None = None) -> Callable:
    def send(hub, device_id, token):
        headers = {"Authorization": auth if auth is not None else basic(device_id, token)}
        if ct is not None:
            headers["Content-Type"] = ct
        return request(hub, "POST", ENROLL, body, headers, source=source_of(device_id))
    return send


def source_of(device_id: str) -> str:
    """The loopback address a case's requests come from (raw_request: always 127.0.0.1)."""
    return SOURCES.get(device_id, "127.0.0.1")


def post_csr(csr: Callable[[str], bytes], ct: str | None = CT) -> Callable:
    def send(hub, device_id, token):
        return post(b64_body(csr(device_id)), ct)(hub, device_id, token)
    return send


def good_csr(device_id: str) -> bytes:
    return make_csr(new_key(), device_id)


def bad_signature_csr(device_id: str) -> bytes:
    der = bytearray(good_csr(device_id))
    der[-1] ^= 0x01  # last byte of the ECDSA signature (s): still DER, no longer a valid signature
    return bytes(der)


def bad_version_csr(device_id: str) -> bytes:
    der = good_csr(device_id)
    at = der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version, INTEGER 0
    return der[:at + 2] + b"\x05" + der[at + 3:]


def rsa1024_csr(device_id: str) -> bytes:
    return make_csr(rsa.generate_private_key(65537, 1024), device_id)


def ca_true_csr(device_id: str) -> bytes:
    return make_csr(new_key(), device_id, [(x509.BasicConstraints(ca=True, path_length=None), True)])


def key_cert_sign_csr(device_id: str) -> bytes:
    ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                       encipher_only=False, decipher_only=False)
    return make_csr(new_key(), device_id, [(ku, True)])


def other_device_csr(device_id: str) -> bytes:
    return make_csr(new_key(), "bad-victim")


def san_other_csr(device_id: str) -> bytes:
    return make_csr(new_key(), device_id, [(x509.SubjectAlternativeName([x509.DNSName("hub.example")]), False)])


def p192_csr(device_id: str) -> bytes:
    return make_csr(ec.generate_private_key(ec.SECP192R1()), device_id)


def ed25519_csr(device_id: str) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)])).sign(key, None)
    return csr.public_bytes(serialization.Encoding.DER)


def declared_length(n: int) -> Callable:
    """Headers declaring an n-byte body; no body is sent (the hub must answer from the header alone)."""
    def send(hub, device_id, token):
        head = (f"POST {ENROLL} HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\nContent-Type: {CT}\r\n"
                f"Authorization: {basic(device_id, token)}\r\nContent-Length: {n}\r\n\r\n").encode()
        return raw_request(hub, head)
    return send


def actual_body(n: int) -> Callable:
    """A real n-byte base64 body (a CSR followed by base64 padding lines)."""
    def send(hub, device_id, token):
        body = b64_body(good_csr(device_id))
        filler = base64.b64encode(b"\0" * 48) + b"\r\n"  # 66 bytes a line
        body = body + filler * ((n - len(body)) // len(filler) + 1)
        assert len(body[:n]) == n
        return post(body[:n])(hub, device_id, token)
    return send


def duplicate_authorization(hub, device_id, token):
    """Two Authorization headers, the right one last (it used to win)."""
    body = b64_body(good_csr(device_id))
    head = (f"POST {ENROLL} HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\nContent-Type: {CT}\r\n"
            f"Authorization: {basic(device_id, 'B' * 32)}\r\nAuthorization: {basic(device_id, token)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return raw_request(hub, head, body)


def use_token(hub, device_id, token):
    resp = enroll(hub, device_id, token, good_csr(device_id))
    assert resp.status == 200, resp.text
    return token


def expire_token(hub, device_id, token):
    """A token that expired yesterday, made with the registry API on the hub's own database."""
    from hub.registry.store import Registry

    reg = Registry(hub.registry_path)
    try:
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
        return reg.create_token(device_id, past, dt.timedelta(days=1), actor="test")
    finally:
        reg.close()


def other_devices_token(hub, device_id, token):
    return hub.add_device(f"{device_id}-x")


def suspend(hub, device_id, token):
    hub.cli_ok("device", "suspend", device_id)
    return token


CASES = {
    "malformed-base64": Case(400, "bad_base64", post(b"MIIB!!notbase64**\r\n")),
    "base64-bad-padding": Case(400, "bad_base64", post(b"MIIBAA=\r\n")),
    "empty-body": Case(400, "bad_base64", post(b"")),
    "garbage-der": Case(400, "bad_csr", post(base64.b64encode(b"this is not a certification request"))),
    "pem-wrong-label": Case(400, "bad_pem", post(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")),
    "wrong-content-type": Case(415, "bad_content_type", post_csr(good_csr, ct="application/json")),
    "no-content-type": Case(415, "bad_content_type", post_csr(good_csr, ct=None)),
    "declared-length-100000": Case(413, "body_too_large", declared_length(100000), audit_device=False,
                                   audit_action="request"),
    "body-40KiB": Case(413, "body_too_large", actual_body(40 * 1024), audit_device=False, audit_action="request"),
    "body-20KiB": Case(413, "body_too_large", actual_body(20 * 1024)),
    "invalid-signature": Case(400, "bad_csr_signature", post_csr(bad_signature_csr)),
    "csr-version-5": Case(400, "bad_csr", post_csr(bad_version_csr)),  # once a 500 (InvalidVersion escaped)
    "rsa-1024": Case(400, "weak_key", post_csr(rsa1024_csr)),
    "ec-p192": Case(400, "weak_key", post_csr(p192_csr)),
    "ed25519": Case(400, "unsupported_key", post_csr(ed25519_csr)),
    "ca-true": Case(403, "ca_requested", post_csr(ca_true_csr)),
    "key-cert-sign": Case(403, "ca_requested", post_csr(key_cert_sign_csr)),
    "cn-of-another-device": Case(403, "name_mismatch", post_csr(other_device_csr)),
    "san-not-the-device": Case(403, "name_mismatch", post_csr(san_other_csr)),
    "unknown-token": Case(401, "unauthorized", lambda hub, d, t: post_csr(good_csr)(hub, d, "A" * 32),
                          audit_code="unknown_token"),
    "other-devices-token": Case(401, "unauthorized", post_csr(good_csr), prepare=other_devices_token,
                                audit_code="token_device_mismatch", token_survives=False),
    "expired-token": Case(401, "unauthorized", post_csr(good_csr), prepare=expire_token, audit_code="token_expired",
                          token_survives=False),
    "used-token": Case(401, "unauthorized", post_csr(good_csr), prepare=use_token, audit_code="token_used",
                       token_survives=False),
    "duplicate-authorization": Case(400, "duplicate_header", duplicate_authorization, audit_device=False,
                                    audit_action="request"),
    "bad-basic-scheme": Case(401, "bad_auth_scheme", post_csr(good_csr), audit_device=False,
                             extra={"auth": "Bearer abc"}),
    "bad-basic-base64": Case(401, "bad_auth_encoding", post_csr(good_csr), audit_device=False,
                             extra={"auth": "Basic !!!!"}),
    "basic-without-colon": Case(401, "bad_auth_format", post_csr(good_csr), audit_device=False,
                                extra={"auth": "Basic " + base64.b64encode(b"no-colon-here").decode()}),
    "no-authorization": Case(401, "missing_auth", post_csr(good_csr), audit_device=False, extra={"auth": ""}),
    "invalid-device-id": Case(401, "bad_device_id", post_csr(good_csr), audit_device=False,
                              extra={"auth": basic("Bad_Device", "x" * 32)}),
    "suspended-device": Case(403, "device_not_active", post_csr(good_csr), prepare=suspend,
                             audit_code="device_suspended", token_survives=False),
}
SOURCES = {f"bad-{name.lower()}": f"127.0.0.{10 + i}" for i, name in enumerate(CASES)
           if CASES[name].send not in (duplicate_authorization,) and not name.startswith("declared-length")}


def _with_auth(case: Case) -> Callable:
    """Cases with a fixed Authorization header: the body is a good CSR, only the header is wrong."""
    if "auth" not in case.extra:
        return case.send
    auth = case.extra["auth"]

    def send(hub, device_id, token):
        headers = {"Content-Type": CT}
        if auth:
            headers["Authorization"] = auth
        return request(hub, "POST", ENROLL, b64_body(good_csr(device_id)), headers, source=source_of(device_id))
    return send


@pytest.mark.parametrize("name", list(CASES))
def test_bad_enrollment_is_refused_and_changes_nothing(hub, name):
    case = CASES[name]
    device_id = f"bad-{name.lower()}"
    token = hub.add_device(device_id)
    if case.prepare:
        token = case.prepare(hub, device_id, token)
    before_state, before_certs, mark = hub.state(), hub.cert_count(), hub.last_audit_id()
    device_certs_before = [c["serial"] for c in before_state["certificates"] if c["device_id"] == device_id]

    resp = _with_auth(case)(hub, device_id, token)

    assert (resp.status, resp.code) == (case.status, case.code), resp.text
    assert resp.text.startswith(f"{case.code}: ") and len(resp.text.strip()) > len(case.code) + 2
    assert resp.headers.get("connection") == "close"
    if resp.status == 401:
        assert resp.headers.get("www-authenticate", "").startswith("Basic realm=")
    # nothing changed: no certificate, no token used, no device changed
    assert hub.cert_count() == before_certs
    assert hub.state() == before_state
    assert [c["serial"] for c in hub.show(device_id)["certificates"]] == device_certs_before
    # exactly one audit row, 'denied', with the code
    rows = hub.audit_since(mark)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["outcome"] == "denied"
    assert row["action"] == case.audit_action
    assert row["detail"].startswith(f"{case.audit_code or case.code}:"), row
    assert row["source"] == source_of(device_id)
    assert row["device_id"] == (device_id if case.audit_device else None)
    # secrets never reach the audit log
    assert token not in row["detail"]
    # the refusal did not burn the token: it still enrolls the device
    if case.token_survives:
        ok = enroll(hub, device_id, token, good_csr(device_id))
        assert ok.status == 200, ok.text
        assert hub.cert_count(device_id) == 1


def test_unknown_resource_and_wrong_method(hub):
    assert request(hub, "GET", "/nope").status == 404
    resp = request(hub, "GET", ENROLL)
    assert (resp.status, resp.code) == (405, "method_not_allowed")
    resp = request(hub, "POST", ENROLL, None, {"Content-Type": CT, "Transfer-Encoding": "chunked"})
    assert resp.status == 411


# --- one token, many clients at once -------------------------------------------------------------------------------

@pytest.mark.parametrize("round_", range(3))
def test_concurrent_uses_of_one_token_issue_exactly_one_certificate(hub, round_):
    device_id = f"race-{round_}"
    token = hub.add_device(device_id)
    n = 8
    keys = [new_key() for _ in range(n)]
    csrs = [make_csr(k, device_id) for k in keys]
    barrier = threading.Barrier(n)
    results: list = [None] * n
    mark = hub.last_audit_id()

    def worker(i: int) -> None:
        client = EstClient(hub.url, cafile=str(hub.root_pem))
        barrier.wait(timeout=30)
        try:
            results[i] = client.simpleenroll(csrs[i], device_id, token)
        except EstClientError as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    wins = [i for i, r in enumerate(results) if isinstance(r, list)]
    losses = [r for r in results if isinstance(r, EstClientError)]
    assert len(wins) == 1, results
    assert [(e.status, e.code) for e in losses] == [(401, "unauthorized")] * (n - 1), [str(e) for e in losses]
    leaf = results[wins[0]][0]
    assert leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == \
        keys[wins[0]].public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    certs = hub.show(device_id)["certificates"]
    assert [(c["serial"], c["status"]) for c in certs] == [(format(leaf.serial_number, "x"), "active")]
    assert hub.cert_count(device_id) == 1
    rows = hub.audit_since(mark)
    assert [(r["action"], r["detail"].split(" ")[0]) for r in rows if r["outcome"] == "ok"] == [("enroll", "serial")]
    # the n-1 refusals are aggregated (hub/est/denials.py): at most the first is a row at once, the rest counted
    denied = [r for r in rows if r["outcome"] != "ok"]
    assert len(denied) <= 1 and all((r["action"], r["outcome"], r["detail"].split(":")[0]) ==
                                    ("enroll", "denied", "token_used") for r in denied), denied
    used = hub.query("SELECT used_at, used_from FROM tokens WHERE device_id = ?", (device_id,))
    assert len(used) == 1 and used[0]["used_at"] is not None and used[0]["used_from"] == "127.0.0.1"


def test_response_is_a_pkcs7_with_the_leaf_and_the_device_ca(hub):
    device_id = "bad-control"
    token = hub.add_device(device_id)
    key = new_key()
    resp = enroll(hub, device_id, token, make_csr(key, device_id))
    assert resp.status == 200, resp.text
    assert resp.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert resp.headers["content-transfer-encoding"] == "base64"
    certs = parse_pkcs7(resp.body)
    assert len(certs) == 2
    device_ca = x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())
    assert device_ca in certs
    leaf = next(c for c in certs if c != device_ca)
    leaf.verify_directly_issued_by(device_ca)
    assert leaf.fingerprint(hashes.SHA256()).hex() == hub.show(device_id)["certificates"][0]["fingerprint_sha256"]
