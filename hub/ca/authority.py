"""The fleet CA hierarchy: a root CA, a device CA and a service CA, with keys in files or in a PKCS#11 token.

* Root CA (pathLen 1, 10 y) signs the two intermediates only.
* Device CA (pathLen 0, 5 y) issues device client certificates only: its own certificate carries EKU clientAuth
  (OpenSSL treats EKU in a CA certificate as a constraint on the chain) and critical nameConstraints that permit
  only subjects under O=<fleet> and exclude every dNSName and iPAddress, so it can never issue a usable server
  certificate. It also signs the device CRL.
* Service CA (pathLen 0, EKU serverAuth+clientAuth, 5 y) issues the hub's server certificates and the hub's admin
  client certificate, so the admin identity can never be confused with a device. It has no nameConstraints:
  devices verify the hub through it and some TLS stacks reject critical directoryName constraints.

Time is always passed in (`now`, timezone-aware). Token signing is serialised with a lock (python-pkcs11 sessions
are not thread-safe); file-key signing is not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsm.errors import HsmError, KeyNotFound
from hsm.secretfile import PrivateFileError, read_private_file
from hsm.token import TokenConfig

from hub.ca.credential import credential_uri
from hub.ca.crl import crl_builder
from hub.ca.policy import Policy, check_device_id

CA_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-3072")
FILE_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
TOKEN_LABELS = {"root": "tessera-root-ca", "device": "tessera-device-ca", "service": "tessera-service-ca"}
ROOT_VALIDITY = timedelta(days=3653)
INTERMEDIATE_VALIDITY = timedelta(days=1827)
CLOCK_SKEW = timedelta(minutes=5)
KEYS_FORMAT = "tessera-ca-keys/1"
_HOST_RE = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", re.I)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class CaError(Exception):
    """The CA cannot do what was asked (bad files, wrong permissions, unacceptable key, expired CA, ...)."""


class CaPaths:
    """Where a hierarchy's files live inside its directory."""

    def __init__(self, ca_dir: Path) -> None:
        self.dir = Path(ca_dir)
        self.root = self.dir / "root.pem"
        self.device_ca = self.dir / "device-ca.pem"
        self.service_ca = self.dir / "service-ca.pem"
        self.device_chain = self.dir / "device-chain.pem"
        self.service_chain = self.dir / "service-chain.pem"
        self.root_key = self.dir / "root.key"
        self.device_key = self.dir / "device-ca.key"
        self.service_key = self.dir / "service-ca.key"
        self.keys_json = self.dir / "keys.json"

    def key_file(self, role: str) -> Path:
        return {"root": self.root_key, "device": self.device_key, "service": self.service_key}[role]

    def existing(self) -> list[Path]:
        """The hierarchy files that exist (a non-empty list means "a hierarchy is here")."""
        return [p for p in (self.root, self.device_ca, self.service_ca, self.device_chain, self.service_chain,
                            self.root_key, self.device_key, self.service_key, self.keys_json) if p.exists()]


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime (UTC)")
    return now


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _name(fleet: str, cn: str, ous: Iterable[str] = ()) -> x509.Name:
    # O first: the device CA's permitted directoryName subtree (O=<fleet>) must be a prefix of the subject.
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def check_public_key(public_key: Any, ec_curves: Iterable[str] = ("secp256r1", "secp384r1"),
                     rsa_min_bits: int = 2048) -> PublicKey:
    """Return public_key if it is EC P-256/P-384 (and in ec_curves) or RSA >= max(2048, rsa_min_bits)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = public_key.curve.name
        if name in ("secp256r1", "secp384r1") and name in tuple(ec_curves):
            return public_key
        raise CaError(f"EC curve {name} is not accepted (allowed: {', '.join(ec_curves)})")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= max(2048, rsa_min_bits):
            return public_key
        raise CaError(f"RSA-{public_key.key_size} is too small (at least {max(2048, rsa_min_bits)} bits)")
    raise CaError(f"unsupported public key type {type(public_key).__name__} (use EC P-256/P-384 or RSA >= 2048)")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never overwrite) with `mode` from the start, write and fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CaError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def new_file_key(path: Path, key_type: str = "ec-p256") -> PrivateKey:
    """Generate a key and write it to a new file as unencrypted PKCS#8 PEM with mode 0600 (never overwrites)."""
    if key_type not in FILE_KEY_TYPES:
        raise CaError(f"unknown key type {key_type!r}; choose one of {', '.join(FILE_KEY_TYPES)}")
    key: PrivateKey = (ec.generate_private_key(ec.SECP256R1() if key_type == "ec-p256" else ec.SECP384R1())
                       if key_type.startswith("ec-") else rsa.generate_private_key(65537, int(key_type[4:])))
    _write_new(Path(path), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), 0o600)
    return key


