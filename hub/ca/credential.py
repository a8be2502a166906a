"""The credential URI every client certificate carries: which CA issued it and its serial, for brokers told no more.

A client certificate of the fleet (device, service identity, the hub's admin) carries one subjectAltName URI,
``urn:tessera:cred:<issuer>:<serial in lower-case hex>`` (issuer ``device`` or ``service``: the CA that signs it).
A broker that authenticates by certificate but passes only one name on to an auth back end (RabbitMQ:
`ssl_cert_login_from = subject_alternative_name`, type uri) then names the exact credential, so the back end makes
the Mosquitto plugin's decision (hub/authz/decide.py: issuer and serial looked up in authz_credentials; an unknown,
superseded, revoked or held certificate refused) instead of trusting a common name. The CA signs it, so it is as
trustworthy as the certificate; the issuer in it is the CA's own word (a holder of the device CA key could claim
`service` here: Mosquitto, which takes the issuer from the verified chain, could not be fooled so).
"""

from __future__ import annotations

import re

PREFIX = "urn:tessera:cred:"
ISSUERS = ("device", "service")
_URI_RE = re.compile(r"urn:tessera:cred:(device|service):([0-9a-f]{1,40})")


def credential_uri(issuer: str, serial: int) -> str:
    if issuer not in ISSUERS:
        raise ValueError(f"credential issuer must be one of {ISSUERS}, not {issuer!r}")
    return f"{PREFIX}{issuer}:{serial:x}"


def parse_credential(uri: str) -> tuple[str, str] | None:
    """(issuer, serial hex as the registry stores it) of a credential URI; None for anything else."""
    m = _URI_RE.fullmatch(uri or "")
    if m is None or (len(m.group(2)) > 1 and m.group(2).startswith("0")):
        return None
    return m.group(1), m.group(2)
