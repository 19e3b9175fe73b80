"""RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0), scoped to the session and the client.

With a valid `id_token_hint`, the requesting client's grants in that session are revoked here; other
clients' grants (a kubectl refresh token, say) are left alone. The person's SSO session is ended by the
authentication role, to which the browser is sent with a signed logout request. The return address
must be registered for the client exactly, or there is no redirect at all.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.errors import OAuthError
from iam.http import read_params
from iam.observability import audit
from iam.pages import HARDENING, error_page
from iam.peers import LOGOUT_TYP
from iam.roles import Role
from iam.token.claims import id_token_hint_claims
from iam.token.services import token_services

router = APIRouter()


@router.api_route("/oauth/v2/end_session", methods=["GET", "POST"])
async def end_session(request: Request) -> Response:
    services = token_services(request)
    try:
        params = await read_params(request)
    except OAuthError as exc:
        return error_page("Invalid sign-out request", exc.description or "The request could not be read.")
    hint = None
    if params.get("id_token_hint"):
        try:
            hint = id_token_hint_claims(services.keys, services.settings.issuer, params["id_token_hint"])
        except ValueError:
            return error_page("Invalid sign-out request", "The id_token_hint was not issued by this server.")
    client_id = params.get("client_id") or (hint or {}).get("aud")
    if hint is not None and client_id != hint.get("aud"):
        return error_page("Invalid sign-out request", "client_id does not match the id_token_hint.")
    client = services.clients.get(client_id) if isinstance(client_id, str) else None
    redirect = params.get("post_logout_redirect_uri")
    if redirect is not None and (client is None or redirect not in client.post_logout_redirect_uris):
        return error_page("Invalid sign-out request", "The address to return to is not registered.")
    claims: dict[str, Any] = {"redirect": redirect, "state": params.get("state")}
    if hint is not None and client is not None and hint.get("sid"):
        revoked = await services.store.revoke_session_grants(hint["sid"], client.client_id)
        audit("token.revoked", actor=hint.get("sub"), client_id=client.client_id, grants=revoked, reason="logout")
        claims["sid"] = hint["sid"]
    logout = services.identity.sign(Role.AUTHENTICATION, LOGOUT_TYP, claims, issuer=Role.TOKEN)
    return RedirectResponse(f"{services.settings.login_base}/authn/logout?{urlencode({'logout': logout})}",
                            303 if request.method == "POST" else 302, headers=HARDENING)
