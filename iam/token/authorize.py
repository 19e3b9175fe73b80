"""The authorization endpoint (RFC 6749 §4.1, OIDC Core §3.1.2) and the return from the authentication role.

Until the client and its redirect URI are proven, errors are an HTML page and nothing redirects
(RFC 6749 §4.1.2.1). After that, errors go back to the client with `state` and `iss` (RFC 9207).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.config import ClientConfig
from iam.errors import NO_STORE, OAuthError, PeerRejected, description_text, json_response
from iam.formats import PROMPTS, known_acr_values
from iam.http import is_digits, parse_params, read_form, read_params, with_params
from iam.pages import HARDENING, error_page
from iam.peers import HANDOFF_TYP, role_id
from iam.roles import Role
from iam.token import pkce
from iam.token.access_tokens import digest, new_token
from iam.token.claims import how_signed_in, id_token_hint_claims
from iam.token.clients import authenticate
from iam.token.dpop import JKT_SHAPE, InvalidProof
from iam.token.redirects import redirect_uri_allowed
from iam.token.scopes import granted_scope
from iam.token.services import TokenServices, token_services

router = APIRouter()

PENDING_TTL = 600  # seconds a person has to sign in
CODE_TTL = 60  # RFC 6749 §4.1.2 recommends ≤ 10 min; FAPI and ASVS L3 use 60 s
PAR_URN = "urn:ietf:params:oauth:request_uri:"  # RFC 9126 §2.2
PAR_TTL = 60  # seconds a pushed request waits for the browser
PUSHED_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 256 bits; a sign-in's request id is 32 characters, never this


class AuthorizationError(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description_text(description)


@router.api_route("/oauth/v2/authorize", methods=["GET", "POST"])
async def authorize(request: Request) -> Response:
    services = token_services(request)
    try:
        params = await read_params(request)
    except OAuthError as exc:
        return error_page("Invalid request", exc.description or "The request could not be read.")
    client = services.clients.get(params.get("client_id", ""))
    if client is None or "authorization_code" not in client.grant_types:
        return error_page("Unknown application", "This application is not registered for sign-in here.")
    status = 303 if request.method == "POST" else 302
    if params.get("request_uri", "").startswith(PAR_URN):
        return await _pushed(services, client, params["request_uri"], status)
    redirect_uri = params.get("redirect_uri")
    if redirect_uri is None or not redirect_uri_allowed(client, redirect_uri):
        return error_page("Invalid redirect", "The address to return to is not registered for this application.")
    try:
        if client.require_pushed_authorization_requests:
            raise AuthorizationError("invalid_request", "this client must push its authorization requests (PAR)")
        pending = _validate(services, client, redirect_uri, params)
    except AuthorizationError as exc:
        return _to_client(services, redirect_uri, status, error=exc.error, error_description=exc.description,
                          state=params.get("state"))
    return await _to_login(services, client, pending, status, params.get("login_hint"))


async def _pushed(services: TokenServices, client: ClientConfig, request_uri: str, status: int) -> Response:
    """RFC 9126 §4: the request the client pushed, used once, for that client; the query's other parameters are
    ignored. It gets a new id for the sign-in: a pushed request's id is never a sign-in's."""
    reference = request_uri.removeprefix(PAR_URN)
    pushed = await services.store.take_request(reference, client.client_id) if PUSHED_ID.match(reference) else None
    now = int(time.time())
    if pushed is None or pushed["expires_at"] < now:
        return error_page("Invalid request", "This sign-in request has expired or was already used. Please start "
                                             "again from the application.")
    pending = {**pushed, "id": secrets.token_urlsafe(24), "created_at": now, "expires_at": now + PENDING_TTL}
    return await _to_login(services, client, pending, status, None)


async def _to_login(services: TokenServices, client: ClientConfig, pending: dict[str, Any], status: int,
                    login_hint: str | None) -> Response:
    """Keep the pending request and send the person to the authentication role's sign-in page."""
    await services.store.add_request(pending)
    login = {
        "request": pending["id"],
        "client_id": client.client_id,
        "prompt": pending["prompt"],
        "max_age": pending["max_age"],
        "login_hint": login_hint,
        "acr_values": pending["acr_values"],
        "scope": pending["scope"] if client.require_consent else None,  # what the consent page asks for
    }
    query = urlencode({key: value for key, value in login.items() if value is not None})
    return RedirectResponse(f"{services.settings.login_base}/authn/login?{query}", status, headers=HARDENING)


