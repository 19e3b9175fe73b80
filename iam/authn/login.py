"""The sign-in pages: password, optional TOTP, and the start of an SSO session (iam/authn/web.py holds the
cookies, the sign-in request and the signed handoff back to the token role).

Forms work without JavaScript and carry a CSRF token (double-submit cookie). Failures say only
"incorrect username or password", and are throttled as iam/authn/throttle.py describes.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.authn.consent import hand_off_or_ask
from iam.authn.services import authn_services
from iam.authn.throttle import DEVICE_COOKIE, DEVICE_TTL
from iam.authn.totp import RECOVERY_CODE
from iam.authn.web import (
    Flow,
    client_name,
    client_of,
    cookie_name,
    current_session,
    handoff,
    page,
    set_cookie,
    sign_in_form,
)
from iam.errors import OAuthError, PeerRejected
from iam.formats import ACR_MFA, acr_of
from iam.http import client_address, parse_params
from iam.observability import LOGINS, audit, source_of
from iam.pages import HARDENING, error_page
from iam.peers import role_id
from iam.roles import Role

router = APIRouter()

MFA_TYP = "iam-mfa+jwt"  # password accepted, second factor pending (authentication -> itself)
MFA_TTL = 300


async def _signed_in(request: Request, flow: Flow, session) -> Response:
    if flow.device is not None:  # back to the device verification page, on this origin only
        return RedirectResponse(f"/authn/device?{urlencode({'user_code': flow.device})}", 303, headers=HARDENING)
    if flow.request is None:
        return RedirectResponse("/authn/account", 303, headers=HARDENING)
    return await hand_off_or_ask(request, flow, session)


def session_allowed(request: Request, flow: Flow, session) -> bool:
    """A session from a connector serves only clients that offer that connector (ClientConfig.connectors)."""
    client = client_of(request, flow)
    return session.connector is None or client is None or client.connectors is None or \
        session.connector in client.connectors


def login_form(request: Request, flow: Flow, status: int = 200, error: str | None = None,
                username: str | None = None, account: str | None = None, connector=None) -> Response:
    """The sign-in page: iam's own form (unless `password_login: false`) and a link per connector offered; or,
    with `connector`, the username/password form of that (LDAP) connector. `account`: the session's user, whom
    prompt=select_account offers to continue as."""
    services = authn_services(request)
    offered = services.connectors.offered(client_of(request, flow))
    links = [{"name": c.name, "href": f"/authn/connectors/{c.id}/login?{flow.query()}"} for c in offered]
    if connector is None:
        return page(request, "login.html", status, flow=flow.fields(), client_name=client_name(request, flow),
                    error=error, username=username or flow.login_hint or "", account=account, connectors=links,
                    action="/authn/login", password_form=services.settings.password_login,
                    forgot_password=services.settings.password_login and services.mailer.configured)
    others = services.settings.password_login or len(offered) > 1
    return page(request, "login.html", status, flow=flow.fields(), client_name=client_name(request, flow),
                error=error, username=username or flow.login_hint or "",
                action=f"/authn/connectors/{connector.id}/login", connector_name=connector.name, password_form=True,
                other_methods=f"/authn/login?{flow.query()}" if others else None)


async def _reusable(request: Request, flow: Flow, session) -> bool:
    """Whether the SSO session answers this sign-in request without a new sign-in (OIDC Core §3.1.2.1)."""
    services = authn_services(request)
    if session is None or "login" in flow.prompt or not session_allowed(request, flow, session):
        return False
    if flow.max_age is not None and services.sessions.clock() - session.auth_time > flow.max_age:
        return False
    # acr_values preferring the second factor: a session of one factor signs in again when the user has TOTP
    # (else the ID token says the acr it has: acr is a voluntary claim).
    return not (flow.wants_mfa and acr_of(session.amr) != ACR_MFA and await services.totp.enabled(session.subject))


@router.get("/authn/login")
async def login_page(request: Request) -> Response:
    try:
        flow = Flow.parse(parse_params(request.url.query))
    except (OAuthError, ValueError):
        return error_page("Invalid sign-in request", "The sign-in link is malformed. Start again from the application.")
    session = await current_session(request)
    if await _reusable(request, flow, session):
        if "select_account" in flow.prompt:  # one session per browser: continue with it, or sign in as another
            user = await authn_services(request).directory.claims(session.subject)
            return login_form(request, flow, account=user.preferred_username if user else session.subject)
        return await _signed_in(request, flow, session)  # SSO: no new sign-in
    if "none" in flow.prompt and flow.request:
        return handoff(request, flow, {"error": "login_required",
                                        "error_description": "the user is not signed in"})
    offered = authn_services(request).connectors.offered(client_of(request, flow))
    if len(offered) == 1 and not authn_services(request).settings.password_login:
        # Nothing to choose: straight to the one way of signing in.
        return RedirectResponse(f"/authn/connectors/{offered[0].id}/login?{flow.query()}", 303, headers=HARDENING)
    return login_form(request, flow)


@router.post("/authn/login")
async def login_submit(request: Request) -> Response:
    services = authn_services(request)
    posted = await sign_in_form(request, Flow.parse)
    if isinstance(posted, Response):
        return posted
    form, flow = posted
    if not services.settings.password_login:
        return error_page("Sign-in method not offered", "Sign in with one of the offered providers.", 403)
    username = form.get("username", "").strip()[:255]
    password = form.get("password", "")
    account, address = username, client_address(request, services.settings.trusted_proxies)
    wait = await services.throttle.check(account, address, known_device(request))
    source = source_of(request)
    if wait:
        LOGINS.labels("locked").inc()
        audit("login.locked", "failure", source=source, username=username, client_id=flow.client_id)
        minutes = max(1, round(wait / 60))
        return login_form(request, flow, 429, f"Too many attempts. Try again in {minutes} minute(s).", username)
    user = await services.directory.find(username) if username else None
    subject = user.sub if user is not None and user.active else None
    if not await services.credentials.verify(subject, password) or subject is None:
        await services.throttle.fail(account, address)
        LOGINS.labels("failure").inc()
        audit("login.failed", "failure", actor=subject, source=source, username=username, client_id=flow.client_id)
        return login_form(request, flow, 401, "Incorrect username or password.", username)
    await services.throttle.succeeded(account, address)
    if await services.totp.enabled(subject):
        # The second factor is guessed under the same account as the password was (acct).
        return second_factor(request, flow, subject, acct=account)
    return await _start_session(request, flow, subject, ["pwd"], account)


@router.post("/authn/login/continue")
async def continue_as(request: Request) -> Response:
    """prompt=select_account: the person chose the account they are signed in with."""
    posted = await sign_in_form(request, Flow.parse)
    if isinstance(posted, Response):
        return posted
    _, flow = posted
    session = await current_session(request)
    if not await _reusable(request, flow, session):
        return login_form(request, flow)
    return await _signed_in(request, flow, session)


def known_device(request: Request) -> str | None:
    """The browser's known-device cookie (see iam/authn/throttle.py), if it sent one."""
    return request.cookies.get(cookie_name(request, DEVICE_COOKIE))


