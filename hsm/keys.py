"""Token key pairs: generate them with hsm.templates' templates, find them, describe them, import software keys.

load_private_key wraps a token private key as a pyca/cryptography private key (hsm.tokenkeys), so cryptography's
CSR and certificate builders sign in the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from . import templates
from .errors import HsmError, KeyExists, KeyNotFound, KeyUsageRefused, UnsupportedKeyType
from .tokenkeys import TokenECPrivateKey, TokenRSAPrivateKey, key_type_name  # noqa: F401  (hsm.keys.* as before)

#: Key types Tessera generates: name -> (family, size-or-curve).
KEY_TYPES: dict[str, tuple[str, Any]] = {
    "ec-p256": ("ec", "secp256r1"),
    "ec-p384": ("ec", "secp384r1"),
    "rsa-2048": ("rsa", 2048),
    "rsa-3072": ("rsa", 3072),
}
DEFAULT_KEY_TYPE = "ec-p256"

_REPORTED_ATTRIBUTES = ("TOKEN", "PRIVATE", "SENSITIVE", "ALWAYS_SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE",
                        "LOCAL", "SIGN", "DECRYPT", "UNWRAP", "DERIVE")


def _pkcs11_template(template: dict[str, bool]) -> dict:
    from pkcs11 import Attribute

    return {getattr(Attribute, name): value for name, value in template.items()}


@dataclass(frozen=True)
class KeyInfo:
    """What is known about a token key pair, for display and for building its PKCS#11 URI."""

    token_label: str
    label: str
    id: bytes
    key_type: str
    public_key_pem: str
    #: Security attributes of the private key as the token reports them (sensitive, extractable, ...).
    attributes: tuple[tuple[str, bool], ...] = ()

    @property
    def uri(self) -> str:
        from .uri import Pkcs11Uri

        return str(Pkcs11Uri(token=self.token_label, object=self.label, id=self.id, type="private"))


def _check_label(session, label: str) -> None:
    from pkcs11 import ObjectClass

    if not label or len(label) > 64:
        raise HsmError("key label must be 1..64 characters")
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        if any(True for _ in session.get_objects({_attr("CLASS"): cls, _attr("LABEL"): label})):
            raise KeyExists(f"a key labelled {label!r} already exists on token {session.token.label!r}; "
                            "refusing to overwrite it")


def _attr(name: str):
    from pkcs11 import Attribute

    return getattr(Attribute, name)


def generate_keypair(session, label: str, key_type: str = DEFAULT_KEY_TYPE, key_id: bytes | None = None) -> KeyInfo:
    """Generate a non-extractable, sensitive, sign-only key pair on the token (session must be R/W).

    The templates are hsm.templates' (accepted by SoftHSM and tpm2-pkcs11 alike); the key the token made is
    checked against the sign-only policy, and destroyed with KeyUsageRefused if the token ignored part of it.
    """
    import secrets

    if key_type not in KEY_TYPES:
        raise UnsupportedKeyType(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    _check_label(session, label)
    key_id = key_id or secrets.token_bytes(8)
    generate_with_templates(session, label, key_type, key_id, templates.PUBLIC_TEMPLATE, templates.PRIVATE_TEMPLATE)
    info = key_info(session, label=label)
    bad = templates.policy_violations(dict(info.attributes))
    if bad:
        _destroy_pair(session, info.id)
        raise KeyUsageRefused(f"token {session.token.label!r} made {key_type} key {label!r} with {', '.join(bad)} "
                              "against the sign-only template; the key pair was destroyed")
    return info


def generate_with_templates(session, label: str, key_type: str, key_id: bytes, public: dict[str, bool],
                            private: dict[str, bool]) -> None:
    """C_GenerateKeyPair with exactly these usage templates (attribute name -> value); a refusal is one line
    naming the key type, the templates and the module's own reason (TemplateRefused / MechanismRefused)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag
    from pkcs11.util.ec import encode_named_curve_parameters

    from .modulelog import captured

    family, param = KEY_TYPES[key_type]
    pub, priv = templates.python_pkcs11_templates(public, private)
    common = dict(id=key_id, label=label, store=True, capabilities=MechanismFlag.SIGN, public_template=pub,
                  private_template=priv)
    mechanism = "CKM_EC_KEY_PAIR_GEN" if family == "ec" else "CKM_RSA_PKCS_KEY_PAIR_GEN"
    before = _key_handles(session)
    with captured() as said:
        try:
            if family == "ec":
                params = session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(param)}, local=True)
                params.generate_keypair(**common)
            else:
                session.generate_keypair(KeyType.RSA, param, **common)
            return
        except pkcs11.PKCS11Error as exc:
            error = exc
    _drop_leftovers(session, before, label)
    raise templates.generation_refused(error, session.token.label, key_type, mechanism, public, private,
                                       said.reason) from None


def _key_handles(session) -> set[int]:
    from pkcs11 import ObjectClass

    return {obj.handle for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
            for obj in session.get_objects({_attr("CLASS"): cls})}


def _drop_leftovers(session, before: set[int], label: str) -> None:
    """Destroy what a refused C_GenerateKeyPair left (SoftHSM 2.6 keeps a nameless half when it refuses an attribute
    late): key objects that are new since `before` and carry our label or none."""
    import pkcs11
    from pkcs11 import ObjectClass

    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for obj in list(session.get_objects({_attr("CLASS"): cls})):
            if obj.handle in before:
                continue
            try:
                if obj[_attr("LABEL")] in ("", label):
                    obj.destroy()
            except pkcs11.PKCS11Error:
                continue


def _destroy_pair(session, key_id: bytes) -> None:
    from pkcs11 import ObjectClass

    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for obj in list(session.get_objects({_attr("CLASS"): cls, _attr("ID"): key_id})):
            obj.destroy()


def require_sign_only(info: KeyInfo) -> KeyInfo:
    """`info` if its key is sign-only (hsm.templates.SIGN_ONLY_POLICY); KeyUsageRefused naming what is not."""
    bad = templates.policy_violations(dict(info.attributes))
    if bad:
        raise KeyUsageRefused(f"token key {info.label!r} on {info.token_label!r} is not sign-only ({', '.join(bad)}); "
                              "Tessera uses only keys it could have made itself: use another key label (a new key "
                              "is generated) or delete this key")
    return info


def _find(session, object_class, label: str | None, key_id: bytes | None):
    import pkcs11

    if label is None and key_id is None:
        raise HsmError("give a key label or id")
    query: dict = {"object_class": object_class}
    if label is not None:
        query["label"] = label
    if key_id is not None:
        query["id"] = key_id
    try:
        return session.get_key(**query)
    except pkcs11.NoSuchKey:
        what = f"label {label!r}" if label is not None else f"id {key_id.hex()}"
        raise KeyNotFound(f"no {object_class.name.lower().replace('_', ' ')} with {what} "
                          f"on token {session.token.label!r}") from None
    except pkcs11.MultipleObjectsReturned:
        raise KeyNotFound(f"more than one key matches label {label!r}; use the id") from None


def find_private_key(session, label: str | None = None, key_id: bytes | None = None):
    from pkcs11 import ObjectClass

    return _find(session, ObjectClass.PRIVATE_KEY, label, key_id)


def find_public_key(session, label: str | None = None, key_id: bytes | None = None):
    from pkcs11 import ObjectClass

    return _find(session, ObjectClass.PUBLIC_KEY, label, key_id)


def public_key_of(pub) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The cryptography public key for a python-pkcs11 public key object."""
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key

    if pub.key_type == KeyType.EC:
        return serialization.load_der_public_key(encode_ec_public_key(pub))
    if pub.key_type == KeyType.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise UnsupportedKeyType(f"unsupported token key type {pub.key_type!r}")


def key_info(session, label: str | None = None, key_id: bytes | None = None) -> KeyInfo:
    priv = find_private_key(session, label, key_id)
    pub = find_public_key(session, key_id=priv.id)
    public = public_key_of(pub)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    attrs = tuple((name.lower(), _read_bool(priv, name)) for name in _REPORTED_ATTRIBUTES)
    return KeyInfo(token_label=session.token.label, label=priv.label, id=bytes(priv.id),
                   key_type=key_type_name(public), public_key_pem=pem, attributes=attrs)


def _read_bool(obj, name: str) -> bool:
    """A boolean attribute; one the object does not have (CKR_ATTRIBUTE_TYPE_INVALID) reads as False."""
    import pkcs11

    try:
        return bool(obj[_attr(name)])
    except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive):
        return False


