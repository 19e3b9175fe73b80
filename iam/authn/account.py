"""The signed-in person's own pages: account, password change, TOTP enrolment, passkeys, and signing out (OIDC
RP-Initiated Logout)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.authn.login import known_device
from iam.authn.passkeys import PasskeyRejected
from iam.authn.services import authn_services
from iam.authn.sessions import Session
from iam.authn.totp import TotpAlreadyEnabled, provisioning
from iam.authn.web import (
    clear_cookie,
    cookie_name,
    current_session,
    json_error,
    json_options,
    page,
    posted_form,
)
from iam.errors import OAuthError, PasswordRejected, PeerRejected, PeerUnavailable
from iam.http import client_address, parse_params, with_params
from iam.observability import audit, source_of
from iam.pages import HARDENING, error_page, render
from iam.peers import LOGOUT_TYP, role_id
from iam.roles import Role

router = APIRouter()


def _to_login() -> Response:
    return RedirectResponse("/authn/login", 303, headers=HARDENING)


AccountChange = Callable[[Request, Session, dict[str, str]], Awaitable[Response]]


def _account_change(what: str) -> Callable[[AccountChange], Callable[[Request], Awaitable[Response]]]:
    """A form posted from the account pages: `handler` gets the signed-in person's session and the form, whose CSRF
    token is checked; without both, the person sees that the session expired and is asked to sign in again to
    `what`."""
    def decorate(handler: AccountChange) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = await current_session(request)
            form = await posted_form(request)
            if session is None or form is None:
                return error_page("Session expired", f"Sign in again to {what}.", 403)
            return await handler(request, session, form)
        # not functools.wraps: FastAPI would read the handler's signature through __wrapped__
        endpoint.__name__, endpoint.__doc__ = handler.__name__, handler.__doc__
        return endpoint
    return decorate


@router.get("/authn/account")
async def account_page(request: Request) -> Response:
    return await account(request)


async def account(request: Request, notice: str | None = None, status: int = 200) -> Response:
    """The account page, with a notice of what was just done (never one taken from the URL)."""
    services = authn_services(request)
    session = await current_session(request)
    if session is None:
        return _to_login()
    user = await services.directory.claims(session.subject)
    try:
        applications = await services.app_access.applications(session.subject)
    except PeerUnavailable:
        applications = None  # the page still works; the list says it is unavailable
    totp_enabled = await services.totp.enabled(session.subject)
    can_verify = bool(user and user.email and not user.email_verified and services.mailer.configured)
    return page(request, "account.html", status, user=user, totp_enabled=totp_enabled,
                passkeys=await services.passkeys.of(session.subject),
                recovery_codes_left=await services.totp.recovery_codes_left(session.subject) if totp_enabled else 0,
                can_verify=can_verify, notice=notice, links=services.account_links, applications=applications,
                date=_date)


@router.post("/authn/email/verification")
async def send_verification(request: Request) -> Response:
    """The signed-in person asks for a link that verifies their address."""
    services = authn_services(request)
    session = await current_session(request)
    if session is None or await posted_form(request) is None:
        return error_page("Session expired", "Sign in again to verify your address.", 403)
    sent = await services.email_verification.send(session.subject)
    return await account(request, notice="A link is on its way to your address." if sent else None)


@router.get("/authn/email/verify")
async def verify_form(request: Request) -> Response:
    """The link from the message: a button that verifies (opening a link alone, as a mail scanner does, not)."""
    try:
        token = parse_params(request.url.query).get("token", "")
    except OAuthError:
        token = ""
    if await authn_services(request).email_verification.statement(token) is None:
        return error_page(*_DEAD_VERIFICATION)
    return page(request, "email_verify.html", token=token)


@router.post("/authn/email/verify")
async def verify_submit(request: Request) -> Response:
    form = await posted_form(request)
    if form is None:
        return error_page("Session expired", "Open the link from the message again.", 403)
    if not await authn_services(request).email_verification.confirm(form.get("token", "")):
        return error_page(*_DEAD_VERIFICATION)
    return page(request, "email_verified.html")


_DEAD_VERIFICATION = ("This link is not valid", "The link has expired, is incomplete, or your address changed since "
                      "it was sent. Ask for a new one from your account page.")


def _date(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


@router.post("/authn/account/applications")
@_account_change("manage your applications")
async def remove_application(request: Request, session: Session, form: dict[str, str]) -> Response:
    """Remove an application's access: its refresh and access tokens of this person stop working at once."""
    services = authn_services(request)
    client_id = form.get("client_id", "")
    try:
        removed = await services.app_access.remove(session.subject, client_id)
    except PeerUnavailable:
        return error_page("Try again later", "Your applications cannot be changed right now.", 503)
    await services.store.remove_consent(session.subject, client_id)  # it asks again next time
    if removed:
        audit("access.removed", actor=session.subject, client_id=client_id, source=source_of(request),
              grants=removed)
    return await account(request, notice="Access removed." if removed else None)


