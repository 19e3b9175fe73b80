"""The user-management role's internal API: claims for the token and authentication roles."""

from fastapi import APIRouter, Request, Response

from iam.errors import json_response
from iam.internal import require_peer
from iam.roles import Role
from iam.users.services import user_services

router = APIRouter()

_NOT_FOUND = {"error": "not_found"}


@router.get("/internal/v1/users/{sub}")
async def user_claims(sub: str, request: Request) -> Response:
    await require_peer(request, Role.USER_MANAGEMENT, Role.TOKEN, Role.AUTHENTICATION)
    claims = await user_services(request).directory.claims(sub)
    return json_response(_NOT_FOUND, 404) if claims is None else json_response(claims.as_dict())


@router.get("/internal/v1/users")
async def find_user(username: str, request: Request) -> Response:
    await require_peer(request, Role.USER_MANAGEMENT, Role.TOKEN, Role.AUTHENTICATION)
    claims = await user_services(request).directory.find(username)
    return json_response(_NOT_FOUND, 404) if claims is None else json_response(claims.as_dict())
