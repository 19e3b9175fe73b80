"""Passkeys (WebAuthn Level 2/3) through the real ASGI app, on SQLite and PostgreSQL, with a software authenticator
(tests/soft_authenticator.py) standing in for the browser and the passkey provider.

Registration needs the password again; a passkey alone signs in (user verification required) and so does a passkey
as the second step after the password; the ID token's amr (RFC 8176) and acr say which. Every forged answer (wrong
origin, RP ID or challenge, a challenge used twice or by another browser, a counter that went back, a removed
credential) gets a clear page and changes nothing: no session, the stored counter as it was.
"""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import func, select

from iam.authn.store import passkey_challenges, passkeys, sessions
from tests.conftest import ISSUER, PASSWORD
from tests.oauth import authorize, follow, hidden_fields, pkce, query, redeem, sign_in
from tests.soft_authenticator import SoftAuthenticator, b64url
from tests.test_code_grant import verify_id_token

APP = "https://app.test/"
MFA = "urn:iam:acr:mfa"
SESSION = "__Host-iam_session"


@pytest.fixture
def authenticator() -> SoftAuthenticator:
    return SoftAuthenticator(ISSUER)


@pytest.fixture
async def other_browser(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        yield http


# -- helpers: the browser's part ------------------------------------------------------------------------------
async def signed_in_with_password(client) -> None:
    page = await client.get("/authn/login")
    done = await sign_in(client, page)
    assert done.status_code == 303 and done.headers["location"] == "/authn/account", done.text


async def registration_options(client, password: str = PASSWORD) -> httpx.Response:
    account = await client.get("/authn/account")
    assert account.status_code == 200
    return await client.post("/authn/passkeys/registration/options",
                             data={"csrf": hidden_fields(account.text)["csrf"], "password": password})


async def register(client, authenticator: SoftAuthenticator, name: str = "Laptop", **forged) -> httpx.Response:
    options = await registration_options(client)
    assert options.status_code == 200, options.text
    assert options.headers["cache-control"] == "no-store"
    answer = authenticator.create(options.json(), **forged)
    csrf = hidden_fields((await client.get("/authn/account")).text)["csrf"]
    return await client.post("/authn/passkeys", data={"csrf": csrf, "name": name, "credential": json.dumps(answer)})


async def registered(client, app, authenticator: SoftAuthenticator, name: str = "Laptop") -> None:
    """A passkey added from the account page of a password session, then signed out."""
    await signed_in_with_password(client)
    done = await register(client, authenticator, name)
    assert done.status_code == 200 and f"Passkey \u201c{name}\u201d added." in done.text, done.text
    client.cookies.clear()


async def sign_in_options(client, fields: dict[str, str]) -> dict:
    options = await client.post("/authn/passkeys/sign-in/options",
                                data={k: v for k, v in fields.items() if k in ("csrf", "mfa")})
    assert options.status_code == 200, options.text
    return options.json()


async def passkey_sign_in(client, page: httpx.Response, authenticator: SoftAuthenticator, **forged) -> httpx.Response:
    """The sign-in page's "Sign in with a passkey" (or the second step's "Use a passkey")."""
    assert page.status_code == 200, page.text
    fields = hidden_fields(page.text)
    answer = authenticator.get(await sign_in_options(client, fields), **forged)
    return await client.post("/authn/login/passkey", data={**fields, "credential": json.dumps(answer)})


async def id_token_after(client, signed_in: httpx.Response, verifier: str) -> dict:
    callback = await follow(client, signed_in, APP)
    assert callback.status_code in (302, 303), callback.text
    tokens = await redeem(client, query(callback.headers["location"])["code"], verifier)
    assert tokens.status_code == 200, tokens.text
    return await verify_id_token(client, tokens.json()["id_token"])


async def code_flow_login_page(client) -> tuple[httpx.Response, str]:
    verifier, challenge = pkce()
    return await follow(client, await authorize(client, challenge=challenge), APP), verifier


# -- helpers: what is stored --------------------------------------------------------------------------------------
async def stored(app) -> dict:
    """What a refused answer must leave as it was: each passkey's counter, flags and last use, and the sessions."""
    async with app.state.iam.authn.store.engine.connect() as conn:
        keys = [tuple(row) for row in await conn.execute(
            select(passkeys.c.id, passkeys.c.name, passkeys.c.sign_count, passkeys.c.backup_state,
                   passkeys.c.last_used_at).order_by(passkeys.c.id))]
        count = (await conn.execute(select(func.count()).select_from(sessions))).scalar_one()
    return {"passkeys": keys, "sessions": count}


async def challenges(app) -> int:
    async with app.state.iam.authn.store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(passkey_challenges))).scalar_one()


