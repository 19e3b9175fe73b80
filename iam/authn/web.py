"""The authentication role's browser plumbing, shared by its pages: cookies, the CSRF token, the sign-in request
(`Flow`) a page carries through its forms, the browser's SSO session, and the signed handoff back to the token
role.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from iam.authn.services import authn_services
from iam.config import SCOPE_TOKEN
from iam.errors import OAuthError
from iam.formats import ACR_MFA, PROMPTS, known_acr_values, normalise_user_code
from iam.http import is_digits, read_form
from iam.pages import HARDENING, error_page, render
from iam.peers import HANDOFF_TYP
from iam.roles import Role
from iam.security import constant_time_equal

REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")

# -- cookies --------------------------------------------------------------------------------------------
def _secure(request: Request) -> bool:
    return authn_services(request).settings.login_base.startswith("https://")


def cookie_name(request: Request, name: str) -> str:
    # `__Host-` binds the cookie to this exact origin, https only, path / (RFC 6265bis §4.1.3.2).
    return f"__Host-{name}" if _secure(request) else name


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(cookie_name(request, name), value, max_age=max_age, path="/", secure=_secure(request),
                        httponly=True, samesite="lax")


def clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(cookie_name(request, name), path="/", secure=_secure(request), httponly=True,
                           samesite="lax")


def csrf_token(request: Request, response_cookies: dict) -> str:
    """The CSRF token for this browser (double-submit): reuse the cookie's, or mint one to set."""
    current = request.cookies.get(cookie_name(request, "iam_csrf"))
    if current and re.fullmatch(r"[A-Za-z0-9_-]{43}", current):
        return current
    response_cookies["iam_csrf"] = token = secrets.token_urlsafe(32)
    return token


def csrf_ok(request: Request, form: dict[str, str]) -> bool:
    # A cross-site POST is refused outright (Fetch Metadata), and the token must match the cookie.
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    cookie = request.cookies.get(cookie_name(request, "iam_csrf"), "")
    return bool(cookie) and constant_time_equal(cookie, form.get("csrf", ""))


Parsed = TypeVar("Parsed")


# A passkey's JSON (iam/authn/passkeys.py) may be longer than a form value usually is: bounded by the body limit.
LONG_VALUES = frozenset({"credential"})


async def sign_in_form(request: Request, parse: Callable[[dict[str, str]], Parsed]
                       ) -> tuple[dict[str, str], Parsed] | Response:
    """The form a sign-in page posted and what `parse` reads from it (raising ValueError to refuse), or the
    error page to answer instead: an unreadable form (400), then an expired or cross-site one (403)."""
    try:
        form = await read_form(request, LONG_VALUES)
        parsed = parse(form)
    except (OAuthError, ValueError):
        return error_page("Invalid sign-in request", "The form could not be read. Please start again.")
    if not csrf_ok(request, form):
        return error_page("Session expired", "The sign-in form expired. Go back and try again.", 403)
    return form, parsed


async def posted_form(request: Request) -> dict[str, str] | None:
    """The form a page posted, or None when it cannot be read or its CSRF token does not match."""
    try:
        form = await read_form(request, LONG_VALUES)
    except OAuthError:
        return None
    return form if csrf_ok(request, form) else None


def page(request: Request, template: str, status: int = 200, **context) -> Response:
    """Render a page with a CSRF token for its forms, setting the cookie when it is new."""
    cookies: dict[str, str] = {}
    context["csrf"] = csrf_token(request, cookies)
    response = render(template, status, **context)
    for name, value in cookies.items():
        set_cookie(request, response, name, value)
    return response


def json_options(options: str) -> Response:
    """WebAuthn options (iam/authn/passkeys.py) for the pages' script (iam/assets/passkeys.js)."""
    return Response(options, media_type="application/json", headers=HARDENING)


def json_error(status: int, message: str) -> Response:
    """What the pages' script shows the person instead of asking for a passkey."""
    return JSONResponse({"error": message}, status, headers=HARDENING)


