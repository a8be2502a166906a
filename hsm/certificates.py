"""X.509 certificate objects in a token (CKO_CERTIFICATE next to the key, same CKA_ID): write one, read one back.

The factory writes a device's birth certificate (IEEE 802.1AR IDevID) into the device's token this way; the agent
reads it back to authenticate a birth-certificate enrollment. Like every python-pkcs11 operation of the agent, the
public functions run in a spawned child (hsm.worker.run_isolated); the `_in_session` ones take an open session.
"""

from __future__ import annotations

from .errors import HsmError, KeyExists, KeyNotFound
from .token import TokenConfig

#: CKA_ID prefix of a key the factory made for a birth certificate (b"idevid:" + serial): the agent never deletes
#: such a key (IEEE 802.1AR: the IDevID key lives as long as the device; re-provisioning needs it)
IDEVID_KEY_ID_PREFIX = b"idevid:"


def _der_integer(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8, "big")  # a leading 0 where the top bit is set
    return b"\x02" + _len(len(body)) + body


def _len(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def write_in_session(session, cert_der: bytes, label: str, key_id: bytes) -> None:
    """Store `cert_der` as a token object labelled `label` with CKA_ID `key_id`; KeyExists if one is there."""
    from cryptography import x509
    from pkcs11 import Attribute, CertificateType, ObjectClass

    if any(True for _ in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label})):
        raise KeyExists(f"a certificate labelled {label!r} already exists on token {session.token.label!r}; "
                        "refusing to overwrite it")
    cert = x509.load_der_x509_certificate(cert_der)
    session.create_object({
        Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.MODIFIABLE: False,
        Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: cert_der,
        Attribute.SUBJECT: cert.subject.public_bytes(), Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: _der_integer(cert.serial_number)})


def read_in_session(session, label: str) -> tuple[bytes, bytes]:
    """(certificate DER, CKA_ID) of the certificate object labelled `label`; KeyNotFound if there is none."""
    from pkcs11 import Attribute, ObjectClass

    found = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}))
    if not found:
        raise KeyNotFound(f"no certificate labelled {label!r} on token {session.token.label!r}")
    if len(found) > 1:
        raise HsmError(f"more than one certificate labelled {label!r} on token {session.token.label!r}")
    return bytes(found[0][Attribute.VALUE]), bytes(found[0][Attribute.ID])


def _write(cfg: TokenConfig, cert_der: bytes, label: str, key_id: bytes) -> None:
    from .token import open_session

    with open_session(cfg, rw=True) as session:
        write_in_session(session, cert_der, label, key_id)


def _read(cfg: TokenConfig, label: str) -> tuple[bytes, bytes]:
    from .token import open_session

    with open_session(cfg) as session:
        return read_in_session(session, label)


def write_certificate(cfg: TokenConfig, cert_der: bytes, label: str, key_id: bytes) -> None:
    """write_in_session in a spawned child."""
    from .worker import run_isolated

    run_isolated(_write, cfg, cert_der, label, key_id)


def read_certificate(cfg: TokenConfig, label: str) -> tuple[bytes, bytes]:
    """read_in_session in a spawned child: (certificate DER, CKA_ID)."""
    from .worker import run_isolated

    return run_isolated(_read, cfg, label)