@router.post("/oauth/v2/par")
async def push_authorization_request(request: Request) -> Response:
    """Pushed authorization requests (RFC 9126 §2): the client sends the request over the back channel,
    authenticated, and gets a one-time `request_uri` for the browser."""
    services = token_services(request)
    form = await read_form(request)
    client = await authenticate(request, services.clients, form)
    if "request_uri" in form:
        raise OAuthError("invalid_request", "request_uri cannot be pushed (RFC 9126 §2.1)")
    if "authorization_code" not in client.grant_types:
        raise OAuthError("unauthorized_client", "this client may not use the authorization code grant")
    redirect_uri = form.get("redirect_uri")
    if redirect_uri is None or not redirect_uri_allowed(client, redirect_uri):
        raise OAuthError("invalid_request", "redirect_uri is not registered for this client")
    try:
        pending = _validate(services, client, redirect_uri, form)
    except AuthorizationError as exc:
        raise OAuthError(exc.error, exc.description) from None
    proven = await _pushed_proof_key(request, services)
    if proven is not None:
        if pending["dpop_jkt"] not in (None, proven):  # RFC 9449 §10.1: both given, they must agree
            raise OAuthError("invalid_dpop_proof", "dpop_jkt is not the key of the DPoP proof")
        pending["dpop_jkt"] = proven
    pending.update(id=secrets.token_urlsafe(32), expires_at=pending["created_at"] + PAR_TTL)
    await services.store.add_request(pending)
    return json_response({"request_uri": PAR_URN + pending["id"], "expires_in": PAR_TTL}, 201, NO_STORE)


async def _pushed_proof_key(request: Request, services: TokenServices) -> str | None:
    """RFC 9449 §10.1: a DPoP proof sent with the pushed request binds the code to its key."""
    proofs = request.headers.getlist("dpop")
    if not proofs:
        return None
    if len(proofs) > 1:
        raise OAuthError("invalid_dpop_proof", "more than one DPoP header")
    try:
        par_endpoint = services.settings.issuer.rstrip("/") + "/oauth/v2/par"
        return (await services.dpop.verify(proofs[0], "POST", par_endpoint)).jkt
    except InvalidProof as exc:
        raise services.dpop.error(exc, resource=False) from None


def _dpop_jkt(value: str | None) -> str | None:
    """RFC 9449 §10: the thumbprint (RFC 7638, SHA-256, base64url) of the key the code is to be bound to."""
    if value is not None and not JKT_SHAPE.match(value):
        raise AuthorizationError("invalid_request", "dpop_jkt must be a base64url SHA-256 JWK thumbprint")
    return value


def _validate(services: TokenServices, client: ClientConfig, redirect_uri: str,
              params: dict[str, str]) -> dict[str, Any]:
    if "request" in params:
        raise AuthorizationError("request_not_supported", "request objects are not supported")
    if "request_uri" in params:
        raise AuthorizationError("request_uri_not_supported", "request_uri is not supported")
    response_type = params.get("response_type")
    if response_type is None:
        raise AuthorizationError("invalid_request", "response_type is required")
    if response_type != "code":
        # RFC 9700 §2.1.2: no implicit or hybrid flows.
        raise AuthorizationError("unsupported_response_type", "only response_type=code is supported")
    if params.get("response_mode", "query") != "query":
        raise AuthorizationError("invalid_request", "only response_mode=query is supported")
    try:
        scope = granted_scope(params.get("scope"), client.scopes)
    except OAuthError as exc:
        raise AuthorizationError("invalid_scope", exc.description or "invalid scope") from None
    challenge = params.get("code_challenge")
    method = params.get("code_challenge_method")
    if challenge is not None or method is not None:
        if method != pkce.METHOD:
            raise AuthorizationError("invalid_request", "code_challenge_method must be S256")
        if not pkce.challenge_ok(challenge):
            raise AuthorizationError("invalid_request", "code_challenge must be a base64url SHA-256 (RFC 7636)")
    elif client.require_pkce:
        raise AuthorizationError("invalid_request", "PKCE is required: send code_challenge with S256")
    prompt = params.get("prompt")
    prompts = set(prompt.split()) if prompt else set()
    if not prompts <= PROMPTS or ("none" in prompts and len(prompts) > 1):
        raise AuthorizationError("invalid_request", "invalid prompt")
    max_age = params.get("max_age")
    if max_age is not None and (not is_digits(max_age) or len(max_age) > 9):
        raise AuthorizationError("invalid_request", "max_age must be a non-negative integer")
    now = int(time.time())
    return {
        "id": secrets.token_urlsafe(24),
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": params.get("state"),
        "nonce": params.get("nonce"),
        "code_challenge": challenge,
        "prompt": " ".join(sorted(prompts)) or None,
        "max_age": int(max_age) if max_age is not None else None,
        "subject_hint": _hinted_subject(services, client, params.get("id_token_hint")),
        "acr_values": known_acr_values(params.get("acr_values")),
        "dpop_jkt": _dpop_jkt(params.get("dpop_jkt")),
        "created_at": now,
        "expires_at": now + PENDING_TTL,
    }


