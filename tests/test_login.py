"""Sign-in, sessions, TOTP, throttling and logout on the authentication role (OIDC Core §3.1.2.1,
RP-Initiated Logout, RFC 9700 §4.12/§4.16, ASVS V6/V7)."""

import asyncio
import re
import time

import pyotp
from sqlalchemy import update

from tests.conftest import ISSUER, PASSWORD
from tests.oauth import authorize, code_flow, follow, hidden_fields, pkce, query, redeem, refresh, sign_in
from tests.test_code_grant import tokens_for, verify_id_token


async def login_page(client, **extra):
    response = await follow(client, await authorize(client, challenge=pkce()[1], **extra), "https://app.test/")
    return response


async def test_login_page_is_accessible_hardened_and_sets_no_session(client, alice):
    page = await login_page(client)
    assert page.status_code == 200
    html = page.text
    assert 'autocomplete="username"' in html and 'autocomplete="current-password"' in html
    assert '<label for="username">' in html and '<label for="password">' in html
    assert "Web App" in html  # the client's name
    assert 'name="csrf"' in html
    # No inline script, nothing third-party: the one script is iam's own (passkeys), allowed by script-src 'self'.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/assets/passkeys.js" defer>']
    assert "http://" not in html.replace("http://www.w3.org", "")
    assert "script-src 'self';" in page.headers["content-security-policy"]
    headers = page.headers
    assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "no-referrer"
    assert not any("iam_session" in c for c in headers.get_list("set-cookie"))


async def test_successful_login_sets_a_hardened_session_cookie_and_redirects_with_303(client, alice):
    response = await sign_in(client, await login_page(client))
    assert response.status_code == 303  # RFC 9700 §4.12: never 307
    cookie = next(c for c in response.headers.get_list("set-cookie") if "iam_session" in c)
    assert cookie.startswith("__Host-iam_session=")  # https issuer: __Host- prefix
    for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Path=/"):
        assert attribute.lower() in cookie.lower()
    assert "domain" not in cookie.lower()


async def test_wrong_password_and_unknown_user_get_the_same_generic_answer(client, alice):
    wrong = await sign_in(client, await login_page(client), password="wrong password!")
    unknown = await sign_in(client, await login_page(client), username="mallory", password="whatever1")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert "Incorrect username or password." in response.text
        assert "location" not in response.headers
    assert re.sub(r'value="[^"]*"', "", wrong.text).replace("alice", "") == \
        re.sub(r'value="[^"]*"', "", unknown.text).replace("mallory", "")


