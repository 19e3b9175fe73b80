"""Password reset by email through a real SMTP server (aiosmtpd on a loopback port): the same answer whether or not
the account exists, a single-use 256-bit link valid 15 minutes, throttled requests, everyone signed out after the
reset; and a relay that is down never holds up a sign-in."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from iam.app import create_app
from iam.observability import MAIL_MESSAGES
from tests import smtp_server
from tests.conftest import ISSUER, PASSWORD, make_settings
from tests.oauth import hidden_fields, refresh, sign_in
from tests.test_code_grant import tokens_for
from tests.test_login import login_page

NEW_PASSWORD = "a fresh passphrase after a reset"
SENT = "If the address exists, a message is on its way"


@pytest.fixture(scope="module")
def inbox():
    with smtp_server.running() as server:
        yield server


def mail_settings(port: int, **extra) -> dict:
    return {"host": "127.0.0.1", "port": port, "security": "none", "from_address": "iam@iam.test",
            "retry_delay": 0, **extra}


@pytest.fixture
def settings(tmp_path, store_urls, inbox):
    inbox.messages.clear()
    return make_settings(tmp_path, store_urls, mail=mail_settings(inbox.port))


async def delivered(app) -> None:
    authn = app.state.iam.authn
    await authn.password_resets.idle()
    await authn.mailer.idle()


async def ask(client, identifier: str, **override) -> httpx.Response:
    form = await client.get("/authn/password/forgot")
    assert form.status_code == 200
    return await client.post("/authn/password/forgot", data={**hidden_fields(form.text), "identifier": identifier,
                                                             **override})


async def reset_link(client, app, inbox, identifier: str = "alice") -> str:
    before = len(inbox.messages)
    assert SENT in (await ask(client, identifier)).text
    await delivered(app)
    assert len(inbox.messages) == before + 1
    return inbox.link(inbox.messages[-1])


async def set_new(client, link: str, new: str = NEW_PASSWORD) -> httpx.Response:
    form = await client.get(link)
    if form.status_code != 200:
        return form
    return await client.post("/authn/password/reset", data={**hidden_fields(form.text), "new": new})


async def signs_in(client, password: str) -> bool:
    client.cookies.clear()
    return (await sign_in(client, await login_page(client, prompt="login"), password=password)).status_code == 303


def audited(caplog, event: str) -> list[dict]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == event]


@pytest.fixture
async def other_browser(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        yield http


async def test_the_sign_in_page_offers_a_reset_only_with_mail_and_password_login(client, tmp_path, store_urls):
    assert 'href="/authn/password/forgot"' in (await login_page(client)).text
    for overrides in ({}, {"password_login": False, "mail": mail_settings(25)}):
        plain = create_app(make_settings(tmp_path / str(len(overrides)), store_urls, **overrides))
        async with plain.router.lifespan_context(plain), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=plain), base_url=ISSUER) as http:
            assert (await http.get("/authn/password/forgot")).status_code == 404
            assert (await http.post("/authn/password/forgot", data={"identifier": "alice"})).status_code == 404


async def test_a_reset_by_mail_sets_the_password_and_signs_out_everywhere(client, other_browser, app, alice, inbox,
                                                                         caplog):
    web = await tokens_for(other_browser)  # signed in elsewhere, with a refresh token
    link = await reset_link(client, app, inbox)
    message = inbox.messages[-1]
    assert message["To"] == "alice@example.com" and message["From"] == "iam <iam@iam.test>"
    assert message["Subject"] == "Reset your password" and message["Auto-Submitted"] == "auto-generated"
    assert link.startswith(f"{ISSUER}/authn/password/reset?token=")
    token = parse_qs(urlsplit(link).query)["token"][0]
    assert len(token) == 43  # 256 bits, base64url
    assert audited(caplog, "password.reset_requested")[-1]["actor"] == alice

    form = await client.get(link)  # opening the link (a mail scanner does too) spends nothing
    assert form.status_code == 200 and 'autocomplete="new-password"' in form.text
    done = await set_new(client, link)
    assert done.status_code == 200 and "signed out everywhere" in done.text
    assert audited(caplog, "password.reset")[-1]["actor"] == alice
    assert audited(caplog, "user.signed_out")[-1]["actor"] == alice

    assert (await other_browser.get("/authn/account")).status_code == 303  # that session is over
    assert (await refresh(other_browser, web["refresh_token"])).json()["error"] == "invalid_grant"
    assert await signs_in(client, NEW_PASSWORD)
    assert not await signs_in(client, PASSWORD)


async def test_a_verified_address_finds_the_account_too(client, app, alice, inbox):
    link = await reset_link(client, app, inbox, "Alice@Example.com")
    assert (await set_new(client, link)).status_code == 200
    assert await signs_in(client, NEW_PASSWORD)


async def test_the_answer_is_the_same_whether_or_not_the_account_exists(client, app, alice, inbox):
    known = await ask(client, "alice")
    unknown = await ask(client, "nobody-here")
    unknown_address = await ask(client, "nobody@example.com")
    assert known.status_code == unknown.status_code == unknown_address.status_code == 200
    strip = [hidden_fields(r.text).get("csrf", "") for r in (known, unknown, unknown_address)]
    assert known.text.replace(strip[0], "") == unknown.text.replace(strip[1], "") \
        == unknown_address.text.replace(strip[2], "")
    await delivered(app)
    assert [m["To"] for m in inbox.messages] == ["alice@example.com"]  # only the real account got one


async def test_bad_links_change_nothing(client, app, alice, inbox):
    from iam.users.directory import NewUser

    link = await reset_link(client, app, inbox)
    truncated = await set_new(client, link[:-1])
    assert truncated.status_code == 400 and "not valid" in truncated.text
    no_csrf = await client.post("/authn/password/reset", data={"token": parse_qs(urlsplit(link).query)["token"][0],
                                                                "new": NEW_PASSWORD, "csrf": "forged"})
    assert no_csrf.status_code == 403
    refused = await set_new(client, link, "Password123")  # the policy of a password change
    assert refused.status_code == 400 and "commonly used" in refused.text
    assert (await set_new(client, link)).status_code == 200  # the link survived all that
    reused = await set_new(client, link, "yet another passphrase here")
    assert reused.status_code == 400 and "not valid" in reused.text
    assert await signs_in(client, NEW_PASSWORD)

    # A link is bound to its user: it never changes another one's password, whatever the form says.
    bob = await app.state.iam.users.directory.create_user(
        NewUser(user_name="bob", email="bob@example.com", email_verified=True), password="bob's long passphrase")
    link = await reset_link(client, app, inbox, "alice")
    form = await client.get(link)
    await client.post("/authn/password/reset", data={**hidden_fields(form.text), "new": "third passphrase here",
                                                      "username": "bob", "sub": bob})
    assert await signs_in(client, "third passphrase here")
    client.cookies.clear()
    bob_signs_in = await sign_in(client, await login_page(client, prompt="login"), username="bob",
                                 password="bob's long passphrase")
    assert bob_signs_in.status_code == 303


async def test_an_expired_link_or_one_of_a_disabled_user_is_refused(client, app, alice, inbox):
    resets = app.state.iam.authn.password_resets
    link = await reset_link(client, app, inbox)
    real_clock = resets.clock
    resets.clock = lambda: real_clock() + 15 * 60 + 1
    try:
        expired = await set_new(client, link)
        assert expired.status_code == 400 and "expired" in expired.text
    finally:
        resets.clock = real_clock
    link = await reset_link(client, app, inbox)
    form = await client.get(link)
    await app.state.iam.users.directory.set_active(alice, False)
    disabled = await client.post("/authn/password/reset", data={**hidden_fields(form.text), "new": NEW_PASSWORD})
    assert disabled.status_code == 400
    await app.state.iam.users.directory.set_active(alice, True)
    assert await signs_in(client, PASSWORD)
    # A purge removes expired links.
    assert await app.state.iam.authn.store.purge_password_resets(int(real_clock()) + 15 * 60 + 1, 100) >= 1


async def test_requests_are_throttled_per_account_with_the_same_answer(client, app, alice, inbox):
    answers = [await ask(client, "alice") for _ in range(5)]
    assert all(a.status_code == 200 and SENT in a.text for a in answers)
    await delivered(app)
    assert len(inbox.messages) == 3  # 3 an hour per account


async def test_requests_are_throttled_per_client_address(client, app, alice, inbox):
    for n in range(10):
        await ask(client, f"someone-{n}")
    assert SENT in (await ask(client, "alice")).text
    await delivered(app)
    assert inbox.messages == []  # this address has asked too often


async def test_a_relay_that_is_down_holds_up_nothing_and_is_logged_and_metered(tmp_path, store_urls, caplog):
    from iam.users.directory import NewUser

    down = smtp_server.free_port()  # nothing listens there
    app = create_app(make_settings(tmp_path, store_urls, mail=mail_settings(down, attempts=2)))
    failed = MAIL_MESSAGES.labels("password_reset", "failed")
    before = failed._value.get()
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=ISSUER) as client:
        await app.state.iam.users.directory.create_user(NewUser(user_name="alice", email="alice@example.com"),
                                                        password=PASSWORD)
        answer = await ask(client, "alice")
        assert answer.status_code == 200 and SENT in answer.text
        assert await signs_in(client, PASSWORD)  # sign-in goes on while the message waits
        with caplog.at_level(logging.WARNING, logger="iam.mail"):
            await delivered(app)
    assert failed._value.get() == before + 1
    assert MAIL_MESSAGES.labels("password_reset", "retried")._value.get() >= 1
    errors = [r.getMessage() for r in caplog.records if r.name == "iam.mail" and r.levelno == logging.ERROR]
    assert errors and "could not be delivered" in errors[-1] and "token=" not in " ".join(errors)


def test_the_relay_password_comes_from_the_environment_and_plain_text_stays_on_loopback(tmp_path):
    from iam.config import ConfigError, load_settings

    config = tmp_path / "iam.yaml"
    config.write_text("mail: {host: smtp.example.com, username: iam, password: '${SMTP_PASSWORD}', "
                      "from_address: iam@example.com}\n")
    settings = load_settings(config, env={"SMTP_PASSWORD": "relay-secret-value"})
    assert settings.mail.password.get_secret_value() == "relay-secret-value"
    assert "relay-secret-value" not in repr(settings) and settings.mail.security == "starttls"
    config.write_text("mail: {host: smtp.example.com, security: none, from_address: iam@example.com}\n")
    with pytest.raises(ConfigError, match="loopback relay only"):
        load_settings(config, env={})
