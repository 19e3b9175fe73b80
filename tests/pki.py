"""A throw-away PKI for the TLS tests (mutual TLS, the Kubernetes ones): a CA, server and client certificates,
self-signed client certificates, written as PEM files (made with `cryptography`)."""

from __future__ import annotations

import base64
import datetime
import ssl
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from joserfc.jwk import ECKey

from iam.token.mtls import x5t_s256


def _name(dn: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(dn)  # "CN=svc,O=Example": the RFC 4514 form, most specific first


@dataclass
class Credential:
    """A certificate and its key, as files and in the forms proxies put a certificate in a header."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def escaped_pem(self) -> str:
        """nginx's `$ssl_client_escaped_cert`: URL-encoded PEM."""
        return quote(self.pem, safe="")

    @property
    def der_base64(self) -> str:
        """Caddy's `{http.request.tls.client.certificate_der_base64}`."""
        return base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()

    @property
    def x5t(self) -> str:
        return x5t_s256(self.certificate)

    @property
    def jwk(self) -> dict:
        """The certificate's public key as a JWK (self_signed_tls_client_auth registers it in `jwks`)."""
        public = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        return ECKey.import_key(public).as_dict(private=False)

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.cert_path, self.key_path

    def context(self, ca: Path) -> ssl.SSLContext:
        """A TLS client context that trusts `ca` for the server and presents this certificate."""
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context


class TestCA:
    __test__ = False  # not a test class

    def __init__(self, directory: Path, name: str = "iam test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(f"CN={name}")
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.pem)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.path))

    def server(self, name: str = "server", hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Credential:
        """A server certificate for `hosts` (IP addresses and DNS names)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(name, f"CN={hosts[0]}", sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, name: str, dn: str, sans: list[x509.GeneralName] | None = None) -> Credential:
        """A client certificate with the subject `dn` and these SAN entries (none: no SAN extension)."""
        sans = [x509.DNSName(f"{name}.clients.test")] if sans is None else sans
        return self._issue(name, dn, sans, ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(self, name: str, dn: str, sans: list[x509.GeneralName], usage) -> Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(_name(dn)).issuer_name(self.name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            certificate = certificate.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = certificate.sign(self.key, hashes.SHA256())
        return _written(self.directory, name, certificate, key)


def self_signed(directory: Path, name: str) -> Credential:
    """A self-signed client certificate (self_signed_tls_client_auth, RFC 8705 §2.2)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"CN={name}")
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.self.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _written(directory, name, certificate, key)


def _written(directory: Path, name: str, certificate: x509.Certificate, key) -> Credential:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Credential(certificate, key, cert_path, key_path)