# -- registration ---------------------------------------------------------------------------------------------------
async def test_adding_a_passkey_needs_the_password_again(client, app, alice, authenticator):
    """ASVS 5 V7.5.1: the session alone cannot add a credential. Without the password there is no challenge, and an
    answer to a challenge never issued adds nothing."""
    before = await stored(app)
    unsigned = await client.post("/authn/passkeys/registration/options", data={"csrf": "x", "password": PASSWORD})
    assert unsigned.status_code == 403 and "error" in unsigned.json()
    await signed_in_with_password(client)
    for password in ("", "not the password"):
        refused = await registration_options(client, password)
        assert refused.status_code == 401 and refused.json() == {"error": "Your current password is not correct."}
    assert await challenges(app) == 0
    # A registration answer made up without the options (its challenge never issued): refused, nothing stored.
    forged = authenticator.create({"rp": {"id": "iam.test"}, "user": {"id": "YWxpY2U"}, "challenge": "bm9wZQ",
                                   "pubKeyCredParams": [{"alg": -7, "type": "public-key"}]})
    csrf = hidden_fields((await client.get("/authn/account")).text)["csrf"]
    done = await client.post("/authn/passkeys", data={"csrf": csrf, "name": "Mine", "credential": json.dumps(forged)})
    assert done.status_code == 400 and "could not be added" in done.text
    # No CSRF token: refused as every other form post.
    options = await registration_options(client)
    answer = authenticator.create(options.json())
    assert (await client.post("/authn/passkeys", data={"credential": json.dumps(answer)})).status_code == 403
    assert (await stored(app))["passkeys"] == before["passkeys"] == []


async def test_the_options_ask_for_a_discoverable_user_verifying_passkey_of_the_issuer(client, app, alice):
    await signed_in_with_password(client)
    options = (await registration_options(client)).json()
    assert options["rp"] == {"id": "iam.test", "name": "iam"}  # the issuer's host (WebAuthn §5.1.4.1)
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["attestation"] == "none" and options["user"]["name"] == "alice"
    assert await challenges(app) == 1


@pytest.mark.parametrize("forgery", ["origin", "rp_id", "challenge", "reused"])
async def test_a_forged_registration_adds_nothing(client, app, alice, authenticator, forgery):
    await signed_in_with_password(client)
    if forgery == "reused":
        options = (await registration_options(client)).json()
        csrf = hidden_fields((await client.get("/authn/account")).text)["csrf"]
        first = authenticator.create(options)
        assert (await client.post("/authn/passkeys", data={"csrf": csrf, "credential": json.dumps(first)})
                ).status_code == 200
        before = await stored(app)
        again = authenticator.create(options)  # another key, answering the spent challenge
        done = await client.post("/authn/passkeys", data={"csrf": csrf, "credential": json.dumps(again)})
    else:
        before = await stored(app)
        forged = {"origin": {"origin": "https://evil.test"}, "rp_id": {"rp_id": "evil.test"},
                  "challenge": {"challenge": "c29tZSBvdGhlciBjaGFsbGVuZ2U"}}[forgery]
        done = await register(client, authenticator, **forged)
    assert done.status_code == 400 and "could not be added" in done.text
    assert await stored(app) == before


