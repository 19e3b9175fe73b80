"""Sign-in through an OpenID Connect connector (iam/authn/connector_sign_in.py) against a real upstream
(node-oidc-provider, tests/oidc_upstream.py), through iam's real ASGI app on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from urllib.parse import urljoin

import httpx
import pyotp
import pytest
from joserfc import jwt

from iam.app import create_app
from tests.conftest import ISSUER, PASSWORD, make_settings
from tests.oauth import authorize, follow, hidden_fields, pkce, query, redeem, refresh
from tests.oidc_upstream import ALICE, BOB, Account
from tests.postgres import free_port

CALLBACK = f"{ISSUER}/authn/connectors/corp/callback"  # the contract redirect URI
WEBAPP = "https://app.test/"


def corp_connector(issuer: str, client_id: str, secret: str, **extra) -> dict:
    return {"id": "corp", "type": "oidc", "name": "Contoso", "issuer": issuer, "client_id": client_id,
            "client_secret": secret, "scopes": ["openid", "email", "profile", "groups"], **extra}


@contextlib.asynccontextmanager
async def iam_with(tmp_path, store_urls, **overrides):
    """iam's app with these settings, and a browser for it (an httpx client keeping cookies)."""
    application = create_app(make_settings(tmp_path, store_urls, **overrides))
    async with application.router.lifespan_context(application):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER) as browser:
            yield application, browser


@pytest.fixture
def upstream_client(oidc_upstream):
    client_id, secret = "iam-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    oidc_upstream.add_client(client_id, secret, [CALLBACK])
    return client_id, secret


@pytest.fixture
async def corp(tmp_path, store_urls, oidc_upstream, upstream_client):
    async with iam_with(tmp_path, store_urls, connectors=[corp_connector(oidc_upstream.issuer, *upstream_client)]) \
            as (application, browser):
        yield application, browser


async def to_connector(browser, login_page: httpx.Response, name="Contoso") -> httpx.Response:
    """Follow the sign-in page's "Sign in with <name>" link: iam answers 303 to the upstream."""
    assert login_page.status_code == 200, login_page.text
    href = next(line.split('href="')[1].split('"')[0] for line in login_page.text.splitlines()
                if f"Sign in with {name}" in line and "href=" in line)
    return await browser.get(urljoin(str(login_page.url), href.replace("&amp;", "&")))


async def upstream_sign_in(oidc_upstream, to_upstream: httpx.Response, account: Account = ALICE) -> dict:
    assert to_upstream.status_code == 303 and to_upstream.headers["location"].startswith(oidc_upstream.issuer)
    async with httpx.AsyncClient() as person_at_upstream:
        return await oidc_upstream.sign_in(person_at_upstream, to_upstream.headers["location"], account.username,
                                           account.password, redirect_uri=CALLBACK)


async def sign_in_through_corp(browser, oidc_upstream, account: Account = ALICE, **authorize_extra):
    """The whole code flow through the connector; returns (tokens, the callback response)."""
    verifier, challenge = pkce()
    page = await follow(browser, await authorize(browser, challenge=challenge, **authorize_extra), WEBAPP)
    params = await upstream_sign_in(oidc_upstream, await to_connector(browser, page), account)
    back = await follow(browser, await browser.get("/authn/connectors/corp/callback", params=params), WEBAPP)
    assert back.status_code in (302, 303) and back.headers["location"].startswith(WEBAPP), back.text
    code = query(back.headers["location"])["code"]
    tokens = await redeem(browser, code, verifier)
    assert tokens.status_code == 200, tokens.text
    return tokens.json(), back


def id_token(app, tokens: dict) -> dict:
    return jwt.decode(tokens["id_token"], app.state.iam.keys.public_set).claims


