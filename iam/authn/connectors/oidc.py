"""Sign in through an upstream OpenID Connect provider: authorization code flow with PKCE, `state` and `nonce`.

iam is the relying party here. `start()` sends the browser to the provider; `finish()` checks the callback,
exchanges the code at the token endpoint and validates the ID token as OIDC Core §3.1.3.7 says, with the
provider's keys from its JWKS (discovery). Optionally the userinfo endpoint (§5.3) fills claims the ID token
lacks. Claims become an `UpstreamIdentity` per the connector's claim mapping.

Failure classes, as the sign-in page and the metrics see them:
- `ConnectorUnavailable`: the provider did not answer in time, answered discovery / JWKS / token requests
  with a server error or a document iam cannot use, or refused iam's client credentials;
- `UpstreamRejected`: this sign-in failed validation (state, `iss`, code, ID token, userinfo); `AccessDenied`
  (reason "access_denied") when the provider says the person declined or may not use iam.
No message carries a code, token, secret, state or nonce.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

import httpx
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import InvalidPayloadError, JoseError
from joserfc.jws import extract_compact

from iam.authn.connectors import (
    Check,
    ConnectorUnavailable,
    PendingUpstream,
    UpstreamIdentity,
    UpstreamRejected,
)
from iam.config import OidcConnectorConfig
from iam.jwks import SIGNING_ALGS, fits, json_object, pick, public_keys, secure_url
from iam.security import constant_time_equal

log = logging.getLogger(__name__)

DISCOVERY_TTL = 3600.0  # seconds a discovery document is used before it is fetched again
JWKS_REFETCH_INTERVAL = 60.0  # an unknown kid fetches the JWKS again at most this often
CLOCK_SKEW = 30  # seconds of clock difference tolerated for exp, iat and nbf
MAX_RESPONSE_BYTES = 1 << 20
# RFC 6749 §4.1.2.1 and OIDC Core §3.1.2.6: the provider is down, not this sign-in wrong.
_UNAVAILABLE_ERRORS = {"server_error", "temporarily_unavailable"}
_KNOWN_ERRORS = {
    "invalid_request", "unauthorized_client", "access_denied", "unsupported_response_type", "invalid_scope",
    "server_error", "temporarily_unavailable", "interaction_required", "login_required",
    "account_selection_required", "consent_required", "invalid_request_uri", "invalid_request_object",
    "request_not_supported", "request_uri_not_supported", "registration_not_supported",
}


class AccessDenied(UpstreamRejected):
    """The provider answered error=access_denied: the person declined, or the provider does not let them in."""

    reason = "access_denied"


@dataclass(frozen=True)
class ProviderMetadata:
    """What iam uses of the provider's discovery document (OpenID Connect Discovery 1.0 §3)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    signing_algs: tuple[str, ...]  # advertised and acceptable to iam, in the provider's order
    ignored_algs: tuple[str, ...]  # advertised but never accepted (none, HMAC, unknown)
    token_auth_method: str | None  # client_secret_basic, client_secret_post or none; None: nothing usable
    pkce_methods: tuple[str, ...] | None  # None: not advertised
    iss_parameter_required: bool  # RFC 9207 §3