async def test_login_without_the_csrf_token_is_refused(client, alice):
    page = await login_page(client)
    fields = hidden_fields(page.text)
    fields.pop("csrf")
    response = await client.post("/authn/login", data={**fields, "username": "alice", "password": PASSWORD})
    assert response.status_code == 403 and "location" not in response.headers
    cross_site = await client.post("/authn/login", data={**hidden_fields(page.text), "username": "alice",
                                                          "password": PASSWORD},
                                   headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 403


async def test_repeated_failures_lock_the_account_for_a_while(client, alice):
    page = await login_page(client)
    for _ in range(5):
        assert (await sign_in(client, page, password="not the password")).status_code == 401
    locked = await sign_in(client, page)  # even the right password waits out the lock
    assert locked.status_code == 429 and "Too many attempts" in locked.text


async def test_a_disabled_user_cannot_sign_in(client, app, alice):
    await app.state.iam.users.directory.set_active(alice, False)
    assert (await sign_in(client, await login_page(client))).status_code == 401


async def test_sso_second_client_gets_a_code_without_signing_in_again(client, alice):
    first, _, _ = await code_flow(client)
    assert "code" in first
    response = await authorize(client, "kubectl", "http://127.0.0.1:8123/callback", "openid", pkce()[1])
    done = await follow(client, response, "http://127.0.0.1:8123/")
    assert done.status_code in (302, 303) and "code" in query(done.headers["location"])


async def test_prompt_none_with_a_session_succeeds_silently_with_the_same_auth_time(client, alice):
    first = await tokens_for(client)
    claims = await verify_id_token(client, first["id_token"])
    params, verifier, _ = await code_flow(client, prompt="none", id_token_hint=first["id_token"])
    second = (await redeem(client, params["code"], verifier)).json()
    again = await verify_id_token(client, second["id_token"])
    assert again["sub"] == claims["sub"] and again["auth_time"] == claims["auth_time"]


async def test_prompt_login_forces_a_new_sign_in_with_a_later_auth_time(client, alice):
    first = await verify_id_token(client, (await tokens_for(client))["id_token"])
    await asyncio.sleep(1.1)
    page = await login_page(client, prompt="login")
    assert page.status_code == 200 and 'name="password"' in page.text  # the form, not a silent redirect
    done = await follow(client, await sign_in(client, page), "https://app.test/")
    code = query(done.headers["location"])["code"]
    # (the verifier of login_page's request is not kept; use a fresh flow for the auth_time check)
    assert code
    params, verifier, _ = await code_flow(client, prompt="login")
    second = await verify_id_token(client, (await redeem(client, params["code"], verifier)).json()["id_token"])
    assert second["auth_time"] > first["auth_time"]


async def test_max_age_forces_a_new_sign_in_once_exceeded(client, alice):
    first = await verify_id_token(client, (await tokens_for(client))["id_token"])
    params, verifier, _ = await code_flow(client, max_age="10000")  # within: no form
    same = await verify_id_token(client, (await redeem(client, params["code"], verifier)).json()["id_token"])
    assert same["auth_time"] == first["auth_time"]
    await asyncio.sleep(2.1)
    page = await login_page(client, max_age="1")
    assert page.status_code == 200 and 'name="password"' in page.text


async def test_prompt_none_when_max_age_is_exceeded_is_login_required(client, alice):
    await tokens_for(client)
    await asyncio.sleep(2.1)
    response = await follow(client, await authorize(client, challenge=pkce()[1], prompt="none", max_age="1"),
                            "https://app.test/")
    assert query(response.headers["location"])["error"] == "login_required"


async def test_a_handoff_cannot_be_replayed_or_forged(client, app, alice):
    page = await login_page(client)
    signed = await sign_in(client, page)
    resume = signed.headers["location"]
    assert resume.startswith(f"{ISSUER}/oauth/v2/authorize/resume?")
    assert (await client.get(resume)).status_code == 302  # first use: code to the client
    replay = await client.get(resume)
    assert replay.status_code == 400 and "location" not in replay.headers
    # A handoff signed by another key, or for another request, is refused.
    from iam.keys import KeyRing
    from iam.peers import HANDOFF_TYP, ServiceIdentity
    from iam.roles import Role

    page = await login_page(client, prompt="login")
    request_id = hidden_fields(page.text)["request"]
    rogue = KeyRing(app.state.iam.settings.keys.dir.parent / "rogue").load(generate=True)
    forged = ServiceIdentity(Role.AUTHENTICATION, rogue).sign(
        Role.TOKEN, HANDOFF_TYP, {"req": request_id, "sub": alice, "auth_time": int(time.time()), "amr": ["pwd"]})
    response = await client.get("/oauth/v2/authorize/resume", params={"request": request_id, "handoff": forged})
    assert response.status_code == 400 and "location" not in response.headers
    genuine_other = app.state.iam.identity.sign(
        Role.TOKEN, HANDOFF_TYP, {"req": "x" * 32, "sub": alice, "auth_time": int(time.time())},
        issuer=Role.AUTHENTICATION)
    response = await client.get("/oauth/v2/authorize/resume", params={"request": request_id, "handoff": genuine_other})
    assert response.status_code == 400


async def test_totp_enrolment_then_sign_in_needs_the_code_once(client, app, alice):
    await sign_in(client, await login_page(client))
    setup = await client.get("/authn/totp/setup")
    assert setup.status_code == 200 and 'autocomplete="one-time-code"' in setup.text
    secret = re.search(r"<code>([A-Z2-7]+)</code>", setup.text).group(1)
    csrf = hidden_fields(setup.text)["csrf"]
    wrong = await client.post("/authn/totp/setup", data={"csrf": csrf, "code": "000000", "password": PASSWORD})
    assert wrong.status_code == 400 and "code is not valid" in wrong.text
    enrolment_code = pyotp.TOTP(secret).now()
    # The session alone cannot bind an authenticator: the password is asked again (ASVS 5 V7.5.1).
    no_password = await client.post("/authn/totp/setup", data={"csrf": csrf, "code": enrolment_code,
                                                               "password": "not the password"})
    assert no_password.status_code == 400 and "password is not correct" in no_password.text
    assert not await app.state.iam.authn.totp.enabled(alice)
    confirm = await client.post("/authn/totp/setup", data={"csrf": csrf, "code": enrolment_code,
                                                           "password": PASSWORD})
    assert confirm.status_code == 200 and "Two-step verification is on" in confirm.text
    again = await client.get("/authn/totp/setup")  # a confirmed factor is never replaced by a new secret
    assert again.status_code == 200 and "already on" in again.text and "<code>" not in again.text

    # A new browser: password, then the code.
    client.cookies.clear()
    step = await sign_in(client, await login_page(client, prompt="login"))
    assert step.status_code == 200 and 'name="mfa"' in step.text
    fields = hidden_fields(step.text)
    # The code used at enrolment cannot be used again (whether or not its step has passed since).
    assert (await client.post("/authn/login/totp", data={**fields, "code": enrolment_code})).status_code == 401
    # The next step's code (within the allowed clock skew) is fresh.
    done = await client.post("/authn/login/totp", data={**fields, "code": pyotp.TOTP(secret).at(time.time() + 30)})
    assert done.status_code == 303
    final = await follow(client, done, "https://app.test/")
    params = query(final.headers["location"])
    assert "code" in params


async def test_logout_ends_the_session_and_only_the_requesting_clients_grants(client, alice):
    web = await tokens_for(client)
    kube = await tokens_for(client, client_id="kubectl", redirect_uri="http://127.0.0.1:7000/callback",
                            scope="openid offline_access")
    response = await client.get("/oauth/v2/end_session", params={
        "id_token_hint": web["id_token"], "post_logout_redirect_uri": "https://app.test/bye", "state": "bye-1"})
    assert response.status_code == 302
    out = await client.get(response.headers["location"])
    assert out.status_code == 303 and out.headers["location"] == "https://app.test/bye?state=bye-1"
    assert (await refresh(client, web["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await refresh(client, kube["refresh_token"], client_id="kubectl")).status_code == 200  # untouched
    silent = await follow(client, await authorize(client, challenge=pkce()[1], prompt="none"), "https://app.test/")
    assert query(silent.headers["location"])["error"] == "login_required"  # the SSO session is gone


async def test_logout_never_redirects_to_an_unregistered_address(client, alice):
    web = await tokens_for(client)
    for uri in ("https://evil.test/", "https://app.test/bye?foo=bar", "https://app.test/cb"):
        response = await client.get("/oauth/v2/end_session", params={
            "id_token_hint": web["id_token"], "post_logout_redirect_uri": uri})
        assert response.status_code == 400 and "location" not in response.headers


async def test_logout_without_a_hint_asks_first(client, alice):
    await tokens_for(client)
    response = await client.get("/oauth/v2/end_session")
    confirm = await client.get(response.headers["location"])
    assert confirm.status_code == 200 and "Sign out?" in confirm.text
    signed_out = await client.post("/authn/logout", data=hidden_fields(confirm.text))
    assert signed_out.status_code == 200 and "You are signed out" in signed_out.text
    silent = await follow(client, await authorize(client, challenge=pkce()[1], prompt="none"), "https://app.test/")
    assert query(silent.headers["location"])["error"] == "login_required"


async def test_expired_sessions_are_not_reused(client, app, alice):
    from iam.authn.store import sessions

    await tokens_for(client)
    async with app.state.iam.stores["authn"].engine.begin() as conn:
        await conn.execute(update(sessions).values(expires_at=0))
    page = await login_page(client)
    assert page.status_code == 200 and 'name="password"' in page.text


async def test_account_page_needs_a_session(client, alice):
    response = await client.get("/authn/account")
    assert response.status_code == 303 and response.headers["location"] == "/authn/login"
    page = await client.get("/authn/login")
    done = await sign_in(client, page)
    assert done.headers["location"] == "/authn/account"
    account = await client.get("/authn/account")
    assert "alice@example.com" in account.text and "admins" in account.text


async def test_open_redirect_parameters_are_ignored(client, alice):
    for name in ("next", "return_to", "redirect", "url", "continue"):
        client.cookies.clear()
        page = await client.get("/authn/login", params={name: "https://evil.test"})
        assert page.status_code == 200 and "evil.test" not in page.text
        done = await sign_in(client, page)
        assert done.headers["location"] == "/authn/account"
        signed_in = await client.get("/authn/login", params={name: "https://evil.test"})
        assert signed_in.headers["location"] == "/authn/account"


async def test_logout_for_another_session_asks_and_ends_only_this_browsers_session(app, alice):
    """OIDC RP-Initiated Logout §2: a hint that does not name this browser's session is confirmed first."""
    import httpx

    from tests.oauth import authorize as start

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as victim, \
            httpx.AsyncClient(transport=transport, base_url=ISSUER) as other:
        theirs = await tokens_for(other)  # another browser's session and ID token
        await tokens_for(victim)
        response = await victim.get("/oauth/v2/end_session", params={"id_token_hint": theirs["id_token"]})
        confirm = await victim.get(response.headers["location"])
        assert confirm.status_code == 200 and "Sign out?" in confirm.text  # asked, not signed out
        # Still signed in until the person confirms.
        silent = await follow(victim, await start(victim, challenge=pkce()[1], prompt="none"), "https://app.test/")
        assert "code" in query(silent.headers["location"])
        # The other browser's SSO session is untouched by the victim's confirmation.
        await victim.post("/authn/logout", data=hidden_fields(confirm.text))
        still = await follow(other, await start(other, challenge=pkce()[1], prompt="none"), "https://app.test/")
        assert "code" in query(still.headers["location"])
