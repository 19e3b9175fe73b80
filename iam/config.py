"""Settings: one YAML file (no secrets), `${VAR}` / `${VAR:-default}` expanded from the environment.

`IAM_CONFIG` names the file (default `config/iam.yaml`). `SERVICE_ROLE` and the three store URLs
(`IAM_AUTHN_DATABASE_URL`, `IAM_TOKEN_DATABASE_URL`, `IAM_USERS_DATABASE_URL`) are contracts: when set in
the environment they win over the file.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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
]
AuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token


class ClientConfig(_Strict):
    """A client, described with RFC 7591 metadata names plus iam's own keys."""

    client_id: str = Field(pattern=r"^[\x20-\x7e]{1,128}$")  # RFC 6749 App. A.1: VSCHAR
    client_name: str | None = None
    # Exactly one of these for confidential clients: the secret itself (from the environment or a mounted
    # secret), or an argon2id hash of it. An empty secret disables the client (fail closed, logged).
    client_secret: SecretStr | None = None
    client_secret_hash: str | None = None
    redirect_uris: list[str] = []
    grant_types: list[GrantType] = ["authorization_code"]
    response_types: list[Literal["code"]] = ["code"]
    scope: str = ""
    token_endpoint_auth_method: AuthMethod = "client_secret_basic"
    post_logout_redirect_uris: list[str] = []
    application_type: Literal["web", "native"] = "web"  # native: any port on a loopback redirect (RFC 8252 §7.3)
    # iam's own keys
    access_token_ttl: int = Field(default=3600, ge=1, le=86400)
    id_token_ttl: int = Field(default=300, ge=1, le=86400)
    refresh_token_ttl: int = Field(default=8 * 3600, ge=60)  # idle lifetime: unused this long, it expires
    grant_ttl: int = Field(default=12 * 3600, ge=60)  # absolute lifetime of a grant without offline_access
    offline_grant_ttl: int = Field(default=30 * 86400, ge=60)  # ... and with offline_access
    require_pkce: bool = True  # may be switched off only for a confidential client that cannot send it
    # Seconds in which a retry of a just-rotated refresh token gets the same successor instead of revoking the
    # grant: parallel kubectl calls race on one refresh token. 0 (default) is strict rotation.
    refresh_reuse_window: int = Field(default=0, ge=0, le=60)
    audience: list[str] = []
    # Ask the person to allow this client its scopes before its first code, and again when it asks for more
    # (a third-party client). Off for the operator's own, trusted clients.
    require_consent: bool = False
    # Accept only pushed authorization requests (RFC 9126 §5) from this client.
    require_pushed_authorization_requests: bool = False

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

    @field_validator("redirect_uris", "post_logout_redirect_uris")
    @classmethod
    def _redirect_uris(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            check_redirect_uri(uri)
        return uris

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
            if not self.require_pkce:
                raise ValueError("public clients must use PKCE (RFC 9700 §2.1.1): require_pkce cannot be false")
        if "authorization_code" in self.grant_types and not self.redirect_uris:
            raise ValueError("the authorization_code grant needs at least one redirect_uri")
        return self

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"

    @property
    def enabled(self) -> bool:
        """A confidential client whose secret expanded to nothing cannot authenticate: it is disabled."""
        if self.is_public:
            return True
        return bool(self.client_secret_hash) or bool(self.client_secret and self.client_secret.get_secret_value())

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def check_redirect_uri(uri: str) -> None:
    """RFC 9700 §2.6 / RFC 6749 §3.1.2: absolute, no fragment, https unless a loopback or a private-use scheme."""
    parts = urlsplit(uri)
    if not parts.scheme or parts.fragment or "#" in uri:
        raise ValueError(f"{uri!r}: a redirect URI must be absolute and have no fragment")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"{uri!r}: http is allowed for loopback redirect URIs only")
    if parts.scheme in ("http", "https") and (not parts.hostname or parts.username or parts.password):
        raise ValueError(f"{uri!r}: needs a host and no user information")


