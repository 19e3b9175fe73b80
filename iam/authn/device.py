"""The verification page of the device authorization grant (RFC 8628 §3.3): enter the code, sign in,
approve or deny. The decision goes to the token role, which owns the device code."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from iam.authn.login import login_form
from iam.authn.services import authn_services
from iam.authn.web import Flow, current_session, page, posted_form, signed_in_claims
from iam.errors import OAuthError
from iam.formats import normalise_user_code
from iam.http import client_address, parse_params
from iam.observability import audit, source_of
from iam.pages import error_page

router = APIRouter()


def _client_name(request: Request, client_id: str) -> str:
    client = authn_services(request).clients.get(client_id)
    return client_id if client is None else client.client_name or client.client_id


@router.get("/authn/device")
async def device_page(request: Request) -> Response:
    services = authn_services(request)
    try:
        user_code = parse_params(request.url.query).get("user_code")
    except OAuthError:
        user_code = None
    if not user_code:
        return page(request, "device.html")
    # User codes are short: guessing them is throttled per client address like passwords.
    address = client_address(request, services.settings.trusted_proxies)
    if await services.throttle.check(None, address):
        return page(request, "device.html", 429, error="Too many attempts. Try again later.")
    found = await services.device_approvals.device_lookup(user_code)
    if found is None:
        await services.throttle.fail(None, address)
        return page(request, "device.html", 400, user_code=user_code,
                    error="That code is not valid or has expired. Check it and try again.")
    code = normalise_user_code(user_code)
    assert code is not None  # the token role found a device code for it
    session = await current_session(request)
    if session is None:
        flow = Flow(request=None, client_id=found["client_id"], prompt=frozenset(), max_age=None, login_hint=None,
                    device=code)
        return login_form(request, flow)
    user = await services.directory.claims(session.subject)
    return page(request, "device_confirm.html", user_code=f"{code[:4]}-{code[4:]}", user=user,
                client_name=_client_name(request, found["client_id"]), scopes=found["scope"].split())


@router.post("/authn/device")
async def device_decision(request: Request) -> Response:
    services = authn_services(request)
    form = await posted_form(request)
    session = await current_session(request)
    if not form or session is None:
        return error_page("Session expired", "Sign in again and re-enter the code.", 403)
    approve = form.get("decision") == "approve"
    decided = await services.device_approvals.device_decide(
        form.get("user_code", ""), approve,
        signed_in_claims(session),
    )
    if not decided:
        return page(request, "device.html", 400, error="That code has expired or was already used.")
    audit("device.approved" if approve else "device.denied", actor=session.subject, source=source_of(request))
    return page(request, "device_done.html", approved=approve)
