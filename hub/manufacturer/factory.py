"""The factory's side of birth certificates: a manufacturer CA whose key lives in its own token, and per device a
key generated in the device's token, the birth certificate (IEEE 802.1AR IDevID) the CA signs for it, written
into the device's token next to the key (same CKA_ID), and one row appended to the batch file the fleet operator
imports (`tessera-hub manufacturer import-batch`).

    python -m hub.manufacturer.factory init-ca ...     (provisioning/factory/tessera-factory wraps it)
    python -m hub.manufacturer.factory birth ...

The birth certificate: subject serialNumber=<device serial> (802.1AR 8.6), O=<manufacturer>, CN=<model>;
notAfter 99991231235959Z unless --days (802.1AR 8.5: no well-defined expiry); keyUsage digitalSignature
(critical), extendedKeyUsage clientAuth (it authenticates the device in TLS and nothing else), no basicConstraints
cA. Every token step runs in its own spawned child (hsm.worker.run_isolated): the CA token and a device token are
different SoftHSM2 configurations, which one process cannot hold at once. No PIN is ever in argv.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsm.token import TokenConfig

#: 802.1AR 8.5: an IDevID "that has no well-defined expiration date" carries this notAfter
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
CA_KEY_LABEL = "manufacturer-ca"
BATCH_FIELDS = ("serial", "device_id", "cert_sha256")


class FactoryError(Exception):
    """A factory step refused (one line: what and why)."""


@dataclass(frozen=True)
class Signer:
    """The manufacturer CA: its certificate and where its key is."""
    token: TokenConfig
    key_label: str
    ca_pem: bytes


def _sign(signer: Signer, kind: str, args: dict) -> bytes:
    """In a child: build (ca_fields / birth_fields from plain data: nothing of cryptography's crosses the process
    boundary) and sign a certificate with the CA's token key; DER."""
    from hsm.keys import load_private_key
    from hsm.token import open_session

    public = _public_key(args["public_key_pem"])
    now = datetime.fromisoformat(args["now"])
    if kind == "ca":
        builder_args = ca_fields(args["name"], args["common_name"], public, now, args["days"])
    else:
        ca = x509.load_pem_x509_certificate(signer.ca_pem)
        builder_args = birth_fields(ca, args["serial"], public, now, args["model"], args["days"])
    with open_session(signer.token) as session:
        key = load_private_key(session, signer.key_label)
        builder = x509.CertificateBuilder(**builder_args["fields"])
        for ext, critical in builder_args["extensions"]:
            builder = builder.add_extension(ext, critical=critical)
        builder = builder.public_key(builder_args["public_key"]).issuer_name(builder_args["issuer"])
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _public_key(pem: str):
    return serialization.load_pem_public_key(pem.encode())


