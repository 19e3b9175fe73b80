"""Code redemption, tokens and refresh (RFC 6749 §4.1.3, §6; RFC 7636; RFC 9700 §4.14; OIDC Core §3.1.3)."""

import asyncio
import time

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import update

from tests.conftest import ISSUER, basic
from tests.oauth import code_flow, pkce, query, redeem, refresh


async def verify_id_token(http, token: str, audience: str = "webapp") -> dict:
    keys = KeySet.import_key_set((await http.get("/oauth/v2/jwks")).json())
    decoded = jwt.decode(token, keys, algorithms=["RS256"])
    assert decoded.header["alg"] == "RS256" and decoded.header["kid"]
    claims = decoded.claims
    now = time.time()
    assert claims["iss"] == ISSUER and claims["aud"] == audience and claims["azp"] == audience
    assert now - 300 < claims["iat"] <= now + 5 and claims["exp"] > now
    assert claims["sub"]
    return claims


async def introspect(http, token):
    return (await http.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"))).json()


async def tokens_for(http, **kwargs) -> dict:
    params, verifier, _ = await code_flow(http, **kwargs)
    response = await redeem(http, params["code"], verifier, kwargs.get("client_id", "webapp"),
                            kwargs.get("redirect_uri", "https://app.test/cb?dummy1=lorem&dummy2=ipsum"))
    assert response.status_code == 200, response.text
    return response.json()


async def test_code_flow_issues_the_phantom_pair_refresh_and_id_token(client, alice):
    params, verifier, location = await code_flow(client, nonce="n-0S6_WzA2Mj")
    assert location.startswith("https://app.test/cb?dummy1=lorem&dummy2=ipsum&")
    assert params["iss"] == ISSUER and params["state"].startswith("st-")
    response = await redeem(client, params["code"], verifier)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert len(body["access_token"]) == 43 and len(body["refresh_token"]) == 43  # opaque, 256 bits
    claims = await verify_id_token(client, body["id_token"])
    assert claims["sub"] == alice and claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["amr"] == ["pwd"] and claims["sid"] and claims["at_hash"]
    assert claims["email"] == "alice@example.com" and claims["email_verified"] is True
    assert claims["groups"] == ["admins", "developers"] and claims["preferred_username"] == "alice"
    # The ingress gets the same claims in the phantom JWT; the client only holds an opaque string.
    phantom = await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {body['access_token']}"})
    at_claims = jwt.decode(phantom.headers["authorization"][7:],
                           KeySet.import_key_set((await client.get("/oauth/v2/jwks")).json())).claims
    assert at_claims["sub"] == alice and at_claims["groups"] == ["admins", "developers"]
    assert at_claims["client_id"] == "webapp"


async def test_no_nonce_is_fine_for_the_code_flow(client, alice):
    body = await tokens_for(client)
    assert "nonce" not in await verify_id_token(client, body["id_token"])


async def test_userinfo_returns_current_claims_for_the_scopes(client, alice):
    body = await tokens_for(client, scope="openid email")
    for method in ("GET", "POST"):
        response = await client.request(method, "/oauth/v2/userinfo",
                                        headers={"Authorization": f"Bearer {body['access_token']}"})
        assert response.status_code == 200
        assert response.json() == {"sub": alice, "email": "alice@example.com", "email_verified": True}
    # RFC 9700 §4.3.2: never from a query string.
    assert (await client.get(f"/oauth/v2/userinfo?access_token={body['access_token']}")).status_code == 401
    assert (await client.get("/oauth/v2/userinfo", headers={"Authorization": "Bearer nope"})).status_code == 401


async def test_userinfo_needs_the_openid_scope(client, alice):
    body = await tokens_for(client, scope="api:read")
    response = await client.get("/oauth/v2/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert response.status_code == 403 and "insufficient_scope" in response.headers["www-authenticate"]


async def test_a_code_is_used_once_and_its_replay_revokes_what_it_bought(client, alice):
    params, verifier, _ = await code_flow(client)
    first = (await redeem(client, params["code"], verifier)).json()
    again = await redeem(client, params["code"], verifier)
    assert again.status_code == 400 and again.headers["content-type"] == "application/json"
    assert again.json()["error"] == "invalid_grant"
    assert (await introspect(client, first["access_token"])) == {"active": False}
    assert (await refresh(client, first["refresh_token"])).json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "change",
    [
        {"code_verifier": "x" * 43},  # wrong verifier
        {"code_verifier": None},  # missing verifier
        {"code_verifier": "short"},  # malformed verifier
        {"redirect_uri": "https://app.test/other"},  # not the one of the request
        {"code": "A" * 43},  # unknown code
        {"code": "garbage"},
    ],
)
async def test_redemption_must_match_the_request(client, alice, change):
    params, verifier, _ = await code_flow(client)
    data = {"grant_type": "authorization_code", "code": params["code"], "code_verifier": verifier,
            "redirect_uri": "https://app.test/cb?dummy1=lorem&dummy2=ipsum", **change}
    response = await client.post("/oauth/v2/token", data={k: v for k, v in data.items() if v is not None},
                                 headers=basic("webapp"))
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    # a failed attempt does not burn the code
    if change.get("code") is None:
        assert (await redeem(client, params["code"], verifier)).status_code == 200


async def test_a_code_is_bound_to_its_client(client, alice):
    params, verifier, _ = await code_flow(client, client_id="kubectl", redirect_uri="http://127.0.0.1:4321/callback",
                                          scope="openid")
    stolen = await redeem(client, params["code"], verifier, "webapp", "http://127.0.0.1:4321/callback")
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    ok = await redeem(client, params["code"], verifier, "kubectl", "http://127.0.0.1:4321/callback")
    assert ok.status_code == 200


async def test_pkce_downgrade_is_refused(client, alice):
    """RFC 9700 §4.8.2: a verifier for a code issued without a challenge is an attack."""
    from tests.oauth import follow, sign_in

    start = await client.get("/oauth/v2/authorize", params={
        "client_id": "legacy", "redirect_uri": "https://legacy.test/cb", "response_type": "code", "scope": "openid"})
    page = await follow(client, start, "https://legacy.test/")
    done = await follow(client, await sign_in(client, page), "https://legacy.test/")
    code = query(done.headers["location"])["code"]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://legacy.test/cb"}
    downgrade = await client.post("/oauth/v2/token", data={**data, "code_verifier": pkce()[0]}, headers=basic("legacy"))
    assert downgrade.json()["error"] == "invalid_grant"
    assert (await client.post("/oauth/v2/token", data=data, headers=basic("legacy"))).status_code == 200


async def test_an_expired_code_is_invalid(client, app, alice):
    from iam.token.store import codes

    params, verifier, _ = await code_flow(client)
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(codes).values(expires_at=0))
    assert (await redeem(client, params["code"], verifier)).json()["error"] == "invalid_grant"


