"""The client administration API under /admin/v1 (internal only, never routed by the ingress): thin handlers over
`StoredClients` (iam/token/stored_clients.py), and over `InitialAccessTokens` (iam/token/initial_tokens.py) for the
initial access tokens of dynamic client registration (RFC 7591 §3).

Every call needs a bearer access token of this issuer: scope `clients:read` to read, `clients:write` to change.
Bodies are RFC 7591 client metadata (JSON); errors are RFC 7591 §3.2.2 bodies (`invalid_client_metadata`,
`invalid_redirect_uri`) or, for the API's own refusals, `{"error": ..., "error_description": ...}` with the status
that says it (401, 403, 404, 409 for a client of the config file, 412 for a stale If-Match, 413, 415).

A client_id may hold any VSCHAR (RFC 6749 App. A.1), `/` too: the routes take the rest of the path as the client_id
(sent percent-encoded or not, it arrives decoded), and `/secret` at its end names the rotation.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.utils import get_openapi

from iam import __version__
from iam.config import ClientConfig
from iam.errors import NO_STORE, OAuthError, json_response
from iam.http import JSON_TYPES, read_json
from iam.resource import require_token
from iam.token.client_metadata import ClientMetadataError, client_metadata, parse_client_metadata
from iam.token.initial_tokens import InitialTokenError
from iam.token.services import TokenServices, token_services
from iam.token.stored_clients import StoredClient, StoredClientError, Unreadable, new_client_id

router = APIRouter(prefix="/admin/v1", tags=["clients"])

READ = "clients:read"
WRITE = "clients:write"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
PATCH_TYPES = ("application/merge-patch+json", "application/json")  # RFC 7396
_STATUS = {"not_found": 404, "precondition": 412, "read_only": 409, "no_secret": 400, "unreadable": 409}
_ERROR = {"not_found": "not_found", "precondition": "precondition_failed", "read_only": "read_only_client",
          "no_secret": "invalid_request", "unreadable": "unreadable_client"}

_METADATA = {"type": "object", "description": "RFC 7591 client metadata, and iam's own keys (see ClientConfig); "
             "`enabled` (boolean) enables or disables a stored client.", "additionalProperties": True}
_CLIENT_TEXT = ("The client: its metadata, `client_id`, `enabled`, `source` (`store` or `config`), "
                "`client_id_issued_at`, `updated_at`.")
_CLIENT: dict[str, Any] = {"description": _CLIENT_TEXT, "content": {"application/json": {"schema": _METADATA}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid_client_metadata / invalid_redirect_uri (RFC 7591 §3.2.2)"},
    401: {"description": "no live access token"}, 403: {"description": "the token lacks the scope"},
}


async def _caller(request: Request, scope: str) -> str:
    """The actor of the call: the token's subject (its client, for a client_credentials token)."""
    members = await require_token(request, token_services(request).access_tokens, scope)
    return str(members.get("sub") or members.get("client_id"))


async def _body(request: Request, types: tuple[str, ...] = JSON_TYPES, *, optional: bool = False) -> Any:
    return await read_json(request, types, "invalid_client_metadata", optional=optional)


def _refused(exc: ClientMetadataError | StoredClientError) -> OAuthError:
    if isinstance(exc, ClientMetadataError):
        return OAuthError(exc.error, exc.description)
    return OAuthError(_ERROR[exc.kind], str(exc), status=_STATUS[exc.kind])


def _configured(config: ClientConfig) -> dict[str, Any]:
    """A client of the config file, as the API tells it (read-only)."""
    return {"client_id": config.client_id, **client_metadata(config), "enabled": config.enabled, "source": "config"}


def _answer(stored: StoredClient | Unreadable, status: int = 200, secret: str | None = None,
            **headers: str) -> Response:
    body = stored.describe()
    if secret is not None:
        # RFC 7591 §3.2.1: shown this once; 0 is "does not expire".
        body |= {"client_secret": secret, "client_secret_expires_at": 0}
    return json_response(body, status, {**NO_STORE, "ETag": stored.etag, **headers})


def _enabled(data: dict[str, Any]) -> bool | None:
    enabled = data.pop("enabled", None)
    if enabled is not None and not isinstance(enabled, bool):
        raise OAuthError("invalid_client_metadata", "enabled: must be true or false")
    return enabled


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise OAuthError("invalid_client_metadata", "the client metadata must be a JSON object")
    # What a GET answered may be sent back as it was: the server's own members are dropped.
    return {key: value for key, value in data.items() if key not in ("source", "updated_at")}


@router.post("/clients", status_code=201, summary="Create a client", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": _METADATA}}}},
    responses={201: {**_CLIENT, "description": _CLIENT_TEXT + " With `client_secret`, shown once."},
               **_ERRORS})