async def test_passkeys_are_listed_renamed_and_removed_with_the_password(client, app, alice, authenticator):
    await signed_in_with_password(client)
    assert "No passkey yet" in (await client.get("/authn/account")).text
    assert (await register(client, authenticator, "Laptop")).status_code == 200
    assert (await register(client, SoftAuthenticator(ISSUER, backup_eligible=True, backed_up=True), "Phone")
            ).status_code == 200
    page = (await client.get("/authn/account")).text
    assert "Laptop" in page and "this device only" in page and "Phone" in page and "synced" in page
    laptop, phone = [row[0] for row in sorted((await stored(app))["passkeys"], key=lambda row: row[1])]
    csrf = hidden_fields(page)["csrf"]

    renamed = await client.post("/authn/passkeys/rename", data={"csrf": csrf, "id": laptop, "name": " Work\x00 laptop "})
    assert renamed.status_code == 200 and "Passkey renamed." in renamed.text and "Work laptop" in renamed.text
    wrong = await client.post("/authn/passkeys/remove", data={"csrf": csrf, "id": laptop, "password": "nope"})
    assert wrong.status_code == 401 and "Work laptop" in wrong.text
    assert (await client.post("/authn/passkeys/remove", data={"id": laptop, "password": PASSWORD})).status_code == 403
    removed = await client.post("/authn/passkeys/remove", data={"csrf": csrf, "id": laptop, "password": PASSWORD})
    assert removed.status_code == 200 and "Passkey removed." in removed.text and "Work laptop" not in removed.text
    assert [row[0] for row in (await stored(app))["passkeys"]] == [phone]


async def test_another_users_passkey_cannot_be_renamed_or_removed(client, app, alice, other_browser, authenticator):
    from iam.users.directory import NewUser

    await registered(client, app, authenticator)
    [passkey] = (await stored(app))["passkeys"]
    await app.state.iam.users.directory.create_user(NewUser(user_name="bob"), password=PASSWORD)
    await sign_in(other_browser, await other_browser.get("/authn/login"), username="bob")
    csrf = hidden_fields((await other_browser.get("/authn/account")).text)["csrf"]
    await other_browser.post("/authn/passkeys/rename", data={"csrf": csrf, "id": passkey[0], "name": "bob's"})
    await other_browser.post("/authn/passkeys/remove", data={"csrf": csrf, "id": passkey[0], "password": PASSWORD})
    assert (await stored(app))["passkeys"] == [passkey]


async def test_a_credential_is_registered_once(client, app, alice, authenticator):
    await signed_in_with_password(client)
    assert (await register(client, authenticator)).status_code == 200
    options = (await registration_options(client)).json()
    # Listed, so that the browser does not create a second passkey on the same authenticator ...
    assert [c["id"] for c in options["excludeCredentials"]] == [b64url(authenticator.credentials[0].id)]
    # ... and a credential id registered already (here or by anyone) is refused.
    before = await stored(app)
    again = authenticator.create(options, credential_id=authenticator.credentials[0].id)
    csrf = hidden_fields((await client.get("/authn/account")).text)["csrf"]
    done = await client.post("/authn/passkeys", data={"csrf": csrf, "credential": json.dumps(again)})
    assert done.status_code == 400 and "already registered" in done.text and await stored(app) == before


# -- sign-in with a passkey alone ----------------------------------------------------------------------------------
async def test_a_passkey_alone_signs_in_through_the_code_flow(client, app, alice, authenticator):
    await registered(client, app, authenticator)
    page, verifier = await code_flow_login_page(client)
    assert 'data-passkey="get"' in page.text and '<script src="/assets/passkeys.js"' in page.text
    options = await sign_in_options(client, hidden_fields(page.text))
    assert options["userVerification"] == "required" and options.get("allowCredentials", []) == []  # discoverable
    answer = authenticator.get(options)
    done = await client.post("/authn/login/passkey", data={**hidden_fields(page.text), "credential": json.dumps(answer)})
    claims = await id_token_after(client, done, verifier)
    # RFC 8176: a key bound to its authenticator, the user present, and verified by it (a multi-factor authenticator).
    assert claims["sub"] == alice and claims["amr"] == ["hwk", "user", "mfa"] and claims["acr"] == MFA
    [(_, _, sign_count, _, last_used)] = (await stored(app))["passkeys"]
    assert sign_count == 1 and last_used is not None
    assert (await client.get("/authn/account")).status_code == 200  # an SSO session like any other