async def test_the_sign_in_page_offers_the_connector_beside_the_password_form(corp, alice):
    _, browser = corp
    page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    assert "Sign in with Contoso" in page.text and 'name="password"' in page.text
    # A plain link: works without JavaScript (the page's one script is for passkeys alone).
    assert re.search(r'<a class="button secondary" href="/authn/connectors/corp/login\?[^"]+">Sign in with Contoso</a>',
                     page.text)


async def test_code_flow_through_the_upstream_provider_gives_an_id_token_with_its_groups(corp, oidc_upstream):
    application, browser = corp
    tokens, _ = await sign_in_through_corp(browser, oidc_upstream)
    claims = id_token(application, tokens)
    user = await application.state.iam.users.directory.claims(claims["sub"])
    assert claims["sub"] != ALICE.sub  # iam's own subject for the person, linked to the upstream one
    assert claims["groups"] == ["admins", "all-staff", "engineering"]
    assert claims["preferred_username"] == "alice" and claims["email"] == "alice@contoso.example"
    assert claims["amr"] == ["pwd"]  # what the upstream reported
    assert user.groups == claims["groups"]
    assert await application.state.iam.users.upstream.upstream_subject(claims["sub"], "corp") == ALICE.sub
    # SSO: the next application sign-in needs no upstream round trip
    again = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    assert again.status_code in (302, 303) and "code=" in again.headers["location"]


async def test_a_second_sign_in_refreshes_groups_and_keeps_the_user(corp, oidc_upstream):
    application, browser = corp
    first, _ = await sign_in_through_corp(browser, oidc_upstream)
    oidc_upstream.add_account(Account("alice", ALICE.password, ALICE.sub,
                                      {**ALICE.claims, "groups": ["engineering"], "name": "Alice L."}))
    try:
        second, _ = await sign_in_through_corp(browser, oidc_upstream, prompt="login")
    finally:
        oidc_upstream.add_account(ALICE)
    assert id_token(application, second)["sub"] == id_token(application, first)["sub"]
    assert id_token(application, second)["groups"] == ["engineering"]
    assert id_token(application, second)["name"] == "Alice L."
    assert await application.state.iam.users.directory.count_users() == 1


async def test_refresh_of_an_oidc_grant_rereads_the_directory_without_the_upstream(corp, oidc_upstream):
    application, browser = corp
    tokens, _ = await sign_in_through_corp(browser, oidc_upstream, scope="openid groups offline_access")
    sub = id_token(application, tokens)["sub"]
    refreshed = await refresh(browser, tokens["refresh_token"])
    assert refreshed.status_code == 200 and id_token(application, refreshed.json())["groups"]
    await application.state.iam.users.directory.set_active(sub, False)  # disabled in SCIM: access ends
    assert (await refresh(browser, refreshed.json()["refresh_token"])).json()["error"] == "invalid_grant"


async def test_a_user_disabled_in_the_directory_cannot_sign_in_through_the_connector(corp, oidc_upstream):
    application, browser = corp
    tokens, _ = await sign_in_through_corp(browser, oidc_upstream)
    await application.state.iam.users.directory.set_active(id_token(application, tokens)["sub"], False)
    page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    params = await upstream_sign_in(oidc_upstream, await to_connector(browser, page))
    refused = await browser.get("/authn/connectors/corp/callback", params=params)
    assert refused.status_code == 403 and "cannot sign in" in refused.text
    assert "location" not in refused.headers


