"""The authorization code flow with PKCE and OpenID Connect in a real browser, against a real `iam serve`.

Headless Chromium (Debian's, driven by Playwright) types into the real pages and clicks their buttons:
sign-in, SSO, prompt=login / prompt=none, TOTP enrolment and sign-in, and RP-initiated logout. The
client's redirect URI is a small loopback server (tests/live.py); the client's back channel is httpx.
Chromium is required: `.ci/run` installs it, and these tests fail (never skip) without it.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Response, expect, sync_playwright

from tests.live import (
    PASSWORD,
    WEB_SECRET,
    Live,
    Request,
    authorization_request,
    live,
    redeem,
    verify_id_token,
)

__all__ = ["live"]  # the module-scoped server fixture

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile for each test: no cookies, no cache."""
    ctx = browser.new_context()
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A tab whose pages must not trip their own Content-Security-Policy (no inline styles or scripts), nor fail in
    their one script (passkeys)."""
    tab = context.new_page()
    violations: list[str] = []
    tab.on("console", lambda message: violations.append(message.text)
           if "Content Security Policy" in message.text else None)
    tab.on("pageerror", lambda error: violations.append(str(error)))
    yield tab
    assert violations == [], violations


# -- helpers -------------------------------------------------------------------------------------------------
def params_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def url_pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix) + r"(\?.*)?$")


def at_callback(page: Page, request: Request) -> dict[str, str]:
    """Wait for the browser to reach the client's redirect URI; return the parameters it received."""
    page.wait_for_url(url_pattern(request.redirect_uri))
    params = params_of(page.url)
    expect(page).to_have_title(f"client {urlsplit(request.redirect_uri).path}")  # the client's page loaded
    return params


def expect_login_page(page: Page, client_name: str = "Command Line") -> None:
    expect(page).to_have_title("Sign in · iam")
    assert urlsplit(page.url).path == "/authn/login"
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text(f"to continue to {client_name}")).to_be_visible()
    # Labels are wired to their inputs (get_by_label follows <label for>), with the autofill hints.
    expect(page.get_by_label("Username")).to_have_attribute("autocomplete", "username")
    expect(page.get_by_label("Password")).to_have_attribute("autocomplete", "current-password")
    expect(page.get_by_label("Password")).to_have_attribute("type", "password")


def type_credentials(page: Page, username: str = "alice", password: str = PASSWORD) -> None:
    field = page.get_by_label("Username")
    field.fill("")
    field.press_sequentially(username, delay=5)  # real key presses, not a value assignment
    page.get_by_label("Password").press_sequentially(password, delay=5)
    page.get_by_role("button", name="Sign in", exact=True).click()


def sign_in(page: Page, live: Live, client_id: str = "cli", username: str = "alice",
            **extra: str) -> tuple[Request, dict[str, str]]:
    """A whole code flow through the login page; returns the request and what the callback received."""
    request = authorization_request(live, client_id, **extra)
    page.goto(request.url)
    expect_login_page(page, "Command Line" if client_id == "cli" else "Web Portal")
    type_credentials(page, username)
    return request, at_callback(page, request)


def tokens(live: Live, request: Request, params: dict[str, str]) -> dict:
    assert params["state"] == request.state and params["iss"] == live.issuer, params
    response = redeem(live, request, params["code"])
    assert response.status_code == 200, response.text
    body = response.json()
    body["claims"] = verify_id_token(live, body["id_token"], request.client_id, request.nonce)
    return body


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=path, full_page=True)
    width, height = png_size(path)
    assert width >= 600 and height >= 400, (width, height)
    assert path.stat().st_size > 8_000, "a blank page compresses to almost nothing"


def logins_shown(page: Page) -> list[str]:
    """Record every login form the browser is served from now on."""
    shown: list[str] = []

    def seen(response: Response) -> None:
        if urlsplit(response.url).path == "/authn/login" and response.request.method == "GET" \
                and response.status == 200:
            shown.append(response.url)

    page.on("response", seen)
    return shown


