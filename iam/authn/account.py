"""The signed-in person's own pages: account, TOTP enrolment, and signing out (OIDC RP-Initiated Logout)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.authn.login import clear_cookie, cookie_name, csrf_ok, current_session, page
from iam.authn.totp import TotpAlreadyEnabled, provisioning
from iam.errors import OAuthError
from iam.http import parse_params, read_form, with_params
from iam.observability import audit, source_of
from iam.pages import HARDENING, error_page, render
from iam.peers import LOGOUT_TYP, PeerRejected, role_id
from iam.roles import Role

router = APIRouter()


def _to_login() -> Response:
    return RedirectResponse("/authn/login", 303, headers=HARDENING)


async def _form(request: Request) -> dict[str, str] | None:
    try:
        form = await read_form(request)
    except OAuthError:
        return None
    return form if csrf_ok(request, form) else None


@router.get("/authn/account")
async def account(request: Request, notice: str | None = None) -> Response:
    iam = request.app.state.iam
    session = await current_session(request)
    if session is None:
        return _to_login()
    user = await iam.directory.claims(session.subject)
    return page(request, "account.html", user=user, totp_enabled=await iam.totp.enabled(session.subject),
                notice=notice, links=getattr(iam, "account_links", []))


@router.get("/authn/totp/setup")
async def totp_setup(request: Request) -> Response:
    iam = request.app.state.iam
    session = await current_session(request)
    if session is None:
        return _to_login()
    try:
        secret = await iam.totp.start_enrolment(session.subject)
    except TotpAlreadyEnabled:
        return await account(request, notice="Two-step verification is already on.")
    return await _setup_page(request, session.subject, secret)


async def _setup_page(request: Request, subject: str, secret: str, error: str | None = None) -> Response:
    user = await request.app.state.iam.directory.claims(subject)
    _, qr = provisioning(secret, user.preferred_username if user else subject)
    return page(request, "totp_setup.html", 400 if error else 200, secret=secret, qr=qr, error=error)


@router.post("/authn/totp/setup")
async def totp_confirm(request: Request) -> Response:
    iam = request.app.state.iam
    session = await current_session(request)
    form = await _form(request)
    if session is None or form is None:
        return error_page("Session expired", "Sign in again to set up two-step verification.", 403)
    if await iam.totp.verify(session.subject, form.get("code", ""), confirming=True):
        audit("mfa.enrolled", actor=session.subject, source=source_of(request), factor="totp")
        return await account(request, notice="Two-step verification is on.")
    secret = await iam.totp.pending_secret(session.subject)
    if secret is None:
        return _to_login()
    return await _setup_page(request, session.subject, secret, "That code is not valid. Try the current one.")


async def _logout_request(request: Request, token: str | None) -> dict | None:
    """The token role's signed logout request (sid to end, where to return), if one came along and is valid."""
    if not token:
        return None
    try:
        return await request.app.state.iam.peer_keys.verify(
            token, issuer=Role.TOKEN, audience=role_id(Role.AUTHENTICATION), typ=LOGOUT_TYP
        )
    except PeerRejected:
        return None


@router.get("/authn/logout")
async def logout_page(request: Request) -> Response:
    try:
        token = parse_params(request.url.query).get("logout")
    except OAuthError:
        token = None
    logout = await _logout_request(request, token)
    session = await current_session(request)
    if logout is not None and logout.get("sid") and session is not None and session.sid == logout["sid"]:
        # The client's id_token_hint names this browser's session: sign out without asking. Otherwise
        # the person is asked first (OIDC RP-Initiated Logout §2).
        return await _sign_out(request, logout)
    return page(request, "logout.html", logout=token if logout is not None else None)


@router.post("/authn/logout")
async def logout_submit(request: Request) -> Response:
    form = await _form(request)
    if form is None:
        return error_page("Session expired", "The sign-out form expired. Go back and try again.", 403)
    return await _sign_out(request, await _logout_request(request, form.get("logout")) or {})


async def _sign_out(request: Request, logout: dict) -> Response:
    iam = request.app.state.iam
    # Only this browser's session ends: a logout request for another session was confirmed by this person
    # for their own session, and must not sign out someone else.
    value = request.cookies.get(cookie_name(request, "iam_session"))
    if value:
        await iam.sessions.end(value)
    audit("session.ended", source=source_of(request), sid=logout.get("sid"), reason="logout")
    redirect = logout.get("redirect")
    if redirect:
        response = RedirectResponse(with_params(redirect, {"state": logout.get("state")}), 303, headers=HARDENING)
    else:
        response = render("signed_out.html")
    clear_cookie(request, response, "iam_session")
    return response