# -- the sign-in request --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flow:
    """What the token role asked for: the pending request it will resume, and the OIDC prompt rules."""

    request: str | None
    client_id: str | None
    prompt: frozenset[str]
    max_age: int | None
    login_hint: str | None
    device: str | None = None  # a user code to return to after sign-in (RFC 8628 verification)
    scope: str | None = None  # what a client that needs consent asks for (the token role checks it again)
    acr_values: str | None = None  # the known acr values asked for, in order of preference

    @classmethod
    def parse(cls, params: dict[str, str]) -> Flow:
        request = params.get("request")
        if request is not None and not REQUEST_ID.match(request):
            raise ValueError("malformed request reference")
        prompt = frozenset((params.get("prompt") or "").split())
        if not prompt <= PROMPTS:
            raise ValueError("invalid prompt")
        max_age = params.get("max_age")
        if max_age is not None and not (is_digits(max_age) and len(max_age) < 10):
            raise ValueError("invalid max_age")
        hint = params.get("login_hint")
        device = params.get("device")
        if device is not None and normalise_user_code(device) is None:
            raise ValueError("malformed user code")
        scope = params.get("scope")
        if scope is not None and (len(scope) > 1000 or not all(SCOPE_TOKEN.match(t) for t in scope.split())):
            raise ValueError("malformed scope")
        return cls(request, params.get("client_id"), prompt, int(max_age) if max_age else None,
                   hint[:255] if hint else None, device, " ".join(scope.split()) if scope else None,
                   known_acr_values(params.get("acr_values")))

    @property
    def wants_mfa(self) -> bool:
        return (self.acr_values or "").split(" ")[0] == ACR_MFA

    def fields(self) -> dict[str, str]:
        """Hidden form fields that carry the flow through the form posts."""
        values = {"request": self.request, "client_id": self.client_id, "prompt": " ".join(sorted(self.prompt)),
                  "max_age": None if self.max_age is None else str(self.max_age), "device": self.device,
                  "scope": self.scope, "acr_values": self.acr_values}
        return {key: value for key, value in values.items() if value}

    def query(self) -> str:
        """The flow as a query string, login_hint included (links to another sign-in method)."""
        return urlencode({**self.fields(), **({"login_hint": self.login_hint} if self.login_hint else {})})


def client_of(request: Request, flow: Flow):
    """The client the sign-in is for, if any: of the config file or stored (iam/authn/clients.py)."""
    return authn_services(request).clients.get(flow.client_id)


def client_name(request: Request, flow: Flow) -> str | None:
    client = client_of(request, flow)
    return None if client is None else client.client_name or client.client_id


def handoff(request: Request, flow: Flow, claims: dict) -> Response:
    """Back to the token role with a signed assertion bound to the pending request (≤ 60 s, single use)."""
    services = authn_services(request)
    assertion = services.identity.sign(Role.TOKEN, HANDOFF_TYP, {"req": flow.request, **claims},
                                  issuer=Role.AUTHENTICATION)
    query = urlencode({"request": flow.request, "handoff": assertion})
    return RedirectResponse(f"{services.settings.issuer.rstrip('/')}/oauth/v2/authorize/resume?{query}", 303,
                            headers=HARDENING)


async def current_session(request: Request):
    """The browser's live SSO session, if its user is still active."""
    services = authn_services(request)
    session = await services.sessions.current(request.cookies.get(cookie_name(request, "iam_session")))
    if session is None:
        return None
    user = await services.directory.claims(session.subject)
    if user is None or not user.active:
        await services.sessions.end(sid=session.sid)
        return None
    return session


def signed_in_claims(session) -> dict:
    """How the session signed in, as the token role records it in the grant (and the ID token says)."""
    claims = {"sub": session.subject, "auth_time": session.auth_time, "amr": session.amr, "sid": session.sid}
    if session.acr:
        claims["acr"] = session.acr
    if session.connector:
        claims["connector"] = session.connector
    return claims