# -- the flows -----------------------------------------------------------------------------------------------
def test_code_flow_with_pkce_works_without_javascript(browser: Browser, live: Live, tmp_path: Path):
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        request = authorization_request(live, "cli")
        page.goto(request.url)
        expect_login_page(page)
        expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
        assert page.locator("script").count() == page.locator("script[src='/assets/passkeys.js']").count() == 1
        assert_screenshot(page, tmp_path / "login.png")

        type_credentials(page)
        params = at_callback(page, request)
        assert set(params) == {"code", "state", "iss"}
        assert live.callbacks.last("/callback") == params  # what the client's server received
        body = tokens(live, request, params)
    finally:
        context.close()
    assert body["token_type"] == "Bearer" and body["refresh_token"] and "openid" in body["scope"].split()
    claims = body["claims"]
    assert claims["sub"] == live.subjects["alice"] and claims["amr"] == ["pwd"] and claims["sid"]
    assert claims["preferred_username"] == "alice" and claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True and claims["groups"] == ["admins"]
    # The code is single use, even for the client that got it.
    assert redeem(live, request, params["code"]).json()["error"] == "invalid_grant"


def test_the_login_page_is_styled(page: Page, live: Live):
    page.goto(authorization_request(live, "cli").url)
    expect_login_page(page)
    styles = page.evaluate("""() => {
        const style = (selector, property) => getComputedStyle(document.querySelector(selector))[property];
        return {button: style('button', 'backgroundColor'), card: style('main', 'backgroundColor'),
                body: style('body', 'backgroundColor'), radius: style('main', 'borderTopLeftRadius'),
                input: style('#username', 'width'), main: style('main', 'width')};
    }""")
    assert styles["button"] == "rgb(36, 87, 214)" and styles["card"] == "rgb(255, 255, 255)"
    assert styles["body"] == "rgb(243, 245, 249)" and styles["radius"] == "12px"
    assert float(styles["input"][:-2]) > 0.7 * float(styles["main"][:-2])  # inputs span the card
    # The username field has focus when the page opens.
    assert page.evaluate("document.activeElement && document.activeElement.id") == "username"


def test_wrong_password_shows_the_generic_error_then_the_right_one_works(page: Page, live: Live):
    request = authorization_request(live, "cli")
    page.goto(request.url)
    expect_login_page(page)
    before = live.callbacks.count("/callback")
    type_credentials(page, password="not the password")
    error = page.get_by_role("alert")
    expect(error).to_have_text("Incorrect username or password.")
    assert urlsplit(page.url).path == "/authn/login" and live.callbacks.count("/callback") == before
    expect(page.get_by_label("Username")).to_have_value("alice")  # kept; the password is not
    expect(page.get_by_label("Password")).to_have_value("")
    expect(page.get_by_label("Username")).to_have_attribute("aria-describedby", "form-error")

    page.get_by_label("Password").press_sequentially(PASSWORD, delay=5)
    page.get_by_role("button", name="Sign in", exact=True).click()
    params = at_callback(page, request)
    assert tokens(live, request, params)["claims"]["sub"] == live.subjects["alice"]


def test_an_unknown_user_gets_the_same_answer(page: Page, live: Live):
    page.goto(authorization_request(live, "cli").url)
    type_credentials(page, username="mallory", password="whatever-it-is")
    expect(page.get_by_role("alert")).to_have_text("Incorrect username or password.")
    expect(page).to_have_title("Sign in · iam")