def load_key_file(path: Path) -> PrivateKey:
    """Load an unencrypted PEM private key, refusing a file that group or others can access."""
    path = Path(path)
    try:
        data = read_private_file(path, "key file")
    except PrivateFileError as exc:
        raise CaError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"key file {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CaError(f"key file {path} holds a {type(key).__name__}; only EC and RSA keys are supported")
    return key


class FleetCA:
    """A loaded hierarchy: certificates and signing keys. Use load_ca() / create_hierarchy(); call close()."""

    def __init__(self, paths: CaPaths, certs: dict[str, x509.Certificate], keys: dict[str, PrivateKey],
                 token_backed: bool, resources: contextlib.ExitStack | None = None) -> None:
        self.paths = paths
        self._certs = dict(certs)
        root = self.root = certs["root"]
        self.device_ca, self.service_ca = certs["device"], certs["service"]
        self._keys = keys
        self.token_backed = token_backed
        self._lock: Any = threading.Lock() if token_backed else contextlib.nullcontext()
        self._resources = resources
        self._closed = False
        orgs = root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if not orgs:
            raise CaError(f"root certificate {paths.root} has no O= (fleet) attribute")
        self.fleet = str(orgs[0].value)
        for role, cert in self._certs.items():
            if _spki(keys[role].public_key()) != _spki(cert.public_key()):
                raise CaError(f"the {role} CA key does not match the {role} CA certificate's public key")
        for role in ("device", "service"):
            try:
                self._certs[role].verify_directly_issued_by(root)
            except Exception as exc:  # InvalidSignature, ValueError, TypeError
                raise CaError(f"the {role} CA certificate was not issued by this root CA ({exc!r})") from None

    def trust_bundle_pem(self) -> bytes:
        """Root, device CA and service CA certificates as PEM (for EST /cacerts and client trust stores)."""
        return _pem(self.root) + _pem(self.device_ca) + _pem(self.service_ca)

    def close(self) -> None:
        """Release the token session if this object opened it (idempotent). File keys need nothing."""
        with self._lock:
            self._closed = True
            if self._resources is not None:
                self._resources.close()
                self._resources = None

    def __enter__(self) -> FleetCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sign(self, role: str, builder: Any) -> Any:
        """builder.sign() with the `role` CA key (certificate or CRL builder), under the token lock."""
        key = self._keys[role]
        with self._lock:
            if self._closed and self.token_backed:
                raise CaError("this FleetCA is closed: its token session is gone")
            return builder.sign(key, _hash_for(key))

    def _leaf(self, role: str, subject: x509.Name, public_key: PublicKey, now: datetime,
              validity: timedelta, credential: bool = False) -> x509.CertificateBuilder:
        """`credential`: a client certificate, which carries its credential URI (hub/ca/credential.py)."""
        issuer = self._certs[role]
        now = _aware(now)
        if now >= issuer.not_valid_after_utc:
            raise CaError(f"the {role} CA certificate expired on {issuer.not_valid_after_utc:%Y-%m-%d}")
        if now < issuer.not_valid_before_utc:
            raise CaError(f"the {role} CA certificate is not valid before {issuer.not_valid_before_utc}")
        if validity <= timedelta(0):
            raise CaError("certificate validity must be positive")
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        serial = x509.random_serial_number()
        builder = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(issuer.subject).public_key(public_key)
                   .serial_number(serial)
                   .not_valid_before(max(now - CLOCK_SKEW, issuer.not_valid_before_utc))
                   .not_valid_after(min(now + validity, issuer.not_valid_after_utc))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
        if credential:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(credential_uri(role, serial))]), critical=False)
        return builder

    def issue_device_cert(self, public_key: PublicKey, device_id: str, policy: Policy, now: datetime,
                          crl_urls: str | Sequence[str]) -> x509.Certificate:
        """A device client certificate from the device CA; every field is decided here, none comes from a CSR.

        `crl_urls`: the CRL distribution point's URIs, in order (one DistributionPoint whose fullName lists them:
        a relying party tries them in turn; the hub puts the http one first, RFC 5280 8).
        Raises hub.ca.policy.PolicyError for an invalid device id, CaError for an unacceptable key or setting.
        """
        check_device_id(device_id)
        if policy.fleet != self.fleet:
            raise CaError(f"policy is for fleet {policy.fleet!r} but this CA serves fleet {self.fleet!r}")
        check_public_key(public_key, policy.ec_curves, policy.rsa_min_bits)
        urls = [crl_urls] if isinstance(crl_urls, str) else list(crl_urls)
        for url in urls or [""]:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                raise CaError(f"CRL distribution point must be an http(s) URL, not {url!r}")
        builder = (self._leaf("device", _name(self.fleet, device_id, policy.extra_ou), public_key, now,
                              policy.validity, credential=True)
                   .add_extension(_key_usage(digital_signature=True), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                       full_name=[x509.UniformResourceIdentifier(u) for u in urls], relative_name=None, reasons=None,
                       crl_issuer=None)]), critical=False))
        return self._sign("device", builder)

    def issue_server_cert(self, public_key: PublicKey, hostnames: list[str], ips: list[str], now: datetime,
                          validity: timedelta = timedelta(days=90)) -> x509.Certificate:
        """A TLS server certificate for the hub from the service CA (SAN = hostnames + IP addresses)."""
        check_public_key(public_key)
        try:
            addresses = [ipaddress.ip_address(ip) for ip in ips]
        except ValueError as exc:
            raise CaError(str(exc)) from None
        bad = [h for h in hostnames if not _HOST_RE.fullmatch(h)]
        if bad or not (hostnames or addresses):
            raise CaError(f"give at least one valid hostname or IP address (bad: {bad!r})")
        san = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(a) for a in addresses]
        cn = hostnames[0] if hostnames else str(addresses[0])
        builder = (self._leaf("service", _name(self.fleet, cn), public_key, now, validity)
                   .add_extension(_key_usage(True, isinstance(public_key, rsa.RSAPublicKey)), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName(san), critical=False))
        return self._sign("service", builder)

    def issue_admin_cert(self, public_key: PublicKey, now: datetime, name: str = "tessera-hub",
                         validity: timedelta = timedelta(days=365)) -> x509.Certificate:
        """The hub's admin client certificate (CN=name, O=<fleet>, clientAuth) from the service CA."""
        check_public_key(public_key)
        builder = (self._leaf("service", _name(self.fleet, name), public_key, now, validity, credential=True)
                   .add_extension(_key_usage(digital_signature=True), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return self._sign("service", builder)

    def issue_identity_cert(self, public_key: PublicKey, principal: str, now: datetime,
                            validity: timedelta = timedelta(days=365)) -> x509.Certificate:
        """A service identity's client certificate from the service CA: O=<fleet>, OU=tessera-service, CN=principal.

        The issuer (service CA) is what sets it apart from a device; the `svc.` principal prefix keeps the names
        apart too (a device id never contains a '.').
        """
        check_public_key(public_key)
        builder = (self._leaf("service", _name(self.fleet, principal, ("tessera-service",)), public_key, now,
                              validity, credential=True)
                   .add_extension(_key_usage(digital_signature=True), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return self._sign("service", builder)

    def build_crl(self, revoked: Iterable[tuple[int, datetime, str]], now: datetime, *, crl_number: int,
                  next_update: timedelta = timedelta(days=7), issuer: str = "device") -> x509.CertificateRevocationList:
        """A CRL signed by the `issuer` CA ("device", default, or "service"): entries, CRLNumber and AKI.

        Reasons are RFC 5280 names (keyCompromise, superseded, certificateHold, ...; case, '_' and '-' are
        ignored). Unknown reasons and 'unspecified' get no reason code (RFC 5280 5.3.1).
        """
        if issuer not in ("device", "service"):
            raise CaError(f"no {issuer!r} CA issues CRLs")
        return self._sign(issuer, crl_builder(self._certs[issuer], revoked, _aware(now), crl_number, next_update))


def _ca_cert(subject: x509.Name, key: PrivateKey, issuer: x509.Certificate | None, issuer_key: PrivateKey,
             now: datetime, validity: timedelta, path_length: int,
             extra: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki_src = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value if issuer else ski
    not_after = now + validity if issuer is None else min(now + validity, issuer.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(_key_usage(ca=True), critical=True)
               .add_extension(ski, critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(aki_src), False))
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, _hash_for(issuer_key))


def create_hierarchy(ca_dir: Path, fleet: str, now: datetime, key_type: str = "ec-p256",
                     token: TokenConfig | None = None, session: Any = None) -> FleetCA:
    """Create root, device and service CAs in ca_dir (0700); refuse if a hierarchy is already there.

    File keys go to root.key / device-ca.key / service-ca.key (0600 PKCS#8 PEM). With `token` (or an open R/W
    python-pkcs11 `session`) the keys are generated in the token under TOKEN_LABELS and keys.json records their
    PKCS#11 URIs (no PIN); the returned FleetCA keeps a session it opened until close().
    """
    now = _aware(now)
    if key_type not in CA_KEY_TYPES:
        raise CaError(f"unsupported CA key type {key_type!r}; choose one of {', '.join(CA_KEY_TYPES)}")
    if not fleet or len(fleet) > 64:
        raise CaError("fleet name must be 1..64 characters")
    paths = CaPaths(Path(ca_dir))
    if paths.existing():
        raise CaError(f"{paths.dir} already holds a CA hierarchy ({paths.existing()[0].name}); refusing to replace it")
    paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(paths.dir, 0o700)
    stack = contextlib.ExitStack()
    use_token = token is not None or session is not None
    try:
        if use_token:
            from hsm.keys import find_private_key, generate_keypair, load_private_key

            if session is None:
                from hsm.token import open_session

                session = stack.enter_context(open_session(token, rw=True))
            for label in TOKEN_LABELS.values():
                try:
                    find_private_key(session, label)
                except KeyNotFound:
                    continue
                raise CaError(f"the token already holds a key labelled {label!r}; refusing to reuse or replace it")
            infos = {role: generate_keypair(session, label, key_type) for role, label in TOKEN_LABELS.items()}
            keys = {role: load_private_key(session, key_id=info.id) for role, info in infos.items()}
            record = {"format": KEYS_FORMAT, "token": session.token.label,
                      "keys": {role: info.uri for role, info in infos.items()}}
            _write_new(paths.keys_json, json.dumps(record, indent=2).encode() + b"\n", 0o644)
        else:
            keys = {role: new_file_key(paths.key_file(role), key_type) for role in TOKEN_LABELS}
        root = _ca_cert(_name(fleet, f"{fleet} Root CA"), keys["root"], None, keys["root"], now, ROOT_VALIDITY, 1,
                        [])
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet)]))],
            excluded_subtrees=[x509.DNSName(""), x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                               x509.IPAddress(ipaddress.ip_network("::/0"))])
        device = _ca_cert(_name(fleet, f"{fleet} Device CA"), keys["device"], root, keys["root"], now,
                          INTERMEDIATE_VALIDITY, 0,
                          [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False), (constraints, True)])
        service = _ca_cert(_name(fleet, f"{fleet} Service CA"), keys["service"], root, keys["root"], now,
                           INTERMEDIATE_VALIDITY, 0,
                           [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                             False)])
        for path, data in ((paths.device_chain, _pem(device) + _pem(root)), (paths.device_ca, _pem(device)),
                           (paths.service_chain, _pem(service) + _pem(root)), (paths.service_ca, _pem(service)),
                           (paths.root, _pem(root))):
            _write_new(path, data, 0o644)
        certs = {"root": root, "device": device, "service": service}
        return FleetCA(paths, certs, keys, token_backed=use_token, resources=stack)
    except BaseException as exc:
        stack.close()
        for leftover in paths.existing():  # all ours: we refused to start if any existed
            leftover.unlink()
        if isinstance(exc, HsmError):
            raise CaError(f"cannot create the CA keys in the token: {exc}") from exc
        raise


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CaError(f"cannot load CA certificate {path}: {exc}") from None