async def test_a_synced_passkey_says_a_software_key_and_its_backup_state_is_kept(client, app, alice):
    synced = SoftAuthenticator(ISSUER, counter=False, backup_eligible=True, backed_up=False)
    await registered(client, app, synced)
    synced.backed_up = True  # backed up since (BS may change; BE never)
    page, verifier = await code_flow_login_page(client)
    claims = await id_token_after(client, await passkey_sign_in(client, page, synced), verifier)
    assert claims["amr"] == ["swk", "user", "mfa"] and claims["acr"] == MFA
    [(_, _, sign_count, backup_state, _)] = (await stored(app))["passkeys"]
    assert sign_count == 0 and backup_state is True
    # A counter that stays 0 is no regression (WebAuthn §6.1.1): it signs in again.
    client.cookies.clear()
    page, verifier = await code_flow_login_page(client)
    assert (await id_token_after(client, await passkey_sign_in(client, page, synced), verifier))["sub"] == alice


async def test_a_passkey_without_user_verification_does_not_sign_in_alone(client, app, alice, authenticator):
    await registered(client, app, authenticator)
    before = await stored(app)
    authenticator.verifies_user = False
    done = await passkey_sign_in(client, await client.get("/authn/login"), authenticator)
    assert done.status_code == 401 and "That passkey could not sign you in" in done.text
    assert SESSION not in done.cookies and await stored(app) == before


async def forge(client, app, authenticator: SoftAuthenticator, forgery: str) -> httpx.Response:
    """A sign-in answer with one thing wrong."""
    page = await client.get("/authn/login")
    if forgery == "origin":
        return await passkey_sign_in(client, page, authenticator, origin="https://evil.test")
    if forgery == "rp_id":
        return await passkey_sign_in(client, page, authenticator, rp_id="evil.test")
    if forgery == "challenge":  # one this server never issued
        return await passkey_sign_in(client, page, authenticator, challenge="bm90IGEgY2hhbGxlbmdlIG9mIGlhbQ")
    if forgery == "counter":  # the authenticator (or a clone of it) went back
        return await passkey_sign_in(client, page, authenticator, sign_count=2)
    if forgery == "user_handle":  # the answer names another account than the credential's (WebAuthn §7.2 step 6)
        return await passkey_sign_in(client, page, authenticator, user_handle=b"someone else")
    if forgery == "backup_eligibility":  # BE is fixed at creation (WebAuthn L3 §6.1.3): another authenticator
        authenticator.backup_eligible = True
        return await passkey_sign_in(client, page, authenticator)
    if forgery == "removed":  # signed in with it, the person removes it
        assert (await passkey_sign_in(client, page, authenticator)).status_code == 303
        [(passkey_id, *_)] = (await stored(app))["passkeys"]
        csrf = hidden_fields((await client.get("/authn/account")).text)["csrf"]
        assert (await client.post("/authn/passkeys/remove", data={
            "csrf": csrf, "id": passkey_id, "password": PASSWORD})).status_code == 200
        client.cookies.clear()
        return await passkey_sign_in(client, await client.get("/authn/login"), authenticator)
    raise AssertionError(forgery)


@pytest.mark.parametrize("forgery", ["origin", "rp_id", "challenge", "counter", "removed", "user_handle",
                                     "backup_eligibility"])
async def test_a_forged_assertion_signs_no_one_in_and_changes_nothing(client, app, alice, authenticator, forgery):
    await registered(client, app, authenticator)
    authenticator.credentials[0].sign_count = 4
    first = await passkey_sign_in(client, await client.get("/authn/login"), authenticator)  # counter 5 stored
    assert first.status_code == 303
    client.cookies.clear()
    response = await forge(client, app, authenticator, forgery)
    before = await stored(app)  # after any set-up of the forgery (a removal)
    assert response.status_code == 401 and "That passkey could not sign you in" in response.text
    assert 'name="username"' in response.text  # the sign-in page again, with the password form
    assert SESSION not in response.cookies and await stored(app) == before
    assert before["passkeys"] == [] if forgery == "removed" else before["passkeys"][0][2] == 5