async def create_client(request: Request) -> Response:
    """Create a stored client from RFC 7591 metadata; `client_id` is generated when none is given. A
    client_secret_basic / client_secret_post client gets a generated secret, in this answer only."""
    actor = await _caller(request, WRITE)
    data = _object(await _body(request))
    enabled = _enabled(data)
    client_id = data.get("client_id") or new_client_id()
    services = token_services(request)
    try:
        config = parse_client_metadata(data, client_id=client_id if isinstance(client_id, str) else "")
        stored, secret = await services.stored_clients.create(config, actor=actor,
                                                              enabled=True if enabled is None else enabled)
    except (ClientMetadataError, StoredClientError) as exc:
        raise _refused(exc) from None
    return _answer(stored, 201, secret, Location=f"{services.settings.issuer.rstrip('/')}/admin/v1/clients/"
                                                 f"{_quoted(stored.client_id)}")


@router.get("/clients", summary="List stored clients", responses={200: {
    "description": "`clients` (up to `limit`, in client_id order) and `next`: the `after` of the next page, or "
                   "null on the last one."}, **_ERRORS})
async def list_clients(request: Request, after: str | None = None, limit: int = DEFAULT_LIMIT) -> Response:
    """Stored clients, a page at a time (`after`: the last client_id of the previous page)."""
    await _caller(request, READ)
    if not 1 <= limit <= MAX_LIMIT:
        raise OAuthError("invalid_request", f"limit: from 1 to {MAX_LIMIT}")
    page = await token_services(request).stored_clients.list(after=after, limit=limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return json_response({"clients": [stored.describe() for stored in page],
                          "next": page[-1].client_id if more else None}, 200, NO_STORE)


@router.get("/clients/{client_id:path}", summary="Read a client", responses={200: _CLIENT, 404: {
    "description": "no such client"}, **_ERRORS})
async def read_client(request: Request, client_id: str) -> Response:
    """A stored client (with its ETag), or a client of the config file (`source: config`, read-only)."""
    await _caller(request, READ)
    services = token_services(request)
    config = services.clients.yaml_client(client_id)
    if config is not None:
        return json_response(_configured(config), 200, NO_STORE)
    stored = await services.stored_clients.read(client_id)  # an unreadable one too, with why (`unreadable`)
    if stored is None:
        raise OAuthError("not_found", f"no client {client_id!r}", status=404)
    return _answer(stored)


@router.put("/clients/{client_id:path}", summary="Replace a client", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": _METADATA}}}},
    responses={200: _CLIENT, 409: {"description": "a client of the config file"},
               412: {"description": "If-Match names an older version"}, **_ERRORS})
async def replace_client(request: Request, client_id: str) -> Response:
    """Replace a stored client's metadata (If-Match: its ETag, or 412)."""
    actor = await _caller(request, WRITE)
    data = _object(await _body(request))
    enabled = _enabled(data)
    stored_clients = token_services(request).stored_clients
    try:
        config = parse_client_metadata(data, client_id=client_id)
        stored, secret = await stored_clients.replace(client_id, config, if_match=request.headers.get("if-match"),
                                                      actor=actor, enabled=enabled)
    except (ClientMetadataError, StoredClientError) as exc:
        raise _refused(exc) from None
    return _answer(stored, secret=secret)


@router.patch("/clients/{client_id:path}", summary="Change a client", openapi_extra={
    "requestBody": {"required": True, "content": {"application/merge-patch+json": {"schema": _METADATA}}}},
    responses={200: _CLIENT, 409: {"description": "a client of the config file"},
               412: {"description": "If-Match names an older version"}, **_ERRORS})
async def patch_client(request: Request, client_id: str) -> Response:
    """A JSON merge patch (RFC 7396) of a stored client's metadata; `{"enabled": false}` disables it."""
    actor = await _caller(request, WRITE)
    data = _object(await _body(request, PATCH_TYPES))
    stored_clients = token_services(request).stored_clients
    try:
        stored, secret = await stored_clients.patch(client_id, data, if_match=request.headers.get("if-match"),
                                                    actor=actor)
    except (ClientMetadataError, StoredClientError) as exc:
        raise _refused(exc) from None
    return _answer(stored, secret=secret)


@router.delete("/clients/{client_id:path}", status_code=204, summary="Delete a client", responses={
    204: {"description": "deleted"}, 409: {"description": "a client of the config file"},
    412: {"description": "If-Match names an older version"}, **_ERRORS})
async def delete_client(request: Request, client_id: str) -> Response:
    """Delete a stored client: its tokens stop working at once, on every replica."""
    actor = await _caller(request, WRITE)
    try:
        await token_services(request).stored_clients.delete(client_id, if_match=request.headers.get("if-match"),
                                                            actor=actor)
    except StoredClientError as exc:
        raise _refused(exc) from None
    return Response(status_code=204, headers=NO_STORE)


@router.post("/clients/{client_id:path}/secret", summary="Rotate a client's secret", openapi_extra={
    "requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"grace": {"type": "integer", "minimum": 0, "description": (
            "Seconds the current secret keeps working (default: the client_secret_grace setting)")}}}}}}},
    responses={200: {"description": "`client_secret` (shown once) and `previous_secret_expires_at`"},
               409: {"description": "a client of the config file"},
               412: {"description": "If-Match (optional) names an older version"}, **_ERRORS})
