"""OpenID Connect Back-Channel Logout 1.0: when a session ends, each client that took part in it receives a
logout token at its backchannel_logout_uri, a real HTTP endpoint here (tests/logout_receiver.py) that verifies
it against the JWKS as an RP library would. On SQLite and PostgreSQL, through the real app; the same across
three processes is in tests/test_split_roles.py.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from pydantic import ValidationError

from iam.config import ClientConfig
from iam.observability import REGISTRY
from iam.peers import SERVICE_TYP
from iam.roles import Role
from tests import logout_receiver
from tests.conftest import ISSUER, PASSWORD, client_config, make_settings
from tests.oauth import code_flow, follow, hidden_fields, redeem
from tests.postgres import free_port

KUBECTL_CALLBACK = "http://127.0.0.1/callback"
ATTEMPTS = 3
PROVISIONER_SECRET = "provisioner-secret-0123456789"


@pytest.fixture(scope="module")
def receiver():
    with logout_receiver.running() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_receiver(receiver):
    receiver.reset()
    yield
    receiver.release()


def public_client(client_id: str, logout_uri: str) -> dict:
    return {"client_id": client_id, "token_endpoint_auth_method": "none", "redirect_uris": [f"https://{client_id}.test/cb"],
            "scope": "openid", "backchannel_logout_uri": logout_uri}


@pytest.fixture
def settings(tmp_path, store_urls, receiver):
    clients = client_config()
    for client in clients:
        if client["client_id"] == "webapp":
            client["backchannel_logout_uri"] = receiver.uri("webapp")
        if client["client_id"] == "kubectl":  # needs the sid in every logout token
            client.update(backchannel_logout_uri=receiver.uri("kubectl"), backchannel_logout_session_required=True)
        if client["client_id"] == "partner":  # registered, but never in alice's sessions here
            client["backchannel_logout_uri"] = receiver.uri("partner")
    clients += [{"client_id": "provisioner", "client_secret": PROVISIONER_SECRET, "grant_types": ["client_credentials"],
                 "scope": "scim:read scim:write"},
                public_client("slow", receiver.uri("slow")),
                public_client("gone", f"http://127.0.0.1:{free_port()}/logout")]  # nothing listens there
    return make_settings(tmp_path, store_urls, clients=clients, backchannel_logout={
        "timeout": 0.5, "attempts": ATTEMPTS, "retry_delay": 0.05, "concurrency": 4})


def browser(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER)


async def id_token(http, client_id="webapp", redirect_uri="https://app.test/cb?dummy1=lorem&dummy2=ipsum",
                   scope="openid") -> dict:
    """A code flow in this browser's session (signing in if needed); the ID token's claims, and its JWT."""
    params, verifier, _ = await code_flow(http, client_id, redirect_uri, scope)
    body = (await redeem(http, params["code"], verifier, client_id, redirect_uri)).json()
    keys = (await http.get("/oauth/v2/jwks")).json()
    from joserfc import jwt
    from joserfc.jwk import KeySet

    return {**jwt.decode(body["id_token"], KeySet.import_key_set(keys), algorithms=["RS256"]).claims,
            "jwt": body["id_token"]}


async def in_session(http, client_id: str) -> None:
    """The client takes part in this browser's session: it got a code (and with it a grant) in it."""
    await code_flow(http, client_id, f"https://{client_id}.test/cb", "openid")


async def delivered(app, client, receiver) -> dict:
    """Every logout token sent to each client so far, validated as an RP would, by client id."""
    await app.state.iam.token.backchannel.idle()
    jwks = (await client.get("/oauth/v2/jwks")).json()
    seen: set[str] = set()
    tokens: dict[str, list[dict]] = {}
    for received in receiver.received:
        assert received.content_type == "application/x-www-form-urlencoded"  # §2.5
        tokens.setdefault(received.client_id, []).append(
            logout_receiver.validate(received.token, jwks, ISSUER, received.client_id, seen))
    return tokens


def metric(client_id: str, result: str) -> float:
    return REGISTRY.get_sample_value("iam_backchannel_logouts_total", {"client_id": client_id, "result": result}) or 0


async def test_discovery_says_back_channel_logout_is_supported(client):
    metadata = (await client.get("/.well-known/openid-configuration")).json()
    assert metadata["backchannel_logout_supported"] is True  # §2.1
    assert metadata["backchannel_logout_session_supported"] is True


async def test_rp_initiated_logout_tells_the_clients_of_that_session_only(app, client, alice, receiver):
    web = await id_token(client)
    async with browser(app) as other:  # alice's second browser: kubectl signs in there, not in this session
        await id_token(other, "kubectl", KUBECTL_CALLBACK)
        response = await client.get("/oauth/v2/end_session", params={"id_token_hint": web["jwt"]})
        signed_out = await client.get(response.headers["location"])
        assert signed_out.status_code == 200 and "You are signed out" in signed_out.text
        tokens = await delivered(app, client, receiver)
        assert list(tokens) == ["webapp"] and len(tokens["webapp"]) == 1
        claims = tokens["webapp"][0]
        assert claims["sid"] == web["sid"] and claims["sub"] == alice and claims["aud"] == "webapp"
        # The other browser's session goes on, and so do its clients.
        assert (await other.get("/authn/account")).status_code == 200


