"""Consent for third-party clients (`require_consent`; OIDC Core §3.1.2.4, prompt=consent and consent_required;
ASVS 5 V10.7.1-3): asked once per scope set, remembered, removable, and not to be bypassed through the browser."""

from tests.oauth import authorize, follow, hidden_fields, pkce, query, redeem, sign_in

PARTNER = "https://partner.test/cb"


async def start(client, scope="openid profile", **extra):
    """Authorize as the partner and sign in if asked: the page that follows (consent) or the redirect."""
    verifier, challenge = pkce()
    response = await follow(client, await authorize(client, "partner", PARTNER, scope, challenge, **extra), PARTNER)
    if response.status_code == 200 and 'name="password"' in response.text:
        response = await follow(client, await sign_in(client, response), PARTNER)
    return response, verifier


async def decide(client, page, decision: str, **override):
    fields = {**hidden_fields(page.text), "decision": decision, **override}
    return await follow(client, await client.post("/authn/consent", data=fields), PARTNER)


async def test_the_first_authorization_asks_and_allowing_gives_a_code(client, alice, caplog):
    page, verifier = await start(client)
    assert page.status_code == 200 and "Allow Partner App?" in page.text
    assert "See your name and username" in page.text and "Know who you are" in page.text
    assert "location" not in page.headers and 'name="csrf"' in page.text
    done = await decide(client, page, "allow")
    params = query(done.headers["location"])
    assert done.headers["location"].startswith(PARTNER) and "code" in params
    tokens = await redeem(client, params["code"], verifier, "partner", PARTNER)
    assert tokens.status_code == 200, tokens.text
    assert any(getattr(r, "audit", {}).get("event") == "consent.granted" for r in caplog.records)

    # Remembered: the same scopes again go straight through (SSO, no page) ...
    again, _ = await start(client)
    assert again.status_code in (302, 303) and "code" in query(again.headers["location"])
    # ... and prompt=none works too; more scopes ask again, naming the new one.
    silent, _ = await start(client, prompt="none")
    assert "code" in query(silent.headers["location"])
    more, _ = await start(client, scope="openid profile email")
    assert more.status_code == 200 and "See your email address" in more.text and "(new)" in more.text
    asked, _ = await start(client, prompt="consent")
    assert asked.status_code == 200 and "Allow Partner App?" in asked.text


async def test_denying_sends_access_denied_to_the_client(client, alice, caplog):
    page, _ = await start(client, state="st-deny")
    denied = await decide(client, page, "deny")
    params = query(denied.headers["location"])
    assert params["error"] == "access_denied" and params["state"] == "st-deny" and "code" not in params
    assert params["iss"]  # RFC 9207 on errors too
    assert any(getattr(r, "audit", {}).get("event") == "consent.denied" for r in caplog.records)


async def test_prompt_none_without_consent_is_consent_required(client, alice):
    page, _ = await start(client)  # signs in, stops at the consent page without deciding
    assert page.status_code == 200
    silent, _ = await start(client, prompt="none", state="st-none")
    params = query(silent.headers["location"])
    assert params["error"] == "consent_required" and params["state"] == "st-none" and "code" not in params


async def test_narrowing_the_scope_in_the_browser_does_not_bypass_consent(client, alice):
    page, _ = await start(client, scope="openid profile offline_access")
    tampered = await decide(client, page, "allow", scope="openid")  # the person saw (and allowed) less
    params = query(tampered.headers["location"])
    assert params["error"] == "access_denied" and "code" not in params


async def test_consent_needs_the_form_token(client, alice):
    page, _ = await start(client)
    forged = await client.post("/authn/consent", data={**hidden_fields(page.text), "decision": "allow",
                                                       "csrf": "forged"})
    assert forged.status_code == 403 and "location" not in forged.headers


async def test_removing_access_forgets_the_consent(client, alice):
    page, verifier = await start(client, scope="openid offline_access")
    params = query((await decide(client, page, "allow")).headers["location"])
    assert (await redeem(client, params["code"], verifier, "partner", PARTNER)).status_code == 200
    account = await client.get("/authn/account")
    assert "Partner App" in account.text
    await client.post("/authn/account/applications", data={"csrf": hidden_fields(account.text)["csrf"],
                                                           "client_id": "partner"})
    asked, _ = await start(client, scope="openid offline_access")
    assert asked.status_code == 200 and "Allow Partner App?" in asked.text


async def test_first_party_clients_are_never_asked(client, alice):
    verifier, challenge = pkce()
    done = await follow(client, await sign_in(client, await follow(
        client, await authorize(client, challenge=challenge), "https://app.test/")), "https://app.test/")
    assert "code" in query(done.headers["location"])
