"""Pushed authorization requests (RFC 9126): pushed over the back channel with client authentication, used
once by the browser, for that client only, with nothing from the browser's query added."""

import httpx
import pytest
from sqlalchemy import update

from iam.app import create_app
from iam.token.store import authorization_requests
from tests.conftest import ISSUER, WEBAPP_CALLBACK, basic, client_config, make_settings
from tests.oauth import follow, pkce, query, redeem, sign_in

URN = "urn:ietf:params:oauth:request_uri:"


async def push(client, client_id="webapp", **params) -> httpx.Response:
    form = {"response_type": "code", "redirect_uri": WEBAPP_CALLBACK, "scope": "openid email", "state": "st-par",
            **params}
    if client_id == "webapp":
        return await client.post("/oauth/v2/par", data=form, headers=basic("webapp"))
    return await client.post("/oauth/v2/par", data={**form, "client_id": client_id})


async def test_a_pushed_request_runs_the_code_flow(client, alice):
    verifier, challenge = pkce()
    pushed = await push(client, code_challenge=challenge, code_challenge_method="S256", nonce="n-par")
    assert pushed.status_code == 201 and pushed.headers["cache-control"] == "no-store"
    body = pushed.json()
    assert body["request_uri"].startswith(URN) and body["expires_in"] == 60
    # Only client_id and request_uri travel through the browser; another redirect_uri there is ignored.
    start = await client.get("/oauth/v2/authorize", params={"client_id": "webapp", "request_uri": body["request_uri"],
                                                            "redirect_uri": "https://evil.test/cb"})
    page = await follow(client, start, "https://app.test/")
    done = await follow(client, await sign_in(client, page), "https://app.test/")
    assert done.headers["location"].startswith(WEBAPP_CALLBACK)
    params = query(done.headers["location"])
    assert params["state"] == "st-par" and params["iss"] == ISSUER
    tokens = await redeem(client, params["code"], verifier)
    assert tokens.status_code == 200 and tokens.json()["scope"] == "openid email"

    again = await client.get("/oauth/v2/authorize", params={"client_id": "webapp", "request_uri": body["request_uri"]})
    assert again.status_code == 400 and "location" not in again.headers  # used once


async def test_a_request_uri_is_for_its_client_only_and_expires(client, app, alice):
    _, challenge = pkce()
    request_uri = (await push(client, code_challenge=challenge, code_challenge_method="S256")).json()["request_uri"]
    other = await client.get("/oauth/v2/authorize", params={"client_id": "legacy", "request_uri": request_uri})
    assert other.status_code == 400 and "location" not in other.headers
    async with app.state.iam.token.store.engine.begin() as conn:
        await conn.execute(update(authorization_requests).values(expires_at=1))
    expired = await client.get("/oauth/v2/authorize", params={"client_id": "webapp", "request_uri": request_uri})
    assert expired.status_code == 400 and "location" not in expired.headers
    forged = await client.get("/oauth/v2/authorize", params={"client_id": "webapp", "request_uri": URN + "x" * 43})
    assert forged.status_code == 400 and "location" not in forged.headers


async def test_a_pushed_request_id_is_never_a_sign_in_request(client):
    _, challenge = pkce()
    request_uri = (await push(client, code_challenge=challenge, code_challenge_method="S256")).json()["request_uri"]
    page = await client.get("/authn/login", params={"request": request_uri.removeprefix(URN), "client_id": "webapp"})
    assert page.status_code == 400 and 'name="password"' not in page.text


@pytest.mark.parametrize("params,status,error", [
    ({"redirect_uri": "https://app.test/unregistered"}, 400, "invalid_request"),
    ({"response_type": "token"}, 400, "unsupported_response_type"),
    ({"request_uri": URN + "a" * 43}, 400, "invalid_request"),
    ({"scope": "openid admin"}, 400, "invalid_scope"),
    ({}, 400, "invalid_request"),  # no PKCE for a client that requires it
])
async def test_a_bad_pushed_request_is_an_oauth_error(client, params, status, error):
    response = await push(client, **params)
    assert response.status_code == status and response.json()["error"] == error


async def test_pushing_needs_client_authentication_and_public_clients_use_pkce(client):
    _, challenge = pkce()
    anonymous = await client.post("/oauth/v2/par", data={"client_id": "webapp", "response_type": "code",
                                                        "redirect_uri": WEBAPP_CALLBACK})
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "invalid_client"
    public = await push(client, "kubectl", redirect_uri="http://127.0.0.1:7000/callback", scope="openid",
                        code_challenge=challenge, code_challenge_method="S256")
    assert public.status_code == 201, public.text


async def test_a_client_that_must_push_cannot_send_its_request_through_the_browser(tmp_path, store_urls):
    strict = {**next(c for c in client_config() if c["client_id"] == "webapp"),
              "client_id": "strict", "require_pushed_authorization_requests": True}
    app = create_app(make_settings(tmp_path, store_urls, clients=[*client_config(), strict]))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        _, challenge = pkce()
        direct = await http.get("/oauth/v2/authorize", params={
            "client_id": "strict", "response_type": "code", "redirect_uri": WEBAPP_CALLBACK, "state": "s1",
            "code_challenge": challenge, "code_challenge_method": "S256"})
        params = query(direct.headers["location"])
        assert params["error"] == "invalid_request" and params["state"] == "s1" and "code" not in params
        pushed = await http.post("/oauth/v2/par", auth=("strict", "webapp-secret-0123456789abcdef"), data={
            "response_type": "code", "redirect_uri": WEBAPP_CALLBACK, "code_challenge": challenge,
            "code_challenge_method": "S256"})
        assert pushed.status_code == 201, pushed.text
        start = await http.get("/oauth/v2/authorize", params={"client_id": "strict",
                                                              "request_uri": pushed.json()["request_uri"]})
        assert start.status_code == 302 and "/authn/login?" in start.headers["location"]


async def test_discovery_names_the_endpoint(client):
    meta = (await client.get("/.well-known/oauth-authorization-server")).json()
    assert meta["pushed_authorization_request_endpoint"] == f"{ISSUER}/oauth/v2/par"
    assert meta["require_pushed_authorization_requests"] is False