async def test_an_answer_is_used_once_and_only_by_the_browser_that_asked(client, app, alice, other_browser,
                                                                        authenticator):
    await registered(client, app, authenticator)
    page = await client.get("/authn/login")
    fields = hidden_fields(page.text)
    answer = json.dumps(authenticator.get(await sign_in_options(client, fields)))
    # Another browser (its own CSRF cookie) posting this browser's answer: refused, and the challenge is spent.
    theirs = hidden_fields((await other_browser.get("/authn/login")).text)
    stolen = await other_browser.post("/authn/login/passkey", data={**theirs, "credential": answer})
    assert stolen.status_code == 401 and SESSION not in stolen.cookies
    assert (await client.post("/authn/login/passkey", data={**fields, "credential": answer})).status_code == 401

    answer = json.dumps(authenticator.get(await sign_in_options(client, fields)))
    assert (await client.post("/authn/login/passkey", data={**fields, "credential": answer})).status_code == 303
    before = await stored(app)
    replayed = await client.post("/authn/login/passkey", data={**fields, "credential": answer})
    assert replayed.status_code == 401 and await stored(app) == before


async def test_a_challenge_expires(client, app, alice, authenticator):
    from iam.authn.passkeys import CHALLENGE_TTL

    await registered(client, app, authenticator)
    fields = hidden_fields((await client.get("/authn/login")).text)
    answer = json.dumps(authenticator.get(await sign_in_options(client, fields)))
    rules = app.state.iam.authn.passkeys
    real = rules.clock
    rules.clock = lambda: real() + CHALLENGE_TTL + 1
    try:
        before = await stored(app)
        late = await client.post("/authn/login/passkey", data={**fields, "credential": answer})
        assert late.status_code == 401 and await stored(app) == before
    finally:
        rules.clock = real
    # Challenges asked for and never answered go with the purge.
    await sign_in_options(client, fields)
    assert await challenges(app) == 1
    await app.state.iam.authn.purge(int(real()) + CHALLENGE_TTL, 100)
    assert await challenges(app) == 0


@pytest.mark.parametrize("garbage", ["", "not json", "{}", '{"id": "x", "rawId": "y", "response": {}}', "[1]"])
async def test_garbage_instead_of_an_answer_is_a_clear_page(client, app, alice, garbage):
    fields = hidden_fields((await client.get("/authn/login")).text)
    response = await client.post("/authn/login/passkey", data={**fields, "credential": garbage})
    assert response.status_code == 401 and "That passkey could not sign you in" in response.text
    await signed_in_with_password(client)
    csrf = hidden_fields((await client.get("/authn/account")).text)["csrf"]
    response = await client.post("/authn/passkeys", data={"csrf": csrf, "credential": garbage})
    assert response.status_code == 400 and "could not be added" in response.text


# -- a passkey as the second step after the password -------------------------------------------------------------
async def test_a_passkey_is_the_second_step_after_the_password(client, app, alice, authenticator):
    await registered(client, app, authenticator)
    page, verifier = await code_flow_login_page(client)
    step = await sign_in(client, page)  # the password is right: now the passkey
    assert step.status_code == 200 and 'name="mfa"' in step.text and "Use a passkey" in step.text
    assert 'name="code"' not in step.text  # no TOTP to offer
    options = await sign_in_options(client, hidden_fields(step.text))
    assert [c["id"] for c in options["allowCredentials"]] == [b64url(authenticator.credentials[0].id)]
    done = await client.post("/authn/login/passkey", data={
        **hidden_fields(step.text), "credential": json.dumps(authenticator.get(options))})
    claims = await id_token_after(client, done, verifier)
    assert claims["amr"] == ["pwd", "hwk", "user", "mfa"] and claims["acr"] == MFA


