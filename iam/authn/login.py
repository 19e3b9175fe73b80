"""The sign-in pages: password, a passkey alone, the second step (TOTP or a passkey), and the start of an SSO
session (iam/authn/web.py holds the cookies, the sign-in request and the signed handoff back to the token role).

Forms work without JavaScript (but for passkeys: iam/assets/passkeys.js) and carry a CSRF token (double-submit
cookie). Failures say only "incorrect username or password", and are throttled as iam/authn/throttle.py describes.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.authn.consent import hand_off_or_ask
from iam.authn.passkeys import PasskeyRejected
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
    json_error,
    json_options,
    page,
    posted_form,
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
                    passkeys=services.settings.password_login,  # iam's own accounts: passkeys are theirs
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
    # acr_values preferring the second factor: a session of one factor signs in again when the user has a second
    # factor (else the ID token says the acr it has: acr is a voluntary claim).
    return not (flow.wants_mfa and acr_of(session.amr) != ACR_MFA
                and await second_factor_needed(request, session.subject))


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
    if await second_factor_needed(request, subject):
        # The second factor is guessed under the same account as the password was (acct).
        return await second_factor(request, flow, subject, acct=account)
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


async def second_factor_needed(request: Request, subject: str) -> bool:
    """Whether a first factor is followed by a second step: the person has TOTP on, or a passkey."""
    services = authn_services(request)
    return await services.totp.enabled(subject) or await services.passkeys.registered(subject)


async def second_factor(request: Request, flow: Flow, subject: str, **signed_in) -> Response:
    """The second step after a first factor; `signed_in` is how the person got this far (the throttle's account
    `acct`; a connector's amr, acr and id)."""
    pending = authn_services(request).identity.sign(
        Role.AUTHENTICATION, MFA_TYP, {"sub": subject, "flow": flow.fields(), **signed_in},
        issuer=Role.AUTHENTICATION, ttl=MFA_TTL)
    return await _second_step(request, pending, subject)


async def _second_step(request: Request, mfa: str, subject: str, status: int = 200, error: str | None = None
                       ) -> Response:
    """The second step's page: a TOTP or recovery code, and a passkey, whichever the person has."""
    services = authn_services(request)
    return page(request, "totp.html", status, mfa=mfa, error=error, totp=await services.totp.enabled(subject),
                passkey=await services.passkeys.registered(subject))


async def _pending(request: Request, token: str) -> tuple[dict, Flow] | None:
    """The signed state of a sign-in waiting for its second step, and its flow; None when expired or forged."""
    try:
        pending = await authn_services(request).peer_keys.verify(
            token, issuer=Role.AUTHENTICATION, audience=role_id(Role.AUTHENTICATION), typ=MFA_TYP, max_ttl=MFA_TTL)
        return pending, Flow.parse(pending["flow"])
    except (PeerRejected, ValueError, KeyError, TypeError):
        return None


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
    waiting = await _pending(request, form.get("mfa", ""))
    if waiting is None:
        return error_page(*_EXPIRED)
    pending, flow = waiting
    subject = pending["sub"]
    account = pending.get("acct", subject)
    address = client_address(request, services.settings.trusted_proxies)
    if await services.throttle.check(account, address, known_device(request)):
        return await _second_step(request, form["mfa"], subject, 429, "Too many attempts. Try again later.")
    # A recovery code stands in for the TOTP code, guessed and throttled the same way.
    used = await services.totp.second_step(subject, form.get("code", ""))
    if used == RECOVERY_CODE:
        audit("mfa.recovery_code_used", actor=subject, source=source_of(request), client_id=flow.client_id,
              left=await services.totp.recovery_codes_left(subject))
    if used is None:
        await services.throttle.fail(account, address)
        LOGINS.labels("mfa_failure").inc()
        audit("mfa.failed", "failure", actor=subject, source=source_of(request), client_id=flow.client_id)
        return await _second_step(request, form["mfa"], subject, 401, "That code is not valid. Try the current one.")
    await services.throttle.succeeded(account, address)
    first = pending.get("amr", ["pwd"])  # a connector's sign-in carries its own (iam/authn/connector_sign_in.py)
    return await _start_session(request, flow, subject, [*first, "otp"], account, acr=pending.get("acr"),
                                connector=pending.get("connector"))


_EXPIRED = ("Sign-in expired", "The sign-in took too long. Please start again.")


# -- passkeys (iam/authn/passkeys.py): alone, or as the second step ----------------------------------------------
@router.post("/authn/passkeys/sign-in/options")
async def passkey_options(request: Request) -> Response:
    """navigator.credentials.get()'s options for this browser (its CSRF cookie): for a passkey alone, or, with the
    signed `mfa` state of a sign-in waiting for its second step, for one of that person's passkeys."""
    services = authn_services(request)
    form = await posted_form(request)
    if form is None:
        return json_error(403, "The sign-in form expired. Reload the page and try again.")
    subject = None
    if "mfa" in form:
        waiting = await _pending(request, form["mfa"])
        if waiting is None:
            return json_error(400, _EXPIRED[1])
        subject = waiting[0]["sub"]
    elif not services.settings.password_login:
        return json_error(403, "Sign in with one of the offered providers.")
    try:
        return json_options(await services.passkeys.sign_in_options(form["csrf"], subject))
    except PasskeyRejected:
        return json_error(400, "You have no passkey. Use your code instead.")


@router.post("/authn/login/passkey")
async def passkey_submit(request: Request) -> Response:
    """The browser's answer to those options: a session for a passkey alone (the user verified: amr says the key
    and "mfa"), or the second step after a first factor."""
    services = authn_services(request)
    posted = await sign_in_form(request, lambda form: None if "mfa" in form else Flow.parse(form))
    if isinstance(posted, Response):
        return posted
    form, alone = posted
    if alone is None:
        return await _passkey_second_step(request, form)
    if not services.settings.password_login:
        return error_page("Sign-in method not offered", "Sign in with one of the offered providers.", 403)
    try:
        signed_in = await services.passkeys.authenticate(form.get("credential", ""), form["csrf"])
        user = await services.directory.claims(signed_in.subject)
        if user is None or not user.active:
            raise PasskeyRejected("inactive_user")
    except PasskeyRejected as exc:
        LOGINS.labels("failure").inc()
        audit("login.failed", "failure", source=source_of(request), client_id=alone.client_id, factor="passkey",
              reason=exc.reason)
        return login_form(request, alone, 401, "That passkey could not sign you in. Try again, or use your password.")
    return await _start_session(request, alone, signed_in.subject, signed_in.amr)


async def _passkey_second_step(request: Request, form: dict[str, str]) -> Response:
    services = authn_services(request)
    waiting = await _pending(request, form["mfa"])
    if waiting is None:
        return error_page(*_EXPIRED)
    pending, flow = waiting
    subject = pending["sub"]
    try:
        signed_in = await services.passkeys.authenticate(form.get("credential", ""), form["csrf"], subject)
    except PasskeyRejected as exc:
        LOGINS.labels("mfa_failure").inc()
        audit("mfa.failed", "failure", actor=subject, source=source_of(request), client_id=flow.client_id,
              factor="passkey", reason=exc.reason)
        return await _second_step(request, form["mfa"], subject, 401, "That passkey could not be used. Try again.")
    first = pending.get("amr", ["pwd"])  # a connector's sign-in carries its own (iam/authn/connector_sign_in.py)
    # Two factors, whether or not the authenticator verified the user (RFC 8176 §2 "mfa").
    amr = list(dict.fromkeys([*first, *signed_in.amr, "mfa"]))
    return await _start_session(request, flow, subject, amr, pending.get("acct", subject), acr=pending.get("acr"),
                                connector=pending.get("connector"))
