"""The UserInfo endpoint (OIDC Core §5.3): the user's current claims for an access token's scopes."""

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, insufficient_scope, invalid_token, json_response
from iam.formats import jwt_claims
from iam.http import bearer_token
from iam.token.claims import scoped_claims
from iam.token.services import token_services

router = APIRouter()


@router.api_route("/oauth/v2/userinfo", methods=["GET", "POST"])
async def userinfo(request: Request) -> Response:
    services = token_services(request)
    # RFC 6750 §2.1 header only: tokens in query strings or bodies leak into logs (RFC 9700 §4.3.2).
    token = bearer_token(request)
    if token is None:
        raise invalid_token()
    row = await services.access_tokens.active(token)
    if row is None or row.grant_id is None:
        raise invalid_token("the access token is invalid, expired or revoked")
    scopes = set(jwt_claims(row.jwt).get("scope", "").split())
    if "openid" not in scopes:
        raise insufficient_scope("openid", "userinfo needs the openid scope")
    user = await services.directory.claims(row.subject)
    if user is None or not user.active:
        raise invalid_token("the user is disabled")
    return json_response({"sub": user.sub, **scoped_claims(user, scopes)}, 200, NO_STORE)
