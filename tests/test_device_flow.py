"""The device authorization grant (RFC 8628), as `kubectl` and other terminals use it."""

from sqlalchemy import update

from iam.token.store import device_codes
from tests.conftest import ISSUER
from tests.oauth import hidden_fields, sign_in
from tests.test_code_grant import verify_id_token

DEVICE = "urn:ietf:params:oauth:grant-type:device_code"


async def start(client, client_id="kubectl", scope="openid email groups offline_access"):
    response = await client.post("/oauth/v2/device_authorization", data={"client_id": client_id, "scope": scope})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()


async def poll(client, device_code, client_id="kubectl"):
    return await client.post("/oauth/v2/token", data={"grant_type": DEVICE, "device_code": device_code,
                                                      "client_id": client_id})


async def allow_polling_now(app):
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(device_codes).values(last_poll=0))


async def approve(client, verification_uri_complete, decision="approve"):
    page = await client.get(verification_uri_complete)
    if 'name="password"' in page.text:
        signed_in = await sign_in(client, page)
        assert signed_in.status_code == 303 and signed_in.headers["location"].startswith("/authn/device?")
        page = await client.get(signed_in.headers["location"])
    assert page.status_code == 200 and "Allow" in page.text, page.text
    return await client.post("/authn/device", data={**hidden_fields(page.text), "decision": decision})


async def test_device_flow_end_to_end(client, app, alice):
    started = await start(client)
    assert set(started) >= {"device_code", "user_code", "verification_uri", "verification_uri_complete",
                            "expires_in", "interval"}
    assert started["verification_uri"] == f"{ISSUER}/authn/device"
    assert len(started["user_code"]) == 9 and started["user_code"][4] == "-"

    pending = await poll(client, started["device_code"])
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending"
    too_fast = await poll(client, started["device_code"])
    assert too_fast.json()["error"] == "slow_down"

    done = await approve(client, started["verification_uri_complete"])
    assert done.status_code == 200 and "Device connected" in done.text

    await allow_polling_now(app)
    tokens = await poll(client, started["device_code"])
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    claims = await verify_id_token(client, body["id_token"], audience="kubectl")
    assert claims["sub"] == alice and claims["groups"] == ["admins", "developers"]
    assert claims["email_verified"] is True and "refresh_token" in body

    await allow_polling_now(app)
    again = await poll(client, started["device_code"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_denied_device_code_is_access_denied(client, app, alice):
    started = await start(client)
    done = await approve(client, started["verification_uri_complete"], decision="deny")
    assert "denied" in done.text
    await allow_polling_now(app)
    assert (await poll(client, started["device_code"])).json()["error"] == "access_denied"


async def test_expired_device_code_is_expired_token(client, app, alice):
    started = await start(client)
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(device_codes).values(expires_at=1))
    assert (await poll(client, started["device_code"])).json()["error"] == "expired_token"
    page = await client.get(started["verification_uri_complete"])
    assert page.status_code == 400 and "not valid or has expired" in page.text


async def test_unknown_user_codes_are_refused_and_throttled(client, alice):
    for attempt in range(40):  # noqa: B007 - the count is checked after the loop
        page = await client.get("/authn/device", params={"user_code": "BCDF-GHJK"})
        if page.status_code == 429:
            break
        assert page.status_code == 400
    assert page.status_code == 429 and attempt == 30  # the 31st try, after 30 failures


async def test_device_code_is_bound_to_its_client(client, alice):
    started = await start(client)
    other = await client.post("/oauth/v2/token", data={"grant_type": DEVICE, "device_code": started["device_code"],
                                                       "client_id": "native"})
    assert other.status_code == 400 and other.json()["error"] in ("invalid_grant", "unauthorized_client")


async def test_clients_without_the_grant_cannot_start_it(client):
    response = await client.post("/oauth/v2/device_authorization", data={"client_id": "native"})
    assert response.status_code == 400 and response.json()["error"] == "unauthorized_client"


async def test_discovery_tells_kubelogin_what_it_needs(client):
    meta = (await client.get("/.well-known/openid-configuration")).json()
    assert meta["device_authorization_endpoint"] == f"{ISSUER}/oauth/v2/device_authorization"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "none" in meta["token_endpoint_auth_methods_supported"]
    assert "RS256" in meta["id_token_signing_alg_values_supported"]
    assert DEVICE in meta["grant_types_supported"]


async def test_a_dpop_proof_binds_the_device_grants_tokens(client, app, alice):
    """RFC 9449 §5: the access token and the public client's refresh token are bound to the proof's key."""
    from tests.dpop import DPoPClient
    key = DPoPClient()
    token_endpoint = f"{ISSUER}/oauth/v2/token"
    started = await start(client)
    await approve(client, started["verification_uri_complete"])
    await allow_polling_now(app)
    tokens = await client.post("/oauth/v2/token", headers={"DPoP": key.proof("POST", token_endpoint)}, data={
        "grant_type": DEVICE, "device_code": started["device_code"], "client_id": "kubectl"})
    assert tokens.status_code == 200 and tokens.json()["token_type"] == "DPoP", tokens.text
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens.json()["refresh_token"], "client_id": "kubectl"}
    unproven = await client.post("/oauth/v2/token", data=refresh)
    assert unproven.status_code == 400 and unproven.json()["error"] == "invalid_dpop_proof"
    proven = await client.post("/oauth/v2/token", data=refresh, headers={"DPoP": key.proof("POST", token_endpoint)})
    assert proven.status_code == 200 and proven.json()["token_type"] == "DPoP"