@router.get("/authn/totp/setup")
async def totp_setup(request: Request) -> Response:
    services = authn_services(request)
    session = await current_session(request)
    if session is None:
        return _to_login()
    try:
        secret = await services.totp.start_enrolment(session.subject)
    except TotpAlreadyEnabled:
        return await account(request, notice="Two-step verification is already on.")
    return await _setup_page(request, session.subject, secret)


async def _setup_page(request: Request, subject: str, secret: str, error: str | None = None) -> Response:
    user = await authn_services(request).directory.claims(subject)
    _, qr = provisioning(secret, user.preferred_username if user else subject)
    return page(request, "totp_setup.html", 400 if error else 200, secret=secret, qr=qr, error=error)


@router.post("/authn/totp/setup")
@_account_change("set up two-step verification")
async def totp_confirm(request: Request, session: Session, form: dict[str, str]) -> Response:
    services = authn_services(request)
    secret = await services.totp.pending_secret(session.subject)
    if secret is None:
        return await account(request)
    # Whoever holds only the session cannot bind their own authenticator to the account (ASVS 5 V7.5.1).
    if refused := await _reauthenticate(request, session.subject, form.get("password", ""), "mfa enrolment"):
        return await _setup_page(request, session.subject, secret, refused[1])
    if await services.totp.verify(session.subject, form.get("code", ""), confirming=True):
        audit("mfa.enrolled", actor=session.subject, source=source_of(request), factor="totp")
        return await _new_recovery_codes(request, session.subject, "Two-step verification is on.")
    return await _setup_page(request, session.subject, secret, "That code is not valid. Try the current one.")


async def _new_recovery_codes(request: Request, subject: str, notice: str) -> Response:
    """Ten new recovery codes, replacing any earlier ones, on a page shown this once (never cached)."""
    codes = await authn_services(request).totp.new_recovery_codes(subject)
    audit("mfa.recovery_codes_created", actor=subject, source=source_of(request), count=len(codes))
    return page(request, "recovery_codes.html", codes=codes, notice=notice)


@router.post("/authn/totp/recovery-codes")
@_account_change("get new recovery codes")
async def recovery_codes_renew(request: Request, session: Session, form: dict[str, str]) -> Response:
    """New recovery codes (the old ones stop working), after the password is asked again as for enrolment."""
    services = authn_services(request)
    if not await services.totp.enabled(session.subject):
        return await account(request)
    if refused := await _reauthenticate(request, session.subject, form.get("password", ""), "recovery codes"):
        return await account(request, notice=refused[1], status=refused[0])
    return await _new_recovery_codes(request, session.subject, "Your earlier recovery codes no longer work.")


async def _reauthenticate(request: Request, subject: str, password: str, purpose: str) -> tuple[int, str] | None:
    """Re-authentication before a change to the account's credentials, throttled as sign-in is: None when the
    password is right, else the status and message to show."""
    services = authn_services(request)
    user = await services.directory.claims(subject)
    account = user.preferred_username if user and user.preferred_username else subject
    address = client_address(request, services.settings.trusted_proxies)
    if await services.throttle.check(account, address, known_device(request)):
        return 429, "Too many attempts. Try again later."
    if not await services.credentials.verify(subject, password):
        await services.throttle.fail(account, address)
        audit("reauthentication.failed", "failure", actor=subject, source=source_of(request), purpose=purpose)
        return 401, "Your current password is not correct."
    await services.throttle.succeeded(account, address)
    return None


# -- passkeys (iam/authn/passkeys.py) -----------------------------------------------------------------------------
@router.post("/authn/passkeys/registration/options")
async def passkey_registration_options(request: Request) -> Response:
    """navigator.credentials.create()'s options, after the password is asked again as for TOTP (ASVS 5 V7.5.1):
    the challenge, bound to this session and spent by its first use, is what lets a passkey be added."""
    services = authn_services(request)
    session = await current_session(request)
    form = await posted_form(request)
    if session is None or form is None:
        return json_error(403, "Your session expired. Reload the page and sign in again.")
    if refused := await _reauthenticate(request, session.subject, form.get("password", ""), "passkey registration"):
        return json_error(*refused)
    user = await services.directory.claims(session.subject)
    name = user.preferred_username if user and user.preferred_username else session.subject
    try:
        options = await services.passkeys.registration_options(session.subject, name, user.name if user and
                                                               user.name else name, session.sid)
    except PasskeyRejected:
        return json_error(409, "You have as many passkeys as an account may have. Remove one first.")
    return json_options(options)