def init_ca(token: TokenConfig, name: str, out: Path, common_name: str = "", days: int = 7300,
            now: datetime | None = None, key_type: str = "ec-p256") -> x509.Certificate:
    """Generate the CA key in `token` (label CA_KEY_LABEL) and its self-signed certificate, written to `out`."""
    from hsm import worker

    if out.exists():
        raise FactoryError(f"{out} already exists; refusing to overwrite it")
    now = now or datetime.now(timezone.utc)
    with open(out, "xb") as fh:  # exclusive: never over another CA's certificate
        try:
            info = worker.generate_key(token, CA_KEY_LABEL, key_type)  # KeyExists: that token has a CA key already
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        try:
            der = worker.run_isolated(_sign, Signer(token, CA_KEY_LABEL, b""), "ca", {
                "name": name, "common_name": common_name, "public_key_pem": info.public_key_pem,
                "now": now.isoformat(), "days": days})
        except BaseException:
            worker.delete_key(token, CA_KEY_LABEL)
            out.unlink(missing_ok=True)
            raise
        cert = x509.load_der_x509_certificate(der)
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def ca_fields(name: str, common_name: str, public, now: datetime, days: int) -> dict:
    """The manufacturer CA's self-signed certificate: O=<name>, cA with pathLen 0, keyCertSign and cRLSign."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{name} IDevID CA")])
    return {
        "fields": {"subject_name": subject, "serial_number": x509.random_serial_number(),
                   "not_valid_before": now - timedelta(minutes=5), "not_valid_after": now + timedelta(days=days)},
        "extensions": [(x509.BasicConstraints(ca=True, path_length=0), True),
                       (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                      crl_sign=True, encipher_only=False, decipher_only=False), True),
                       (x509.SubjectKeyIdentifier.from_public_key(public), False)],
        "public_key": public, "issuer": subject}


def birth_fields(ca: x509.Certificate, serial: str, public, now: datetime, model: str = "",
                 days: int | None = None) -> dict:
    """The birth certificate's fields and extensions (see the module docstring)."""
    org = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    names = [x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]
    names += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org[0].value))] if org else []
    names += [x509.NameAttribute(NameOID.COMMON_NAME, model)] if model else []
    not_after = NO_EXPIRY if days is None else now + timedelta(days=days)
    return {
        "fields": {"subject_name": x509.Name(names), "serial_number": x509.random_serial_number(),
                   "not_valid_before": now - timedelta(minutes=5), "not_valid_after": not_after},
        "extensions": [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), False)],
        "public_key": public, "issuer": ca.subject}


def issue_birth(signer: Signer, device: TokenConfig, serial: str, batch: Path, device_id: str = "",
                key_label: str = "device-key", key_type: str = "ec-p256", model: str = "", days: int | None = None,
                now: datetime | None = None) -> x509.Certificate:
    """Key in the device token, the birth certificate signed by the CA, written into the token, row in `batch`."""
    from hsm import worker
    from hsm.certificates import IDEVID_KEY_ID_PREFIX, write_certificate
    from hub.manufacturer.store import ManufacturerError, check_serial

    try:
        check_serial(serial)
    except ManufacturerError as exc:
        raise FactoryError(str(exc)) from None
    ca = x509.load_pem_x509_certificate(signer.ca_pem)
    now = now or datetime.now(timezone.utc)
    key_id = IDEVID_KEY_ID_PREFIX + serial.encode()
    with open(batch, "a", newline="") as fh:  # opened first: a batch file that cannot be written stops us here
        info = worker.generate_key(device, key_label, key_type, key_id)
        try:
            der = worker.run_isolated(_sign, signer, "birth", {"serial": serial, "public_key_pem": info.public_key_pem,
                                                               "now": now.isoformat(), "model": model, "days": days})
            cert = x509.load_der_x509_certificate(der)
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:  # noqa: BLE001  (InvalidSignature, or another key type)
                raise FactoryError(f"the CA certificate {ca.subject.rfc4514_string()} is not the one whose key is "
                                   f"in the CA token {signer.token.label!r}") from None
            write_certificate(device, der, key_label, info.id)
        except BaseException:  # no half-provisioned token: a re-run starts from scratch
            worker.delete_key(device, key_label)
            raise
        writer = csv.writer(fh)
        if fh.tell() == 0:
            writer.writerow(BATCH_FIELDS)
        writer.writerow((serial, device_id, cert.fingerprint(hashes.SHA256()).hex()))
    return cert


# --- the command line ---------------------------------------------------------------------------------------------

