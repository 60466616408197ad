"""A throw-away certificate authority for the security tests (made fresh in every run).

Writes PEM files: ``ca.pem`` (the trusted CA), ``broker.crt``/``broker.key`` (a server
certificate naming only ``localhost``, so connecting by IP fails hostname verification),
``client.crt``/``client.key`` (a client certificate for mutual TLS, CN=worker; the key also
encrypted in ``client-encrypted.key`` with :data:`KEY_PASSWORD`), and
``other-ca.pem`` (a CA nobody uses, to stand for "the wrong CA").
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["KEY_PASSWORD", "Pki", "make_pki"]

KEY_PASSWORD = "key-password-for-tests"  # noqa: S105 - a throw-away key made per run


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files :func:`make_pki` wrote."""

    ca: Path
    other_ca: Path
    broker_cert: Path
    broker_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    dns: tuple[str, ...] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey, password: str = ""
) -> Path:
    pem = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            pem += item.public_bytes(serialization.Encoding.PEM)
        else:
            pem += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password.encode())
                if password
                else serialization.NoEncryption(),
            )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def make_pki(folder: Path) -> Pki:
    """Create a CA, a broker and a client certificate (and an unrelated CA) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("test-ca", ca_key, None, ca=True)
    other = _certificate("some-other-ca", other_key, None, ca=True)
    broker_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    broker = _certificate(
        "localhost", broker_key, ("test-ca", ca_key), dns=("localhost",),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )  # fmt: skip
    client = _certificate(
        "worker", client_key, ("test-ca", ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(
        ca=_write(folder / "ca.pem", ca),
        other_ca=_write(folder / "other-ca.pem", other),
        broker_cert=_write(folder / "broker.crt", broker),
        broker_key=_write(folder / "broker.key", broker_key),
        client_cert=_write(folder / "client.crt", client),
        client_key=_write(folder / "client.key", client_key),
        client_key_encrypted=_write(
            folder / "client-encrypted.key", client_key, password=KEY_PASSWORD
        ),
    )
