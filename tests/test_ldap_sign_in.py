"""Sign-in through an LDAP connector's form against a real slapd (tests/ldap_server.py), through iam's ASGI app
on SQLite and PostgreSQL: the password checked by the directory server, throttled like iam's own form, and the
person re-checked with the service bind at every refresh."""

from __future__ import annotations

import secrets

import pytest

from tests.conftest import PASSWORD
from tests.oauth import authorize, follow, hidden_fields, pkce, query, redeem, refresh
from tests.test_connector_sign_in import WEBAPP, iam_with, id_token, to_connector


@pytest.fixture
async def ldap(tmp_path, store_urls, ldap_server):
    async with iam_with(tmp_path, store_urls, connectors=[ldap_server.connector_config(id="ad")]) as pair:
        yield pair


async def ldap_form(browser, **authorize_extra):
    page = await follow(browser, await authorize(browser, challenge=authorize_extra.pop("challenge"),
                                                 **authorize_extra), WEBAPP)
    form = await to_connector(browser, page, "Example Directory")
    assert form.status_code == 200 and "Sign in with Example Directory" in form.text
    return form


async def post_form(browser, form, username, password):
    return await browser.post("/authn/connectors/ad/login",
                              data={**hidden_fields(form.text), "username": username, "password": password})


async def ldap_code_flow(browser, username, password, scope="openid profile email groups"):
    verifier, challenge = pkce()
    form = await ldap_form(browser, challenge=challenge, scope=scope)
    back = await follow(browser, await post_form(browser, form, username, password), WEBAPP)
    assert back.status_code in (302, 303) and back.headers["location"].startswith(WEBAPP), back.text
    tokens = await redeem(browser, query(back.headers["location"])["code"], verifier)
    assert tokens.status_code == 200, tokens.text
    return tokens.json()


def add_person(server, uid: str, password: str, group: str | None = None) -> None:
    server.modify(f"dn: {server.user_dn(uid)}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: {uid}\n"
                  f"cn: {uid.title()}\nsn: {uid}\nmail: {uid}@example.test\nuserPassword: {password}\n")
    if group:
        server.modify(f"dn: cn={group},{server.groups_dn}\nchangetype: modify\nadd: member\n"
                      f"member: {server.user_dn(uid)}\n")


async def test_the_ldap_form_signs_in_and_the_id_token_has_the_directory_groups(ldap, ldap_server):
    application, browser = ldap
    tokens = await ldap_code_flow(browser, "alice", ldap_server.password_of("alice"))
    claims = id_token(application, tokens)
    assert claims["preferred_username"] == "alice" and claims["amr"] == ["pwd"]
    assert "engineering" in claims["groups"]
    assert (await application.state.iam.authn.sessions.current(
        browser.cookies.get("__Host-iam_session"))).connector == "ad"
    assert browser.cookies.get("__Host-iam_device")  # a known device for this directory account from now on


async def test_a_wrong_password_an_unknown_user_and_a_filter_injection_get_one_answer_and_store_nothing(
        ldap, ldap_server):
    application, browser = ldap
    form = await ldap_form(browser, challenge=pkce()[1])
    for username, password in (("alice", "not-her-password"), ("nobody", "whatever-pw"), ("*)(uid=*", "x"),
                               ("*", ldap_server.password_of("alice")), ("alice", "")):
        answer = await post_form(browser, form, username, password)
        assert answer.status_code == 401 and "Incorrect username or password." in answer.text, username
        assert "location" not in answer.headers
    assert await application.state.iam.users.directory.count_users() == 0


async def test_ldap_attempts_are_throttled_like_local_ones(ldap, ldap_server):
    _, browser = ldap
    form = await ldap_form(browser, challenge=pkce()[1])
    for _ in range(5):
        assert (await post_form(browser, form, "bob", "wrong-password")).status_code == 401
    locked = await post_form(browser, form, "bob", ldap_server.password_of("bob"))  # even the right one waits
    assert locked.status_code == 429 and "Too many attempts" in locked.text


async def test_a_locked_directory_account_cannot_sign_in(ldap, ldap_server):
    application, browser = ldap
    form = await ldap_form(browser, challenge=pkce()[1])
    assert (await post_form(browser, form, "carol", ldap_server.password_of("carol"))).status_code == 401
    assert await application.state.iam.users.directory.count_users() == 0