@pytest.mark.parametrize("case", ["missing", "reused", "other-browser", "other-connector-id"])
async def test_a_callback_without_this_browsers_pending_request_is_an_error_and_stores_nothing(
        corp, oidc_upstream, case):
    application, browser = corp
    page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    params = await upstream_sign_in(oidc_upstream, await to_connector(browser, page))
    if case == "missing":
        params.pop("state")
        answer = await browser.get("/authn/connectors/corp/callback", params=params)
    elif case == "reused":
        first = await browser.get("/authn/connectors/corp/callback", params=params)
        assert first.status_code == 303
        await application.state.iam.users.directory.delete_user(
            (await application.state.iam.users.directory.find("alice")).sub)
        answer = await browser.get("/authn/connectors/corp/callback", params=params)
    elif case == "other-browser":
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER) as other:
            answer = await other.get("/authn/connectors/corp/callback", params=params)
        # ... and the request stays for the browser that started it
        assert (await browser.get("/authn/connectors/corp/callback", params=params)).status_code == 303
        await application.state.iam.users.directory.delete_user(
            (await application.state.iam.users.directory.find("alice")).sub)
    else:
        answer = await browser.get("/authn/connectors/elsewhere/callback", params=params)
    assert answer.status_code in (400, 404) and "location" not in answer.headers
    assert "start again" in answer.text.lower()
    assert not any("iam_session" in c for c in answer.headers.get_list("set-cookie"))
    assert await application.state.iam.users.directory.count_users() == 0


async def test_the_person_declining_upstream_gets_the_sign_in_page_again(corp, oidc_upstream):
    application, browser = corp
    page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    to_upstream = await to_connector(browser, page)
    async with httpx.AsyncClient() as person:
        params = await oidc_upstream.decline(person, to_upstream.headers["location"], redirect_uri=CALLBACK)
    assert params["error"] == "access_denied"
    answer = await browser.get("/authn/connectors/corp/callback", params=params)
    assert answer.status_code == 400 and "did not complete" in answer.text
    assert params.get("error_description", "@@") not in answer.text  # upstream text is never shown as is
    assert 'name="password"' in answer.text  # the other ways to sign in are still there
    assert await application.state.iam.users.directory.count_users() == 0


async def test_an_unreachable_provider_says_so_and_the_password_still_works(tmp_path, store_urls):
    dead = f"http://127.0.0.1:{free_port()}"
    async with iam_with(tmp_path, store_urls, connectors=[corp_connector(dead, "iam", "s3cret-s3cret")]) \
            as (application, browser):
        from iam.users.directory import NewUser

        await application.state.iam.users.directory.create_user(NewUser(user_name="alice"), password=PASSWORD)
        page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
        answer = await to_connector(browser, page)
        assert answer.status_code == 503 and "Contoso is unavailable" in answer.text
        fields = hidden_fields(answer.text)
        signed_in = await browser.post("/authn/login", data={**fields, "username": "alice", "password": PASSWORD})
        assert signed_in.status_code == 303


async def test_link_by_email_links_a_verified_address_and_never_an_unverified_one(
        tmp_path, store_urls, oidc_upstream, upstream_client):
    from iam.users.directory import NewUser

    connector = corp_connector(oidc_upstream.issuer, *upstream_client, link_by="email")
    async with iam_with(tmp_path, store_urls, connectors=[connector]) as (application, browser):
        directory = application.state.iam.users.directory
        local_alice = await directory.create_user(NewUser(user_name="alice.l", email="alice@contoso.example",
                                                          email_verified=True))
        local_bob = await directory.create_user(NewUser(user_name="bob", email="bob@contoso.example",
                                                        email_verified=True))
        tokens, _ = await sign_in_through_corp(browser, oidc_upstream)  # verified upstream: linked
        assert id_token(application, tokens)["sub"] == local_alice
        browser.cookies.clear()
        tokens, _ = await sign_in_through_corp(browser, oidc_upstream, BOB)  # unverified upstream: a new user
        bob = id_token(application, tokens)
        assert bob["sub"] != local_bob and bob["preferred_username"] == "bob@corp"


async def test_login_hint_goes_upstream(corp, oidc_upstream):
    _, browser = corp
    page = await follow(browser, await authorize(browser, challenge=pkce()[1], login_hint="alice@contoso.example"),
                        WEBAPP)
    to_upstream = await to_connector(browser, page)
    assert "login_hint=alice%40contoso.example" in to_upstream.headers["location"]