async def rotate_secret(request: Request, client_id: str) -> Response:
    """A new generated secret; the current one keeps working for `grace` seconds, then stops (If-Match: only if
    the client is still at that ETag, or 412)."""
    actor = await _caller(request, WRITE)
    services = token_services(request)
    data = await _body(request, optional=True)
    grace = data.get("grace", services.settings.client_secret_grace) if isinstance(data, dict) else None
    if not isinstance(grace, int) or isinstance(grace, bool) or not 0 <= grace <= 30 * 86400:
        raise OAuthError("invalid_request", "grace: seconds, from 0 to 2592000")
    try:
        stored, secret = await services.stored_clients.rotate_secret(client_id, grace=grace, actor=actor,
                                                                     if_match=request.headers.get("if-match"))
    except StoredClientError as exc:
        raise _refused(exc) from None
    return json_response({"client_id": client_id, "client_secret": secret,
                          "previous_secret_expires_at": stored.previous_expires_at}, 200,
                         {**NO_STORE, "ETag": stored.etag})


_INITIAL_TOKEN_REQUEST = {"type": "object", "additionalProperties": False, "properties": {
    "grant_types": {"type": "array", "items": {"type": "string"}, "description": (
        "The grant types a registered client may have (default: authorization_code, refresh_token).")},
    "redirect_uri_patterns": {"type": "array", "items": {"type": "string"}, "description": (
        "Full URIs its redirect URIs must match; `*` is one run of letters, digits and `-` (default: none, any "
        "redirect URI a client may have).")},
    "scope": {"type": "string", "description": "The scopes it may have besides openid, space-separated."},
    "token_endpoint_auth_methods": {"type": "array", "items": {"type": "string"}, "description": (
        "The authentication methods it may use (default: client_secret_basic, private_key_jwt, none).")},
    "uses": {"type": ["integer", "null"], "minimum": 0, "description": (
        "Registrations it allows (default 1; 0 or null: any number until it expires).")},
    "ttl": {"type": "integer", "minimum": 1, "maximum": 30 * 86400, "description": "Its lifetime, seconds (default "
            "86400)."}}}
_INITIAL_TOKEN_TEXT = "`id`, `expires_at`, `uses` (left; null: any number), `policy`, `created_by`, `created_at`."


@router.post("/initial-access-tokens", status_code=201, summary="Issue an initial access token", openapi_extra={
    "requestBody": {"required": False, "content": {"application/json": {"schema": _INITIAL_TOKEN_REQUEST}}}},
    responses={201: {"description": "`token` (shown once), " + _INITIAL_TOKEN_TEXT}, **_ERRORS})
async def issue_initial_token(request: Request) -> Response:
    """An initial access token for dynamic client registration (RFC 7591 §3) at /oauth/v2/register, with the policy
    the clients registered with it must keep to."""
    actor = await _caller(request, WRITE)
    data = await read_json(request, optional=True)
    try:
        value, token = await token_services(request).initial_tokens.issue_as_asked(data, actor=actor)
    except InitialTokenError as exc:
        raise OAuthError("invalid_request", str(exc)) from None
    return json_response({"token": value, **token.describe()}, 201, NO_STORE)


@router.get("/initial-access-tokens", summary="List initial access tokens", responses={200: {
    "description": "`initial_access_tokens`, newest first, without their values: " + _INITIAL_TOKEN_TEXT},
    **_ERRORS})
async def list_initial_tokens(request: Request) -> Response:
    """The initial access tokens not yet purged (expired and used-up ones go with the purge)."""
    await _caller(request, READ)
    tokens = await token_services(request).initial_tokens.list()
    return json_response({"initial_access_tokens": [token.describe() for token in tokens]}, 200, NO_STORE)


@router.delete("/initial-access-tokens/{token_id}", status_code=204, summary="Revoke an initial access token",
               responses={204: {"description": "revoked"}, 404: {"description": "no such token"}, **_ERRORS})
async def revoke_initial_token(request: Request, token_id: str) -> Response:
    """Revoke an initial access token: it registers no more clients (those it registered stay)."""
    actor = await _caller(request, WRITE)
    if not await token_services(request).initial_tokens.revoke(token_id, actor=actor):
        raise OAuthError("not_found", f"no initial access token {token_id!r}", status=404)
    return Response(status_code=204, headers=NO_STORE)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> Response:
    """This API's OpenAPI description (the server's other surfaces are specified by their RFCs)."""
    await _caller(request, READ)
    return json_response(_openapi_document(token_services(request)), 200)


def _openapi_document(services: TokenServices) -> dict[str, Any]:
    document = get_openapi(title="iam client administration", version=__version__, routes=router.routes,
                           description=__doc__, servers=[{"url": services.settings.issuer.rstrip("/")}])
    document["components"] = {**document.get("components", {}), "securitySchemes": {"bearer": {
        "type": "http", "scheme": "bearer", "description": f"an access token with {READ} / {WRITE}"}}}
    document["security"] = [{"bearer": []}]
    return document


def _quoted(client_id: str) -> str:
    from urllib.parse import quote

    return quote(client_id, safe="")
