"""Mutual TLS (RFC 8705): TLS client certificates authenticate clients and bind access tokens.

The certificate of a request comes from iam's own TLS handshake (`iam serve --tls-client-ca`: the ASGI TLS
extension's `client_cert_chain`) or, behind a TLS-terminating proxy, from the header it sets
(`mtls.certificate_header`), believed only when the request comes from one of `mtls.trusted_proxies`: from
anyone else the header is ignored, as if no certificate had been presented. The header holds URL-encoded PEM
(nginx `$ssl_client_escaped_cert`), base64 DER (Caddy, Traefik) or Envoy's `x-forwarded-client-cert` element.

Client authentication (§2): `tls_client_auth` needs a certificate that chains to `mtls.ca_file` (checked here,
whoever terminated TLS, so a proxy that accepts any certificate for self-signed clients cannot let a made-up
certificate with the right name through) and carries the registered subject DN or SAN entry;
`self_signed_tls_client_auth` a certificate whose public key is one of the client's registered `jwks`.
Both fail with invalid_client.

Certificate-bound tokens (§3): `cnf.x5t#S256` is the base64url SHA-256 of the certificate's DER; a protected
resource answers 401 invalid_token to such a token presented without that very certificate.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError
from starlette.requests import Request

from iam.config import ClientConfig, MutualTLS
from iam.errors import OAuthError, invalid_client, invalid_token
from iam.jwks import check_key_set
from iam.runtime import StartupError

log = logging.getLogger("iam.mtls")

MAX_HEADER_CHARS = 16384  # a certificate header longer than this is not one certificate
_SCOPE_KEY = "iam.client_certificate"  # the request's certificate, parsed once per request
_NONE = object()
# The Web PKI's rules for a client certificate, less two that private CAs often do not follow: a client registered
# by its subject DN may have no SAN, and a certificate may lack the authority key identifier. The signature, the
# validity period, the CA's basic constraints and key usage, and extendedKeyUsage clientAuth if it is there are
# still checked.
_CLIENT = (ExtensionPolicy.webpki_defaults_ee()
           .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
           .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None))
# An Envoy x-forwarded-client-cert element starts with one of its keys.
_XFCC = re.compile(r"^\s*(by|hash|cert|chain|subject|uri|dns)=", re.IGNORECASE)
_XFCC_ELEMENT = re.compile(r'(?:[^,"]|"[^"]*")+')  # elements are comma-separated, quoted values may hold commas
_XFCC_PAIR = re.compile(r'([^;=]+)=((?:[^;"]|"[^"]*")*)')


def x5t_s256(certificate: x509.Certificate) -> str:
    """`x5t#S256` (RFC 8705 §3.1): base64url of the SHA-256 of the certificate's DER."""
    return base64.urlsafe_b64encode(certificate.fingerprint(hashes.SHA256())).rstrip(b"=").decode()


@functools.lru_cache(maxsize=1024)  # the same few clients call again and again: parse each certificate once
def from_header(value: str) -> x509.Certificate | None:
    """The client certificate in a proxy's header; None if it is empty or not one."""
    value = value.strip()
    if not value or len(value) > MAX_HEADER_CHARS:
        return None
    if _XFCC.match(value):  # Envoy: By=...;Hash=...;Cert="<URL-encoded PEM>";Subject="CN=a,O=b"
        elements = _XFCC_ELEMENT.findall(value)
        if len(elements) != 1:
            return None  # more than one element: not the one client's certificate Envoy set (SANITIZE_SET)
        pairs = {key.strip().lower(): item.strip('"') for key, item in _XFCC_PAIR.findall(elements[0])}
        value = pairs.get("cert", "")
    text = unquote(value)
    try:
        if "-----BEGIN CERTIFICATE-----" in text:
            return x509.load_pem_x509_certificate(text.encode())
        # base64 DER: Caddy's certificate_der_base64; Traefik's chain is comma-separated, the client's first.
        return x509.load_der_x509_certificate(base64.b64decode(text.split(",")[0], validate=True))
    except ValueError:  # not base64 (binascii.Error), not a certificate
        return None


def subject_dn_matches(certificate: x509.Certificate, expected: str) -> bool:
    """RFC 8705 §2.1.2 `tls_client_auth_subject_dn`: the subject, compared as a parsed RFC 4514 name."""
    try:
        return certificate.subject == x509.Name.from_rfc4514_string(expected)
    except ValueError:
        return False