class OidcConnector:
    """One upstream OpenID Connect provider; implements `RedirectConnector`."""

    def __init__(self, config: OidcConnectorConfig, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.id = config.id
        self.config = config
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=config.timeout, follow_redirects=False)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._metadata: ProviderMetadata | None = None
        self._metadata_expires = 0.0
        self._keys: list[Any] | None = None  # None: the JWKS was never fetched
        self._last_refetch: float | None = None  # when an unknown kid last made iam fetch the JWKS again

    # -- the flow ----------------------------------------------------------------------------------------
    async def start(self, redirect_uri: str, *, login_hint: str | None = None) -> tuple[str, PendingUpstream]:
        metadata = await self._provider()
        if not metadata.signing_algs or metadata.token_auth_method is None:  # no use sending the person there
            raise ConnectorUnavailable(f"connector {self.id}: the provider offers no signing algorithm or client "
                                       f"authentication iam can use (iam connectors test {self.id})")
        pending = PendingUpstream(
            connector_id=self.id,
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            code_verifier=secrets.token_urlsafe(32),  # RFC 7636 §4.1: 256 bits, 43 characters
        )
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": create_s256_code_challenge(pending.code_verifier),
            "code_challenge_method": "S256",
        }
        if login_hint:
            params["login_hint"] = login_hint
        # OIDC Core §3.1.2.1 / RFC 6749 §3.1: the endpoint may carry a query of its own, which is kept.
        parts = urlsplit(metadata.authorization_endpoint)
        query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()])
        return urlunsplit(parts._replace(query=query)), pending

    async def finish(self, redirect_uri: str, params: dict[str, str], pending: PendingUpstream) -> UpstreamIdentity:
        # RFC 6749 §10.12: the callback must answer the request this browser started (error responses too).
        state = params.get("state")
        if pending.connector_id != self.id or not state or not constant_time_equal(state, pending.state):
            raise UpstreamRejected(f"connector {self.id}: the callback's state does not match this browser's sign-in")
        metadata = await self._provider()
        # RFC 9207 §2.4: the response names the issuer that sent it (mix-up attacks).
        if "iss" in params:
            if params["iss"] != metadata.issuer:
                raise UpstreamRejected(f"connector {self.id}: the callback's iss is not the provider's issuer")
        elif metadata.iss_parameter_required:
            raise UpstreamRejected(f"connector {self.id}: the callback lacks the iss parameter (RFC 9207)")
        if "error" in params:
            raise self._callback_error(params["error"])
        code = params.get("code")
        if not code:
            raise UpstreamRejected(f"connector {self.id}: the callback has neither code nor error")

        tokens = await self._exchange(metadata, redirect_uri, code, pending.code_verifier)
        claims = await self._validate_id_token(metadata, tokens["id_token"], pending.nonce)
        if self._needs_userinfo(metadata, claims) and isinstance(tokens.get("access_token"), str):
            userinfo = await self._userinfo(metadata, tokens["access_token"], claims["sub"])
            claims = {**userinfo, **claims}  # the signed ID token wins where both say something
        return self._identity(claims)

    def _callback_error(self, error: str) -> Exception:
        label = error if error in _KNOWN_ERRORS else "an unregistered error code"
        message = f"connector {self.id}: the provider answered {label}"
        if error == "access_denied":
            return AccessDenied(message)
        if error in _UNAVAILABLE_ERRORS:
            return ConnectorUnavailable(message)
        return UpstreamRejected(message)

    async def _exchange(self, metadata: ProviderMetadata, redirect_uri: str, code: str,
                        code_verifier: str) -> dict[str, Any]:
        """The code for tokens at the token endpoint (OIDC Core §3.1.3.1, RFC 7636 §4.5)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": code_verifier}
        headers = {"Accept": "application/json"}
        secret = self.config.client_secret.get_secret_value() if self.config.client_secret else None
        if metadata.token_auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined.
            raw = f"{quote_plus(self.config.client_id)}:{quote_plus(secret or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        else:
            form["client_id"] = self.config.client_id
            if metadata.token_auth_method == "client_secret_post":
                form["client_secret"] = secret or ""
        response, body = await self._send("token endpoint", "POST", metadata.token_endpoint, data=form,
                                          headers=headers)
        document = json_object(body)
        if response.status_code != 200:
            error = document.get("error") if document else None
            # RFC 6749 §5.2: invalid_client is iam's own credentials; invalid_grant this code.
            if response.status_code == 401 or error == "invalid_client":
                raise ConnectorUnavailable(f"connector {self.id}: the provider refused iam's client credentials")
            if response.status_code >= 500:
                raise ConnectorUnavailable(f"connector {self.id}: token endpoint answered {response.status_code}")
            label = error if error in ("invalid_grant", "invalid_request", "unauthorized_client") else "an error"
            raise UpstreamRejected(f"connector {self.id}: the token endpoint refused the code ({label})")
        if document is None:
            raise UpstreamRejected(f"connector {self.id}: the token response is not a JSON object")
        token_type = document.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":  # OIDC Core §3.1.3.3
            raise UpstreamRejected(f"connector {self.id}: the token response's token_type is not Bearer")
        if not isinstance(document.get("id_token"), str):
            raise UpstreamRejected(f"connector {self.id}: the token response has no ID token")
        return document

    async def _validate_id_token(self, metadata: ProviderMetadata, id_token: str, nonce: str) -> dict[str, Any]:
        """OIDC Core §3.1.3.7, rule by rule; the claims if every rule holds."""
        def reject(why: str) -> UpstreamRejected:
            return UpstreamRejected(f"connector {self.id}: ID token rejected: {why}")

        try:
            header = extract_compact(id_token.encode()).headers()
        except (JoseError, ValueError, UnicodeError):
            raise reject("not a compact JWS") from None
        alg = header.get("alg")
        # §3.1.3.7 rule 6/7: only the algorithms the provider advertises and iam accepts (never none or HMAC).
        if alg not in metadata.signing_algs:
            raise reject(f"alg {str(alg)[:16]!r} is not one the provider signs with")
        if "crit" in header:  # RFC 7515 §4.1.11: no extension iam would have to understand
            raise reject("unsupported crit header")
        key = await self._signing_key(metadata, header.get("kid"), alg)
        if key is None:
            raise reject("signed by a key the provider does not publish")
        try:
            claims = jwt.decode(id_token, key, algorithms=[alg]).claims
        except InvalidPayloadError:
            raise reject("its claims are not a JSON object") from None
        except (JoseError, ValueError):
            raise reject("bad signature") from None

        now = self._clock()
        if claims.get("iss") != metadata.issuer:  # rule 2
            raise reject("iss is not the provider's issuer")
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences
        if not isinstance(audiences, list) or self.config.client_id not in audiences:  # rule 3
            raise reject("aud does not contain iam's client_id")
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.config.client_id:  # rules 4, 5
            raise reject("azp is not iam's client_id")
        if not _number(claims.get("exp")) or now >= claims["exp"] + CLOCK_SKEW:  # rule 9
            raise reject("expired")
        if not _number(claims.get("iat")) or claims["iat"] > now + CLOCK_SKEW:  # rule 10
            raise reject("iat is missing or in the future")
        if "nbf" in claims and (not _number(claims["nbf"]) or claims["nbf"] > now + CLOCK_SKEW):
            raise reject("not valid yet (nbf)")
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not constant_time_equal(token_nonce, nonce):  # rule 11
            raise reject("nonce does not match this sign-in")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:  # §2: sub
            raise reject("sub is missing or malformed")
        return claims

    def _needs_userinfo(self, metadata: ProviderMetadata, claims: dict[str, Any]) -> bool:
        if not self.config.userinfo or not metadata.userinfo_endpoint:
            return False
        mapping = self.config.claims
        wanted = (mapping.subject, mapping.username, mapping.email, mapping.name, mapping.groups)
        return any(claim_at(claims, path) is None for path in wanted)

    async def _userinfo(self, metadata: ProviderMetadata, access_token: str, subject: str) -> dict[str, Any]:
        """OIDC Core §5.3: the userinfo response, if it is about the same person as the ID token (§5.3.4)."""
        assert metadata.userinfo_endpoint is not None  # asked only when there is one (_needs_userinfo)
        response, body = await self._send("userinfo endpoint", "GET", metadata.userinfo_endpoint,
                                          headers={"Authorization": f"Bearer {access_token}",
                                                   "Accept": "application/json"})
        if response.status_code >= 500:
            raise ConnectorUnavailable(f"connector {self.id}: userinfo endpoint answered {response.status_code}")
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        document = json_object(body) if media_type == "application/json" else None
        if response.status_code != 200 or document is None:
            raise UpstreamRejected(f"connector {self.id}: the userinfo endpoint answered {response.status_code} "
                                   f"{media_type or 'without a content type'} (signed userinfo: set userinfo: false)")
        if document.get("sub") != subject:
            raise UpstreamRejected(f"connector {self.id}: userinfo is about another subject than the ID token")
        return document

    def _identity(self, claims: dict[str, Any]) -> UpstreamIdentity:
        mapping = self.config.claims
        subject = claim_at(claims, mapping.subject)
        if not isinstance(subject, str) or not subject:
            raise UpstreamRejected(f"connector {self.id}: the claim {mapping.subject!r} (the subject) is missing")
        email = _string(claim_at(claims, mapping.email))
        amr = claims.get("amr")
        return UpstreamIdentity(
            connector_id=self.id,
            subject=subject,
            username=_string(claim_at(claims, mapping.username)),
            email=email,
            email_verified=email is not None and claim_at(claims, mapping.email_verified) is True,
            name=_string(claim_at(claims, mapping.name)),
            groups=self._groups(claim_at(claims, mapping.groups)),
            amr=[value for value in amr if isinstance(value, str)] if isinstance(amr, list) else [],
            acr=_string(claims.get("acr")),
        )

    def _groups(self, value: Any) -> list[str]:
        names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        allow = set(self.config.groups.allow)
        kept = [name for name in names if isinstance(name, str) and name and (not allow or name in allow)]
        return [self.config.groups.prefix + name for name in dict.fromkeys(kept)]

    # -- discovery and keys --------------------------------------------------------------------------------
    async def _provider(self, refresh: bool = False) -> ProviderMetadata:
        """The provider's metadata, from cache while fresh; a stale copy is used while the provider is down."""
        if self._metadata is not None and not refresh and self._clock() < self._metadata_expires:
            return self._metadata
        async with self._lock:
            if self._metadata is not None and not refresh and self._clock() < self._metadata_expires:
                return self._metadata
            try:
                metadata = await self._discover()
            except ConnectorUnavailable as exc:
                if self._metadata is None or refresh:
                    raise
                log.warning("%s; using the discovery document fetched before", exc)
                self._metadata_expires = self._clock() + JWKS_REFETCH_INTERVAL
                return self._metadata
            if self._metadata is not None and metadata.jwks_uri != self._metadata.jwks_uri:
                self._keys = None
            self._metadata, self._metadata_expires = metadata, self._clock() + DISCOVERY_TTL
            return metadata

    async def _discover(self) -> ProviderMetadata:
        """OpenID Connect Discovery 1.0 §4: fetch and check the provider's configuration."""
        issuer = self.config.issuer
        response, body = await self._send("discovery", "GET", issuer + "/.well-known/openid-configuration",
                                          headers={"Accept": "application/json"})
        document = json_object(body)
        if response.status_code != 200 or document is None:
            raise ConnectorUnavailable(f"connector {self.id}: discovery answered {response.status_code}, "
                                       "not a JSON document")

        def unusable(why: str) -> ConnectorUnavailable:
            return ConnectorUnavailable(f"connector {self.id}: discovery document unusable: {why}")

        # §4.3: the issuer must be the one asked for (the configured value has lost any trailing slash).
        if document.get("issuer") not in (issuer, issuer + "/"):
            raise unusable("its issuer is not the configured issuer")
        endpoints = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            url = document.get(name)
            if url is None and name == "userinfo_endpoint":
                continue
            if not isinstance(url, str) or not secure_url(url):
                raise unusable(f"{name} is missing or not an https URL")
            endpoints[name] = url
        response_types = document.get("response_types_supported")
        if not isinstance(response_types, list) or "code" not in response_types:
            raise unusable("it does not support response_type=code")
        advertised = document.get("id_token_signing_alg_values_supported")
        if not isinstance(advertised, list):
            raise unusable("id_token_signing_alg_values_supported is missing")
        # Discovery §3: omitted means client_secret_basic only.
        methods = document.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        methods = methods if isinstance(methods, list) else []
        auth_method: str | None
        if self.config.client_secret is None:
            auth_method = "none"
        else:
            auth_method = next((m for m in ("client_secret_basic", "client_secret_post") if m in methods), None)
        pkce = document.get("code_challenge_methods_supported")
        return ProviderMetadata(
            issuer=document["issuer"],
            authorization_endpoint=endpoints["authorization_endpoint"],
            token_endpoint=endpoints["token_endpoint"],
            jwks_uri=endpoints["jwks_uri"],
            userinfo_endpoint=endpoints.get("userinfo_endpoint"),
            signing_algs=tuple(a for a in advertised if a in SIGNING_ALGS),
            ignored_algs=tuple(str(a) for a in advertised if a not in SIGNING_ALGS),
            token_auth_method=auth_method,
            pkce_methods=tuple(str(m) for m in pkce) if isinstance(pkce, list) else None,
            iss_parameter_required=document.get("authorization_response_iss_parameter_supported") is True,
        )

    async def _signing_key(self, metadata: ProviderMetadata, kid: Any, alg: str) -> Any | None:
        """The provider's key for this kid and alg. An unknown kid fetches the JWKS again (the provider rotated
        its keys), at most once per JWKS_REFETCH_INTERVAL: a flood of forged kids cannot make iam hammer it."""
        if self._keys is not None and (key := pick(self._keys, kid, alg)) is not None:
            return key
        async with self._lock:
            if self._keys is not None:
                if (key := pick(self._keys, kid, alg)) is not None:  # another sign-in just fetched it
                    return key
                now = self._clock()
                if self._last_refetch is not None and now - self._last_refetch < JWKS_REFETCH_INTERVAL:
                    return None
                self._last_refetch = now
            self._keys = await self._fetch_keys(metadata)
            return pick(self._keys, kid, alg)

    async def _fetch_keys(self, metadata: ProviderMetadata) -> list[Any]:
        response, body = await self._send("JWKS", "GET", metadata.jwks_uri, headers={"Accept": "application/json"})
        document = json_object(body)
        if response.status_code != 200 or document is None or not isinstance(document.get("keys"), list):
            raise ConnectorUnavailable(f"connector {self.id}: the JWKS answered {response.status_code}, "
                                       "not a JWK Set")
        return list(public_keys(document["keys"]))

    async def _send(self, what: str, method: str, url: str, **kwargs) -> tuple[httpx.Response, bytes]:
        """One request to the provider, bounded by the connector's timeout and MAX_RESPONSE_BYTES."""
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout), self._http.stream(method, url, **kwargs) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise ConnectorUnavailable(f"connector {self.id}: {what} answered more than 1 MiB")
                return response, bytes(body)
        except (TimeoutError, httpx.TimeoutException):
            raise ConnectorUnavailable(f"connector {self.id}: {what} did not answer within {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ConnectorUnavailable(f"connector {self.id}: {what} unreachable ({type(exc).__name__})") from None

    # -- for operators ---------------------------------------------------------------------------------------
    async def check(self) -> list[Check]:
        """`iam connectors test`: discovery, the JWKS, and whether iam can use what the provider offers."""
        try:
            metadata = await self._provider(refresh=True)
        except ConnectorUnavailable as exc:
            return [Check("discovery", False, str(exc))]
        checks = [Check("discovery", True, f"issuer {metadata.issuer}")]
        ignored = f" (ignored: {', '.join(metadata.ignored_algs)})" if metadata.ignored_algs else ""
        checks.append(Check("signing algorithms", bool(metadata.signing_algs),
                            (", ".join(metadata.signing_algs) or "none iam accepts") + ignored))
        try:
            async with self._lock:
                self._keys = await self._fetch_keys(metadata)
        except ConnectorUnavailable as exc:
            checks.append(Check("jwks", False, str(exc)))
        else:
            usable = [k for k in self._keys if any(fits(k, alg) for alg in metadata.signing_algs)]
            kids = ", ".join(str(k.kid) for k in usable if k.kid)
            checks.append(Check("jwks", bool(usable), f"{len(usable)} signing key(s) for the advertised algorithms"
                                + (f": {kids}" if kids else "")))
        checks.append(Check("client authentication", metadata.token_auth_method is not None,
                            metadata.token_auth_method or "the provider offers neither client_secret_basic nor "
                                                          "client_secret_post"))
        methods = metadata.pkce_methods
        checks.append(Check("pkce", methods is None or "S256" in methods,
                            ", ".join(methods) if methods is not None else "not advertised; S256 is sent"))
        if self.config.userinfo:
            checks.append(Check("userinfo", True, metadata.userinfo_endpoint or "none: claims from the ID token only"))
        return checks

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The claim named `path`, or reached by its dotted parts (`realm_access.roles`); None if absent."""
    if path in claims:  # claim names may contain dots themselves (https://example.com/groups)
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