def load_private_key(session, label: str | None = None, key_id: bytes | None = None):
    """A cryptography private key object that signs in the token (valid while `session` is open)."""
    priv = find_private_key(session, label, key_id)
    public = public_key_of(find_public_key(session, key_id=priv.id))
    if isinstance(public, ec.EllipticCurvePublicKey):
        return TokenECPrivateKey(priv, public)
    return TokenRSAPrivateKey(priv, public)


def import_private_key(session, private_key, label: str, key_id: bytes | None = None) -> KeyInfo:
    """Move a software key into the token (sensitive, non-extractable, sign-only) with its public half.

    For migrating existing CA keys into a token. Unlike generated keys these are not CKA_LOCAL and not
    CKA_NEVER_EXTRACTABLE: the key existed outside the token before; destroy the file afterwards.
    """
    import secrets

    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    _check_label(session, label)
    key_id = key_id or secrets.token_bytes(8)
    common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    priv_t = {**common, **_pkcs11_template(templates.PRIVATE_TEMPLATE), Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    pub_t = {**common, **_pkcs11_template(templates.IMPORT_PUBLIC_TEMPLATE), Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        params = encode_named_curve_parameters(private_key.curve.name)
        size = (private_key.curve.key_size + 7) // 8
        point = private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                      serialization.PublicFormat.UncompressedPoint)
        priv_t.update({Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params,
                       Attribute.VALUE: private_key.private_numbers().private_value.to_bytes(size, "big")})
        # CKA_EC_POINT is a DER OCTET STRING (short form length for P-256/P-384 points < 128 bytes)
        octet = bytes([0x04, len(point)]) + point if len(point) < 128 else bytes([0x04, 0x81, len(point)]) + point
        pub_t.update({Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params, Attribute.EC_POINT: octet})
    elif isinstance(private_key, rsa.RSAPrivateKey):
        n = private_key.private_numbers()

        def b(x: int) -> bytes:
            return x.to_bytes((x.bit_length() + 7) // 8, "big")

        priv_t.update({Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: b(n.public_numbers.n),
                       Attribute.PUBLIC_EXPONENT: b(n.public_numbers.e), Attribute.PRIVATE_EXPONENT: b(n.d),
                       Attribute.PRIME_1: b(n.p), Attribute.PRIME_2: b(n.q), Attribute.EXPONENT_1: b(n.dmp1),
                       Attribute.EXPONENT_2: b(n.dmq1), Attribute.COEFFICIENT: b(n.iqmp)})
        pub_t.update({Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: b(n.public_numbers.n),
                      Attribute.PUBLIC_EXPONENT: b(n.public_numbers.e)})
    else:
        raise UnsupportedKeyType(f"cannot import a {type(private_key).__name__} into the token")
    session.create_object(pub_t)
    session.create_object(priv_t)
    return key_info(session, label=label)
