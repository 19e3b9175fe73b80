"""Passkeys in a real browser: headless Chromium with its virtual authenticator (the DevTools protocol's WebAuthn
domain, through Playwright's CDP session), against a real `iam serve` on http://localhost (a secure context; a
WebAuthn RP ID cannot be an IP address).

The person adds a passkey on the account page (the password asked again; a wrong one is shown by the page's
script), signs out, signs in with the passkey alone and reaches the client's redirect URI with a code; then the
passkey is the second step after the password. The pages never trip their CSP (script-src 'self' only).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import CDPSession, Page, expect

from tests.live import PASSWORD, Live, running
from tests.test_browser_flow import (
    assert_screenshot,
    at_callback,
    authorization_request,
    browser,
    context,
    expect_login_page,
    page,
    tokens,
    type_credentials,
)

# Fixtures: the module's browser, a fresh profile per test, a tab that must not trip its CSP nor fail in its script.
__all__ = ["browser", "context", "page"]
MFA = "urn:iam:acr:mfa"


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    with running(tmp_path_factory.mktemp("live-passkeys"), host="localhost") as server:
        yield server


def virtual_authenticator(page: Page) -> tuple[CDPSession, str]:
    """A platform authenticator with resident keys that verifies the user (a passkey provider), on this tab."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    added = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "ctap2Version": "ctap2_1", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True, "automaticPresenceSimulation": True}})
    return cdp, added["authenticatorId"]


def stored_counter(live: Live) -> int:
    with sqlite3.connect(live.cwd / "authn.db") as db:
        return db.execute("SELECT sign_count FROM passkeys").fetchone()[0]


def test_add_a_passkey_sign_out_and_sign_in_with_it_alone_then_as_the_second_step(page: Page, live: Live,
                                                                                  tmp_path: Path):
    cdp, authenticator = virtual_authenticator(page)
    request = authorization_request(live, "cli")
    page.goto(request.url)
    expect_login_page(page)
    type_credentials(page)
    at_callback(page, request)

    page.goto(f"{live.issuer}/authn/account")
    expect(page).to_have_title("Your account · iam")
    expect(page.get_by_text("No passkey yet")).to_be_visible()
    page.get_by_label("Name of the new passkey").fill("Chromium")
    page.get_by_label("Your password, to add a passkey").fill("not the password")
    page.get_by_role("button", name="Add a passkey").click()
    expect(page.locator("#passkey-error")).to_have_text("Your current password is not correct.")
    assert cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"] == []

    page.get_by_label("Your password, to add a passkey").fill(PASSWORD)
    page.get_by_role("button", name="Add a passkey").click()
    expect(page.get_by_role("status")).to_have_text("Passkey \u201cChromium\u201d added.")
    expect(page.locator("ul.passkeys li")).to_have_count(1)
    expect(page.locator("ul.passkeys li strong")).to_have_text("Chromium")
    expect(page.locator("ul.passkeys")).to_contain_text("this device only")
    expect(page.get_by_text("Two-step verification: on")).to_be_visible()  # a password sign-in now asks for it
    assert_screenshot(page, tmp_path / "account-passkey.png")
    [credential] = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"]
    assert credential["isResidentCredential"] and credential["rpId"] == "localhost"
    assert credential["userHandle"]  # the account's user handle, for a sign-in without a username

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_title("Signed out · iam")

    # A passkey alone: no username, no password.
    request = authorization_request(live, "cli")
    page.goto(request.url)
    expect_login_page(page)
    assert_screenshot(page, tmp_path / "login-with-passkey.png")
    page.get_by_role("button", name="Sign in with a passkey").click()
    claims = tokens(live, request, at_callback(page, request))["claims"]
    assert claims["sub"] == live.subjects["alice"]
    assert claims["amr"] == ["hwk", "user", "mfa"] and claims["acr"] == MFA
    [credential] = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"]
    assert credential["signCount"] >= 1 and stored_counter(live) == credential["signCount"]

    # The password, then the passkey as the second step.
    request = authorization_request(live, "cli", prompt="login")
    page.goto(request.url)
    expect_login_page(page)
    type_credentials(page)
    expect(page).to_have_title("Two-step verification · iam")
    page.get_by_role("button", name="Use a passkey").click()
    claims = tokens(live, request, at_callback(page, request))["claims"]
    assert claims["amr"] == ["pwd", "hwk", "user", "mfa"] and claims["acr"] == MFA

    # Removed, the passkey signs no one in: the page says so.
    page.goto(f"{live.issuer}/authn/account")
    page.get_by_text("Remove", exact=True).click()
    page.get_by_label("Your password, to remove Chromium").fill(PASSWORD)
    page.get_by_role("button", name="Remove Chromium").click()
    expect(page.get_by_role("status")).to_have_text("Passkey removed.")
    page.get_by_role("button", name="Sign out").click()
    request = authorization_request(live, "cli")
    page.goto(request.url)
    page.get_by_role("button", name="Sign in with a passkey").click()
    expect(page.get_by_role("alert")).to_have_text(
        "That passkey could not sign you in. Try again, or use your password.")
    expect(page.get_by_label("Password")).to_be_visible()  # the sign-in page again, the password form on it