def _hinted_subject(services: TokenServices, client: ClientConfig, hint: str | None) -> str | None:
    """The `sub` of an ID token this server issued to this client (expired ones are fine, OIDC Core §3.1.2.1)."""
    if hint is None:
        return None
    try:
        claims = id_token_hint_claims(services.keys, services.settings.issuer, hint)
    except ValueError:
        raise AuthorizationError("invalid_request", "id_token_hint is not an ID token from this server") from None
    if claims["aud"] != client.client_id:
        raise AuthorizationError("invalid_request", "id_token_hint was not issued to this client")
    subject: str = claims["sub"]  # a string: id_token_hint_claims checked it
    return subject


def _to_client(services: TokenServices, redirect_uri: str, status: int, **params: str | None) -> Response:
    """An authorization response, success or error, always with `iss` (RFC 9207 §2)."""
    location = with_params(redirect_uri, {**params, "iss": services.settings.issuer})
    return RedirectResponse(location, status, headers=HARDENING)


@router.get("/oauth/v2/authorize/resume")
async def resume(request: Request) -> Response:
    """The authentication role hands the person back with a signed, single-use assertion (iam/authn/web.py)."""
    services = token_services(request)
    try:
        params = parse_params(request.url.query)
    except OAuthError:
        params = {}
    request_id, handoff = params.get("request", ""), params.get("handoff", "")
    try:
        claims = await services.peer_keys.verify(handoff, issuer=Role.AUTHENTICATION, audience=role_id(Role.TOKEN),
                                            typ=HANDOFF_TYP)
    except PeerRejected:
        return error_page("Sign-in not verified", "The sign-in could not be verified. Please start again.")
    if claims.get("req") != request_id:
        return error_page("Sign-in not verified", "The sign-in does not belong to this request.")
    pending = await services.store.take_request(request_id)
    now = int(time.time())
    if pending is None or pending["expires_at"] < now:
        return error_page("Sign-in expired", "This sign-in has expired or was already used. Please start again.")
    client = services.clients.get(pending["client_id"])
    if client is None:
        return error_page("Unknown application", "This application is no longer registered.")

    def back(**response: str | None) -> Response:
        return _to_client(services, pending["redirect_uri"], 302, state=pending["state"], **response)

    if claims.get("error"):
        return back(error=claims["error"], error_description=description_text(claims.get("error_description")))
    auth_time = claims.get("auth_time")
    if not isinstance(auth_time, int) or not claims.get("sub"):
        return error_page("Sign-in not verified", "The sign-in assertion is incomplete.")
    prompts = set((pending["prompt"] or "").split())
    fresh_login_needed = ("login" in prompts and auth_time < pending["created_at"]) or (
        pending["max_age"] is not None and now - auth_time > pending["max_age"]
    )
    other_user = pending["subject_hint"] is not None and pending["subject_hint"] != claims["sub"]
    if fresh_login_needed or ("none" in prompts and other_user):
        return back(error="login_required", error_description="the user must sign in again")
    # A client that offers only some connectors accepts no sign-in through another (the page's list came
    # through the browser).
    connector = claims.get("connector")
    if connector is not None and client.connectors is not None and connector not in client.connectors:
        return back(error="access_denied", error_description="this sign-in method is not offered for this application")
    # The consent page showed the scope the browser carried: the handoff must cover what was really asked.
    if client.require_consent and not set(pending["scope"].split()) <= set(str(claims.get("consent", "")).split()):
        return back(error="consent_required" if "none" in prompts else "access_denied",
                    error_description="the user has not allowed this application these scopes")

    grant_id = uuid.uuid4().hex
    offline = "offline_access" in pending["scope"].split()
    code = new_token()
    await services.store.add_grant_with_code(
        {
            "id": grant_id,
            "client_id": client.client_id,
            "subject": claims["sub"],
            "scope": pending["scope"],
            "sid": claims.get("sid"),
            "auth_time": auth_time,
            **how_signed_in(claims),
            "nonce": pending["nonce"],
            "offline": offline,
            "dpop_jkt": pending.get("dpop_jkt"),  # RFC 9449 §10: the code is bound to that key
            "created_at": now,
            "expires_at": now + (client.offline_grant_ttl if offline else client.grant_ttl),
            "revoked": False,
        },
        {
            "digest": digest(code),
            "grant_id": grant_id,
            "redirect_uri": pending["redirect_uri"],
            "code_challenge": pending["code_challenge"],
            "expires_at": now + CODE_TTL,
            "consumed": False,
        },
    )
    return back(code=code)
