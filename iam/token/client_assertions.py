"""Client authentication with a signed JWT (RFC 7521 §4.2, RFC 7523 §2.2 and §3): `client_assertion`.

Two kinds of client use it, told apart by how they are registered:
- `private_key_jwt` (OpenID Connect Core §9): the client signs the assertion with its own key (`jwks` or
  `jwks_uri`); `iss` = `sub` = its client_id; `exp` at most MAX_ASSERTION_LIFETIME ahead; its `jti` is used
  once, recorded in the token store until it expires, so a replay fails on every replica.
- `workload_identity`: the assertion is a token the workload's platform issued (a Kubernetes projected
  service-account token, a SPIFFE JWT-SVID), verified with its issuer's keys, for one of the client's
  `workload_identities` by exact `iss` and `sub`. Such a token is a bearer credential the workload presents
  for its whole lifetime (the kubelet rotates it at 80 % of it, SPIFFE agents likewise), so its `jti` is not
  single use here: what bounds it is its `exp` and its audience, iam's issuer (or the configured one).

Only asymmetric algorithms (ASSERTION_ALGS), and the key must fit the alg: no `none`, no HMAC keyed with a
public key. A key set that cannot be fetched is 503 temporarily_unavailable, never the client's fault.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from iam.config import ClientConfig, Settings, WorkloadIdentity
from iam.errors import OAuthError, invalid_client
from iam.jwks import Key, KeySources, KeysUnavailable, check_key_set, pick
from iam.token.store import TokenStore

log = logging.getLogger("iam.token.client_assertions")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS256", "PS256", "ES256", "EdDSA")
# private_key_jwt: how far ahead `exp` may be. Its jti is kept until then, so this also bounds the table.
MAX_ASSERTION_LIFETIME = 300
CLOCK_SKEW = 30  # seconds of clock difference tolerated for exp, iat and nbf
MAX_JTI_CHARS = 256
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class AssertionRejected(Exception):
    """A JWT that does not verify or does not hold (the message says which rule): invalid_client when it
    authenticates a client, invalid_request when it is a token exchange's subject or actor token."""


class KeySource(Protocol):
    async def key(self, kid: Any, alg: str) -> Key | None: ...


class StaticKeys:
    """Keys registered inline (RFC 7591 `jwks`)."""

    def __init__(self, keys: list[Key]) -> None:
        self._keys = keys

    async def key(self, kid: Any, alg: str) -> Key | None:
        return pick(self._keys, kid, alg)


@dataclass(frozen=True, slots=True)
class TrustedWorkload:
    identity: WorkloadIdentity
    audience: str
    keys: KeySource


def claimed_client(assertion: str) -> str | None:
    """The unverified `sub` of a private_key_jwt assertion (= its client_id, RFC 7523 §3): which client it is
    for when the form has no client_id. Verification follows."""
    try:
        claims = json.loads(extract_compact(assertion.encode()).payload)
    except (JoseError, ValueError, UnicodeError):
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else None


