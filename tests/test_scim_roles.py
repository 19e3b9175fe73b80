"""SCIM with SERVICE_ROLE=user-management apart: tokens and passwords go over the internal HTTP API.

The peer (an `all` instance, standing in for the token and authentication roles) is reached through an ASGI
transport instead of a socket; everything else is the real code: service assertions, RemoteTokens,
RemoteCredentials and the peer's /internal/v1 endpoints. Both instances share one key directory, as the
peers' JWKS would be fetched otherwise.
"""

from __future__ import annotations

import httpx
import pytest

from iam.app import create_app
from tests.conftest import ISSUER, client_config, make_settings

pytest.register_assert_rewrite("tests.scim_support")
from tests.scim_support import USER_SCHEMA, dump_store, scim_clients, scim_error, token_for  # noqa: E402

PEER = "http://peer.test"


async def test_user_management_apart_uses_the_peers_over_http(tmp_path):
    def stores(prefix: str) -> dict[str, str]:
        return {name: f"sqlite+aiosqlite:///{tmp_path}/{prefix}-{name}.db" for name in ("authn", "token", "users")}

    clients = client_config() + scim_clients()
    peer_app = create_app(make_settings(tmp_path, stores("peer"), clients=clients))
    users_app = create_app(make_settings(tmp_path, stores("um"), clients=clients, role="user-management",
                                         peers={"authentication": PEER, "token": PEER}))
    runtime = users_app.state.iam
    assert not hasattr(runtime, "credentials")  # no credential store in this role
    async with peer_app.router.lifespan_context(peer_app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=peer_app), base_url=PEER) as to_peer:
        runtime.users.directory.credentials.http = to_peer
        runtime.users.tokens.http = to_peer
        runtime.peer_keys.http = to_peer
        async with users_app.router.lifespan_context(users_app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=users_app), base_url=ISSUER) as http:
            token = await token_for(to_peer, "scim-admin")
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
            reader = {"Authorization": f"Bearer {await token_for(to_peer, 'scim-reader')}"}

            password = "a password over the wire"
            created = await http.post("/scim/v2/Users", headers=headers, json={
                "schemas": [USER_SCHEMA], "userName": "remote-user", "password": password})
            assert created.status_code == 201, created.text
            sub = created.json()["id"]
            assert await peer_app.state.iam.authn.credentials.verify(sub, password)

            refused = await http.post("/scim/v2/Users", headers=headers, json={
                "schemas": [USER_SCHEMA], "userName": "weak-user", "password": "short"})
            assert "at least 8 characters" in scim_error(refused, 400, "invalidValue")["detail"]
            scim_error(await http.post("/scim/v2/Users", headers=reader, json={"schemas": [USER_SCHEMA]}), 403)
            scim_error(await http.get("/scim/v2/Users", headers={"Authorization": "Bearer nope"}), 401)

            # the authentication role is down: 503, nothing stored, and a retry works once it is back
            before = await dump_store(users_app)
            runtime.users.directory.credentials.http = httpx.AsyncClient(
                transport=httpx.MockTransport(lambda request: httpx.Response(502)))
            scim_error(await http.post("/scim/v2/Users", headers=headers, json={
                "schemas": [USER_SCHEMA], "userName": "later-user", "password": password}), 503)
            scim_error(await http.delete(f"/scim/v2/Users/{sub}", headers=headers), 503)
            assert await dump_store(users_app) == before
            runtime.users.directory.credentials.http = to_peer
            retried = await http.post("/scim/v2/Users", headers=headers, json={
                "schemas": [USER_SCHEMA], "userName": "later-user", "password": password})
            assert retried.status_code == 201, retried.text

            assert (await http.delete(f"/scim/v2/Users/{sub}", headers=headers)).status_code == 204
            assert not await peer_app.state.iam.authn.credentials.verify(sub, password)
            dump = repr(await dump_store(users_app))
            assert password not in dump and "$argon2" not in dump
