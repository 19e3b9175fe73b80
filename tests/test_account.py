"""The signed-in person's account page: changing one's own password (ASVS 5 V6.2.2-3, V7.4.3) and removing an
application's access (ASVS 5 V10.4.9)."""

import httpx
import pytest

from iam.peers import PeerUnavailable
from tests.conftest import ISSUER, PASSWORD, basic
from tests.oauth import hidden_fields, refresh, sign_in
from tests.test_code_grant import tokens_for
from tests.test_login import login_page

NEW_PASSWORD = "a brand new passphrase for alice"


@pytest.fixture
async def other_browser(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        yield http


async def change(client, current: str, new: str, **override) -> httpx.Response:
    form = await client.get("/authn/password")
    assert form.status_code == 200
    return await client.post("/authn/password", data={**hidden_fields(form.text), "current": current, "new": new,
                                                      **override})


async def signs_in(client, password: str) -> bool:
    client.cookies.clear()
    return (await sign_in(client, await login_page(client, prompt="login"), password=password)).status_code == 303


async def test_the_password_form_asks_for_the_current_one_and_suits_password_managers(client, alice):
    assert (await client.get("/authn/password")).headers["location"] == "/authn/login"  # signed out: sign in first
    await sign_in(client, await login_page(client))
    account = await client.get("/authn/account")
    assert 'href="/authn/password"' in account.text
    html = (await client.get("/authn/password")).text
    assert 'autocomplete="current-password"' in html and 'autocomplete="new-password"' in html
    assert '<label for="current">' in html and '<label for="new">' in html and 'name="csrf"' in html


async def test_a_password_change_signs_out_the_other_sessions_and_only_the_new_password_works(
        client, other_browser, alice, caplog):
    await sign_in(other_browser, await login_page(other_browser))
    await sign_in(client, await login_page(client))
    done = await change(client, PASSWORD, NEW_PASSWORD)
    assert done.status_code == 200 and "Your password was changed" in done.text
    assert (await client.get("/authn/account")).status_code == 200  # this session goes on
    assert (await other_browser.get("/authn/account")).status_code == 303  # the other one was signed out
    assert [r.audit["event"] for r in caplog.records if hasattr(r, "audit")][-1] == "password.changed"
    assert await signs_in(client, NEW_PASSWORD)
    assert not await signs_in(client, PASSWORD)


async def test_a_wrong_current_password_or_a_refused_new_one_changes_nothing(client, alice, caplog):
    await sign_in(client, await login_page(client))
    wrong = await change(client, "not the password", NEW_PASSWORD)
    assert wrong.status_code == 401 and "current password is not correct" in wrong.text
    assert any(getattr(r, "audit", {}).get("event") == "reauthentication.failed" for r in caplog.records)
    common = await change(client, PASSWORD, "Password123")
    assert common.status_code == 400 and "commonly used" in common.text
    short = await change(client, PASSWORD, "short")
    assert short.status_code == 400 and "at least 8 characters" in short.text
    no_csrf = await change(client, PASSWORD, NEW_PASSWORD, csrf="forged")
    assert no_csrf.status_code == 403
    assert await signs_in(client, PASSWORD)


async def test_guessing_the_current_password_is_throttled(client, alice):
    await sign_in(client, await login_page(client))
    statuses = [(await change(client, f"guess number {n}", NEW_PASSWORD)).status_code for n in range(7)]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429
    assert (await change(client, PASSWORD, NEW_PASSWORD)).status_code == 429  # even the right one, while locked


async def test_the_account_page_shows_no_notice_taken_from_the_url(client, alice):
    await sign_in(client, await login_page(client))
    page = await client.get("/authn/account", params={"notice": "Call +1 555 0100 to verify your account"})
    assert page.status_code == 200 and "555 0100" not in page.text
    form = await client.get("/authn/password", params={"error": "Injected text", "status": "500"})
    assert form.status_code == 200 and "Injected text" not in form.text


# -- applications (ASVS 5 V10.4.9) -----------------------------------------------------------------------------
async def remove_access(client, client_id: str, **override) -> httpx.Response:
    page = await client.get("/authn/account")
    return await client.post("/authn/account/applications",
                             data={"csrf": hidden_fields(page.text)["csrf"], "client_id": client_id, **override})


async def test_the_account_lists_the_applications_holding_a_live_grant(client, alice):
    empty = await client.get("/authn/account")  # no session yet: to the sign-in page
    assert empty.status_code == 303
    web = await tokens_for(client, scope="openid email")
    await tokens_for(client, client_id="kubectl", redirect_uri="http://127.0.0.1:7000/callback",
                     scope="openid offline_access")
    page = (await client.get("/authn/account")).text
    assert "Web App" in page and "email openid" in page  # scopes sorted
    assert "kubectl" in page and "offline_access openid" in page
    assert 'aria-label="Remove access of Web App"' in page
    # Once every token of a grant is spent or gone, the application is no longer listed.
    await client.post("/oauth/v2/revoke", data={"token": web["refresh_token"]}, headers=basic("webapp"))
    assert "Web App" not in (await client.get("/authn/account")).text


async def test_removing_an_applications_access_revokes_its_tokens_and_no_others(client, alice, caplog):
    web = await tokens_for(client)
    kube = await tokens_for(client, client_id="kubectl", redirect_uri="http://127.0.0.1:7000/callback",
                            scope="openid offline_access")
    removed = await remove_access(client, "webapp")
    assert removed.status_code == 200 and "Access removed." in removed.text and "Web App" not in removed.text
    assert any(getattr(r, "audit", {}).get("event") == "access.removed" for r in caplog.records)
    assert (await refresh(client, web["refresh_token"])).json()["error"] == "invalid_grant"
    introspected = await client.post("/oauth/v2/introspect", data={"token": web["access_token"]},
                                     headers=basic("webapp"))
    assert introspected.json() == {"active": False}
    assert (await refresh(client, kube["refresh_token"], client_id="kubectl")).status_code == 200  # untouched
    again = await remove_access(client, "webapp")  # nothing left to remove: no notice
    assert again.status_code == 200 and "Access removed." not in again.text
    assert (await client.get("/authn/account")).status_code == 200  # the SSO session goes on


async def test_removing_access_needs_the_form_token_and_touches_only_ones_own_grants(client, app, alice):
    web = await tokens_for(client)
    assert (await remove_access(client, "webapp", csrf="forged")).status_code == 403
    assert (await remove_access(client, "no-such-client")).status_code == 200
    # Another person removing "webapp" from their own account leaves alice's grant alone.
    from iam.users.directory import NewUser

    await app.state.iam.users.directory.create_user(NewUser(user_name="bob"), password="bob's long passphrase")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as bob:
        await sign_in(bob, await login_page(bob), username="bob", password="bob's long passphrase")
        assert (await remove_access(bob, "webapp")).status_code == 200
    assert (await refresh(client, web["refresh_token"])).status_code == 200


# -- an operator signs a user out everywhere (ASVS 5 V7.4.5) ---------------------------------------------------
async def test_an_operator_signs_a_user_out_everywhere_and_they_can_sign_in_again(client, app, alice, caplog):
    web = await tokens_for(client)
    await app.state.iam.users.directory.sign_out_everywhere(alice)
    assert (await client.get("/authn/account")).status_code == 303  # the SSO session is over
    assert (await refresh(client, web["refresh_token"])).json()["error"] == "invalid_grant"
    introspected = await client.post("/oauth/v2/introspect", data={"token": web["access_token"]},
                                     headers=basic("webapp"))
    assert introspected.json() == {"active": False}
    assert any(getattr(r, "audit", {}).get("event") == "user.signed_out" for r in caplog.records)
    assert await signs_in(client, PASSWORD)  # still an active user


async def test_signing_out_fails_loudly_when_a_role_cannot_be_told(app, alice):
    async def unreachable(sub: str) -> None:
        raise PeerUnavailable("the token role did not answer")

    app.state.iam.users.directory.on_disabled.append(unreachable)
    with pytest.raises(PeerUnavailable):
        await app.state.iam.users.directory.sign_out_everywhere(alice)