def load_ca(ca_dir: Path, token: TokenConfig | None = None, session: Any = None) -> FleetCA:
    """Load a hierarchy made by create_hierarchy: certificates plus file keys, or token keys (keys.json).

    Token keys need `token` (a session is opened and kept until close()) or an open `session` (the caller keeps
    it open for the FleetCA's life and closes it). Each key is checked against its certificate.
    """
    paths = CaPaths(Path(ca_dir))
    certs = {role: _load_cert(p) for role, p in (("root", paths.root), ("device", paths.device_ca),
                                                 ("service", paths.service_ca))}
    if not paths.keys_json.exists():
        if token is not None or session is not None:
            raise CaError(f"{paths.dir} uses file keys (no keys.json); do not pass a token")
        keys = {role: load_key_file(paths.key_file(role)) for role in TOKEN_LABELS}
        return FleetCA(paths, certs, keys, token_backed=False)
    if token is None and session is None:
        raise CaError(f"the CA keys of {paths.dir} are in a PKCS#11 token (keys.json); configure the token")
    from hsm.keys import load_private_key
    from hsm.uri import UriError, parse

    try:
        record = json.loads(paths.keys_json.read_text())
        if record.get("format") != KEYS_FORMAT:
            raise CaError(f"{paths.keys_json}: unknown format {record.get('format')!r}")
        uris = {role: parse(record["keys"][role]) for role in TOKEN_LABELS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UriError) as exc:
        raise CaError(f"cannot read {paths.keys_json}: {exc!r}") from None
    stack = contextlib.ExitStack()
    try:
        if session is None:
            from hsm.token import open_session

            session = stack.enter_context(open_session(token))
        keys = {}
        for role, uri in uris.items():
            if uri.token is not None and uri.token != session.token.label:
                raise CaError(f"the {role} CA key is on token {uri.token!r}, not on {session.token.label!r}")
            try:
                keys[role] = load_private_key(session, uri.object, uri.id)
            except HsmError as exc:
                raise CaError(f"cannot find the {role} CA key {uri}: {exc}") from None
        return FleetCA(paths, certs, keys, token_backed=True, resources=stack)
    except BaseException:
        stack.close()
        raise
