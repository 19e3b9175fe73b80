"""Dynamic client registration (RFC 7591) at /oauth/v2/register, and its management (RFC 7592) at
/oauth/v2/register/{client_id}: mounted only with `registration.enabled` (iam/app.py), else these paths are 404.

- Registering needs an initial access token (RFC 7591 §3; iam/token/initial_tokens.py) as a bearer token; its
  policy bounds what may be registered, and one of its uses is consumed with the client's insert, by a successful
  registration only.
- A registrant chooses only standard registration metadata (REGISTRABLE); whatever else it sends is ignored and
  the server's defaults apply, and the answer tells what was registered (§3.2.1). The server generates the
  client_id. A registered client always asks the person for consent (RFC 9700 §4.11.2: no configuration vouches
  for it).
- Each client gets a registration access token (RFC 7592 §1.1), random and kept only as its SHA-256 digest, which
  alone reads, replaces or deletes that client; every failure to match it is the same 401, so nothing tells
  whether a client exists.

A registered client is a stored client like the administration API's: same table, same `StoredClients` code path,
same change notices to every replica.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from iam.config import ClientConfig
from iam.errors import NO_STORE, OAuthError, invalid_token, json_response
from iam.http import bearer_token, read_json
from iam.token.client_metadata import ClientMetadataError, parse_client_metadata
from iam.token.initial_tokens import InitialAccessToken, RegistrationPolicy
from iam.token.services import TokenServices, token_services
from iam.token.software_statements import MEMBER as STATEMENT
from iam.token.store import InitialTokenSpent, RegistrationsThrottled
from iam.token.stored_clients import (
    SECRET_BYTES,
    Registration,
    StoredClient,
    StoredClientError,
    new_client_id,
    secret_digest,
)

router = APIRouter(tags=["registration"])

PATH = "/oauth/v2/register"
# RFC 7591 §2 (and the metadata of the OAuth / OpenID Connect extensions iam implements) a registrant may choose.
# iam's own keys (lifetimes, introspection, token exchange, audiences, connectors, PKCE, PAR, ...) are the
# operator's: not in this list, they are ignored and take the server's defaults.
REGISTRABLE = frozenset({
    "redirect_uris", "grant_types", "response_types", "token_endpoint_auth_method", "client_name", "scope", "jwks",
    "jwks_uri", "post_logout_redirect_uris", "application_type", "backchannel_logout_uri",
    "backchannel_logout_session_required", "dpop_bound_access_tokens", "tls_client_auth_subject_dn",
    "tls_client_auth_san_dns", "tls_client_auth_san_uri", "tls_client_auth_san_ip", "tls_client_auth_san_email",
    "tls_client_certificate_bound_access_tokens",
})
_NOT_THIS_CLIENT = "the registration access token is invalid"  # RFC 7592 §2.1-§2.3: never whether it exists
_DUMMY = secret_digest("iam: no client secret")


def _registration_client_uri(services: TokenServices, client_id: str) -> str:
    return f"{services.settings.issuer.rstrip('/')}{PATH}/{quote(client_id, safe='')}"


async def _initial_token(request: Request, services: TokenServices) -> InitialAccessToken:
    value = bearer_token(request)
    if value is None:
        raise invalid_token("an initial access token is required (RFC 7591 §3)")
    token = await services.initial_tokens.find(value)
    if token is None:
        raise invalid_token("the initial access token is invalid, expired or used up")
    return token


async def _registered(request: Request, client_id: str) -> tuple[str, StoredClient]:
    """The registration access token presented, and the client it manages, which must be `client_id`."""
    value = bearer_token(request)
    if value is None:
        raise invalid_token("a registration access token is required (RFC 7592 §2)")
    try:
        stored = await token_services(request).stored_clients.registered(value)
    except StoredClientError:  # stored by a newer release: a replica of that release can manage it
        raise OAuthError("temporarily_unavailable", "this client cannot be read by this server's release; "
                         "try again later", status=503) from None
    if stored is None or stored.client_id != client_id or stored.registration_policy is None:
        raise invalid_token(_NOT_THIS_CLIENT)
    return value, stored


async def _metadata(request: Request, services: TokenServices) -> tuple[dict[str, Any], str | None]:
    """The request's client metadata, its software statement's claims laid over it (RFC 7591 §3.1.1), and that
    statement, if there was one."""
    data = await read_json(request, error="invalid_client_metadata")
    if not isinstance(data, dict):
        raise OAuthError("invalid_client_metadata", "the client metadata must be a JSON object")
    try:
        merged = await services.software_statements.apply(data)
    except ClientMetadataError as exc:
        raise OAuthError(exc.error, exc.description) from None
    statement = data.get(STATEMENT)
    return merged, statement if isinstance(statement, str) else None


def _registrable(data: dict[str, Any], client_id: str, policy: RegistrationPolicy) -> ClientConfig:
    """The client `data` describes, of the REGISTRABLE members only, always asking for consent, within `policy`
    (checked after ClientConfig's own rules); ClientMetadataError otherwise."""
    chosen = {name: value for name, value in data.items() if name in REGISTRABLE}
    config = parse_client_metadata({**chosen, "require_consent": True}, client_id=client_id)
    policy.check(config)
    return config


def _information(services: TokenServices, stored: StoredClient, access_token: str, status: int = 200,
                 secret: str | None = None, statement: str | None = None) -> Response:
    """The client information response (RFC 7591 §3.2.1, RFC 7592 §3): every registrable member as registered,
    and the software statement used, unmodified (§3.2.1)."""
    shown = stored.config.model_dump(mode="json", include=set(REGISTRABLE), exclude_none=True)
    body = {"client_id": stored.client_id, **shown, "client_id_issued_at": stored.created_at,
            "registration_access_token": access_token,
            "registration_client_uri": _registration_client_uri(services, stored.client_id)}
    if secret is not None:
        body |= {"client_secret": secret, "client_secret_expires_at": 0}  # 0: it does not expire
    if statement is not None:
        body[STATEMENT] = statement
    return json_response(body, status, NO_STORE)


@router.post(PATH, status_code=201)
async def register(request: Request) -> Response:
    """RFC 7591 §3.1: register a client; 201 with its client information, the secrets shown this once."""
    services = token_services(request)
    initial = await _initial_token(request, services)
    data, statement = await _metadata(request, services)
    access_token = secrets.token_urlsafe(SECRET_BYTES)
    try:
        config = _registrable(data, new_client_id(), initial.policy)
        stored, secret = await services.stored_clients.create(
            config, actor=f"initial-token:{initial.id}", registration=Registration(
                secret_digest(access_token), initial.policy.to_json(), services.initial_tokens.use(initial)))
    except ClientMetadataError as exc:
        raise OAuthError(exc.error, exc.description) from None
    except InitialTokenSpent:
        raise invalid_token("the initial access token is invalid, expired or used up") from None
    except RegistrationsThrottled as exc:
        raise OAuthError("temporarily_unavailable", f"at most {services.settings.registration.rate_limit} "
                         "registrations a minute with one initial access token", 429,
                         {"Retry-After": str(exc.retry_after)}) from None
    return _information(services, stored, access_token, 201, secret, statement)


@router.get(PATH + "/{client_id}")
async def read_registration(request: Request, client_id: str) -> Response:
    """RFC 7592 §2.1: the client's current information (never its secret)."""
    access_token, stored = await _registered(request, client_id)
    return _information(token_services(request), stored, access_token)


@router.put(PATH + "/{client_id}")
async def replace_registration(request: Request, client_id: str) -> Response:
    """RFC 7592 §2.2: replace the client's metadata, within the policy it was registered under."""
    access_token, stored = await _registered(request, client_id)
    services = token_services(request)
    data, statement = await _metadata(request, services)
    if data.get("client_id") != client_id:
        raise OAuthError("invalid_client_metadata", "client_id: must be present and be the client's id (RFC 7592 §2.2)")
    if "client_secret" in data:  # §2.2: if sent, it must be the current one
        presented = data["client_secret"]
        digest = secret_digest(presented) if isinstance(presented, str) else _DUMMY
        if stored.secret_digest is None or not hmac.compare_digest(digest, stored.secret_digest):
            raise OAuthError("invalid_client_metadata", "client_secret: is not the client's current secret")
    assert stored.registration_policy is not None  # _registered checked it
    try:
        config = _registrable(data, client_id, RegistrationPolicy.from_json(stored.registration_policy))
        replaced, secret = await services.stored_clients.replace(client_id, config, if_match=stored.etag,
                                                                 actor=f"registration:{client_id}")
    except ClientMetadataError as exc:
        raise OAuthError(exc.error, exc.description) from None
    except StoredClientError:  # deleted or changed meanwhile
        raise invalid_token(_NOT_THIS_CLIENT) from None
    return _information(services, replaced, access_token, secret=secret, statement=statement)


@router.delete(PATH + "/{client_id}", status_code=204)
async def delete_registration(request: Request, client_id: str) -> Response:
    """RFC 7592 §2.3: deregister the client; its tokens stop working at once, on every replica."""
    _, stored = await _registered(request, client_id)
    try:
        await token_services(request).stored_clients.delete(client_id, if_match=stored.etag,
                                                            actor=f"registration:{client_id}")
    except StoredClientError:
        raise invalid_token(_NOT_THIS_CLIENT) from None
    return Response(status_code=204, headers=NO_STORE)