@router.post("/authn/passkeys")
@_account_change("manage your passkeys")
async def passkey_register(request: Request, session: Session, form: dict[str, str]) -> Response:
    """The browser's answer to those options: the new passkey, named as the person chose."""
    services = authn_services(request)
    try:
        added = await services.passkeys.register(session.subject, session.sid, form.get("credential", ""),
                                                 form.get("name", ""))
    except PasskeyRejected as exc:
        audit("mfa.enrolled", "failure", actor=session.subject, source=source_of(request), factor="passkey",
              reason=exc.reason[:200])
        message = ("That passkey is already registered." if exc.reason == "already_registered"
                   else "The passkey could not be added. Start again from this page.")
        return await account(request, notice=message, status=400)
    audit("mfa.enrolled", actor=session.subject, source=source_of(request), factor="passkey", passkey=added.id)
    return await account(request, notice=f"Passkey \u201c{added.name}\u201d added.")


@router.post("/authn/passkeys/rename")
@_account_change("manage your passkeys")
async def passkey_rename(request: Request, session: Session, form: dict[str, str]) -> Response:
    services = authn_services(request)
    renamed = await services.passkeys.rename(session.subject, form.get("id", ""), form.get("name", ""))
    return await account(request, notice="Passkey renamed." if renamed else None)


@router.post("/authn/passkeys/remove")
@_account_change("manage your passkeys")
async def passkey_remove(request: Request, session: Session, form: dict[str, str]) -> Response:
    """Remove a passkey, after the password is asked again: it changes how the account signs in (ASVS 5 V7.5.1)."""
    services = authn_services(request)
    if refused := await _reauthenticate(request, session.subject, form.get("password", ""), "passkey removal"):
        return await account(request, notice=refused[1], status=refused[0])
    removed = await services.passkeys.remove(session.subject, form.get("id", ""))
    if removed:
        audit("mfa.removed", actor=session.subject, source=source_of(request), factor="passkey",
              passkey=form.get("id", ""))
    return await account(request, notice="Passkey removed." if removed else None)


@router.get("/authn/password")
async def password_form(request: Request) -> Response:
    return await password_page(request)


async def password_page(request: Request, status: int = 200, error: str | None = None) -> Response:
    session = await current_session(request)
    if session is None:
        return _to_login()
    user = await authn_services(request).directory.claims(session.subject)
    return page(request, "password.html", status, error=error,
                username=user.preferred_username if user else "")


@router.post("/authn/password")
async def password_change(request: Request) -> Response:
    """Change one's own password: the current one is required (ASVS 5 V6.2.2-3), throttled as sign-in is."""
    services = authn_services(request)
    session = await current_session(request)
    form = await posted_form(request)
    if session is None or form is None:
        return error_page("Session expired", "Sign in again to change your password.", 403)
    subject = session.subject
    if refused := await _reauthenticate(request, subject, form.get("current", ""), "password change"):
        return await password_page(request, *refused)
    try:
        await services.credentials.set_password(subject, form.get("new", ""))
    except PasswordRejected as exc:
        return await password_page(request, 400, f"Choose another password: {exc}.")
    # Whoever may know the old password is signed out everywhere else (ASVS 5 V7.4.3).
    await services.sessions.end_all(subject, but=session.sid)
    audit("password.changed", actor=subject, source=source_of(request), sid=session.sid)
    return await account(request, notice="Your password was changed. Your other sessions were signed out.")


async def _logout_request(request: Request, token: str | None) -> dict | None:
    """The token role's signed logout request (sid to end, where to return), if one came along and is valid."""
    if not token:
        return None
    try:
        return await authn_services(request).peer_keys.verify(
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
    form = await posted_form(request)
    if form is None:
        return error_page("Session expired", "The sign-out form expired. Go back and try again.", 403)
    return await _sign_out(request, await _logout_request(request, form.get("logout")) or {})


async def _sign_out(request: Request, logout: dict) -> Response:
    services = authn_services(request)
    # Only this browser's session ends: a logout request for another session was confirmed by this person
    # for their own session, and must not sign out someone else.
    value = request.cookies.get(cookie_name(request, "iam_session"))
    if value:
        await services.sessions.end(value)
    audit("session.ended", source=source_of(request), sid=logout.get("sid"), reason="logout")
    redirect = logout.get("redirect")
    if redirect:
        response: Response = RedirectResponse(with_params(redirect, {"state": logout.get("state")}), 303,
                                              headers=HARDENING)
    else:
        response = render("signed_out.html")
    clear_cookie(request, response, "iam_session")
    return response