def test_the_session_cookie_is_http_only(page: Page, context: BrowserContext, live: Live):
    sign_in(page, live)
    cookies = {cookie["name"]: cookie for cookie in context.cookies(live.issuer)}
    # An http loopback issuer: no __Host- prefix and no Secure (the https case is tested in test_login.py).
    session = cookies["iam_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Lax" and session["path"] == "/"
    assert session["domain"] == "127.0.0.1"  # host-only
    page.goto(f"{live.issuer}/authn/account")
    expect(page).to_have_title("Your account · iam")
    visible = page.evaluate("document.cookie")
    assert "iam_session" not in visible and "iam_csrf" not in visible


def test_sso_a_second_request_gets_a_code_without_the_login_page(page: Page, live: Live):
    shown = logins_shown(page)
    first_request, first_params = sign_in(page, live, "cli")
    first = tokens(live, first_request, first_params)["claims"]
    assert len(shown) == 1  # the one sign-in

    second_request = authorization_request(live, "web")  # another client, same browser
    page.goto(second_request.url)
    second = tokens(live, second_request, at_callback(page, second_request))["claims"]
    assert len(shown) == 1  # no login page this time
    assert second["sub"] == first["sub"] and second["sid"] == first["sid"]
    assert second["auth_time"] == first["auth_time"]

    third_request = authorization_request(live, "cli")  # and the same client again
    page.goto(third_request.url)
    assert "code" in at_callback(page, third_request) and len(shown) == 1


def test_prompt_login_shows_the_form_again(page: Page, live: Live):
    first_request, first_params = sign_in(page, live)
    first = tokens(live, first_request, first_params)["claims"]
    time.sleep(1.05)  # auth_time has a resolution of one second
    request, params = sign_in(page, live, prompt="login")  # sign_in asserts the login page is shown
    again = tokens(live, request, params)["claims"]
    assert again["sub"] == first["sub"] and again["auth_time"] > first["auth_time"]


def test_prompt_none_without_a_session_is_login_required(page: Page, live: Live):
    shown = logins_shown(page)
    request = authorization_request(live, "cli", prompt="none")
    page.goto(request.url)
    params = at_callback(page, request)
    assert params["error"] == "login_required" and "code" not in params
    assert params["state"] == request.state and params["iss"] == live.issuer
    assert shown == []


def test_totp_enrolment_sign_out_and_sign_in_with_the_second_factor(page: Page, live: Live, tmp_path: Path):
    sign_in(page, live, username="tess")

    page.goto(f"{live.issuer}/authn/account")
    expect(page).to_have_title("Your account · iam")
    expect(page.get_by_text("Two-step verification: off")).to_be_visible()
    page.get_by_role("link", name="Set up an authenticator app").click()
    expect(page).to_have_title("Set up two-step verification · iam")
    qr = page.get_by_role("img", name="QR code for your authenticator app")
    expect(qr).to_be_visible()
    assert qr.evaluate("img => img.complete && img.naturalWidth > 0")  # the CSP allows the inline QR code
    assert_screenshot(page, tmp_path / "totp-setup.png")
    secret = page.locator("code").inner_text().strip()
    assert re.fullmatch(r"[A-Z2-7]{16,}", secret), secret

    page.get_by_label("Verification code").fill("000000")
    page.get_by_label("Your password").fill(PASSWORD)
    page.get_by_role("button", name="Turn on").click()
    expect(page.get_by_role("alert")).to_have_text("That code is not valid. Try the current one.")
    enrolment_code = pyotp.TOTP(secret).now()
    page.get_by_label("Verification code").press_sequentially(enrolment_code, delay=5)
    page.get_by_label("Your password").fill(PASSWORD)
    page.get_by_role("button", name="Turn on").click()
    expect(page.get_by_role("status")).to_have_text("Two-step verification is on.")
    expect(page).to_have_title("Your recovery codes · iam")
    recovery_codes = page.locator(".recovery-codes code").all_inner_texts()
    assert len(recovery_codes) == 10
    page.get_by_role("link", name="Back to your account").click()
    expect(page.get_by_text("Two-step verification: on")).to_be_visible()
    expect(page.get_by_text("Recovery codes left: 10")).to_be_visible()

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_title("Signed out · iam")
    expect(page.get_by_role("heading", name="You are signed out")).to_be_visible()

    request = authorization_request(live, "cli", prompt="login")
    page.goto(request.url)
    expect_login_page(page)
    type_credentials(page, "tess")
    expect(page).to_have_title("Two-step verification · iam")
    code_field = page.get_by_label("Verification code")
    expect(code_field).to_have_attribute("autocomplete", "one-time-code")
    code_field.press_sequentially(enrolment_code, delay=5)  # already used at enrolment: no replay
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_role("alert")).to_have_text("That code is not valid. Try the current one.")
    next_code = pyotp.TOTP(secret).at(time.time() + 30)  # the next step's code, within the allowed skew
    page.get_by_label("Verification code").press_sequentially(next_code, delay=5)
    page.get_by_role("button", name="Verify").click()
    claims = tokens(live, request, at_callback(page, request))["claims"]
    assert claims["sub"] == live.subjects["tess"] and claims["amr"] == ["pwd", "otp"]

    # The phone is lost: a recovery code instead, once.
    request = authorization_request(live, "cli", prompt="login")
    page.goto(request.url)
    type_credentials(page, "tess")
    page.get_by_text("Use a recovery code").click()
    page.get_by_label("Recovery code").press_sequentially(recovery_codes[0], delay=5)
    page.get_by_role("button", name="Use recovery code").click()
    claims = tokens(live, request, at_callback(page, request))["claims"]
    assert claims["amr"] == ["pwd", "otp"]
    page.goto(f"{live.issuer}/authn/account")
    expect(page.get_by_text("Recovery codes left: 9")).to_be_visible()