def _app():
    import typer

    app = typer.Typer(help="Factory: the manufacturer CA (key in its own token) and birth certificates (IEEE "
                           "802.1AR IDevID) written into device tokens.", no_args_is_help=True)

    def token(label: str, pin_source: str, module: str, softhsm_conf: str) -> TokenConfig:
        return TokenConfig(label=label, pin_source=pin_source, module=module,
                           softhsm_conf=str(Path(softhsm_conf).resolve()) if softhsm_conf else "")

    def run(fn):
        from hsm.errors import HsmError

        try:
            return fn()
        except (FactoryError, HsmError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)

    @app.command("init-ca")
    def init_ca_cmd(
        name: str = typer.Option(..., "--name", help="The manufacturer's name (O= of its certificates)."),
        out: Path = typer.Option(..., "--out", help="Where the CA certificate (PEM) goes; give it to the fleet "
                                                    "operator (`tessera-hub manufacturer add`)."),
        token_label: str = typer.Option(..., "--token-label", help="The CA's token (label)."),
        pin_source: str = typer.Option(..., "--pin-source", help="Its PIN: file:/path (0600) or env:NAME."),
        module: str = typer.Option("", "--module", help="PKCS#11 module \\[default: SoftHSM2]."),
        softhsm_conf: str = typer.Option("", "--softhsm-conf", help="SoftHSM2 only: its config file."),
        days: int = typer.Option(7300, "--days", min=1, max=36500, help="The CA's lifetime."),
    ) -> None:
        """Generate the manufacturer CA's key in its token and its self-signed certificate."""
        cert = run(lambda: init_ca(token(token_label, pin_source, module, softhsm_conf), name, out, days=days))
        typer.echo(f"CA {cert.subject.rfc4514_string()} in {out}; sha256 {cert.fingerprint(hashes.SHA256()).hex()}")

    @app.command("birth")
    def birth_cmd(
        serial: str = typer.Option(..., "--serial", help="The device serial number (subject serialNumber)."),
        batch: Path = typer.Option(..., "--batch", help="The batch CSV the row is appended to (serial, device_id, "
                                                        "cert_sha256; made with its header if missing)."),
        ca: Path = typer.Option(..., "--ca", help="The manufacturer CA certificate (PEM, from init-ca)."),
        ca_token_label: str = typer.Option(..., "--ca-token-label", help="The CA's token (label)."),
        ca_pin_source: str = typer.Option(..., "--ca-pin-source", help="Its PIN: file:/path or env:NAME."),
        ca_module: str = typer.Option("", "--ca-module", help="Its PKCS#11 module \\[default: SoftHSM2]."),
        ca_softhsm_conf: str = typer.Option("", "--ca-softhsm-conf", help="SoftHSM2 only: its config file."),
        token_label: str = typer.Option("tessera", "--token-label", help="The device's token (label)."),
        pin_source: str = typer.Option(..., "--pin-source", help="Its PIN: file:/path (0600) or env:NAME."),
        module: str = typer.Option("", "--module", help="Its PKCS#11 module \\[default: SoftHSM2]."),
        softhsm_conf: str = typer.Option("", "--softhsm-conf", help="SoftHSM2 only: its config file."),
        key_label: str = typer.Option("device-key", "--key-label", help="Label of the key and the certificate "
                                                                        "(the agent's token.key_label)."),
        device_id: str = typer.Option("", "--device-id", help="The fleet device id, if the factory knows it "
                                                              "\\[default: empty: the serial in lower case]."),
        model: str = typer.Option("", "--model", help="CN= of the birth certificate (e.g. the model name)."),
        days: Optional[int] = typer.Option(None, "--days", min=1, max=36500,
                                           help="Lifetime \\[default: none, notAfter 99991231235959Z]."),
    ) -> None:
        """Key in the device token, birth certificate signed by the CA and written next to it, row in the batch."""
        try:
            ca_pem = ca.read_bytes()
        except OSError as exc:
            typer.echo(f"error: cannot read {ca}: {exc.strerror}", err=True)
            raise typer.Exit(1)
        signer = Signer(token(ca_token_label, ca_pin_source, ca_module, ca_softhsm_conf), CA_KEY_LABEL, ca_pem)
        device = token(token_label, pin_source, module, softhsm_conf)
        cert = run(lambda: issue_birth(signer, device, serial, batch, device_id, key_label, model=model, days=days))
        typer.echo(f"birth certificate for {serial} in token {token_label!r} ({key_label}); "
                   f"sha256 {cert.fingerprint(hashes.SHA256()).hex()}; appended to {batch}")

    return app


def main() -> None:
    _app()()


if __name__ == "__main__":
    main()
