"""The UserInfo endpoint (OIDC Core §5.3): the user's current claims for an access token's scopes."""

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, insufficient_scope, invalid_token, json_response
from iam.formats import jwt_claims
from iam.http import access_token
from iam.token.claims import scoped_claims
from iam.token.senders import check_sender
from iam.token.services import token_services

router = APIRouter()


@router.api_route("/oauth/v2/userinfo", methods=["GET", "POST"])
async def userinfo(request: Request) -> Response:
    services = token_services(request)
    # RFC 6750 §2.1 (or RFC 9449 §7.1) header only: tokens in query strings or bodies leak into logs (RFC 9700 §4.3.2).
    presented = access_token(request)
    if presented is None:
        raise invalid_token()
    scheme, token = presented
    live = await services.access_tokens.live(token)
    if live is None or live.row.grant_id is None:
        raise invalid_token("the access token is invalid, expired or revoked")
    # RFC 9449 §7.1, RFC 8705 §3: userinfo is a protected resource; its URL is the public one, never the Host
    # header's.
    await check_sender(services, request, scheme, token, live.holder, request.method,
                       services.settings.issuer.rstrip("/") + "/oauth/v2/userinfo")
    row = live.row
    scopes = set(jwt_claims(row.jwt).get("scope", "").split())
    if "openid" not in scopes:
        raise insufficient_scope("openid", "userinfo needs the openid scope")
    user = await services.directory.claims(row.subject)
    if user is None or not user.active:
        raise invalid_token("the user is disabled")
    return json_response({"sub": user.sub, **scoped_claims(user, scopes)}, 200, NO_STORE)