class Stores(_Strict):
    authn: str = "sqlite+aiosqlite:///var/authn.db"
    token: str = "sqlite+aiosqlite:///var/token.db"
    users: str = "sqlite+aiosqlite:///var/users.db"

    @field_validator("authn", "token", "users")
    @classmethod
    def _supported(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class Keys(_Strict):
    dir: Path = Path("var/keys")
    # A new key is published this long before it signs: replicas and JWKS caches see it first.
    activation_delay: int = Field(default=0, ge=0)
    access_token_alg: Literal["ES256", "RS256"] = "ES256"


class Peers(_Strict):
    """Internal base URLs of the other roles, for instances that run apart (unused in `all`)."""

    authentication: str = ""
    token: str = ""
    user_management: str = ""

    def url(self, role: Role) -> str:
        return getattr(self, role.value.replace("-", "_"))


class KubeCluster(_Strict):
    """A Kubernetes cluster whose API server trusts this issuer's ID tokens (`iam kube`, /authn/kubeconfig)."""

    name: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
    server: str  # the API server URL, as kubectl reaches it
    certificate_authority_data: str | None = None  # base64 PEM of the API server's CA (public)
    client_id: str  # the public iam client kubectl uses
    username_claim: str = "email"
    groups_claim: str = "groups"
    username_prefix: str = "oidc:"
    groups_prefix: str = "oidc:"
    audiences: list[str] = []  # default: [client_id]
    discovery_url: str | None = None  # an in-cluster discovery URL (structured authentication config only)

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


class Kubernetes(_Strict):
    clusters: list[KubeCluster] = []


CONNECTOR_ID = r"^[a-z0-9-]{1,64}$"


class ClaimMapping(_Strict):
    """Which upstream claim (a dotted path into the ID token / userinfo) becomes which iam attribute."""

    subject: str = "sub"  # the link key: (connector id, this value) identifies the person for good
    username: str = "preferred_username"
    email: str = "email"
    email_verified: str = "email_verified"
    name: str = "name"
    groups: str = "groups"


class GroupFilter(_Strict):
    prefix: str = ""  # prepended to every upstream group name (e.g. "corp:")
    allow: list[str] = []  # keep only these upstream groups (before the prefix); empty: keep all


class _Connector(_Strict):
    id: str = Field(pattern=CONNECTOR_ID, description="Stable id: part of the callback URL and of user links.")
    name: str = Field(min_length=1, max_length=100, description='Shown on the sign-in page: "Sign in with <name>".')
    # Ask for iam's own second factor after the upstream sign-in (else upstream amr/acr are trusted as given).
    require_mfa: bool = False
    # Link a first upstream sign-in to an existing local account with the same address: only when the upstream
    # says the address is verified (an unverified one would be an account takeover). Off by default.
    link_by: Literal["email"] | None = None
    groups: GroupFilter = GroupFilter()


class OidcConnectorConfig(_Connector):
    """An upstream OpenID Connect provider: code flow with PKCE, state and nonce; its ID token fully validated."""

    type: Literal["oidc"]
    issuer: str
    client_id: str
    client_secret: SecretStr | None = None
    scopes: list[str] = ["openid", "email", "profile"]
    claims: ClaimMapping = ClaimMapping()
    timeout: float = Field(default=5.0, gt=0, le=60)  # seconds for each call to the provider
    # Ask the userinfo endpoint (OIDC Core §5.3) for mapped claims the ID token does not carry.
    userinfo: bool = True

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
    base_dn: str
    filter: str  # {username} (users) or {dn} / {username} (groups), escaped per RFC 4515 when filled in
    username_attribute: str = "uid"
    id_attribute: str = "entryUUID"  # stable upstream subject (AD: objectGUID)
    email_attribute: str = "mail"
    name_attribute: str = "cn"
    # user_search only: an attribute of the user entry that lists the person's groups by DN (AD, the memberof
    # overlay: "memberOf"); each group is named by its DN's first RDN value.
    groups_attribute: str | None = None


class LdapConnectorConfig(_Connector):
    """An LDAP v3 / Active Directory server: the password is checked by binding as the user, never stored."""

    type: Literal["ldap"]
    url: str = Field(pattern=r"^ldaps?://[^/?#]+/?$")
    start_tls: bool = False
    ca_file: Path | None = None  # PEM bundle that signs the server's certificate (default: the system's)
    insecure_no_tls: bool = False  # plain ldap:// without StartTLS: tests and loopback only
    bind_dn: str = ""
    bind_password: SecretStr | None = None
    user_search: LdapSearch
    group_search: LdapSearch | None = None
    # Groups of groups too: AD answers LDAP_MATCHING_RULE_IN_CHAIN (1.2.840.113556.1.4.1941); other servers get a
    # bounded breadth-first expansion (group_search.filter must then contain {dn}).
    nested_groups: bool = False
    max_groups: int = Field(default=1000, ge=1, le=10_000)  # a person's groups beyond this are left out (logged)
    timeout: float = Field(default=5.0, gt=0, le=60)  # seconds for one attempt, and for each network operation in it
    max_connections: int = Field(default=8, ge=1, le=100)  # attempts at once against this server
    # The directory's mail attribute is administered, not self-asserted: say so to let link_by: email use it.
    email_verified: bool = False

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


class Settings(_Strict):
    role: Role = Role.ALL
    issuer: str = "http://localhost:8080"
    # Where browsers reach the authentication role's pages (default: the issuer, behind one ingress host).
    authentication_url: str = ""
    # The SCIM base URL as its clients reach it, for meta.location, $ref and Location (default: {issuer}/scim/v2).
    # Never taken from the request's Host header, which the caller chooses.
    scim_url: str = ""
    peers: Peers = Peers()
    stores: Stores = Stores()
    keys: Keys = Keys()
    # Proxies (CIDRs) whose X-Forwarded-For is believed for the client address (login throttling, audit).
    trusted_proxies: list[str] = []
    session_ttl: int = Field(default=12 * 3600, ge=60)  # an SSO session ends this long after sign-in
    session_idle_ttl: int = Field(default=2 * 3600, ge=60)  # ... or after this long unused
    migrate_on_start: bool = True
    # Expired tokens, ended sessions and stale sign-in throttling counters are deleted in batches of this size
    # every purge_interval seconds (0: never in-process).
    purge_interval: int = Field(default=300, ge=0)
    purge_batch: int = Field(default=1000, ge=1)
    # Introspection / forward-auth keep live token rows in memory at most this long (the staleness bound if a
    # revocation notice were ever lost; revocations themselves evict at once, iam/token/hot_cache.py). 0: off.
    introspection_cache_seconds: int = Field(default=5, ge=0, le=300)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    audit_log: str = "stderr"  # where audit events go: stderr, stdout, or a file path
    # Also keep audit events in the role's own store (table audit_events, `iam audit list`), this many days.
    audit_store: bool = False
    audit_retention_days: int = Field(default=90, ge=1)
    clients: list[ClientConfig] = []
    kubernetes: Kubernetes = Kubernetes()
    # Upstream identity providers the sign-in page offers (iam/authn/connectors/).
    connectors: list[ConnectorConfig] = []
    # Offer iam's own username/password form (false: connectors only).
    password_login: bool = True

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        # RFC 8414 §2: https, no query or fragment. http is tolerated for loopback development only.
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an absolute https URL")
        if parts.query or parts.fragment:
            raise ValueError("must have no query or fragment (RFC 8414 §2)")
        if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
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

    @property
    def login_base(self) -> str:
        return (self.authentication_url or self.issuer).rstrip("/")

    @property
    def scim_base(self) -> str:
        return (self.scim_url or f"{self.issuer.rstrip('/')}/scim/v2").rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)
        return values

    @field_validator("connectors")
    @classmethod
    def _unique_connector_ids(cls, connectors: list) -> list:
        seen: set[str] = set()
        for connector in connectors:
            if connector.id in seen:
                raise ValueError(f"duplicate connector id {connector.id!r}")
            seen.add(connector.id)
        return connectors

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
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = "".join(f"{part}." for part in first["loc"][:-1]) + (f"{first['loc'][-1]}: " if first["loc"] else "")
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"] == ("role",):
            valid = ", ".join(role.value for role in Role)
            raise ConfigError(f"unknown SERVICE_ROLE {data.get('role')!r}: valid roles are {valid}") from None
        raise ConfigError(f"{file}: {location}{message}") from None

