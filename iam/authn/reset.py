"""Password reset by email: "Forgot password?" on the sign-in page (when `mail` is set and password login on).

- The form takes a username or an address, and always answers the same ("if the address exists, a message is on
  its way"): the lookup, the link and the message all happen after the answer, off the request path, so neither
  the page nor its timing tells whether an account exists (ASVS 5 V6.4.1).
- Requests are throttled per account (3 an hour) and per client address (10 in 15 minutes), counted whether the
  account exists or not; a throttled request gets the same answer and sends nothing.
- The link carries a 256-bit random token, kept only as its SHA-256, bound to its user, valid 15 minutes and
  spent on use (with every other link of the user). Opening it only shows the form (mail scanners open links).
- Setting the new password follows the password policy of a password change; then every session and grant of
  the person ends (as `iam users sign-out`), and both steps are audited.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from iam.authn.credentials import check_policy
from iam.authn.services import authn_services
from iam.authn.web import csrf_ok, page, posted_form
from iam.errors import OAuthError, PasswordRejected, PeerUnavailable
from iam.http import client_address, parse_params, read_form
from iam.observability import audit, source_of
from iam.pages import error_page

log = logging.getLogger("iam.authn.reset")

router = APIRouter()


# -- the pages ------------------------------------------------------------------------------------------------
SENT = "If the address exists, a message is on its way. Open its link within 15 minutes."
INVALID = ("This link is not valid", "The link has expired, was used already, or is incomplete. "
           "Ask for a new one from the sign-in page.")


def offered(request: Request) -> bool:
    settings = authn_services(request).settings
    return settings.password_login and settings.mail is not None


@router.get("/authn/password/forgot")
async def forgot_form(request: Request) -> Response:
    if not offered(request):
        return error_page("Not offered", "Password reset by email is not offered here.", 404)
    return page(request, "password_forgot.html")


@router.post("/authn/password/forgot")
async def forgot_submit(request: Request) -> Response:
    services = authn_services(request)
    if not offered(request):
        return error_page("Not offered", "Password reset by email is not offered here.", 404)
    try:
        form = await read_form(request)
    except OAuthError:
        form = {}
    if not csrf_ok(request, form):
        return error_page("Session expired", "The form expired. Go back and try again.", 403)
    identifier = form.get("identifier", "").strip()[:320]
    if not identifier:
        return page(request, "password_forgot.html", 400, error="Enter your username or email address.")
    address = client_address(request, services.settings.trusted_proxies)
    # Counted before anything is looked up, whether the account exists or not: the answer stays the same.
    if await services.throttle.spend_reset(identifier, address):
        log.info("a password reset request was throttled")
    else:
        services.password_resets.request_later(services.directory, identifier)
    return page(request, "password_forgot.html", notice=SENT)


def _token(request: Request) -> str:
    try:
        return parse_params(request.url.query).get("token", "")[:128]
    except OAuthError:
        return ""


@router.get("/authn/password/reset")
async def reset_form(request: Request) -> Response:
    token = _token(request)
    if await authn_services(request).password_resets.subject(token) is None:
        return error_page(*INVALID)
    return page(request, "password_reset.html", token=token)


@router.post("/authn/password/reset")
async def reset_submit(request: Request) -> Response:
    services = authn_services(request)
    form = await posted_form(request)
    if form is None:
        return error_page("Session expired", "The form expired. Open the link from the message again.", 403)
    token = form.get("token", "")[:128]
    subject = await services.password_resets.subject(token)
    user = None if subject is None else await services.directory.claims(subject)
    if subject is None or user is None or not user.active:
        return error_page(*INVALID)
    new = form.get("new", "")
    try:
        check_policy(new)  # before the link is spent: a refused password leaves it usable
    except PasswordRejected as exc:
        return page(request, "password_reset.html", 400, token=token, error=f"Choose another password: {exc}.")
    if not await services.password_resets.spend(token, subject):
        return error_page(*INVALID)  # a concurrent use of the same link won
    await services.credentials.set_password(subject, new)
    try:
        # Whoever signed in with the old password (or still holds its tokens) is signed out (ASVS 5 V7.4.3).
        await services.directory.sign_out_everywhere(subject, actor=subject)
    except PeerUnavailable:
        log.error("after a password reset, the sessions and grants of a user could not all be ended")
    audit("password.reset", actor=subject, source=source_of(request))
    return page(request, "password_reset_done.html")