def test_a_third_party_client_is_allowed_once_on_the_consent_page(page: Page, live: Live, tmp_path: Path):
    request = authorization_request(live, "partner", scope="openid email")
    page.goto(request.url)
    expect_login_page(page, "Partner Portal")
    type_credentials(page, "alice")
    expect(page).to_have_title("Allow access · iam")
    expect(page.get_by_role("heading", name="Allow Partner Portal?")).to_be_visible()
    expect(page.get_by_role("listitem")).to_have_text(["Know who you are when you sign in", "See your email address"])
    assert_screenshot(page, tmp_path / "consent.png")
    page.get_by_role("button", name="Allow").click()
    claims = tokens(live, request, at_callback(page, request))["claims"]
    assert claims["sub"] == live.subjects["alice"]

    again = authorization_request(live, "partner", scope="openid")  # allowed already: no page at all
    shown = logins_shown(page)
    page.goto(again.url)
    assert "code" in at_callback(page, again) and shown == []

    more = authorization_request(live, "partner", scope="openid profile")
    page.goto(more.url)
    expect(page.get_by_role("heading", name="Allow Partner Portal?")).to_be_visible()
    page.get_by_role("button", name="Deny").click()
    params = at_callback(page, more)
    assert params["error"] == "access_denied" and "code" not in params and params["state"] == more.state


def test_rp_initiated_logout_returns_to_the_client_and_ends_the_session(page: Page, live: Live):
    request, params = sign_in(page, live, "web")
    body = tokens(live, request, params)
    state = "bye-" + str(time.time_ns())
    end_session = live.metadata()["end_session_endpoint"]
    page.goto(f"{end_session}?" + urlencode({"id_token_hint": body["id_token"], "state": state,
                                             "post_logout_redirect_uri": live.web_logout_redirect}))
    page.wait_for_url(url_pattern(live.web_logout_redirect))
    assert params_of(page.url) == {"state": state}
    assert live.callbacks.last("/web/signed-out") == {"state": state}
    # The client's grant in that session is revoked ...
    refreshed = httpx.post(live.metadata()["token_endpoint"], auth=httpx.BasicAuth("web", WEB_SECRET),
                           data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
    # ... and the browser is signed out: a silent request needs a login now.
    silent = authorization_request(live, "web", prompt="none")
    page.goto(silent.url)
    assert at_callback(page, silent)["error"] == "login_required"