def second_factor(request: Request, flow: Flow, subject: str, **signed_in) -> Response:
    """The TOTP step after a first factor; `signed_in` is how the person got this far (the throttle's account
    `acct`; a connector's amr, acr and id)."""
    pending = authn_services(request).identity.sign(
        Role.AUTHENTICATION, MFA_TYP, {"sub": subject, "flow": flow.fields(), **signed_in},
        issuer=Role.AUTHENTICATION, ttl=MFA_TTL)
    return page(request, "totp.html", mfa=pending)


async def _start_session(request: Request, flow: Flow, subject: str, amr: list[str], account: str | None = None,
                         *, acr: str | None = None, connector: str | None = None) -> Response:
    services = authn_services(request)
    old = request.cookies.get(cookie_name(request, "iam_session"))
    if old:
        await services.sessions.end(old)  # a new id at every sign-in (ASVS V7.2.4)
    value, session = await services.sessions.create(subject, amr, acr=acr, connector=connector)
    LOGINS.labels("success").inc()
    extra = {} if connector is None else {"connector": connector}
    audit("login.succeeded", actor=subject, source=source_of(request), client_id=flow.client_id, amr=amr,
          sid=session.sid, **extra)
    response = await _signed_in(request, flow, session)
    set_cookie(request, response, "iam_session", value)
    if account is not None:  # this browser is now known for the account: password guessing elsewhere spares it
        set_cookie(request, response, DEVICE_COOKIE, services.throttle.device_cookie(account), max_age=DEVICE_TTL)
    return response


@router.post("/authn/login/totp")
async def totp_submit(request: Request) -> Response:
    services = authn_services(request)
    posted = await sign_in_form(request, lambda form: None)  # the flow is in the signed `mfa` token
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    try:
        pending = await services.peer_keys.verify(form.get("mfa", ""), issuer=Role.AUTHENTICATION,
                                             audience=role_id(Role.AUTHENTICATION), typ=MFA_TYP, max_ttl=MFA_TTL)
        flow = Flow.parse(pending["flow"])
    except (PeerRejected, ValueError, KeyError, TypeError):
        return error_page("Sign-in expired", "The sign-in took too long. Please start again.")
    subject = pending["sub"]
    account = pending.get("acct", subject)
    address = client_address(request, services.settings.trusted_proxies)
    if await services.throttle.check(account, address, known_device(request)):
        return page(request, "totp.html", 429, mfa=form["mfa"], error="Too many attempts. Try again later.")
    # A recovery code stands in for the TOTP code, guessed and throttled the same way.
    used = await services.totp.second_step(subject, form.get("code", ""))
    if used == RECOVERY_CODE:
        audit("mfa.recovery_code_used", actor=subject, source=source_of(request), client_id=flow.client_id,
              left=await services.totp.recovery_codes_left(subject))
    if used is None:
        await services.throttle.fail(account, address)
        LOGINS.labels("mfa_failure").inc()
        audit("mfa.failed", "failure", actor=subject, source=source_of(request), client_id=flow.client_id)
        return page(request, "totp.html", 401, mfa=form["mfa"], error="That code is not valid. Try the current one.")
    await services.throttle.succeeded(account, address)
    first = pending.get("amr", ["pwd"])  # a connector's sign-in carries its own (iam/authn/connector_sign_in.py)
    return await _start_session(request, flow, subject, [*first, "otp"], account, acr=pending.get("acr"),
                                connector=pending.get("connector"))