async def test_the_directory_down_says_so_and_the_local_password_still_works(ldap, ldap_server, alice):
    application, browser = ldap
    form = await ldap_form(browser, challenge=pkce()[1])
    with ldap_server.stopped():
        answer = await post_form(browser, form, "alice", ldap_server.password_of("alice"))
        assert answer.status_code == 503 and "Example Directory is unavailable" in answer.text
        page = await follow(browser, await authorize(browser, challenge=pkce()[1]), WEBAPP)
        signed_in = await browser.post("/authn/login", data={**hidden_fields(page.text), "username": "alice",
                                                              "password": PASSWORD})
        assert signed_in.status_code == 303


async def test_refresh_rechecks_the_person_with_the_service_bind(ldap, ldap_server):
    application, browser = ldap
    uid, password = "dave-" + secrets.token_hex(3), "dave-pw-" + secrets.token_hex(8)
    add_person(ldap_server, uid, password, group="ops")
    tokens = await ldap_code_flow(browser, uid, password, scope="openid groups offline_access")
    assert "ops" in id_token(application, tokens)["groups"]
    # a group change in the directory shows at the next refresh
    ldap_server.modify(f"dn: cn=ops,{ldap_server.groups_dn}\nchangetype: modify\ndelete: member\n"
                       f"member: {ldap_server.user_dn(uid)}\n")
    refreshed = await refresh(browser, tokens["refresh_token"])
    assert refreshed.status_code == 200 and "ops" not in id_token(application, refreshed.json()).get("groups", [])
    # the directory down: try again later, the refresh token is not spent
    with ldap_server.stopped():
        unavailable = await refresh(browser, refreshed.json()["refresh_token"])
        assert unavailable.status_code == 503 and unavailable.json()["error"] == "temporarily_unavailable"
    again = await refresh(browser, refreshed.json()["refresh_token"])
    assert again.status_code == 200
    # removed from the directory: access ends at the next refresh
    ldap_server.delete(ldap_server.user_dn(uid))
    gone = await refresh(browser, again.json()["refresh_token"])
    assert gone.status_code == 400 and gone.json()["error"] == "invalid_grant"


async def test_device_flow_through_the_ldap_connector(ldap, ldap_server):
    application, browser = ldap
    started = await browser.post("/oauth/v2/device_authorization",
                                 data={"client_id": "kubectl", "scope": "openid groups"})
    device = started.json()
    page = await browser.get("/authn/device", params={"user_code": device["user_code"]})
    assert page.status_code == 200 and "Sign in with Example Directory" in page.text
    form = await to_connector(browser, page, "Example Directory")
    signed_in = await post_form(browser, form, "alice", ldap_server.password_of("alice"))
    confirm = await follow(browser, signed_in, "none")
    assert confirm.status_code == 200 and "alice" in confirm.text.lower()
    decided = await browser.post("/authn/device", data={**hidden_fields(confirm.text), "decision": "approve"})
    assert decided.status_code == 200
    tokens = await browser.post("/oauth/v2/token", data={
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": device["device_code"],
        "client_id": "kubectl"})
    assert tokens.status_code == 200, tokens.text
    claims = id_token(application, tokens.json())
    assert "engineering" in claims["groups"] and claims["amr"] == ["pwd"]


async def test_the_token_role_asks_the_authentication_role_over_its_internal_api(ldap, ldap_server):
    """The re-check as the token role makes it when the roles run apart (RemoteUpstreamChecks)."""
    import httpx

    from iam.peers import PeerUnavailable, RemoteUpstreamChecks, ServiceIdentity
    from iam.roles import Role
    from tests.conftest import ISSUER

    application, browser = ldap
    uid, password = "erin-" + secrets.token_hex(3), "erin-pw-" + secrets.token_hex(8)
    add_person(ldap_server, uid, password)
    sub = id_token(application, await ldap_code_flow(browser, uid, password))["sub"]
    keys = application.state.iam.keys
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER) as http:
        remote = RemoteUpstreamChecks(http, ISSUER, ServiceIdentity(Role.TOKEN, keys), Role.AUTHENTICATION)
        assert await remote.recheck(sub, "ad") is True
        with ldap_server.stopped(), pytest.raises(PeerUnavailable):
            await remote.recheck(sub, "ad")
        ldap_server.delete(ldap_server.user_dn(uid))
        assert await remote.recheck(sub, "ad") is False
        assert await remote.recheck(sub, "no-such-connector") is False
        users_role = RemoteUpstreamChecks(http, ISSUER, ServiceIdentity(Role.USER_MANAGEMENT, keys),
                                          Role.AUTHENTICATION)
        with pytest.raises(Exception, match="refused"):  # only the token role may ask
            await users_role.recheck(sub, "ad")
