"""The user-management role's internal API: claims for the token and authentication roles."""

from fastapi import APIRouter, Request, Response

from iam.errors import UserDisabled, json_response
from iam.internal import require_peer
from iam.peers import UpstreamIdentity
from iam.roles import Role
from iam.users.directory import DirectoryError
from iam.users.services import user_services

router = APIRouter()

_NOT_FOUND = {"error": "not_found"}


@router.get("/internal/v1/users/{sub}")
async def user_claims(sub: str, request: Request) -> Response:
    await require_peer(request, Role.USER_MANAGEMENT, Role.TOKEN, Role.AUTHENTICATION)
    claims = await user_services(request).directory.claims(sub)
    return json_response(_NOT_FOUND, 404) if claims is None else json_response(claims.as_dict())


@router.get("/internal/v1/users")
async def find_user(request: Request, username: str | None = None, email: str | None = None) -> Response:
    """The user with this username, or the one whose verified primary address is `email`."""
    await require_peer(request, Role.USER_MANAGEMENT, Role.TOKEN, Role.AUTHENTICATION)
    directory = user_services(request).directory
    claims = (await directory.find(username) if username is not None
              else await directory.find_by_email(email) if email is not None else None)
    return json_response(_NOT_FOUND, 404) if claims is None else json_response(claims.as_dict())


@router.post("/internal/v1/users/{sub}/sign-out")
async def sign_out_everywhere(sub: str, request: Request) -> Response:
    """Every session and grant of the user ends (a password reset at the authentication role)."""
    await require_peer(request, Role.USER_MANAGEMENT, Role.AUTHENTICATION)
    try:
        actor = str((await request.json()).get("actor", "operator"))[:64]
        await user_services(request).directory.sign_out_everywhere(sub, actor=actor)
    except (ValueError, AttributeError):
        return json_response({"error": "invalid_request"}, 400)
    except DirectoryError:
        return json_response(_NOT_FOUND, 404)
    return Response(status_code=204)


@router.post("/internal/v1/upstream-identities")
async def provision(request: Request) -> Response:
    """An upstream sign-in: the user it is (linked or created), with claims refreshed; 409 if disabled here."""
    await require_peer(request, Role.USER_MANAGEMENT, Role.AUTHENTICATION)
    try:
        body = await request.json()
        identity = UpstreamIdentity.from_json(body["identity"])
        link_by = body.get("link_by")
        if link_by not in (None, "email"):
            raise ValueError("link_by must be null or \"email\"")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return json_response({"error": "invalid_request", "error_description": str(exc)}, 400)
    try:
        claims = await user_services(request).upstream.provision(identity, link_by)
    except UserDisabled:
        return json_response({"error": "account_disabled"}, 409)
    except DirectoryError as exc:  # concurrent changes kept winning: the caller may retry
        return json_response({"error": "temporarily_unavailable", "error_description": str(exc)}, 503)
    return json_response(claims.as_dict())


@router.get("/internal/v1/users/{sub}/upstream/{connector_id}")
async def upstream_subject(sub: str, connector_id: str, request: Request) -> Response:
    await require_peer(request, Role.USER_MANAGEMENT, Role.AUTHENTICATION)
    subject = await user_services(request).upstream.upstream_subject(sub, connector_id)
    return json_response(_NOT_FOUND, 404) if subject is None else json_response({"subject": subject})


@router.post("/internal/v1/users/{sub}/email-verified")
async def confirm_email(sub: str, request: Request) -> Response:
    """A verification link was opened: 204 when the address is still the user's (now verified), else 409."""
    await require_peer(request, Role.USER_MANAGEMENT, Role.AUTHENTICATION)
    try:
        email = (await request.json())["email"]
        if not isinstance(email, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return json_response({"error": "invalid_request"}, 400)
    confirmed = await user_services(request).directory.confirm_email(sub, email)
    return Response(status_code=204) if confirmed else json_response({"error": "address_changed"}, 409)