async def test_without_the_password_form_one_connector_is_where_sign_in_starts(
        tmp_path, store_urls, oidc_upstream, upstream_client):
    async with iam_with(tmp_path, store_urls, password_login=False,
                        connectors=[corp_connector(oidc_upstream.issuer, *upstream_client)]) as (_, browser):
        page = await follow(browser, await authorize(browser, challenge=pkce()[1]), oidc_upstream.issuer)
        assert page.status_code == 303 and page.headers["location"].startswith(oidc_upstream.issuer)
        refused = await browser.post("/authn/login", data={"username": "alice", "password": PASSWORD})
        assert refused.status_code == 403


async def test_a_clients_allow_list_hides_other_connectors_and_the_token_role_enforces_it(
        tmp_path, store_urls, oidc_upstream, upstream_client, alice):
    from tests.conftest import client_config

    clients = [{**c, "connectors": []} if c["client_id"] == "webapp" else c for c in client_config()]
    async with iam_with(tmp_path, store_urls, clients=clients,
                        connectors=[corp_connector(oidc_upstream.issuer, *upstream_client)]) as (_, browser):
        page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
        assert page.status_code == 200 and "Sign in with Contoso" not in page.text
        flow = {k: v for k, v in hidden_fields(page.text).items() if k != "csrf"}
        hidden = await browser.get("/authn/connectors/corp/login", params=flow)
        assert hidden.status_code == 404  # not offered to this client, even by URL


async def test_require_mfa_asks_for_iams_own_code_after_the_upstream(
        tmp_path, store_urls, oidc_upstream, upstream_client):
    connector = corp_connector(oidc_upstream.issuer, *upstream_client, require_mfa=True)
    async with iam_with(tmp_path, store_urls, connectors=[connector]) as (application, browser):
        first, _ = await sign_in_through_corp(browser, oidc_upstream)  # not enrolled yet: the upstream suffices
        sub = id_token(application, first)["sub"]
        secret = await application.state.iam.authn.totp.start_enrolment(sub)
        assert await application.state.iam.authn.totp.verify(sub, pyotp.TOTP(secret).now(), confirming=True)
        browser.cookies.clear()
        page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
        params = await upstream_sign_in(oidc_upstream, await to_connector(browser, page))
        totp_page = await browser.get("/authn/connectors/corp/callback", params=params)
        assert totp_page.status_code == 200 and 'name="code"' in totp_page.text
        fields = hidden_fields(totp_page.text)
        code = pyotp.TOTP(secret).at(time.time() + 30)  # the next step: enrolment used this one
        done = await browser.post("/authn/login/totp", data={**fields, "code": code})
        session = await application.state.iam.authn.sessions.current(
            done.cookies.get("__Host-iam_session") or browser.cookies.get("__Host-iam_session"))
        assert session is not None and session.amr == ["pwd", "otp"] and session.connector == "corp"


async def test_no_upstream_secret_code_or_password_reaches_a_log_line(
        tmp_path, store_urls, oidc_upstream, upstream_client, caplog):
    from tests.conftest import find_leaks

    caplog.set_level("INFO")  # the production default (log_level: info)
    client_id, secret = upstream_client
    async with iam_with(tmp_path, store_urls, connectors=[corp_connector(oidc_upstream.issuer, client_id, secret)]) \
            as (_, browser):
        page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
        params = await upstream_sign_in(oidc_upstream, await to_connector(browser, page))
        assert (await browser.get("/authn/connectors/corp/callback", params=params)).status_code == 303
        replay = await browser.get("/authn/connectors/corp/callback", params=params)  # a failure is logged too
        assert replay.status_code == 400
    lines = [caplog.text]
    for value in (secret, ALICE.password, params["code"], params["state"]):
        assert value not in caplog.text
    assert not find_leaks(lines)