async def test_the_second_step_takes_only_the_persons_own_passkey(client, app, alice, authenticator):
    from iam.users.directory import NewUser

    await registered(client, app, authenticator)
    bob = SoftAuthenticator(ISSUER)
    await app.state.iam.users.directory.create_user(NewUser(user_name="bob"), password=PASSWORD)
    page = await client.get("/authn/login")
    await sign_in(client, page, username="bob")
    await register(client, bob, "Bob's")  # bob has a passkey too
    client.cookies.clear()
    step = await sign_in(client, await client.get("/authn/login"))  # alice's password
    fields = hidden_fields(step.text)
    options = await sign_in_options(client, fields)
    before = await stored(app)
    mine = bob.get(options, credential=bob.credentials[0])  # bob's passkey answering alice's second step
    done = await client.post("/authn/login/passkey", data={**fields, "credential": json.dumps(mine)})
    assert done.status_code == 401 and "That passkey could not be used" in done.text and 'name="mfa"' in done.text
    assert SESSION not in done.cookies and await stored(app) == before
    # A second step's answer is no sign-in alone either (another purpose), nor the other way round.
    options = await sign_in_options(client, fields)
    answer = json.dumps(authenticator.get(options))
    login_fields = hidden_fields((await client.get("/authn/login")).text)
    assert (await client.post("/authn/login/passkey", data={**login_fields, "credential": answer})).status_code == 401


async def test_a_forged_mfa_state_is_refused(client, alice):
    fields = hidden_fields((await client.get("/authn/login")).text)
    options = await client.post("/authn/passkeys/sign-in/options", data={"csrf": fields["csrf"], "mfa": "forged"})
    assert options.status_code == 400 and "took too long" in options.json()["error"]
    done = await client.post("/authn/login/passkey", data={"csrf": fields["csrf"], "mfa": "forged", "credential": "{}"})
    assert done.status_code == 400 and "took too long" in done.text


async def test_acr_values_mfa_steps_up_a_password_session_with_the_passkey(client, app, alice, authenticator):
    """OIDC Core §3.1.2.1: a one-factor session predating the passkey signs in again for acr_values=mfa."""
    await signed_in_with_password(client)
    assert (await register(client, authenticator)).status_code == 200  # the session stays one factor
    verifier, challenge = pkce()
    page = await follow(client, await authorize(client, challenge=challenge, acr_values=MFA), APP)
    assert page.status_code == 200 and 'name="password"' in page.text
    claims = await id_token_after(client, await passkey_sign_in(client, page, authenticator), verifier)
    assert claims["acr"] == MFA


async def test_a_users_passkeys_go_with_their_credentials(client, app, alice, authenticator):
    await registered(client, app, authenticator)
    await app.state.iam.authn.store.remove_credentials(alice)
    assert (await stored(app))["passkeys"] == []


async def test_a_passkey_asks_for_it_after_the_password_until_an_operator_resets_the_second_factors(
        client, app, alice, authenticator):
    """A lost passkey: `iam users reset-mfa` removes it (with any TOTP), and the password alone signs in again."""
    await registered(client, app, authenticator)
    assert 'name="mfa"' in (await sign_in(client, await client.get("/authn/login"))).text
    assert await app.state.iam.users.directory.reset_second_factor(alice)
    assert (await stored(app))["passkeys"] == []
    client.cookies.clear()
    await signed_in_with_password(client)


async def test_a_second_step_without_a_passkey_offers_none(client, app, alice):
    """A person with TOTP only: the second step has no passkey button, and its options are refused (an empty
    allowCredentials would let the browser offer any passkey)."""
    from tests.test_acr import enrol

    await enrol(app, alice)
    step = await sign_in(client, await client.get("/authn/login"))
    assert 'name="code"' in step.text and "Use a passkey" not in step.text
    fields = hidden_fields(step.text)
    refused = await client.post("/authn/passkeys/sign-in/options", data={"csrf": fields["csrf"], "mfa": fields["mfa"]})
    assert refused.status_code == 400 and refused.json() == {"error": "You have no passkey. Use your code instead."}
    assert await challenges(app) == 0
