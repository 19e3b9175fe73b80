"""Sign-in through a connector: the authentication role's routes (README, "Sign-in through a connector").

- oidc: `GET /authn/connectors/{id}/login` keeps the upstream request server-side, bound to this browser, and
  sends the browser upstream; `GET /authn/connectors/{id}/callback` (the contract redirect URI) takes it back
  once and lets the connector validate the answer.
- ldap: the username/password form posts to `/authn/connectors/{id}/login`, throttled like iam's own form.

Then, for both: the user from the directory (created or linked on first sign-in), iam's TOTP step when the
connector says `require_mfa` and the user enrolled one, and the session and handoff of every other sign-in.
What the upstream said is logged by reason only, never shown to the person or logged as it is.
"""

from __future__ import annotations

import logging
import re
import secrets

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from iam.authn.connectors import ConnectorError, InvalidCredentials, UpstreamIdentity
from iam.authn.connectors.pending import TTL
from iam.authn.connectors.registry import callback_uri
from iam.authn.login import _start_session, known_device, login_form, second_factor, second_factor_needed
from iam.authn.services import authn_services
from iam.authn.web import Flow, client_of, cookie_name, set_cookie, sign_in_form
from iam.errors import OAuthError, PeerUnavailable, UserDisabled
from iam.http import client_address, parse_params
from iam.observability import CONNECTOR_FAILURES, CONNECTOR_SIGN_INS, LOGINS, audit, source_of, upstream_call
from iam.pages import HARDENING, error_page

log = logging.getLogger("iam.authn.connectors")
router = APIRouter()

BROWSER = "iam_upstream"  # the cookie that binds a pending upstream request to the browser that started it
BROWSER_VALUE = re.compile(r"^[A-Za-z0-9_-]{43}$")
# RFC 8176 §2: the authentication method references iam passes on from an upstream provider.
AMR_VALUES = {"face", "fpt", "geo", "hwk", "iris", "kba", "mca", "mfa", "otp", "pin", "pwd", "rba", "retina", "sc",
              "sms", "swk", "tel", "user", "vbm", "wia"}


def _offered(request: Request, connector_id: str, flow: Flow):
    """The connector's configuration, if it exists and is offered to the flow's client."""
    connectors = authn_services(request).connectors
    config = connectors.config(connector_id)
    if config is None or config not in connectors.offered(client_of(request, flow)):
        return None
    return config


def _unknown() -> Response:
    return error_page("Unknown sign-in method", "This way of signing in is not offered here. Start again from the "
                                                "application.", 404)


def _failed(request: Request, flow: Flow, config, reason: str, *, username: str | None = None,
            status: int | None = None) -> Response:
    """A failed connector sign-in: counted, audited by reason, and the sign-in page again with a plain message."""
    CONNECTOR_SIGN_INS.labels(config.id, "failure").inc()
    CONNECTOR_FAILURES.labels(config.id, reason).inc()
    LOGINS.labels("failure").inc()
    audit("login.failed", "failure", source=source_of(request), client_id=flow.client_id, connector=config.id,
          reason=reason, **({"username": username} if username else {}))
    messages = {
        "unavailable": (503, f"Sign-in with {config.name} is unavailable right now. Try again later."),
        "invalid_credentials": (401, "Incorrect username or password."),
        "disabled": (403, "This account cannot sign in here. Contact your administrator."),
    }
    code, message = messages.get(reason, (400, f"Sign-in with {config.name} did not complete. Please try again."))
    if config.type == "ldap":
        return login_form(request, flow, status or code, message, username, connector=config)
    return login_form(request, flow, status or code, message)


def _parse_flow(params: dict[str, str]) -> Flow | None:
    try:
        return Flow.parse(params)
    except ValueError:
        return None


def _posted_flow(form: dict[str, str]) -> Flow:
    if not form:
        raise ValueError("an empty form")
    return Flow.parse(form)


@router.get("/authn/connectors/{connector_id}/login")
async def connector_login(connector_id: str, request: Request) -> Response:
    services = authn_services(request)
    try:
        flow = _parse_flow(parse_params(request.url.query))
    except OAuthError:
        flow = None
    if flow is None:
        return error_page("Invalid sign-in request", "The sign-in link is malformed. Start again from the application.")
    config = _offered(request, connector_id, flow)
    if config is None:
        return _unknown()
    if config.type == "ldap":
        return login_form(request, flow, connector=config)
    try:
        with upstream_call(config.id, "start"):
            # login_hint goes upstream (OIDC Core §3.1.2.1): the provider may pre-fill its own form.
            connector = services.connectors.redirect(config.id)
            location, pending = await connector.start(callback_uri(services.settings, config.id),
                                                      login_hint=flow.login_hint)
    except ConnectorError as exc:
        log.warning("connector %s: the sign-in could not start (%s)", config.id, exc.reason)
        return _failed(request, flow, config, exc.reason)
    browser = request.cookies.get(cookie_name(request, BROWSER), "")
    if not BROWSER_VALUE.match(browser):
        browser = secrets.token_urlsafe(32)
    await services.pending_upstream.keep(browser, pending, {**flow.fields(), **({"login_hint": flow.login_hint}
                                                                           if flow.login_hint else {})})
    response = RedirectResponse(location, 303, headers=HARDENING)
    set_cookie(request, response, BROWSER, browser, max_age=TTL)
    return response


