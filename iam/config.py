"""Settings: one YAML file (no secrets), `${VAR}` / `${VAR:-default}` expanded from the environment.

`IAM_CONFIG` names the file (default `config/iam.yaml`). `SERVICE_ROLE` and the three store URLs
(`IAM_AUTHN_DATABASE_URL`, `IAM_TOKEN_DATABASE_URL`, `IAM_USERS_DATABASE_URL`) are contracts: when set in
the environment they win over the file.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from iam.jwks import LOOPBACK_HOSTS, check_key_set, secure_url
from iam.roles import Role

DEFAULT_CONFIG = "config/iam.yaml"


class ConfigError(Exception):
    """Invalid configuration: the message names the file and the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


GrantType = Literal[
    "authorization_code",
    "refresh_token",
    "client_credentials",
    "urn:ietf:params:oauth:grant-type:device_code",
    "urn:ietf:params:oauth:grant-type:token-exchange",
]
AccessTokenAlg = Literal["ES256", "RS256"]
AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "workload_identity",
                     "tls_client_auth", "self_signed_tls_client_auth", "none"]
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
MTLS_METHODS = ("tls_client_auth", "self_signed_tls_client_auth")  # RFC 8705 §2
# RFC 8705 §2.1.2: the one certificate attribute a tls_client_auth client is registered by.
TLS_CLIENT_AUTH_NAMES = ("tls_client_auth_subject_dn", "tls_client_auth_san_dns", "tls_client_auth_san_uri",
                         "tls_client_auth_san_ip", "tls_client_auth_san_email")
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token


def _https_url(value: str) -> str:
    if not secure_url(value):
        raise ValueError(f"{value!r}: must be an https URL (http only on a loopback host)")
    return value


HttpsUrl = Annotated[str, AfterValidator(_https_url)]


def _key_set(value: dict[str, Any]) -> dict[str, Any]:
    check_key_set(value)
    return value


# A JWK Set of public signature keys (RFC 7517 §5), as a client's `jwks` or a trusted issuer's.
KeySet = Annotated[dict[str, Any], AfterValidator(_key_set)]


def _cidrs(values: list[str]) -> list[str]:
    for value in values:
        ipaddress.ip_network(value, strict=False)
    return values


Cidrs = Annotated[list[str], AfterValidator(_cidrs)]


class WorkloadIdentity(_Strict):
    """A workload trusted to authenticate as a client with a token its platform gave it (a Kubernetes
    service-account token, a SPIFFE JWT-SVID), sent as a client assertion (RFC 7523 §2.2)."""

    issuer: str = Field(description=(
        "The `iss` of the workload's tokens, e.g. https://kubernetes.default.svc; `spiffe://<trust domain>` for "
        "SPIFFE JWT-SVIDs (their `iss` is not checked, the trust bundle's keys vouch for them)."))
    subject: str = Field(min_length=1, max_length=255, description=(
        "The exact `sub`: `system:serviceaccount:<namespace>:<name>`, or a SPIFFE ID `spiffe://<domain>/<path>`."))
    audience: str | None = Field(default=None, description=(
        "An `aud` the token must carry; unset: iam's issuer (the projected volume's `audience`)."))
    jwks_uri: HttpsUrl | None = Field(default=None, description=(
        "The issuer's JWK Set URL; unset (and no jwks_file): found by OIDC discovery from the issuer."))
    jwks_file: Path | None = Field(default=None, description=(
        "A file with the issuer's JWK Set or SPIFFE trust bundle (a mounted ConfigMap), for issuers whose "
        "discovery iam cannot reach."))

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        if not secure_url(value) and not SPIFFE_TRUST_DOMAIN.match(value):
            raise ValueError(f"{value!r}: must be an https URL (http only on a loopback host) or spiffe://<domain>")
        return value

    @property
    def spiffe_trust_domain(self) -> bool:
        """The issuer is a SPIFFE trust domain: JWT-SVIDs need no `iss` (SPIFFE JWT-SVID §3), the trust bundle
        names the keys."""
        return bool(SPIFFE_TRUST_DOMAIN.match(self.issuer))

    @field_validator("subject")
    @classmethod
    def _subject_shape(cls, value: str) -> str:
        if value.startswith("system:serviceaccount:") and len(value.split(":")) != 4:
            raise ValueError("a service account subject is system:serviceaccount:<namespace>:<name>")
        if value.startswith("spiffe://") and not SPIFFE_ID.match(value):
            raise ValueError("not a SPIFFE ID (spiffe://<trust domain>/<path>)")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> WorkloadIdentity:
        if self.jwks_uri is not None and self.jwks_file is not None:
            raise ValueError("set jwks_uri or jwks_file, not both")
        if self.spiffe_trust_domain:
            if self.jwks_uri is None and self.jwks_file is None:
                raise ValueError("a SPIFFE trust domain needs its trust bundle: jwks_file or jwks_uri")
            if not self.subject.startswith(self.issuer + "/"):
                raise ValueError("the subject must be a SPIFFE ID of the issuer's trust domain")
        return self


# SPIFFE ID (SPIFFE-ID §2): lowercase trust domain, a path of non-empty segments that are not . or ..
SPIFFE_TRUST_DOMAIN = re.compile(r"^spiffe://[a-z0-9._-]{1,255}$")
SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]{1,255}(/(?!\.{1,2}(/|$))[A-Za-z0-9._-]+)+$")


class TokenExchangePolicy(_Strict):
    """What a client may get by token exchange (RFC 8693): for which audiences, from whose tokens."""

    audiences: list[str] = Field(min_length=1, description=(
        "The audiences (`audience` or `resource`) it may exchange tokens for; never more."))
    subject_audiences: list[str] = Field(default=[], description=(
        "Access tokens of other clients it may exchange: those whose `aud` contains one of these (the APIs it "
        "serves); its own tokens always."))
    workload_identities: list[WorkloadIdentity] = Field(default=[], description=(
        "Workload tokens (service-account tokens, JWT-SVIDs) it may present as subject_token or actor_token "
        "(`subject_token_type` `urn:ietf:params:oauth:token-type:jwt`)."))


