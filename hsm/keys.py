"""Token key pairs: generate and find them, and wrap a token private key as a pyca/cryptography private key.

The wrappers subclass cryptography's EllipticCurvePrivateKey / RSAPrivateKey so its CSR and certificate builders
sign through the token. Signing hashes on the host and signs the digest in the token (SoftHSM has no
CKM_ECDSA_SHA256): CKM_ECDSA for EC (raw r||s turned into DER), CKM_RSA_PKCS over a DigestInfo and CKM_RSA_PKCS_PSS
for RSA. Every path that would export private material raises ExportRefused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from .errors import ExportRefused, HsmError, KeyExists, KeyNotFound, UnsupportedKeyType

#: Key types Tessera generates: name -> (family, size-or-curve).
KEY_TYPES: dict[str, tuple[str, Any]] = {
    "ec-p256": ("ec", "secp256r1"),
    "ec-p384": ("ec", "secp384r1"),
    "rsa-2048": ("rsa", 2048),
    "rsa-3072": ("rsa", 3072),
}
DEFAULT_KEY_TYPE = "ec-p256"

# DER DigestInfo prefixes from RFC 8017 section 9.2, note 1 (fixed byte strings, not general ASN.1).
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


_REPORTED_ATTRIBUTES = ("TOKEN", "PRIVATE", "SENSITIVE", "ALWAYS_SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE",
                        "LOCAL", "SIGN", "DECRYPT", "UNWRAP", "DERIVE")


def _private_template() -> dict:
    from pkcs11 import Attribute

    return {
        Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False,
    }


def _public_template() -> dict:
    from pkcs11 import Attribute

    return {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
            Attribute.WRAP: False, Attribute.DERIVE: False}


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
    """Generate a non-extractable, sensitive, sign-only key pair on the token (session must be R/W)."""
    import secrets

    from pkcs11 import Attribute, KeyType, MechanismFlag
    from pkcs11.util.ec import encode_named_curve_parameters

    if key_type not in KEY_TYPES:
        raise UnsupportedKeyType(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    _check_label(session, label)
    key_id = key_id or secrets.token_bytes(8)
    family, param = KEY_TYPES[key_type]
    common = dict(id=key_id, label=label, store=True, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                  public_template=_public_template(), private_template=_private_template())
    if family == "ec":
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(param)}, local=True)
        params.generate_keypair(**common)
    else:
        session.generate_keypair(KeyType.RSA, param, **common)
    return key_info(session, label=label)


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


def key_type_name(public_key) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(public_key.curve.name, public_key.curve.name)
    return f"rsa-{public_key.key_size}"


def key_info(session, label: str | None = None, key_id: bytes | None = None) -> KeyInfo:
    priv = find_private_key(session, label, key_id)
    pub = find_public_key(session, key_id=priv.id)
    public = public_key_of(pub)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    attrs = tuple((name.lower(), bool(priv[_attr(name)])) for name in _REPORTED_ATTRIBUTES)
    return KeyInfo(token_label=session.token.label, label=priv.label, id=bytes(priv.id),
                   key_type=key_type_name(public), public_key_pem=pem, attributes=attrs)


def load_private_key(session, label: str | None = None, key_id: bytes | None = None):
    """A cryptography private key object that signs in the token (valid while `session` is open)."""
    priv = find_private_key(session, label, key_id)
    public = public_key_of(find_public_key(session, key_id=priv.id))
    if isinstance(public, ec.EllipticCurvePublicKey):
        return TokenECPrivateKey(priv, public)
    return TokenRSAPrivateKey(priv, public)


def _digest(data: bytes, algorithm) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        if len(data) != algorithm.digest_size:
            raise ValueError("prehashed data does not match the digest size")
        return data, algorithm._algorithm
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


def _refuse(*_a, **_k):
    raise ExportRefused("the private key lives in a PKCS#11 token and cannot be exported")


class TokenECPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC private key whose operations happen in the token."""

    def __init__(self, token_key, public: ec.EllipticCurvePublicKey):
        self._token_key = token_key
        self._public = public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        from pkcs11 import Mechanism

        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedKeyType("token EC keys sign with ECDSA only")
        digest, _ = _digest(data, signature_algorithm.algorithm)
        raw = self._token_key.sign(digest, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise ExportRefused("token keys are sign-only: ECDH is refused")

    private_numbers = _refuse
    private_bytes = _refuse

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        _refuse()


class TokenRSAPrivateKey(rsa.RSAPrivateKey):
    """An RSA private key whose operations happen in the token (PKCS#1 v1.5 and PSS signatures)."""

    def __init__(self, token_key, public: rsa.RSAPublicKey):
        self._token_key = token_key
        self._public = public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(self, data: bytes, padding_: padding.AsymmetricPadding, algorithm) -> bytes:
        from pkcs11 import MGF, Mechanism

        digest, alg = _digest(data, algorithm)
        if alg.name not in _DIGEST_INFO:
            raise UnsupportedKeyType(f"hash {alg.name} is not supported for token RSA signatures")
        if isinstance(padding_, padding.PKCS1v15):
            return self._token_key.sign(_DIGEST_INFO[alg.name] + digest, mechanism=Mechanism.RSA_PKCS)
        if isinstance(padding_, padding.PSS):
            salt = padding_._salt_length
            if salt is padding.PSS.MAX_LENGTH or isinstance(salt, padding._MaxLength):
                salt = (self.key_size + 7) // 8 - alg.digest_size - 2
            elif salt is padding.PSS.DIGEST_LENGTH or isinstance(salt, padding._DigestLength):
                salt = alg.digest_size
            elif not isinstance(salt, int):
                raise UnsupportedKeyType("PSS salt length AUTO is only for verification")
            mgf_alg = padding_.mgf._algorithm
            name = alg.name.upper()
            mech_param = (getattr(Mechanism, name), getattr(MGF, mgf_alg.name.upper()), salt)
            return self._token_key.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=mech_param)
        raise UnsupportedKeyType(f"padding {padding_.name} is not supported for token RSA signatures")

    def decrypt(self, ciphertext: bytes, padding_) -> bytes:
        raise ExportRefused("token keys are sign-only: decryption is refused")

    private_numbers = _refuse
    private_bytes = _refuse

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        _refuse()


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
    priv_t = {**common, **_private_template(), Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    pub_t = {**common, **_public_template(), Attribute.CLASS: ObjectClass.PUBLIC_KEY}
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
