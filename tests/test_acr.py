"""The authentication context (OIDC Core §2 acr, §3.1.2.1 acr_values and prompt=select_account, §5.5 claims)."""

import json
import time

import pyotp
import pytest

from iam.users.directory import NewUser
from tests.conftest import PASSWORD, WEBAPP_CALLBACK, basic
from tests.oauth import authorize, code_flow, follow, hidden_fields, pkce, query, redeem, sign_in
from tests.test_code_grant import tokens_for, verify_id_token

PWD = "urn:iam:acr:pwd"
MFA = "urn:iam:acr:mfa"
APP = "https://app.test/"


async def id_token(client, params: dict, verifier: str) -> dict:
    response = await redeem(client, params["code"], verifier)
    assert response.status_code == 200, response.text
    return await verify_id_token(client, response.json()["id_token"])


async def test_discovery_advertises_the_acr_values_and_no_claims_parameter(client):
    metadata = (await client.get("/.well-known/openid-configuration")).json()
    assert metadata["acr_values_supported"] == [PWD, MFA]
    assert metadata["claims_parameter_supported"] is False
    assert "acr" in metadata["claims_supported"]


async def test_a_password_sign_in_says_one_factor(client, alice):
    claims = await verify_id_token(client, (await tokens_for(client))["id_token"])
    assert claims["acr"] == PWD and claims["amr"] == ["pwd"]


async def enrol(app, subject: str) -> pyotp.TOTP:
    totp = app.state.iam.authn.totp
    generator = pyotp.TOTP(await totp.start_enrolment(subject))
    assert await totp.verify(subject, generator.now(), confirming=True)
    return generator


async def start(client, how: str, **params):
    """An authorization request, sent in the query or pushed first (RFC 9126): the sign-in page or a redirect."""
    verifier, challenge = pkce()
    if how == "query":
        return await follow(client, await authorize(client, challenge=challenge, **params), APP), verifier
    pushed = await client.post("/oauth/v2/par", headers=basic("webapp"), data={
        "response_type": "code", "redirect_uri": WEBAPP_CALLBACK, "scope": "openid", "code_challenge": challenge,
        "code_challenge_method": "S256", **params})
    assert pushed.status_code == 201, pushed.text
    first = await client.get("/oauth/v2/authorize", params={"client_id": "webapp",
                                                            "request_uri": pushed.json()["request_uri"]})
    return await follow(client, first, APP), verifier


@pytest.mark.parametrize("how", ["query", "par"])
async def test_acr_values_preferring_mfa_step_up_a_one_factor_session(client, app, alice, how):
    """OIDC Core §3.1.2.1: the session (password only) predates the user's TOTP; asking for the mfa acr makes
    them sign in again with both factors, and the ID token says so."""
    await tokens_for(client)
    generator = await enrol(app, alice)
    # Without acr_values (or preferring pwd) the one-factor session still serves, and says what it is.
    for extra in ({}, {"acr_values": f"{PWD} {MFA}"}):
        page, verifier = await start(client, how, **extra)
        assert page.status_code == 302, page.text
        assert (await id_token(client, query(page.headers["location"]), verifier))["acr"] == PWD

    page, verifier = await start(client, how, acr_values=f"urn:other:gold {MFA} {PWD}")
    assert page.status_code == 200 and 'name="password"' in page.text  # the sign-in form, not SSO
    step = await sign_in(client, page)
    assert step.status_code == 200 and 'name="mfa"' in step.text
    done = await client.post("/authn/login/totp", data={**hidden_fields(step.text),
                                                        "code": generator.at(time.time() + 30)})
    claims = await id_token(client, query((await follow(client, done, APP)).headers["location"]), verifier)
    assert claims["acr"] == MFA and claims["amr"] == ["pwd", "otp"]


async def test_acr_values_mfa_without_totp_answers_with_the_acr_it_has(client, alice):
    """acr is a voluntary claim: a user without a second factor signs in with the password alone."""
    params, verifier, _ = await code_flow(client, acr_values=MFA)
    assert (await id_token(client, params, verifier))["acr"] == PWD


async def test_prompt_none_needing_a_step_up_is_login_required(client, app, alice):
    await tokens_for(client)
    await enrol(app, alice)
    response = await follow(client, await authorize(client, challenge=pkce()[1], prompt="none", acr_values=MFA), APP)
    assert query(response.headers["location"])["error"] == "login_required"


async def test_the_claims_parameter_is_ignored(client, alice):
    """OIDC Core §5.5: not supported (claims_parameter_supported: false), so it changes nothing."""
    claims = json.dumps({"id_token": {"acr": {"essential": True, "values": [MFA]}, "nickname": None}})
    params, verifier, _ = await code_flow(client, claims=claims)
    token = await id_token(client, params, verifier)
    assert token["acr"] == PWD and "nickname" not in token


async def test_prompt_select_account_offers_the_signed_in_account_or_another(client, app, alice):
    await tokens_for(client)
    page = await follow(client, await authorize(client, challenge=pkce()[1], prompt="select_account"), APP)
    assert page.status_code == 200 and "Continue as alice" in page.text and 'name="password"' in page.text
    chosen = await client.post("/authn/login/continue", data=hidden_fields(page.text))
    assert "code" in query((await follow(client, chosen, APP)).headers["location"])

    bob = await app.state.iam.users.directory.create_user(NewUser(user_name="bob"), password=PASSWORD)
    verifier, challenge = pkce()
    page = await follow(client, await authorize(client, challenge=challenge, prompt="select_account"), APP)
    other = await follow(client, await sign_in(client, page, username="bob"), APP)
    assert (await id_token(client, query(other.headers["location"]), verifier))["sub"] == bob
    # The continue form is a form post like the others: no CSRF token, no sign-in.
    forged = await client.post("/authn/login/continue", data={k: v for k, v in hidden_fields(page.text).items()
                                                              if k != "csrf"})
    assert forged.status_code == 403