async def test_logout_confirmed_on_the_page_tells_the_clients_too(app, client, alice, receiver):
    web = await id_token(client)
    await in_session(client, "slow")  # another client in the same session
    confirm = await client.get((await client.get("/oauth/v2/end_session")).headers["location"])
    await client.post("/authn/logout", data=hidden_fields(confirm.text))
    tokens = await delivered(app, client, receiver)
    assert sorted(tokens) == ["slow", "webapp"]
    assert {claims["sid"] for claims in tokens["webapp"] + tokens["slow"]} == {web["sid"]}


async def test_signing_a_user_out_everywhere_tells_every_client_of_theirs(app, client, alice, receiver):
    """`iam users sign-out` and a password reset (both Directory.sign_out_everywhere)."""
    first = await id_token(client)
    kube = await id_token(client, "kubectl", KUBECTL_CALLBACK)  # same session
    async with browser(app) as other:
        second = await id_token(other)
        await app.state.iam.users.directory.sign_out_everywhere(alice)
        tokens = await delivered(app, client, receiver)
    # webapp: one token for all of alice's sessions (sub, no sid, §2.4); kubectl requires the sid: one per session.
    assert sorted(tokens) == ["kubectl", "webapp"]
    assert [(claims["sub"], "sid" in claims) for claims in tokens["webapp"]] == [(alice, False)]
    assert [(claims["sub"], claims["sid"]) for claims in tokens["kubectl"]] == [(alice, kube["sid"])]
    assert first["sid"] == kube["sid"] != second["sid"]
    assert (await client.get("/authn/account")).status_code == 303  # and the sessions did end


async def test_disabling_a_user_tells_their_clients(app, client, alice, receiver):
    await id_token(client)
    await app.state.iam.users.directory.set_active(alice, False)  # `iam users disable`, SCIM active=false
    tokens = await delivered(app, client, receiver)
    assert [claims["sub"] for claims in tokens["webapp"]] == [alice]


async def test_disabling_a_user_over_scim_tells_their_clients(app, client, alice, receiver):
    await id_token(client)
    token = (await client.post("/oauth/v2/token", auth=("provisioner", PROVISIONER_SECRET),
                               data={"grant_type": "client_credentials"})).json()["access_token"]
    patched = await client.patch(f"/scim/v2/Users/{alice}", headers={"Authorization": f"Bearer {token}"}, json={
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "active", "value": False}]})
    assert patched.status_code == 200, patched.text
    tokens = await delivered(app, client, receiver)
    assert [(claims["sub"], "sid" in claims) for claims in tokens["webapp"]] == [(alice, False)]


async def test_a_new_sign_in_in_the_same_browser_ends_the_old_session(app, client, alice, receiver):
    web = await id_token(client)
    again = await follow(client, await client.get("/oauth/v2/authorize", params={
        "client_id": "webapp", "redirect_uri": "https://app.test/other", "response_type": "code", "scope": "openid",
        "prompt": "login", "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256"}), "https://app.test/")
    fields = hidden_fields(again.text)
    await client.post("/authn/login", data={**fields, "username": "alice", "password": PASSWORD})
    tokens = await delivered(app, client, receiver)
    assert [claims["sid"] for claims in tokens["webapp"]] == [web["sid"]]


async def test_a_password_change_tells_the_clients_of_the_other_sessions(app, client, alice, receiver):
    mine = await id_token(client)
    async with browser(app) as other:
        theirs = await id_token(other)
        form = await client.get("/authn/password")
        changed = await client.post("/authn/password", data={"csrf": hidden_fields(form.text)["csrf"],
                                                              "current": PASSWORD, "new": "a brand new passphrase"})
        assert changed.status_code == 200
        tokens = await delivered(app, client, receiver)
    assert [claims["sid"] for claims in tokens["webapp"]] == [theirs["sid"]] != [mine["sid"]]


async def test_deliveries_beyond_the_queue_are_dropped_and_counted(app, client, alice, receiver):
    from iam.config import BackChannelLogout
    from iam.token.backchannel import BackChannelLogouts

    await id_token(client)
    await id_token(client, "kubectl", KUBECTL_CALLBACK)  # two clients to tell, room for one
    token = app.state.iam.token
    small = BackChannelLogouts(BackChannelLogout(queue_size=1, concurrency=1, timeout=0.5, attempts=1), ISSUER,
                               token.keys, token.store, token.clients)
    receiver.held.update({"webapp", "kubectl"})
    dropped = metric("webapp", "dropped") + metric("kubectl", "dropped")
    small.start()
    try:
        assert await small.sessions_ended(alice, None) == 1
        assert metric("webapp", "dropped") + metric("kubectl", "dropped") == dropped + 1
    finally:
        receiver.release()
        await small.stop()