async def test_sign_ins_are_counted_per_connector_and_audited_with_the_connector_or_the_reason(
        corp, oidc_upstream, caplog):
    from tests.test_observability import metric

    caplog.set_level("INFO", logger="iam.audit")
    application, browser = corp
    before = (await browser.get("/metrics")).text
    await sign_in_through_corp(browser, oidc_upstream)
    browser.cookies.clear()
    page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    to_upstream = await to_connector(browser, page)
    async with httpx.AsyncClient() as person:
        declined = await oidc_upstream.decline(person, to_upstream.headers["location"], redirect_uri=CALLBACK)
    await browser.get("/authn/connectors/corp/callback", params=declined)
    after = (await browser.get("/metrics")).text
    for name, labels in (("iam_connector_sign_ins_total", {"connector": "corp", "result": "success"}),
                         ("iam_connector_sign_ins_total", {"connector": "corp", "result": "failure"}),
                         ("iam_connector_failures_total", {"connector": "corp", "reason": "access_denied"})):
        assert metric(after, name, **labels) == metric(before, name, **labels) + 1, (name, labels)
    assert metric(after, "iam_connector_upstream_duration_seconds_count", connector="corp", operation="finish") \
        >= metric(before, "iam_connector_upstream_duration_seconds_count", connector="corp", operation="finish") + 2
    events = [record.audit for record in caplog.records if record.name == "iam.audit"]
    succeeded = next(e for e in events if e["event"] == "login.succeeded")
    assert succeeded["details"]["connector"] == "corp" and succeeded["actor"]
    failed = next(e for e in events if e["event"] == "login.failed")
    assert failed["details"] == {"connector": "corp", "reason": "access_denied"}
    created = next(e for e in events if e["event"] == "user.created")
    assert created["details"]["connector"] == "corp"


async def test_upstream_amr_and_acr_say_how_the_person_signed_in(corp, oidc_upstream):
    """OIDC Core §2: acr and amr of the ID token; RFC 8176 values only are passed on."""
    application, browser = corp
    strong = Account("mona", "mona-upstream-pw-" + secrets.token_hex(4), "sub-mona-" + secrets.token_hex(3),
                     {"preferred_username": "mona", "email": "mona@contoso.example", "email_verified": True},
                     amr=["pwd", "hwk", "made-up"], acr="urn:contoso:loa:high")
    oidc_upstream.add_account(strong)
    tokens, _ = await sign_in_through_corp(browser, oidc_upstream, strong)
    claims = id_token(application, tokens)
    assert claims["amr"] == ["pwd", "hwk"] and claims["acr"] == "urn:contoso:loa:high"


async def test_a_pending_upstream_request_expires_after_ten_minutes_and_is_purged(corp, oidc_upstream):
    from sqlalchemy import func, select

    from iam.authn.store import upstream_requests

    application, browser = corp
    iam = application.state.iam
    page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
    params = await upstream_sign_in(oidc_upstream, await to_connector(browser, page))
    iam.authn.pending_upstream.clock = lambda: time.time() + 601
    try:
        late = await browser.get("/authn/connectors/corp/callback", params=params)
        assert late.status_code == 400 and "expired" in late.text
        assert await iam.authn.pending_upstream.purge_expired(int(time.time()) + 601, 100) == 1
    finally:
        iam.authn.pending_upstream.clock = time.time
    async with iam.stores["authn"].engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(upstream_requests))).scalar_one() == 0
    assert await iam.users.directory.count_users() == 0


async def test_logout_ends_the_iam_session_of_a_connector_sign_in(corp, oidc_upstream):
    _, browser = corp
    tokens, _ = await sign_in_through_corp(browser, oidc_upstream)
    response = await browser.get("/oauth/v2/end_session", params={
        "id_token_hint": tokens["id_token"], "post_logout_redirect_uri": "https://app.test/bye"})
    out = await browser.get(response.headers["location"])
    assert out.status_code == 303 and out.headers["location"].startswith("https://app.test/bye")
    silent = await follow(browser, await authorize(browser, challenge=pkce()[1], prompt="none"), WEBAPP)
    assert query(silent.headers["location"])["error"] == "login_required"  # no SSO session left
