"""The token role's internal API (`/internal/v1/...`): what the other roles ask of it, each caller proving its
role with a service assertion (iam/internal.py). Never routed by the ingress.
"""

import hashlib
import json
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError

from iam.errors import NO_STORE, OAuthError, json_response
from iam.internal import require_peer
from iam.peers import MAX_SIDS, ClientView
from iam.roles import Role
from iam.token.services import token_services

router = APIRouter()

INACTIVE = {"active": False}


@router.post("/internal/v1/introspect")
async def introspect_for_peer(request: Request) -> Response:
    """The same answer for the other roles, which prove their role instead of holding a client secret."""
    await require_peer(request, Role.TOKEN, Role.USER_MANAGEMENT, Role.AUTHENTICATION)
    try:
        token = (await request.json())["token"]
        if not isinstance(token, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise OAuthError("invalid_request", "body must be {\"token\": string}") from None
    live = await token_services(request).access_tokens.live(token)
    if live is None:
        return json_response(INACTIVE, 200, NO_STORE)
    return Response(live.introspection_json, 200, NO_STORE, media_type="application/json")


@router.get("/internal/v1/clients")
async def clients_for_peer(request: Request) -> Response:
    """The enabled stored clients as the authentication role's sign-in pages need them (name, connectors, consent);
    it asks every few seconds, with If-None-Match."""
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    views = [ClientView.of(client) for client in token_services(request).clients.stored()]
    body = json.dumps({"clients": [asdict(view) for view in views]}, separators=(",", ":"), sort_keys=True).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, 200, {**NO_STORE, "ETag": etag}, media_type="application/json")


@router.post("/internal/v1/subjects/{sub}/revoke")
async def revoke_subject(sub: str, request: Request) -> Response:
    """A disabled or deleted user (told by the user-management role): every grant and token of theirs ends."""
    await require_peer(request, Role.TOKEN, Role.USER_MANAGEMENT)
    await token_services(request).store.revoke_subject(sub)
    return Response(status_code=204)


class SessionsEnded(BaseModel):
    sub: str = Field(min_length=1, max_length=255)
    sids: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=MAX_SIDS)] | None


@router.post("/internal/v1/sessions/ended")
async def sessions_ended(request: Request) -> Response:
    """The authentication role ended SSO sessions of a person (`sids`; null: every one of theirs): the clients
    that took part are sent logout tokens (iam/token/backchannel.py), off the request path. 202 {"queued": n}."""
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    try:
        ended = SessionsEnded.model_validate_json(await request.body())
    except ValidationError:
        raise OAuthError("invalid_request",
                         "body must be {\"sub\": string, \"sids\": [string] or null}") from None
    queued = await token_services(request).backchannel.sessions_ended(ended.sub, ended.sids)
    return json_response({"queued": queued}, 202)


@router.get("/internal/v1/subjects/{sub}/applications")
async def applications_for_peer(sub: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    return json_response({"applications": await token_services(request).app_access.applications(sub)})


@router.delete("/internal/v1/subjects/{sub}/applications/{client_id:path}")
async def remove_for_peer(sub: str, client_id: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    removed = await token_services(request).app_access.remove(sub, client_id)
    return json_response({"removed": removed})


@router.get("/internal/v1/device/{user_code}")
async def lookup_for_peer(user_code: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    found = await token_services(request).device_approvals.device_lookup(user_code)
    return json_response(found or {"error": "not_found"}, 200 if found else 404)


@router.post("/internal/v1/device/{user_code}")
async def decide_for_peer(user_code: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    try:
        body = await request.json()
        approve, session = bool(body["approve"]), body["session"]
        if not isinstance(session, dict) or not isinstance(session.get("sub"), str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise OAuthError("invalid_request", "body must be {approve, session}") from None
    decided = await token_services(request).device_approvals.device_decide(user_code, approve, session)
    return json_response({"decided": decided}, 200 if decided else 409)