@router.get("/authn/connectors/{connector_id}/callback")
async def connector_callback(connector_id: str, request: Request) -> Response:
    services = authn_services(request)
    config = services.connectors.config(connector_id)
    if config is None or config.type != "oidc":
        return _unknown()
    try:
        params = parse_params(request.url.query)
    except OAuthError:
        params = {}
    taken = await services.pending_upstream.take(config.id, params.get("state"),
                                            request.cookies.get(cookie_name(request, BROWSER)))
    if taken is None:
        CONNECTOR_FAILURES.labels(config.id, "state").inc()
        audit("login.failed", "failure", source=source_of(request), connector=config.id, reason="state")
        return error_page("Sign-in expired", "This sign-in has expired, was already used, or was started in another "
                                             "browser. Please start again from the application.")
    pending, flow_fields = taken
    flow = _parse_flow(flow_fields) or Flow(None, None, frozenset(), None, None)
    try:
        with upstream_call(config.id, "finish"):
            connector = services.connectors.redirect(config.id)
            identity = await connector.finish(callback_uri(services.settings, config.id), params, pending)
    except ConnectorError as exc:
        log.warning("connector %s: the upstream sign-in failed (%s)", config.id, exc.reason)
        return _failed(request, flow, config, exc.reason)
    return await _upstream_signed_in(request, flow, config, identity)


@router.post("/authn/connectors/{connector_id}/login")
async def connector_password(connector_id: str, request: Request) -> Response:
    """An LDAP connector's form: the password is checked by the directory server and never stored here."""
    services = authn_services(request)
    posted = await sign_in_form(request, _posted_flow)
    if isinstance(posted, Response):
        return posted
    form, flow = posted
    config = _offered(request, connector_id, flow)
    if config is None or config.type != "ldap":
        return _unknown()
    username = form.get("username", "").strip()[:255]
    password = form.get("password", "")
    # The same throttle as iam's own form (iam/authn/throttle.py), with the directory's accounts apart from iam's.
    account = f"ldap:{config.id}:{username}"
    address = client_address(request, services.settings.trusted_proxies)
    if await services.throttle.check(account, address, known_device(request)):
        LOGINS.labels("locked").inc()
        audit("login.locked", "failure", source=source_of(request), username=username, client_id=flow.client_id,
              connector=config.id)
        return login_form(request, flow, 429, "Too many attempts. Try again in a few minutes.", username,
                          connector=config)
    try:
        if not username or not password:  # an empty password is an anonymous bind in LDAP: never a sign-in
            raise InvalidCredentials("empty username or password")
        with upstream_call(config.id, "authenticate"):
            identity = await services.connectors.password(config.id).authenticate(username, password)
    except InvalidCredentials:
        await services.throttle.fail(account, address)
        return _failed(request, flow, config, "invalid_credentials", username=username)
    except ConnectorError as exc:  # the directory is down or refused iam itself: not the person's attempt
        log.warning("connector %s: the directory could not check a password (%s)", config.id, exc.reason)
        return _failed(request, flow, config, exc.reason, username=username)
    await services.throttle.succeeded(account, address)
    return await _upstream_signed_in(request, flow, config, identity, username=username, account=account)


def _amr(config, identity: UpstreamIdentity) -> list[str]:
    """How the person authenticated: a password checked by the directory (ldap), or what the provider reports
    (RFC 8176 values only; none reported: no amr)."""
    if config.type == "ldap":
        return ["pwd"]
    return [value for value in dict.fromkeys(identity.amr) if value in AMR_VALUES]


async def _upstream_signed_in(request: Request, flow: Flow, config, identity: UpstreamIdentity, *,
                              username: str | None = None, account: str | None = None) -> Response:
    """After the upstream said who it is: the user from the directory, then TOTP or the session. `account` is the
    throttle's name for a password sign-in (its browser becomes a known device for it)."""
    services = authn_services(request)
    try:
        user = await services.upstream_accounts.provision(identity, config.link_by)
    except UserDisabled:
        return _failed(request, flow, config, "disabled", username=username)
    except PeerUnavailable:
        return _failed(request, flow, config, "unavailable", username=username)
    CONNECTOR_SIGN_INS.labels(config.id, "success").inc()
    acr = identity.acr[:255] if identity.acr else None
    if config.require_mfa and await second_factor_needed(request, user.sub):
        return await second_factor(request, flow, user.sub, amr=_amr(config, identity), acr=acr, connector=config.id,
                             **({"acct": account} if account else {}))
    return await _start_session(request, flow, user.sub, _amr(config, identity), account, acr=acr,
                                connector=config.id)