class IntrospectionRight(_Strict):
    """A resource server's right to introspect only the tokens meant for it (RFC 7662 §2.2)."""

    audiences: frozenset[str] = Field(min_length=1, description=(
        "The APIs it serves: it sees a token only if the token's `aud` names one of them; any other token is "
        "`active: false` to it."))


class ClientConfig(_Strict):
    """A client, described with RFC 7591 metadata names plus iam's own keys."""

    client_id: str = Field(pattern=r"^[\x20-\x7e]{1,128}$",  # RFC 6749 App. A.1: VSCHAR
                           description="The client's id: 1 to 128 printable ASCII characters.")
    client_name: str | None = Field(default=None, description="Shown to people (consent, account page).")
    # Exactly one of these for confidential clients: the secret itself (from the environment or a mounted
    # secret), or an argon2id hash of it. An empty secret disables the client (fail closed, logged).
    client_secret: SecretStr | None = Field(default=None, description=(
        "A confidential client's secret, from the environment (`${VAR}`); empty disables the client."))
    client_secret_hash: str | None = Field(default=None, description=(
        "Instead of client_secret: its argon2id hash (`iam clients hash-secret`)."))
    redirect_uris: list[str] = Field(default=[], description=(
        "Exact redirect URIs; https, or http on a loopback host, or a private-use scheme; no fragment."))
    grant_types: list[GrantType] = Field(default=["authorization_code"], description="Grants the client may use.")
    response_types: list[Literal["code"]] = Field(default=["code"], description="Only `code`.")
    scope: str = Field(default="", description="The scopes the client may be granted, space-separated.")
    token_endpoint_auth_method: AuthMethod = Field(default="client_secret_basic", description=(
        "`client_secret_basic`, `client_secret_post`, `private_key_jwt` (a client assertion signed with a key "
        "of `jwks` / `jwks_uri`), `workload_identity` (a token of one of `workload_identities`), `tls_client_auth` "
        "(a TLS client certificate from `mtls.ca_file` with the registered subject DN or SAN, RFC 8705 §2.1), "
        "`self_signed_tls_client_auth` (a certificate whose key is in `jwks`, §2.2), or `none` for a public "
        "client."))
    jwks: KeySet | None = Field(default=None, description=(
        "private_key_jwt, self_signed_tls_client_auth: the client's public keys, a JWK Set `{\"keys\": [...]}` "
        "(RFC 7591 §2)."))
    jwks_uri: HttpsUrl | None = Field(default=None, description=(
        "private_key_jwt: where the client publishes its JWK Set instead (https)."))
    workload_identities: list[WorkloadIdentity] = Field(default=[], description=(
        "workload_identity: the workloads that may authenticate as this client, by issuer and subject."))
    post_logout_redirect_uris: list[str] = Field(default=[], description=(
        "Where RP-initiated logout may send the browser back to (exact match)."))
    application_type: Literal["web", "native"] = Field(default="web", description=(
        "`native`: any port on a loopback redirect URI is accepted (RFC 8252 §7.3)."))
    # iam's own keys
    access_token_ttl: int = Field(default=3600, ge=1, le=86400, description="Access token lifetime, seconds.")
    id_token_ttl: int = Field(default=300, ge=1, le=86400, description="ID token lifetime, seconds.")
    refresh_token_ttl: int = Field(default=8 * 3600, ge=60, description=(
        "Refresh token idle lifetime, seconds: unused this long, it expires."))
    grant_ttl: int = Field(default=12 * 3600, ge=60, description=(
        "Absolute lifetime of a grant without offline_access, seconds."))
    offline_grant_ttl: int = Field(default=30 * 86400, ge=60, description=(
        "Absolute lifetime of a grant with offline_access, seconds."))
    require_pkce: bool = Field(default=True, description=(
        "PKCE S256 required; may be false only for a confidential client that cannot send it."))
    # Parallel kubectl calls race on one refresh token.
    refresh_reuse_window: int = Field(default=0, ge=0, le=60, description=(
        "Seconds in which a retry of a just-rotated refresh token gets the same successor instead of revoking "
        "the grant; 0 is strict rotation."))
    audience: list[str] = Field(default=[], description=(
        "The `aud` of the client's access tokens (the APIs); a `resource` parameter (RFC 8707) picks one of them."))
    token_exchange: TokenExchangePolicy | None = Field(default=None, description=(
        "Token exchange (RFC 8693, grant `urn:ietf:params:oauth:grant-type:token-exchange`): its policy."))
    require_consent: bool = Field(default=False, description=(
        "Ask the person to allow the client its scopes before its first code, and again when it asks for more "
        "(third-party clients)."))
    require_pushed_authorization_requests: bool = Field(default=False, description=(
        "Accept only pushed authorization requests (RFC 9126 §5) from this client."))
    connectors: list[str] | None = Field(default=None, description=(
        "The connectors (ids from `connectors:`) offered when signing in to this client; unset: every one."))
    introspection_signed_response_alg: Literal["RS256", "ES256", "EdDSA", "Ed25519"] = Field(
        default="RS256", description=(
            "The JWS algorithm of the client's signed introspection responses (RFC 9701 §6); `EdDSA` and "
            "`Ed25519` (RFC 9864) need an Ed25519 key in the ring (`iam keys rotate` adds one)."))
    dpop_bound_access_tokens: bool = Field(default=False, description=(
        "Require a DPoP proof (RFC 9449 §5.2) at the token endpoint: every access token of this client is "
        "bound to the client's key."))
    introspection: bool | IntrospectionRight = Field(default=False, description=(
        "May the client call the introspection endpoint (RFC 7662): `true` for every token (a gateway), "
        "`{audiences: [...]}` for the tokens meant for those APIs only; `false` (default): refused with 403."))
    tls_client_auth_subject_dn: str | None = Field(default=None, description=(
        "tls_client_auth: the certificate's subject DN, RFC 4514 (`CN=svc,O=Example`; RFC 8705 §2.1.2)."))
    tls_client_auth_san_dns: str | None = Field(default=None, description=(
        "tls_client_auth: a dNSName the certificate's SAN must contain (instead of the subject DN)."))
    tls_client_auth_san_uri: str | None = Field(default=None, description=(
        "tls_client_auth: a uniformResourceIdentifier the SAN must contain (a SPIFFE ID, say)."))
    tls_client_auth_san_ip: str | None = Field(default=None, description=(
        "tls_client_auth: an iPAddress the SAN must contain (IPv4 or IPv6)."))
    tls_client_auth_san_email: str | None = Field(default=None, description=(
        "tls_client_auth: an rfc822Name the SAN must contain."))
    tls_client_certificate_bound_access_tokens: bool = Field(default=False, description=(
        "Bind every access token of this client to its TLS client certificate (RFC 8705 §3: `cnf.x5t#S256`); "
        "the token endpoint then requires one, and so do forward-auth and userinfo with the token."))
    backchannel_logout_uri: str | None = Field(default=None, description=(
        "Where a signed logout token is POSTed when a session the client took part in ends (OpenID Connect "
        "Back-Channel Logout 1.0 §2.2): https, or http on a loopback host; no fragment."))
    backchannel_logout_session_required: bool = Field(default=False, description=(
        "The client needs a `sid` in each logout token (§2.2): when all of a person's sessions end it gets one "
        "token per session it took part in, not one with `sub` alone."))

    @field_validator("scope")
    @classmethod
    def _scope_tokens(cls, value: str) -> str:
        for token in value.split():
            if not SCOPE_TOKEN.match(token):
                raise ValueError(f"invalid scope token {token!r} (RFC 6749 §3.3)")
        return " ".join(value.split())

    @field_validator("client_secret_hash")
    @classmethod
    def _argon2_hash(cls, value: str | None) -> str | None:
        if value and not value.startswith("$argon2id$"):
            raise ValueError("must be an argon2id hash (see `iam clients hash-secret`)")
        return value or None

    @field_validator("tls_client_auth_subject_dn")
    @classmethod
    def _distinguished_name(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                x509.Name.from_rfc4514_string(value)
            except ValueError as exc:
                raise ValueError(f"not an RFC 4514 distinguished name: {exc}") from None
        return value

    @field_validator("tls_client_auth_san_ip")
    @classmethod
    def _ip_address(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value

    @field_validator("redirect_uris", "post_logout_redirect_uris")
    @classmethod
    def _redirect_uris(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            check_redirect_uri(uri)
        return uris

    @field_validator("backchannel_logout_uri")
    @classmethod
    def _backchannel_logout_uri(cls, uri: str | None) -> str | None:
        # Back-Channel Logout 1.0 §2.2: an absolute URI, no fragment; a logout token is a bearer credential of
        # sorts, so it travels over TLS unless the receiver is on this host.
        if uri is not None and (not secure_url(uri) or "#" in uri):
            raise ValueError(f"{uri!r}: must be an https URL without fragment (http only on a loopback host)")
        return uri

    @model_validator(mode="after")
    def _consistent(self) -> ClientConfig:
        has_secret = bool(self.client_secret and self.client_secret.get_secret_value()) or bool(
            self.client_secret_hash
        )
        if self.client_secret and self.client_secret.get_secret_value() and self.client_secret_hash:
            raise ValueError("set client_secret or client_secret_hash, not both")
        if self.token_endpoint_auth_method == "none":
            if has_secret:
                raise ValueError("a public client (token_endpoint_auth_method: none) has no secret")
            if "client_credentials" in self.grant_types:
                raise ValueError("client_credentials needs a confidential client (RFC 6749 §4.4)")
            if self.introspection:
                raise ValueError("introspection needs a confidential client (RFC 7662 §2.1)")
            if not self.require_pkce:
                raise ValueError("public clients must use PKCE (RFC 9700 §2.1.1): require_pkce cannot be false")
        if "authorization_code" in self.grant_types and not self.redirect_uris:
            raise ValueError("the authorization_code grant needs at least one redirect_uri")
        method = self.token_endpoint_auth_method
        if method in ("private_key_jwt", "workload_identity") and has_secret:
            raise ValueError(f"a {method} client has no client secret")
        if method == "self_signed_tls_client_auth":
            if self.jwks is None:  # §2.2.2: the certificates' keys are registered as a JWK Set
                raise ValueError("self_signed_tls_client_auth needs jwks (its certificates' public keys)")
            if has_secret:
                raise ValueError("a self_signed_tls_client_auth client has no client secret")
        elif (method == "private_key_jwt") != (self.jwks is not None or self.jwks_uri is not None):
            raise ValueError("private_key_jwt needs jwks or jwks_uri, and only private_key_jwt uses them")
        named = [name for name in TLS_CLIENT_AUTH_NAMES if getattr(self, name) is not None]
        if method == "tls_client_auth" and (len(named) != 1 or has_secret):
            raise ValueError("tls_client_auth needs exactly one of " + ", ".join(TLS_CLIENT_AUTH_NAMES)
                             + " (RFC 8705 §2.1.2), and no client secret")
        if method != "tls_client_auth" and named:
            raise ValueError(f"{named[0]} is for tls_client_auth clients only")
        if self.dpop_bound_access_tokens and self.tls_client_certificate_bound_access_tokens:
            raise ValueError("bind the tokens to a DPoP key or to the TLS client certificate, not both")
        if self.jwks is not None and self.jwks_uri is not None:
            raise ValueError("set jwks or jwks_uri, not both (RFC 7591 §2)")
        if (EXCHANGE_GRANT in self.grant_types) != (self.token_exchange is not None):
            raise ValueError("the token-exchange grant needs token_exchange, and only it uses it")
        if self.token_exchange is not None and method == "none":
            raise ValueError("token exchange needs a confidential client (RFC 8693 §2.1)")
        if (method == "workload_identity") != bool(self.workload_identities):
            raise ValueError("workload_identity needs workload_identities, and only workload_identity uses them")
        return self

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"

    @property
    def enabled(self) -> bool:
        """A confidential client whose secret expanded to nothing cannot authenticate: it is disabled."""
        if self.token_endpoint_auth_method not in SECRET_METHODS:
            return True  # public, or authenticated by keys (the validator above checked they are there)
        return bool(self.client_secret_hash) or bool(self.client_secret and self.client_secret.get_secret_value())

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())


# Schemes a browser would run or read locally instead of navigating to a client (RFC 9700 §4.1.3, §4.11).
_SCRIPT_SCHEMES = frozenset({"javascript", "data", "vbscript", "file", "blob"})


def check_redirect_uri(uri: str) -> None:
    """RFC 9700 §2.6 / RFC 6749 §3.1.2: absolute, no fragment, https unless a loopback or a private-use scheme."""
    parts = urlsplit(uri)
    if not parts.scheme or parts.fragment or "#" in uri:
        raise ValueError(f"{uri!r}: a redirect URI must be absolute and have no fragment")
    if parts.scheme.lower() in _SCRIPT_SCHEMES:
        raise ValueError(f"{uri!r}: {parts.scheme}: cannot be a redirect URI")
    if "*" in uri:  # redirect URIs match exactly (RFC 9700 §4.1.3): no patterns
        raise ValueError(f"{uri!r}: a redirect URI is matched exactly: no wildcards")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"{uri!r}: http is allowed for loopback redirect URIs only")
    if parts.scheme in ("http", "https") and (not parts.hostname or parts.username or parts.password):
        raise ValueError(f"{uri!r}: needs a host and no user information")


class Stores(_Strict):
    authn: str = Field(default="sqlite+aiosqlite:///var/authn.db", description=(
        "The authentication role's credential store (`IAM_AUTHN_DATABASE_URL`)."))
    token: str = Field(default="sqlite+aiosqlite:///var/token.db", description=(
        "The token role's store (`IAM_TOKEN_DATABASE_URL`)."))
    users: str = Field(default="sqlite+aiosqlite:///var/users.db", description=(
        "The user-management role's store (`IAM_USERS_DATABASE_URL`)."))

    @field_validator("authn", "token", "users")
    @classmethod
    def _supported(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class Keys(_Strict):
    dir: Path = Field(default=Path("var/keys"), description=(
        "Directory of the signing keys and the data key, 0600 files (`IAM_KEYS_DIR`)."))
    activation_delay: int = Field(default=0, ge=0, description=(
        "Seconds a new key is published before it signs, so replicas and JWKS caches see it first."))
    access_token_alg: AccessTokenAlg = Field(default="ES256", description="Access token JWT algorithm.")


class Peers(_Strict):
    """Internal base URLs of the other roles, for instances that run apart (unused in `all`)."""

    authentication: str = Field(default="", description="The authentication role's internal URL (`IAM_AUTHN_URL`).")
    token: str = Field(default="", description="The token role's internal URL (`IAM_TOKEN_URL`).")
    user_management: str = Field(default="", description=(
        "The user-management role's internal URL (`IAM_USERS_URL`)."))

    def url(self, role: Role) -> str:
        return getattr(self, role.value.replace("-", "_"))


class KubeCluster(_Strict):
    """A Kubernetes cluster whose API server trusts this issuer's ID tokens (`iam kube`, /authn/kubeconfig)."""

    name: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$",
                      description="The cluster's name in kubeconfig.")
    server: str = Field(description="The API server URL, as kubectl reaches it (https).")
    certificate_authority_data: str | None = Field(default=None, description=(
        "Base64 PEM of the API server's CA certificate (public)."))
    client_id: str = Field(description="The public iam client kubectl uses.")
    username_claim: str = Field(default="email", description="The ID token claim kube-apiserver takes as username.")
    groups_claim: str = Field(default="groups", description="The ID token claim kube-apiserver takes as groups.")
    username_prefix: str = Field(default="oidc:", description="Prefix kube-apiserver puts before usernames.")
    groups_prefix: str = Field(default="oidc:", description="Prefix kube-apiserver puts before group names.")
    audiences: list[str] = Field(default=[], description="Accepted ID token audiences (default: [client_id]).")
    discovery_url: str | None = Field(default=None, description=(
        "An in-cluster discovery URL (structured authentication configuration only)."))

    @model_validator(mode="before")
    @classmethod
    def _default_audiences(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("audiences") and data.get("client_id"):
            return {**data, "audiences": [data["client_id"]]}
        return data

    @field_validator("server", "discovery_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        # kubectl sends bearer tokens over https only, and kube-apiserver fetches discovery over https only.
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.fragment:
            raise ValueError("must be an absolute https URL")
        return value

    @field_validator("certificate_authority_data")
    @classmethod
    def _pem_base64(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            pem = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64 (of a PEM certificate)") from None
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError("must be the base64 of a PEM certificate")
        return "".join(value.split())


class Mail(_Strict):
    """An SMTP relay for password reset and address verification messages (iam/mail.py)."""

    host: str = Field(min_length=1, description="The relay's host name.")
    port: int = Field(default=587, ge=1, le=65535, description="Its port (587 submission, 465 implicit TLS).")
    security: Literal["starttls", "tls", "none"] = Field(default="starttls", description=(
        "`starttls` (required, not opportunistic), `tls` (implicit TLS, RFC 8314), or `none` (loopback only)."))
    username: str = Field(default="", description="The relay's user name (empty: no SMTP AUTH).")
    password: SecretStr | None = Field(default=None, description="Its password, from the environment (`${VAR}`).")
    from_address: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", description="The From: address, e.g. `iam@example.com`.")
    from_name: str = Field(default="iam", description="The From: display name.")
    timeout: float = Field(default=10.0, gt=0, le=120, description="Seconds one delivery attempt takes at most.")
    attempts: int = Field(default=4, ge=1, le=10, description="Delivery attempts per message before it is dropped.")
    retry_delay: float = Field(default=5.0, ge=0, le=600, description=(
        "Seconds before the second attempt, doubled before each further one."))
    queue_size: int = Field(default=1000, ge=1, description=(
        "Messages waiting at most; more are dropped (logged, metered) rather than held in memory."))
    templates_dir: Path | None = Field(default=None, description=(
        "A directory whose templates (`password_reset.subject.txt`, `.txt`, `.html`, ...) replace the built-in "
        "ones of iam/templates/mail/ that have the same name."))

    @model_validator(mode="after")
    def _no_plain_text_off_loopback(self) -> Mail:
        if self.security == "none" and self.host not in LOOPBACK_HOSTS:
            raise ValueError("security `none` is allowed for a loopback relay only")
        return self


class BackChannelLogout(_Strict):
    """How logout tokens are delivered to clients' `backchannel_logout_uri` (iam/token/backchannel.py)."""

    timeout: float = Field(default=5.0, gt=0, le=60, description="Seconds one delivery attempt takes at most.")
    attempts: int = Field(default=3, ge=1, le=10, description="Delivery attempts per logout token, at most.")
    retry_delay: float = Field(default=1.0, ge=0, le=300, description=(
        "Seconds before the second attempt, doubled before each further one."))
    concurrency: int = Field(default=4, ge=1, le=64, description="Deliveries under way at once, at most.")
    queue_size: int = Field(default=1000, ge=1, description=(
        "Deliveries waiting at most; more are dropped (logged, metered) rather than held in memory."))


class Kubernetes(_Strict):
    clusters: list[KubeCluster] = Field(default=[], description=(
        "Clusters whose API server trusts this issuer (`iam kube`, /authn/kubeconfig)."))


CONNECTOR_ID = r"^[a-z0-9-]{1,64}$"


class ClaimMapping(_Strict):
    """Which upstream claim (a dotted path into the ID token / userinfo) becomes which iam attribute."""

    subject: str = Field(default="sub", description=(
        "The link key: (connector id, this value) identifies the person for good."))
    username: str = Field(default="preferred_username", description="Upstream claim for the username.")
    email: str = Field(default="email", description="Upstream claim for the email address.")
    email_verified: str = Field(default="email_verified", description="Upstream claim for email_verified.")
    name: str = Field(default="name", description="Upstream claim for the display name.")
    groups: str = Field(default="groups", description="Upstream claim for the groups.")


class GroupFilter(_Strict):
    prefix: str = Field(default="", description='Prepended to every upstream group name (e.g. "corp:").')
    allow: list[str] = Field(default=[], description=(
        "Keep only these upstream groups (before the prefix); empty: keep all."))


class _Connector(_Strict):
    id: str = Field(pattern=CONNECTOR_ID, description="Stable id: part of the callback URL and of user links.")
    name: str = Field(min_length=1, max_length=100, description='Shown on the sign-in page: "Sign in with <name>".')
    require_mfa: bool = Field(default=False, description=(
        "Ask for iam's own second factor after the upstream sign-in (else upstream amr/acr are trusted)."))
    # An unverified address would be an account takeover.
    link_by: Literal["email"] | None = Field(default=None, description=(
        "Link a first upstream sign-in to the local account with the same address, only when the upstream "
        "says it is verified. Off by default."))
    groups: GroupFilter = Field(default=GroupFilter(), description="Which upstream groups are kept, and how named.")


class OidcConnectorConfig(_Connector):
    """An upstream OpenID Connect provider: code flow with PKCE, state and nonce; its ID token fully validated."""

    type: Literal["oidc"] = Field(description="The connector type: `oidc` or `ldap`.")
    issuer: str = Field(description="The provider's issuer URL (https).")
    client_id: str = Field(description="iam's client id at the provider.")
    client_secret: SecretStr | None = Field(default=None, description="iam's client secret at the provider.")
    scopes: list[str] = Field(default=["openid", "email", "profile"], description="Scopes asked for; must hold openid.")
    claims: ClaimMapping = Field(default=ClaimMapping(), description="Which upstream claim becomes which attribute.")
    timeout: float = Field(default=5.0, gt=0, le=60, description="Seconds for each call to the provider.")
    userinfo: bool = Field(default=True, description=(
        "Ask the userinfo endpoint (OIDC Core §5.3) for mapped claims the ID token does not carry."))

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an absolute https URL without query or fragment")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError("must use https (http is allowed for loopback only)")
        return value.rstrip("/")

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, scopes: list[str]) -> list[str]:
        if "openid" not in scopes:
            raise ValueError("must include openid")
        return scopes


class LdapSearch(_Strict):
    base_dn: str = Field(description="Where the search starts.")
    filter: str = Field(description=(
        "Search filter with {username} (users) or {dn} / {username} (groups), escaped per RFC 4515."))
    username_attribute: str = Field(default="uid", description="Attribute holding the username.")
    id_attribute: str = Field(default="entryUUID", description="Stable upstream subject (AD: objectGUID).")
    email_attribute: str = Field(default="mail", description="Attribute holding the email address.")
    name_attribute: str = Field(default="cn", description="Attribute holding the display name.")
    groups_attribute: str | None = Field(default=None, description=(
        "user_search only: an attribute of the user entry that lists the person's groups by DN (AD, the memberof "
        'overlay: "memberOf"); each group is named by its DN\'s first RDN value.'))


class LdapConnectorConfig(_Connector):
    """An LDAP v3 / Active Directory server: the password is checked by binding as the user, never stored."""

    type: Literal["ldap"] = Field(description="The connector type: `oidc` or `ldap`.")
    url: str = Field(pattern=r"^ldaps?://[^/?#]+/?$", description="`ldaps://host[:port]` or `ldap://host[:port]`.")
    start_tls: bool = Field(default=False, description="StartTLS on an ldap:// URL.")
    ca_file: Path | None = Field(default=None, description=(
        "PEM bundle that signs the server's certificate (default: the system's)."))
    insecure_no_tls: bool = Field(default=False, description="Plain ldap:// without StartTLS: tests and loopback only.")
    bind_dn: str = Field(default="", description="The service account that searches (empty: anonymous).")
    bind_password: SecretStr | None = Field(default=None, description="Its password, from the environment.")
    user_search: LdapSearch = Field(description="How a user is found by username.")
    group_search: LdapSearch | None = Field(default=None, description="How a user's groups are found.")
    nested_groups: bool = Field(default=False, description=(
        "Groups of groups too: AD answers LDAP_MATCHING_RULE_IN_CHAIN (1.2.840.113556.1.4.1941); other servers get "
        "a bounded breadth-first expansion (group_search.filter must then contain {dn})."))
    max_groups: int = Field(default=1000, ge=1, le=10_000, description=(
        "A person's groups beyond this many are left out (logged)."))
    timeout: float = Field(default=5.0, gt=0, le=60, description=(
        "Seconds for one attempt, and for each network operation in it."))
    max_connections: int = Field(default=8, ge=1, le=100, description="Attempts at once against this server.")
    # The directory's mail attribute is administered, not self-asserted.
    email_verified: bool = Field(default=False, description=(
        "Treat the directory's mail attribute as verified, so that link_by: email may use it."))

    @model_validator(mode="after")
    def _transport(self) -> LdapConnectorConfig:
        if self.url.startswith("ldap://") and not self.start_tls and not self.insecure_no_tls:
            raise ValueError("ldap:// sends passwords in the clear: use ldaps://, start_tls: true "
                             "(or insecure_no_tls: true on loopback)")
        if self.url.startswith("ldaps://") and self.start_tls:
            raise ValueError("start_tls applies to ldap:// URLs only")
        if "{username}" not in self.user_search.filter:
            raise ValueError("user_search.filter must contain {username}")
        if self.nested_groups and (not self.group_search or "{dn}" not in self.group_search.filter):
            raise ValueError("nested_groups needs a group_search whose filter contains {dn}")
        return self


ConnectorConfig = Annotated[OidcConnectorConfig | LdapConnectorConfig, Field(discriminator="type")]


# Which other roles a role calls, when they run in other processes.
PEERS_NEEDED = {
    Role.TOKEN: (Role.USER_MANAGEMENT, Role.AUTHENTICATION),
    Role.AUTHENTICATION: (Role.USER_MANAGEMENT, Role.TOKEN),
    Role.USER_MANAGEMENT: (Role.AUTHENTICATION, Role.TOKEN),
    Role.ALL: (),
}


class DPoP(_Strict):
    """Proof-of-possession with DPoP (RFC 9449)."""

    proof_max_age: int = Field(default=300, ge=1, le=3600, description=(
        "Seconds a DPoP proof is accepted after its `iat` (RFC 9449 §11.1); its jti is remembered this long."))
    require_nonce: bool = Field(default=False, description=(
        "Require a server nonce in every DPoP proof (RFC 9449 §8, §9: `use_dpop_nonce`, `DPoP-Nonce`)."))
    nonce_lifetime: int = Field(default=300, ge=10, le=3600, description=(
        "Seconds a server nonce is current; the previous one is still accepted (nonces rotate)."))
    original_request_headers: Literal["x-original", "x-forwarded"] = Field(default="x-original", description=(
        "Where forward-auth reads the API call a proof is for: `x-original` (X-Original-Method, X-Original-URL: "
        "nginx, ingress-nginx) or `x-forwarded` (X-Forwarded-Method, -Proto, -Host, -Uri: Traefik, Caddy)."))


class MutualTLS(_Strict):
    """TLS client certificates (RFC 8705): client authentication and certificate-bound access tokens."""

    certificate_header: str = Field(default="ssl-client-cert", description=(
        "The request header a TLS-terminating proxy puts the client's certificate in: URL-encoded PEM (nginx "
        "`$ssl_client_escaped_cert`), base64 DER (Caddy, Traefik) or Envoy's `x-forwarded-client-cert`."))
    trusted_proxies: Cidrs = Field(default=[], description=(
        "Addresses (CIDRs) whose certificate header is believed; empty: no header is, only iam's own TLS "
        "(`iam serve --tls-client-ca`)."))
    ca_file: Path | None = Field(default=None, description=(
        "PEM file of the CAs a tls_client_auth client's certificate must chain to (checked by iam, whoever "
        "terminated TLS); required by tls_client_auth clients."))
    endpoint_base: str | None = Field(default=None, description=(
        "A base URL (a host that asks for client certificates) advertised as `mtls_endpoint_aliases` (RFC 8705 "
        "§5) for the token, revocation, introspection, userinfo, PAR and device endpoints."))

    @field_validator("endpoint_base")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is not None and (not secure_url(value) or urlsplit(value).query or "#" in value):
            raise ValueError("must be an https URL without query or fragment")
        return value


class SoftwareStatementIssuer(_Strict):
    """A trusted signer of software statements (RFC 7591 §2.3), by its `iss` and its public keys."""

    issuer: str = Field(min_length=1, description="The `iss` of its software statements.")
    jwks: KeySet | None = Field(default=None, description="Its public keys, a JWK Set `{\"keys\": [...]}`.")
    jwks_uri: HttpsUrl | None = Field(default=None, description="Where it publishes its JWK Set instead (https).")

    @model_validator(mode="after")
    def _one_key_source(self) -> SoftwareStatementIssuer:
        if (self.jwks is None) == (self.jwks_uri is None):
            raise ValueError("set jwks or jwks_uri (one of them)")
        return self


class Registration(_Strict):
    """Dynamic client registration (RFC 7591) and its management (RFC 7592), with initial access tokens."""

    enabled: bool = Field(default=False, description=(
        "Serve `/oauth/v2/register` (RFC 7591) and advertise it as `registration_endpoint`; off: 404."))
    rate_limit: int = Field(default=10, ge=1, le=10_000, description=(
        "Registrations per initial access token per minute, counted in the store (429 beyond)."))
    software_statement_required: bool = Field(default=False, description=(
        "Refuse a registration without a `software_statement` (RFC 7591 §2.3) of a trusted issuer."))
    software_statement_issuers: list[SoftwareStatementIssuer] = Field(default=[], description=(
        "The trusted signers of software statements: `{issuer, jwks}` or `{issuer, jwks_uri}` each."))

    @field_validator("software_statement_issuers")
    @classmethod
    def _unique_issuers(cls, issuers: list[SoftwareStatementIssuer]) -> list[SoftwareStatementIssuer]:
        if len({issuer.issuer for issuer in issuers}) != len(issuers):
            raise ValueError("each issuer once")
        return issuers


class Settings(_Strict):
    """Every setting carries its description (README "Settings" lists them all; tests/test_config.py checks)."""

    role: Role = Field(default=Role.ALL, description=(
        "`authentication`, `token`, `user-management` or `all` (`SERVICE_ROLE`)."))
    issuer: str = Field(default="http://localhost:8080", description=(
        "The token role's public URL, the `iss` of every token (`IAM_ISSUER`); https, no query or fragment."))
    authentication_url: str = Field(default="", description=(
        "Where browsers reach the authentication role's pages (default: the issuer; `IAM_AUTHN_PUBLIC_URL`)."))
    # Never taken from the request's Host header, which the caller chooses.
    scim_url: str = Field(default="", description=(
        "The SCIM base URL as its clients reach it, for meta.location, $ref and Location (default: "
        "{issuer}/scim/v2; `IAM_SCIM_URL`)."))
    peers: Peers = Field(default=Peers(), description="The other roles' internal URLs, when they run apart.")
    stores: Stores = Field(default=Stores(), description="One database URL per role's store.")
    keys: Keys = Field(default=Keys(), description="The key ring.")
    trusted_proxies: Cidrs = Field(default=[], description=(
        "Proxies (CIDRs) whose X-Forwarded-For is believed for the client address (sign-in throttling, audit)."))
    session_ttl: int = Field(default=12 * 3600, ge=60, description=(
        "Seconds after sign-in at which an SSO session ends."))
    session_idle_ttl: int = Field(default=2 * 3600, ge=60, description=(
        "Seconds unused after which an SSO session ends."))
    migrate_on_start: bool = Field(default=True, description=(
        "Apply the store's migrations at start-up (false in production: run `iam migrate` as a job)."))
    store_timeout: float = Field(default=3.0, gt=0, le=60, description=(
        "Seconds a request waits for its store at most (pool, connect, statement; on a hung or unreachable "
        "database) before it answers 503 temporarily_unavailable; /health/ready answers within it too."))
    purge_interval: int = Field(default=60, ge=0, description=(
        "Seconds, give or take half, between in-process purges of what can never be used again: expired tokens, "
        "codes, device codes, pending and pushed authorization requests, ended grants and sessions, stale "
        "sign-in throttling counters, audit events past their retention (0: never in-process; run "
        "`iam tokens purge` from a CronJob instead; `IAM_PURGE_INTERVAL`)."))
    purge_batch: int = Field(default=1000, ge=1, description=(
        "Rows one purge statement deletes per table at most; a purge repeats it until none is left."))
    purge_budget: float = Field(default=30, gt=0, description="Seconds one purge round runs at most.")
    # The staleness bound if a revocation notice were ever lost; revocations evict at once (iam/token/hot_cache.py).
    introspection_cache_seconds: int = Field(default=5, ge=0, le=300, description=(
        "Seconds a live token row stays in memory for introspection and forward-auth (0: off)."))
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    audit_log: str = Field(default="stderr", description="Where audit events go: stderr, stdout, or a file path.")
    audit_store: bool = Field(default=False, description=(
        "Also keep audit events in the role's own store (table audit_events, `iam audit list`)."))
    audit_retention_days: int = Field(default=90, ge=1, description="Days audit events stay in the stores.")
    clients: list[ClientConfig] = Field(default=[], description="The OAuth clients (RFC 7591 metadata names).")
    kubernetes: Kubernetes = Field(default=Kubernetes(), description="Kubernetes login.")
    connectors: list[ConnectorConfig] = Field(default=[], description=(
        "Upstream identity providers the sign-in page offers (iam/authn/connectors/)."))
    password_login: bool = Field(default=True, description=(
        "Offer iam's own username/password form (false: connectors only)."))
    mail: Mail | None = Field(default=None, description=(
        "The SMTP relay; unset, no mail is sent and the sign-in page offers no password reset."))
    dpop: DPoP = Field(default=DPoP(), description="DPoP proofs (RFC 9449).")
    mtls: MutualTLS = Field(default=MutualTLS(), description="TLS client certificates (RFC 8705).")
    backchannel_logout: BackChannelLogout = Field(default=BackChannelLogout(), description=(
        "Delivery of logout tokens (OpenID Connect Back-Channel Logout 1.0)."))
    registration: Registration = Field(default=Registration(), description=(
        "Dynamic client registration (RFC 7591, RFC 7592)."))
    client_secret_grace: int = Field(default=24 * 3600, ge=0, le=30 * 86400, description=(
        "Seconds a stored client's previous secret keeps working after `rotate-secret` (a call may say otherwise)."))
    config_reload_interval: float = Field(default=5, ge=0, description=(
        "Seconds between checks of the config file by the token role: changed YAML clients (a new secret, say) are "
        "taken without a restart; an invalid file is logged and the running clients kept (0: never)."))
    client_sync_interval: float = Field(default=2, gt=0, description=(
        "Seconds between checks for stored-client changes made by other processes on the same SQLite file "
        "(PostgreSQL replicas are notified at once), and between the authentication role's copies of the stored "
        "clients' names and connectors when it runs apart."))
    # Where these settings were read from (load_settings): the file the token role re-reads for its clients.
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        # RFC 8414 §2: https, no query or fragment. http is tolerated for loopback development only.
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an absolute https URL")
        if parts.query or parts.fragment:
            raise ValueError("must have no query or fragment (RFC 8414 §2)")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError("must use https (http is allowed for localhost only)")
        return value

    @field_validator("scim_url")
    @classmethod
    def _scim_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment):
            raise ValueError("must be an absolute http(s) URL without query or fragment")
        return value

    @model_validator(mode="after")
    def _peers_for_role(self) -> Settings:
        for peer in PEERS_NEEDED[self.role]:
            if not self.peers.url(peer):
                field_name = peer.value.replace("-", "_")
                raise ValueError(f"peers.{field_name} is required when SERVICE_ROLE is {self.role.value}")
        return self

    @model_validator(mode="after")
    def _kubernetes_clients(self) -> Settings:
        clients = {client.client_id: client for client in self.clients}
        names: set[str] = set()
        for i, cluster in enumerate(self.kubernetes.clusters):
            where = f"kubernetes.clusters.{i}"
            if cluster.name in names:
                raise ValueError(f"{where}.name: duplicate cluster name {cluster.name!r}")
            names.add(cluster.name)
            client = clients.get(cluster.client_id)
            if client is None:
                raise ValueError(f"{where}.client_id: no client {cluster.client_id!r} in clients")
            if not client.is_public:
                raise ValueError(f"{where}.client_id: client {cluster.client_id!r} must be public "
                                 "(token_endpoint_auth_method: none): kubectl cannot keep a secret")
            if "openid" not in client.scopes:
                raise ValueError(f"{where}.client_id: client {cluster.client_id!r} needs the openid scope")
        return self

    @model_validator(mode="after")
    def _mtls_ca(self) -> Settings:
        needing = [c.client_id for c in self.clients if c.token_endpoint_auth_method == "tls_client_auth"]
        if needing and self.mtls.ca_file is None:
            raise ValueError(f"client {needing[0]}: tls_client_auth needs mtls.ca_file (the CAs its certificate "
                             "chains to)")
        return self

    @property
    def login_base(self) -> str:
        return (self.authentication_url or self.issuer).rstrip("/")

    @property
    def scim_base(self) -> str:
        return (self.scim_url or f"{self.issuer.rstrip('/')}/scim/v2").rstrip("/")


    @field_validator("connectors")
    @classmethod
    def _unique_connector_ids(cls, connectors: list) -> list:
        seen: set[str] = set()
        for connector in connectors:
            if connector.id in seen:
                raise ValueError(f"duplicate connector id {connector.id!r}")
            seen.add(connector.id)
        return connectors

    @model_validator(mode="after")
    def _client_connectors(self) -> Settings:
        known = {connector.id for connector in self.connectors}
        for i, client in enumerate(self.clients):
            for connector_id in client.connectors or ():
                if connector_id not in known:
                    raise ValueError(f"clients.{i}.connectors: no connector {connector_id!r} in connectors")
        return self

    @field_validator("clients")
    @classmethod
    def _unique_ids(cls, clients: list[ClientConfig]) -> list[ClientConfig]:
        seen: set[str] = set()
        for client in clients:
            if client.client_id in seen:
                raise ValueError(f"duplicate client_id {client.client_id!r}")
            seen.add(client.client_id)
        return clients


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str, env: dict[str, str], where: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`. An unset `${VAR}` is an error."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set")

    return _VAR.sub(replace, value)


def _expand_tree(node: object, env: dict[str, str], where: str) -> object:
    if isinstance(node, str):
        return expand(node, env, where)
    if isinstance(node, list):
        return [_expand_tree(item, env, f"{where}.{i}") for i, item in enumerate(node)]
    if isinstance(node, dict):
        return {key: _expand_tree(item, env, f"{where}.{key}" if where else str(key)) for key, item in node.items()}
    return node


_ENV_OVERRIDES = {
    "SERVICE_ROLE": ("role",),
    "IAM_ISSUER": ("issuer",),
    "IAM_AUTHN_DATABASE_URL": ("stores", "authn"),
    "IAM_TOKEN_DATABASE_URL": ("stores", "token"),
    "IAM_USERS_DATABASE_URL": ("stores", "users"),
    "IAM_KEYS_DIR": ("keys", "dir"),
    "IAM_AUTHN_URL": ("peers", "authentication"),
    "IAM_TOKEN_URL": ("peers", "token"),
    "IAM_USERS_URL": ("peers", "user_management"),
    "IAM_AUTHN_PUBLIC_URL": ("authentication_url",),
    "IAM_SCIM_URL": ("scim_url",),
}


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    file = Path(path or env.get("IAM_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(file.read_text()) if file.exists() or path or "IAM_CONFIG" in env else {}
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({exc.__class__.__name__})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping")
    try:
        data = _expand_tree(raw, env, "")
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    assert isinstance(data, dict)
    for var, field_path in _ENV_OVERRIDES.items():
        if env.get(var):
            target = data
            for key in field_path[:-1]:
                target = target.setdefault(key, {})
            target[field_path[-1]] = env[var]
    try:
        settings = Settings.model_validate(data)
        settings._source = file if file.exists() else None
        return settings
    except ValidationError as exc:
        first = exc.errors()[0]
        location = "".join(f"{part}." for part in first["loc"][:-1]) + (f"{first['loc'][-1]}: " if first["loc"] else "")
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"] == ("role",):
            valid = ", ".join(role.value for role in Role)
            raise ConfigError(f"unknown SERVICE_ROLE {data.get('role')!r}: valid roles are {valid}") from None
        raise ConfigError(f"{file}: {location}{message}") from None



def settings_reference() -> list[tuple[str, str, str]]:
    """Every setting as (dotted path, default, description), walking the models: the README's "Settings" table
    is this list (`python3 -c 'from iam.config import settings_table; print(settings_table())'`)."""
    rows: dict[str, tuple[str, str, str]] = {}

    def walk(model: type[BaseModel], prefix: str, tag: str = "", common: frozenset[str] = frozenset()) -> None:
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            default = "required" if info.is_required() else _shown(info.get_default(call_default_factory=True))
            own = "" if not tag or name in common else tag
            rows.setdefault(path, (path, default, f"{own}{info.description or ''}"))
            members = _models_in(info.annotation)
            shared = frozenset.intersection(*(frozenset(m.model_fields) for m, _ in members)) if members else None
            for inner, suffix in members:
                tagged = len(members) > 1 and "type" in inner.model_fields
                walk(inner, f"{path}{suffix}.", f"({_type_of(inner)}) " if tagged else own,
                     shared if tagged and shared is not None else frozenset(inner.model_fields) if not own else common)

    walk(Settings, "")
    return list(rows.values())


def settings_table() -> str:
    """The README's "Settings" table (Markdown)."""
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    lines += [f"| `{path}` | {default} | {description} |" for path, default, description in settings_reference()]
    return "\n".join(lines)


def _models_in(annotation: object) -> list[tuple[type[BaseModel], str]]:
    """The models a field holds (itself, in a list, optional, or a discriminated union), with the path suffix."""
    import typing

    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin is list:
        return [(model, "[]") for model, _ in _models_in(typing.get_args(annotation)[0])]
    if origin in (typing.Union, __import__("types").UnionType):
        return [found for arg in typing.get_args(annotation) for found in _models_in(arg)]
    return []


def _type_of(model: type[BaseModel]) -> str:
    annotation = model.model_fields["type"].annotation
    import typing

    return ", ".join(str(value) for value in typing.get_args(annotation))





def _shown(value: object) -> str:
    """A default as YAML would spell it."""
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "none"
    if isinstance(value, Path | Role):
        value = str(value)
    return f"`{json.dumps(value)}`"
