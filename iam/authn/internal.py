"""The authentication role's internal API: the user-management role sets and removes credentials here.

Errors are OAuth-style JSON bodies (`error`, `error_description`), as everywhere else.
"""

from fastapi import APIRouter, Request, Response

from iam.authn.services import authn_services
from iam.errors import OAuthError, PasswordRejected, json_response
from iam.internal import require_peer
from iam.roles import Role

router = APIRouter()


@router.put("/internal/v1/credentials/{sub}")
async def set_password(sub: str, request: Request) -> Response:
    await require_peer(request, Role.AUTHENTICATION, Role.USER_MANAGEMENT)
    try:
        body = await request.json()
        password = body["password"]
        if not isinstance(password, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise OAuthError("invalid_request", "the body must be a JSON object with a string password") from None
    try:
        await authn_services(request).credentials.set_password(sub, password)
    except PasswordRejected as exc:
        raise OAuthError("invalid_request", str(exc)) from None
    return Response(status_code=204)


@router.delete("/internal/v1/sessions/{sub}")
async def end_sessions(sub: str, request: Request) -> Response:
    """A disabled or deleted user: every SSO session of theirs ends."""
    await require_peer(request, Role.AUTHENTICATION, Role.USER_MANAGEMENT)
    await authn_services(request).sessions.end_all(sub)
    return Response(status_code=204)


@router.delete("/internal/v1/credentials/{sub}")
async def remove_password(sub: str, request: Request) -> Response:
    await require_peer(request, Role.AUTHENTICATION, Role.USER_MANAGEMENT)
    await authn_services(request).credentials.remove(sub)
    return Response(status_code=204)


@router.delete("/internal/v1/credentials/{sub}/second-factor")
async def reset_second_factor(sub: str, request: Request) -> Response:
    await require_peer(request, Role.AUTHENTICATION, Role.USER_MANAGEMENT)
    removed = await authn_services(request).credentials.reset_second_factor(sub)
    return Response(status_code=204) if removed else json_response({"error": "not_found"}, 404)


@router.post("/internal/v1/credentials/{sub}/verification")
async def send_verification(sub: str, request: Request) -> Response:
    """Mail the user an address verification link (a SCIM create with sendVerification): 204 sent, 409 not."""
    await require_peer(request, Role.AUTHENTICATION, Role.USER_MANAGEMENT)
    sent = await authn_services(request).credentials.send_verification(sub)
    return Response(status_code=204) if sent else json_response({"error": "not_sent"}, 409)


@router.post("/internal/v1/upstream-identities/recheck")
async def recheck_upstream(request: Request) -> Response:
    """Refresh of a grant signed in through a connector: may the person go on? (iam/authn/connectors/recheck.py)"""
    await require_peer(request, Role.AUTHENTICATION, Role.TOKEN)
    try:
        body = await request.json()
        sub, connector = body["sub"], body["connector"]
        if not isinstance(sub, str) or not isinstance(connector, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return json_response({"error": "invalid_request",
                              "error_description": "body must be {\"sub\": string, \"connector\": string}"}, 400)
    return json_response({"active": await authn_services(request).upstream_checks.recheck(sub, connector)})
