"""Consent for clients that ask for it (`require_consent`): the person allows a client its scopes once, and again
when it asks for more (ASVS 5 V10.7.1-3). The operator's own clients never ask.

The handoff back to the token role carries the scopes allowed (`consent`); the token role checks that they
cover what was really requested, since the scope shown here came through the browser.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from iam.authn.services import authn_services
from iam.authn.web import Flow, client_of, csrf_ok, current_session, handoff, page, signed_in_claims
from iam.errors import OAuthError
from iam.http import read_form
from iam.observability import audit, source_of
from iam.pages import error_page

router = APIRouter()

# What each scope lets the client do, in the person's words; other scopes are shown as they are.
SCOPE_TEXT = {
    "openid": "Know who you are when you sign in",
    "profile": "See your name and username",
    "email": "See your email address",
    "groups": "See the groups you belong to",
    "offline_access": "Keep access while you are away, until you remove it",
}


def _reading_order(scope: str) -> tuple[int, str]:
    order = list(SCOPE_TEXT)
    return (order.index(scope) if scope in order else len(order), scope)


async def hand_off_or_ask(request: Request, flow: Flow, session) -> Response:
    """After sign-in or SSO: back to the token role, through the consent page when the client needs one."""
    claims = signed_in_claims(session)
    client = client_of(request, flow)
    if client is None or not client.require_consent:
        return handoff(request, flow, claims)
    allowed = await authn_services(request).store.consented_scopes(session.subject, client.client_id)
    wanted = set((flow.scope or "").split())
    if wanted <= allowed and "consent" not in flow.prompt:
        return handoff(request, flow, {**claims, "consent": " ".join(sorted(allowed))})
    if "none" in flow.prompt:  # OIDC Core §3.1.2.6: no page may be shown
        return handoff(request, flow, {"error": "consent_required",
                                        "error_description": "the user has not allowed this application"})
    return page(request, "consent.html", flow=flow.fields(), client_name=client.client_name or client.client_id,
                scopes=[(scope, SCOPE_TEXT.get(scope, scope)) for scope in sorted(wanted, key=_reading_order)],
                new=wanted - allowed if allowed else set())  # "(new)" only beside what was allowed before


@router.post("/authn/consent")
async def consent_submit(request: Request) -> Response:
    services = authn_services(request)
    try:
        form = await read_form(request)
        flow = Flow.parse(form)
    except (OAuthError, ValueError):
        return error_page("Invalid request", "The form could not be read. Please start again.")
    session = await current_session(request)
    client = client_of(request, flow)
    if not csrf_ok(request, form) or session is None or client is None or flow.request is None:
        return error_page("Session expired", "The form expired. Please start again from the application.", 403)
    if form.get("decision") != "allow":
        audit("consent.denied", "failure", actor=session.subject, client_id=client.client_id,
              source=source_of(request), scope=flow.scope)
        return handoff(request, flow, {"error": "access_denied",
                                        "error_description": "the user did not allow this application"})
    # Added to what the person allowed the client before: a consent covers everything allowed so far.
    allowed = (await services.store.consented_scopes(session.subject, client.client_id)
               | set((flow.scope or "").split()))
    await services.store.set_consent(session.subject, client.client_id, allowed, int(time.time()))
    audit("consent.granted", actor=session.subject, client_id=client.client_id, source=source_of(request),
          scope=flow.scope)
    return handoff(request, flow, {**signed_in_claims(session), "consent": " ".join(sorted(allowed))})