class ClientAssertions:
    """Verifies client assertions for the clients registered to send them; the keys of each are resolved once."""

    def __init__(self, settings: Settings, store: TokenStore, sources: KeySources,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer = settings.issuer
        self.token_endpoint = settings.issuer.rstrip("/") + "/oauth/v2/token"
        self.store = store
        self.sources = sources
        self.clock = clock
        self._client_keys: dict[str, KeySource] = {}
        self._workloads: dict[str, list[TrustedWorkload]] = {}
        # The workload tokens each client may present in a token exchange (RFC 8693), by its policy.
        self.exchange_workloads: dict[str, list[TrustedWorkload]] = {}
        for client in settings.clients:
            self.learn(client)

    def learn(self, client: ClientConfig) -> None:
        """Resolve the keys and trusted workloads of a client (anew, for a changed stored client)."""
        self.forget(client.client_id)
        if client.jwks is not None:
            self._client_keys[client.client_id] = StaticKeys(check_key_set(client.jwks))
        elif client.jwks_uri is not None:
            self._client_keys[client.client_id] = self.sources.jwks_uri(client.jwks_uri)
        if client.workload_identities:
            self._workloads[client.client_id] = self.trusted(client.workload_identities)
        if client.token_exchange is not None and client.token_exchange.workload_identities:
            self.exchange_workloads[client.client_id] = self.trusted(client.token_exchange.workload_identities)

    def forget(self, client_id: str) -> None:
        for known in (self._client_keys, self._workloads, self.exchange_workloads):
            known.pop(client_id, None)

    def _workload_keys(self, identity: WorkloadIdentity) -> KeySource:
        if identity.jwks_file is not None:
            return self.sources.file(identity.jwks_file)
        if identity.jwks_uri is not None:
            return self.sources.jwks_uri(identity.jwks_uri)
        return self.sources.discovery(identity.issuer)

    async def verify(self, client: ClientConfig, assertion: str, endpoint: str) -> None:
        """Authenticate `client` by `assertion`, presented at `endpoint` (its URL under the issuer); raises
        invalid_client (or 503 if keys cannot be had)."""
        method = client.token_endpoint_auth_method
        try:
            if method == "private_key_jwt":
                await self._private_key_jwt(client, assertion, endpoint)
            elif method == "workload_identity":
                await self.workload_claims(self._workloads[client.client_id], assertion)
            else:
                raise invalid_client(f"client is registered for {method}")
        except AssertionRejected as exc:
            raise invalid_client(str(exc)) from None

    async def _private_key_jwt(self, client: ClientConfig, assertion: str, endpoint: str) -> None:
        claims = await _verified(assertion, self._client_keys[client.client_id])
        client_id = client.client_id
        # RFC 7523 §3 items 1 and 2: the client is both issuer and subject.
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise AssertionRejected("the assertion's iss and sub must be the client_id")
        # Item 3: the audience is this server: its issuer (RFC 7523bis), the token endpoint or the endpoint called.
        _check_audience(claims, (self.issuer, self.token_endpoint, endpoint))
        now = self.clock()
        expires = _check_times(claims, now)
        if expires > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
            raise AssertionRejected(f"the assertion's exp is more than {MAX_ASSERTION_LIFETIME} s ahead")
        jti = claims.get("jti")  # OpenID Connect Core §9: required
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
            raise AssertionRejected("the assertion has no usable jti")
        # Item 7: single use. Kept until it could no longer be accepted anyway.
        digest = hashlib.sha256(f"{client_id}\0{jti}".encode()).digest()
        if not await self.store.use_assertion_jti(digest, client_id, int(expires) + CLOCK_SKEW + 1):
            raise AssertionRejected("the assertion was used before (jti)")

    def trusted(self, identities: Sequence[WorkloadIdentity]) -> list[TrustedWorkload]:
        """Workload identities with their key sources, resolved once (at start-up)."""
        return [TrustedWorkload(identity, identity.audience or self.issuer, self._workload_keys(identity))
                for identity in identities]

    async def workload_claims(self, workloads: Sequence[TrustedWorkload], assertion: str) -> dict[str, Any]:
        """The claims of a workload's token (a service-account token, a JWT-SVID) from one of `workloads`;
        AssertionRejected if it is not one."""
        unverified = _unverified_claims(assertion)
        issuer, subject = unverified.get("iss"), unverified.get("sub")
        trusted = next((t for t in workloads
                        if t.identity.subject == subject and _issued_by(t.identity, issuer)), None)
        if trusted is None:
            raise AssertionRejected("no trusted workload identity has that iss and sub")
        claims = await _verified(assertion, trusted.keys)
        if claims.get("sub") != trusted.identity.subject or not _issued_by(trusted.identity, claims.get("iss")):
            raise AssertionRejected("the token's iss or sub is not the trusted workload's")
        _check_audience(claims, (trusted.audience,))
        _check_times(claims, self.clock())
        # A SPIFFE JWT-SVID has no more to check: its sub, a SPIFFE ID, was matched exactly (config checks its shape).
        if trusted.identity.subject.startswith(SERVICE_ACCOUNT_PREFIX):
            _check_service_account(claims, trusted.identity.subject)
        return claims


def _issued_by(identity: WorkloadIdentity, issuer: Any) -> bool:
    """`iss` is the identity's issuer; for a SPIFFE trust domain the bundle's keys are what vouch for the SVID,
    whose `iss` is optional (SPIFFE JWT-SVID §3)."""
    return identity.spiffe_trust_domain or issuer == identity.issuer


async def _verified(assertion: str, keys: KeySource) -> dict[str, Any]:
    """The claims of a JWS signed by one of `keys` with an accepted algorithm; AssertionRejected otherwise."""
    try:
        header = extract_compact(assertion.encode()).headers()
    except (JoseError, ValueError, UnicodeError):
        raise AssertionRejected("the assertion is not a compact JWS") from None
    alg = header.get("alg")
    if alg not in ASSERTION_ALGS:  # never none, never HMAC (alg confusion with a public key)
        raise AssertionRejected("the assertion's alg is not one of " + ", ".join(ASSERTION_ALGS))
    if "crit" in header:  # RFC 7515 §4.1.11: no extension iam would have to understand
        raise AssertionRejected("unsupported crit header")
    try:
        key = await keys.key(header.get("kid"), alg)
    except KeysUnavailable as exc:
        log.warning("client assertion keys unavailable: %s", exc)
        raise OAuthError("temporarily_unavailable", "the keys to verify the assertion are unavailable; retry later",
                         503, {"Retry-After": "5"}) from None
    if key is None:
        raise AssertionRejected("the assertion is signed by an unknown key (kid)")
    try:
        claims = jwt.decode(assertion, key, algorithms=[alg]).claims
    except (JoseError, ValueError):
        raise AssertionRejected("the assertion's signature does not verify") from None
    if not isinstance(claims, dict):
        raise AssertionRejected("the assertion's claims are not a JSON object")
    return claims


def _unverified_claims(assertion: str) -> dict[str, Any]:
    try:
        claims = json.loads(extract_compact(assertion.encode()).payload)
    except (JoseError, ValueError, UnicodeError):
        raise AssertionRejected("the assertion is not a compact JWS") from None
    if not isinstance(claims, dict):
        raise AssertionRejected("the assertion's claims are not a JSON object")
    return claims


def _check_audience(claims: dict[str, Any], accepted: Sequence[str]) -> None:
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or not any(a in audiences for a in accepted):
        raise AssertionRejected("the assertion's aud is not this server")


def _check_times(claims: dict[str, Any], now: float) -> float:
    """RFC 7523 §3 items 4-6: exp required and not past, nbf and iat not in the future. Returns exp."""
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or isinstance(expires, bool) or now >= expires + CLOCK_SKEW:
        raise AssertionRejected("the assertion has expired (or has no exp)")
    for name in ("nbf", "iat"):
        if name in claims and (not _number(claims[name]) or claims[name] > now + CLOCK_SKEW):
            raise AssertionRejected(f"the assertion is not valid yet ({name})")
    return float(expires)


def _check_service_account(claims: dict[str, Any], subject: str) -> None:
    """The `kubernetes.io` claim of a service-account token agrees with its `sub`
    (system:serviceaccount:<namespace>:<name>): the namespace, the service account's name and uid, and, when
    the token is bound to a pod (or node), that object's name and uid."""
    namespace, name = subject.removeprefix(SERVICE_ACCOUNT_PREFIX).split(":")
    kube = claims.get("kubernetes.io")
    if not isinstance(kube, dict) or kube.get("namespace") != namespace:
        raise AssertionRejected("the token's kubernetes.io claim does not name the service account's namespace")
    account = kube.get("serviceaccount")
    if not isinstance(account, dict) or not _object_ref(account) or account["name"] != name:
        raise AssertionRejected("the token's kubernetes.io claim does not name the service account")
    for bound in ("pod", "node", "secret"):
        if bound in kube and not _object_ref(kube[bound]):
            raise AssertionRejected(f"the token's kubernetes.io {bound} binding is malformed")


def _object_ref(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("name"), str) and bool(value["name"])
            and isinstance(value.get("uid"), str) and bool(value["uid"]))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