async def test_a_receiver_down_or_hanging_never_holds_up_the_logout(app, client, alice, receiver, caplog):
    web = await id_token(client)
    await in_session(client, "slow")
    await in_session(client, "gone")
    receiver.held.add("slow")  # answers nothing until released: every attempt times out
    before = {(c, r): metric(c, r) for c in ("slow", "gone", "webapp") for r in ("failed", "retried", "delivered")}
    response = await client.get("/oauth/v2/end_session", params={"id_token_hint": web["jwt"]})
    # The logout is done while the slow receiver still holds its first request.
    signed_out = await client.get(response.headers["location"])
    assert signed_out.status_code == 200 and "You are signed out" in signed_out.text
    with caplog.at_level(logging.INFO, logger="iam.token.backchannel"):
        await app.state.iam.token.backchannel.idle()
    receiver.release()
    # Bounded: exactly `attempts` tries each, then given up, counted and logged (by client, never the token).
    assert len(receiver.for_client("slow")) == ATTEMPTS
    for client_id in ("slow", "gone"):
        assert metric(client_id, "retried") - before[client_id, "retried"] == ATTEMPTS - 1
        assert metric(client_id, "failed") - before[client_id, "failed"] == 1
        assert any(f"back-channel logout to client {client_id} failed" in r.getMessage() for r in caplog.records)
    # The reachable client was told all the same.
    assert metric("webapp", "delivered") - before["webapp", "delivered"] == 1
    assert len(receiver.for_client("webapp")) == 1
    assert not any("eyJ" in record.getMessage() for record in caplog.records)


async def test_a_client_that_refuses_the_token_is_not_asked_again(app, client, alice, receiver):
    web = await id_token(client)
    receiver.status["webapp"] = 400  # §2.8: the RP could not log out; the same token would not fare better
    failed = metric("webapp", "failed")
    response = await client.get("/oauth/v2/end_session", params={"id_token_hint": web["jwt"]})
    await client.get(response.headers["location"])
    await app.state.iam.token.backchannel.idle()
    assert len(receiver.for_client("webapp")) == 1 and metric("webapp", "failed") == failed + 1


async def test_the_internal_api_takes_only_the_authentication_role_and_well_formed_bodies(app, client, alice, receiver):
    await id_token(client)
    identity = app.state.iam.identity
    url = "/internal/v1/sessions/ended"
    assert (await client.post(url, json={"sub": alice, "sids": None})).status_code == 401
    as_users = identity.sign(Role.TOKEN, SERVICE_TYP, issuer=Role.USER_MANAGEMENT)
    refused = await client.post(url, json={"sub": alice, "sids": None}, headers={"Authorization": f"Bearer {as_users}"})
    assert refused.status_code == 401
    as_authn = {"Authorization": f"Bearer {identity.sign(Role.TOKEN, SERVICE_TYP, issuer=Role.AUTHENTICATION)}"}
    for body in ({"sub": alice}, {"sids": None}, {"sub": 1, "sids": None}, {"sub": alice, "sids": "x"},
                 {"sub": alice, "sids": [1]}, {"sub": alice, "sids": ["x" * 65]}, {"sub": alice, "sids": ["x"] * 1001},
                 [alice], "x"):
        bad = await client.post(url, json=body, headers=as_authn)
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request", body
    assert (await client.post(url, content=b"{", headers=as_authn)).status_code == 400
    await app.state.iam.token.backchannel.idle()
    assert receiver.received == []  # nothing was sent for any of them
    accepted = await client.post(url, json={"sub": alice, "sids": None}, headers=as_authn)
    assert accepted.status_code == 202 and accepted.json() == {"queued": 1}
    assert [claims["sub"] for claims in (await delivered(app, client, receiver))["webapp"]] == [alice]


async def test_the_authentication_role_names_many_sessions_in_batches(app, client, alice, receiver):
    """RemoteTokens, as a separate authentication role uses it, against the token role's internal API."""
    from iam.peers import MAX_SIDS, RemoteTokens, ServiceIdentity

    web = await id_token(client)
    remote = RemoteTokens(client, ISSUER, ServiceIdentity(Role.AUTHENTICATION, app.state.iam.keys), Role.TOKEN)
    assert await remote.sessions_ended(alice, [f"other-{n}" for n in range(MAX_SIDS)] + [web["sid"]]) == 1
    assert [claims["sid"] for claims in (await delivered(app, client, receiver))["webapp"]] == [web["sid"]]


@pytest.mark.parametrize("uri", ["http://rp.example/logout", "ftp://rp.example/logout", "https://rp.example/l#f",
                                 "/logout", "https:///logout"])
def test_a_backchannel_logout_uri_must_be_https_off_loopback(uri):
    with pytest.raises(ValidationError, match="must be an https URL"):
        ClientConfig.model_validate(public_client("rp", uri))


@pytest.mark.parametrize("uri", ["https://rp.example/logout?tenant=1", "http://127.0.0.1:8000/logout",
                                 "http://localhost/logout", "http://[::1]:9/logout"])
def test_https_and_loopback_backchannel_logout_uris_are_accepted(uri):
    assert ClientConfig.model_validate(public_client("rp", uri)).backchannel_logout_uri == uri