def san_matches(certificate: x509.Certificate, kind: str, expected: str) -> bool:
    """RFC 8705 §2.1.2: one SAN entry of the registered type equals the registered value."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    if kind == "dns":  # DNS names compare without regard to case (RFC 4343)
        return expected.lower() in (name.lower() for name in san.get_values_for_type(x509.DNSName))
    if kind == "uri":
        return expected in san.get_values_for_type(x509.UniformResourceIdentifier)
    if kind == "ip":
        return ipaddress.ip_address(expected) in san.get_values_for_type(x509.IPAddress)
    # rfc822Name: the domain compares without regard to case
    return _mailbox(expected) in (_mailbox(name) for name in san.get_values_for_type(x509.RFC822Name))


def _mailbox(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def registered_name_matches(client: ClientConfig, certificate: x509.Certificate) -> bool:
    if client.tls_client_auth_subject_dn is not None:
        return subject_dn_matches(certificate, client.tls_client_auth_subject_dn)
    for kind in ("dns", "uri", "ip", "email"):
        expected = getattr(client, f"tls_client_auth_san_{kind}")
        if expected is not None:
            return san_matches(certificate, kind, expected)
    return False


def public_key_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


class ClientCertificates:
    """The request's client certificate, and what RFC 8705 makes of it."""

    def __init__(self, settings: MutualTLS, clients: list[ClientConfig]) -> None:
        self.header = settings.certificate_header
        self.proxies = [ipaddress.ip_network(net, strict=False) for net in settings.trusted_proxies]
        self._warned = False
        self._verifier = None
        if settings.ca_file is not None:
            self._verifier = (PolicyBuilder().store(Store(_certificates(settings.ca_file)))
                              .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_CLIENT)
                              .build_client_verifier())
        # self_signed_tls_client_auth (§2.2): the public keys of each client's registered certificates.
        self._keys: dict[str, list[bytes]] = {}
        for client in clients:
            self.learn(client)

    def learn(self, client: ClientConfig) -> None:
        """Know a client's registered certificate keys (anew, for a changed stored client)."""
        self._keys.pop(client.client_id, None)
        if client.token_endpoint_auth_method == "self_signed_tls_client_auth" and client.jwks is not None:
            self._keys[client.client_id] = [key.as_pem(private=False) for key in check_key_set(client.jwks)]

    def forget(self, client_id: str) -> None:
        self._keys.pop(client_id, None)

    def presented(self, request: Request) -> x509.Certificate | None:
        """The certificate the client presented: a trusted proxy's header, else iam's own TLS handshake."""
        found: Any = request.scope.get(_SCOPE_KEY, _NONE)
        if found is _NONE:
            found = request.scope[_SCOPE_KEY] = self._find(request)
        return found  # type: ignore[no-any-return]

    def _find(self, request: Request) -> x509.Certificate | None:
        value = request.headers.get(self.header)
        if value is not None:
            if self._from_proxy(request):
                return from_header(value)
            if not self._warned:  # once: anyone may send the header, the log is not theirs to fill
                self._warned = True
                log.warning("ignored the %s header of a request from %s, not one of mtls.trusted_proxies (logged "
                            "once)", self.header, request.client.host if request.client else "unknown")
        tls = request.scope.get("extensions", {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or ()
        if not chain:
            return None
        try:
            return x509.load_pem_x509_certificate(chain[0].encode())
        except ValueError:
            return None

    def _from_proxy(self, request: Request) -> bool:
        if not self.proxies or request.client is None:
            return False
        try:
            address = ipaddress.ip_address(request.client.host)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)

    def authenticate(self, client: ClientConfig, certificate: x509.Certificate | None) -> None:
        """RFC 8705 §2: the client's certificate authenticates it, or invalid_client."""
        if certificate is None:
            raise invalid_client("a TLS client certificate is required")
        if client.token_endpoint_auth_method == "tls_client_auth":
            if self._verifier is None or not self._chains(certificate):
                raise invalid_client("the TLS client certificate is not issued by a trusted CA")
            if not registered_name_matches(client, certificate):
                raise invalid_client("the TLS client certificate's subject is not the one registered for the client")
            return
        presented = public_key_pem(certificate)
        if not any(hmac.compare_digest(presented, key) for key in self._keys.get(client.client_id, ())):
            raise invalid_client("the TLS client certificate is not one registered in the client's jwks")

    def _chains(self, certificate: x509.Certificate) -> bool:
        assert self._verifier is not None
        try:
            self._verifier.verify(certificate, [])
        except VerificationError:
            return False
        return True

    def check_presented(self, request: Request, bound: str) -> None:
        """RFC 8705 §3: a certificate-bound token only with that certificate; 401 invalid_token otherwise."""
        certificate = self.presented(request)
        if certificate is None:
            raise invalid_token("the access token is bound to a TLS client certificate, and none was presented")
        if not hmac.compare_digest(x5t_s256(certificate).encode(), bound.encode()):
            raise invalid_token("the access token is bound to another TLS client certificate")

    def bound(self, request: Request) -> str:
        """x5t#S256 of the certificate the token endpoint binds a client's tokens to (§3.1)."""
        certificate = self.presented(request)
        if certificate is None:
            raise OAuthError("invalid_request", "this client's tokens are bound to its TLS client certificate: "
                                                "present one")
        return x5t_s256(certificate)


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StartupError(f"mtls.ca_file {path}: {exc}") from None
