"""Password reset in a real browser against a real `iam serve` that mails through a real SMTP server: the person
follows "Forgot password?", opens the link from the message, chooses a new password and signs in with it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests import smtp_server
from tests.live import Live, authorization_request, running
from tests.test_browser_flow import at_callback, browser, context, expect_login_page, page, tokens, type_credentials

__all__ = ["browser", "context", "page"]  # the browser fixtures

NEW_PASSWORD = "chosen in the browser after a reset"


@pytest.fixture(scope="module")
def inbox() -> Iterator[smtp_server.Inbox]:
    with smtp_server.running() as server:
        yield server


@pytest.fixture(scope="module")
def mailing_live(tmp_path_factory, inbox) -> Iterator[Live]:
    mail = {"host": "127.0.0.1", "port": inbox.port, "security": "none", "from_address": "iam@iam.test"}
    with running(tmp_path_factory.mktemp("live-mail"), mail=mail) as server:
        yield server


def wait_for_message(inbox: smtp_server.Inbox, count: int, within: float = 15.0):
    """The message arrives off the request path: wait for it (a bound on a wait, not a timing assertion)."""
    deadline = time.monotonic() + within
    while len(inbox.messages) < count:
        assert time.monotonic() < deadline, "no message reached the SMTP server"
        time.sleep(0.05)
    return inbox.messages[count - 1]


def test_forgot_password_by_mail_then_sign_in_with_the_new_one(page: Page, mailing_live: Live, inbox,
                                                                browser: Browser, tmp_path: Path):
    live = mailing_live
    request = authorization_request(live, "cli")
    page.goto(request.url)
    expect_login_page(page)
    page.get_by_role("link", name="Forgot password?").click()
    expect(page).to_have_title("Forgot your password? · iam")
    page.get_by_label("Username or email address").press_sequentially("alice@example.com", delay=5)
    page.get_by_role("button", name="Send the link").click()
    expect(page.get_by_role("status")).to_contain_text("If the address exists, a message is on its way")

    message = wait_for_message(inbox, 1)
    assert message["To"] == "alice@example.com"
    link = inbox.link(message)
    assert link.startswith(f"{live.issuer}/authn/password/reset?token=")

    page.goto(link)
    expect(page).to_have_title("Choose a new password · iam")
    field = page.get_by_label("New password")
    expect(field).to_have_attribute("autocomplete", "new-password")
    field.press_sequentially("Password123", delay=5)  # on the common-password list
    page.get_by_role("button", name="Set the password").click()
    expect(page.get_by_role("alert")).to_contain_text("commonly used")
    page.get_by_label("New password").press_sequentially(NEW_PASSWORD, delay=5)
    page.get_by_role("button", name="Set the password").click()
    expect(page.get_by_role("status")).to_contain_text("signed out everywhere")

    page.goto(link)  # spent
    expect(page.get_by_role("heading", name="This link is not valid")).to_be_visible()

    request = authorization_request(live, "cli", prompt="login")
    page.goto(request.url)
    expect_login_page(page)
    type_credentials(page, "alice", NEW_PASSWORD)
    claims = tokens(live, request, at_callback(page, request))["claims"]
    assert claims["sub"] == live.subjects["alice"]
