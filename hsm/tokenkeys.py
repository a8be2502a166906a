"""Token private keys as pyca/cryptography private keys: every signature is made in the token, nothing exports.

TokenECPrivateKey / TokenRSAPrivateKey subclass cryptography's EllipticCurvePrivateKey / RSAPrivateKey so its CSR
and certificate builders sign through the token (hsm.keys.load_private_key makes them). EC and PSS hash on the
host and sign the digest in the token (SoftHSM has no CKM_ECDSA_SHA256): CKM_ECDSA (raw r||s turned into DER),
CKM_RSA_PKCS_PSS. PKCS#1 v1.5 hashes in the token (CKM_SHA256_RSA_PKCS, ...): tpm2-pkcs11 makes CKM_RSA_PKCS over a
DigestInfo from a raw RSA decryption, which a sign-only key cannot do; only prehashed input takes that route. A
refused signature is one line naming the mechanism, key type and label. Every export path raises ExportRefused.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from . import templates
from .errors import ExportRefused, UnsupportedKeyType

# DER DigestInfo prefixes from RFC 8017 section 9.2, note 1 (fixed byte strings, not general ASN.1).
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def key_type_name(public_key) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(public_key.curve.name, public_key.curve.name)
    return f"rsa-{public_key.key_size}"


def _digest(data: bytes, algorithm) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        if len(data) != algorithm.digest_size:
            raise ValueError("prehashed data does not match the digest size")
        return data, algorithm._algorithm
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


def _token_sign(token_key, data: bytes, key_type: str, what: str, **mechanism) -> bytes:
    """token_key.sign(data, **mechanism); a refusal names the mechanism, key type and label (one line)."""
    import pkcs11

    from .modulelog import captured

    with captured() as said:
        try:
            return token_key.sign(data, **mechanism)
        except pkcs11.PKCS11Error as exc:
            error = exc
    raise templates.signing_refused(error, token_key.session.token.label, token_key.label, key_type, what,
                                    said.reason) from None


def _refuse(*_a, **_k):
    raise ExportRefused("the private key lives in a PKCS#11 token and cannot be exported")


class _Unexportable:
    """What both token key classes share: the private key never leaves the token (no numbers, no bytes, no
    pickling) and a copy is the same handle."""
    private_numbers = _refuse
    private_bytes = _refuse

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        _refuse()


class TokenECPrivateKey(_Unexportable, ec.EllipticCurvePrivateKey):
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
        raw = _token_sign(self._token_key, digest, key_type_name(self._public), "CKM_ECDSA", mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise ExportRefused("token keys are sign-only: ECDH is refused")


class TokenRSAPrivateKey(_Unexportable, rsa.RSAPrivateKey):
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
            if not isinstance(algorithm, utils.Prehashed):  # hash-and-sign: the one a sign-only TPM key can do
                mech = f"{alg.name.upper()}_RSA_PKCS"
                return _token_sign(self._token_key, data, key_type_name(self._public), f"CKM_{mech}",
                                   mechanism=getattr(Mechanism, mech))
            return _token_sign(self._token_key, _DIGEST_INFO[alg.name] + digest, key_type_name(self._public),
                               "CKM_RSA_PKCS", mechanism=Mechanism.RSA_PKCS)
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
            return _token_sign(self._token_key, digest, key_type_name(self._public),
                               f"CKM_RSA_PKCS_PSS ({alg.name}, MGF1-{mgf_alg.name}, salt {salt})",
                               mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=mech_param)
        raise UnsupportedKeyType(f"padding {padding_.name} is not supported for token RSA signatures")

    def decrypt(self, ciphertext: bytes, padding_) -> bytes:
        raise ExportRefused("token keys are sign-only: decryption is refused")