async def test_refresh_rotates_and_returns_a_fresh_id_token(client, alice):
    first = await tokens_for(client)
    first_claims = await verify_id_token(client, first["id_token"])
    await asyncio.sleep(1.1)
    response = await refresh(client, first["refresh_token"])
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    claims = await verify_id_token(client, second["id_token"])
    for name in ("iss", "sub", "aud", "azp", "auth_time", "sid"):
        assert claims[name] == first_claims[name]
    assert claims["iat"] > first_claims["iat"]
    assert (await introspect(client, second["access_token"]))["active"] is True


async def test_refresh_token_reuse_revokes_the_family(client, alice):
    first = await tokens_for(client)
    second = (await refresh(client, first["refresh_token"])).json()
    reuse = await refresh(client, first["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert (await refresh(client, second["refresh_token"])).json()["error"] == "invalid_grant"
    assert await introspect(client, second["access_token"]) == {"active": False}
    assert await introspect(client, first["access_token"]) == {"active": False}


async def test_refresh_scope_may_narrow_but_not_widen(client, alice):
    first = await tokens_for(client, scope="openid email profile")
    wider = await refresh(client, first["refresh_token"], scope="openid email groups")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    narrower = await refresh(client, first["refresh_token"], scope="openid email")
    assert narrower.status_code == 200 and narrower.json()["scope"] == "openid email"


async def test_a_refresh_token_is_bound_to_its_client(client, alice):
    theirs = await tokens_for(client, client_id="kubectl", redirect_uri="http://127.0.0.1:5000/callback",
                              scope="openid")
    response = await refresh(client, theirs["refresh_token"], client_id="webapp")
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert (await refresh(client, theirs["refresh_token"], client_id="kubectl")).status_code == 200


async def test_refresh_reads_current_claims_and_stops_for_a_disabled_user(client, app, alice):
    directory = app.state.iam.users.directory
    first = await tokens_for(client)
    await directory.add_to_group(alice, "sre")
    second = (await refresh(client, first["refresh_token"])).json()
    assert "sre" in (await verify_id_token(client, second["id_token"]))["groups"]
    await directory.set_active(alice, False)
    response = await refresh(client, second["refresh_token"])
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


async def test_refresh_tokens_only_for_clients_allowed_the_grant(client, alice):
    body = await tokens_for(client, client_id="kubectl", redirect_uri="http://127.0.0.1/callback", scope="openid")
    assert "refresh_token" in body
    from tests.oauth import follow, sign_in  # noqa: F401

    legacy = await client.get("/oauth/v2/authorize", params={
        "client_id": "legacy", "redirect_uri": "https://legacy.test/cb", "response_type": "code", "scope": "openid"})
    done = await follow(client, legacy, "https://legacy.test/")  # already signed in: SSO
    code = query(done.headers["location"])["code"]
    tokens = (await client.post("/oauth/v2/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": "https://legacy.test/cb"},
        headers=basic("legacy"))).json()
    assert "refresh_token" not in tokens and "id_token" in tokens


async def test_a_peer_outage_consumes_nothing(client, app, alice, monkeypatch):
    from iam.peers import PeerUnavailable

    params, verifier, _ = await code_flow(client)
    directory = app.state.iam.token.directory

    async def down(sub):
        raise PeerUnavailable("user-management did not answer")

    monkeypatch.setattr(directory, "claims", down)
    outage = await redeem(client, params["code"], verifier)
    assert outage.status_code == 503 and outage.json()["error"] == "temporarily_unavailable"
    monkeypatch.undo()
    assert (await redeem(client, params["code"], verifier)).status_code == 200


async def test_concurrent_redemptions_and_refreshes_have_one_winner(client, alice, backend):
    params, verifier, _ = await code_flow(client)
    results = await asyncio.gather(*(redeem(client, params["code"], verifier) for _ in range(10)))
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 1 and statuses.count(400) == 9, statuses
    assert all(r.json()["error"] == "invalid_grant" for r in results if r.status_code == 400)

    body = await tokens_for(client)
    results = await asyncio.gather(*(refresh(client, body["refresh_token"]) for _ in range(10)))
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 1 and statuses.count(400) == 9, statuses


KUBECTL = {"client_id": "kubectl", "redirect_uri": "http://127.0.0.1:8000/callback",
           "scope": "openid email groups offline_access"}


async def test_reuse_window_gives_a_retry_the_same_successor(client, alice):
    first = await tokens_for(client, **KUBECTL)
    second = await refresh(client, first["refresh_token"], client_id="kubectl")
    retry = await refresh(client, first["refresh_token"], client_id="kubectl")
    assert second.status_code == retry.status_code == 200
    assert retry.json() == second.json()  # the very same tokens
    assert (await introspect(client, second.json()["access_token"]))["active"] is True
    third = await refresh(client, second.json()["refresh_token"], client_id="kubectl")
    assert third.status_code == 200


async def test_parallel_kubectl_refreshes_all_get_the_same_tokens(client, alice):
    first = await tokens_for(client, **KUBECTL)
    results = await asyncio.gather(*(refresh(client, first["refresh_token"], client_id="kubectl")
                                     for _ in range(8)))
    assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
    assert len({r.json()["refresh_token"] for r in results}) == 1
    assert len({r.json()["access_token"] for r in results}) == 1


async def test_reuse_after_the_window_still_revokes_the_family(client, app, alice):
    from iam.token.store import refresh_tokens

    first = await tokens_for(client, **KUBECTL)
    second = (await refresh(client, first["refresh_token"], client_id="kubectl")).json()
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(refresh_tokens).where(refresh_tokens.c.used_at.is_not(None))
                           .values(used_at=refresh_tokens.c.used_at - 6))
    late = await refresh(client, first["refresh_token"], client_id="kubectl")
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant"
    assert (await refresh(client, second["refresh_token"], client_id="kubectl")).json()["error"] == "invalid_grant"
    assert await introspect(client, second["access_token"]) == {"active": False}


async def test_the_successor_is_stored_only_encrypted(client, app, alice):
    from sqlalchemy import select

    from iam.token.store import refresh_tokens

    first = await tokens_for(client, **KUBECTL)
    second = (await refresh(client, first["refresh_token"], client_id="kubectl")).json()
    async with app.state.iam.stores["token"].engine.connect() as conn:
        blobs = (await conn.execute(select(refresh_tokens.c.successor))).scalars().all()
    stored = b"".join(blob for blob in blobs if blob)
    assert stored and second["refresh_token"].encode() not in stored and second["access_token"].encode() not in stored


async def test_disabling_a_user_revokes_their_tokens_and_sessions_at_once(client, app, alice):
    """ASVS 5 V7.4.2: not only refresh, but live access tokens and the SSO session stop working too."""
    body = await tokens_for(client)
    assert (await introspect(client, body["access_token"]))["active"] is True
    await app.state.iam.users.directory.set_active(alice, False)
    assert await introspect(client, body["access_token"]) == {"active": False}
    assert (await client.get("/oauth/v2/phantom",
                             headers={"Authorization": f"Bearer {body['access_token']}"})).status_code == 401
    assert (await client.get("/authn/account")).status_code == 303  # the session is gone
