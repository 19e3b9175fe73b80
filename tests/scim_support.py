"""Shared pieces of the SCIM tests: one app per test module and backend, clients with SCIM scopes, helpers.

Each SCIM test module imports the `scim` fixture from here; tests share that module's app and stores, so
they use unique names (`unique()`) and never count resources outside their own prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import inspect, text

from iam.app import create_app
from tests.conftest import ISSUER, STORES, basic, client_config, make_settings, postgres_stores

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
IAM_USER = "urn:ietf:params:scim:schemas:extension:iam:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
SCIM_JSON = "application/scim+json"

SCIM_SECRETS = {
    "scim-admin": "scim-admin-secret-0123456789",
    "scim-reader": "scim-reader-secret-0123456789",
    "scim-writer": "scim-writer-secret-0123456789",
}
SCOPES = {"scim-admin": "scim:read scim:write", "scim-reader": "scim:read", "scim-writer": "scim:write"}


def scim_clients() -> list[dict]:
    return [
        {"client_id": cid, "client_secret": SCIM_SECRETS[cid], "grant_types": ["client_credentials"],
         "scope": SCOPES[cid]}
        for cid in SCIM_SECRETS
    ]


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def token_for(http: httpx.AsyncClient, client_id: str) -> str:
    response = await http.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                               headers=basic(client_id, SCIM_SECRETS[client_id]))
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@dataclass
class Scim:
    """An HTTP client for /scim/v2 with a token per role: admin (read+write), reader, writer."""

    http: httpx.AsyncClient
    app: object
    tokens: dict[str, str]

    @property
    def directory(self):
        return self.app.state.iam.users.directory

    def headers(self, who: str | None = "scim-admin", **extra) -> dict:
        headers = {"Content-Type": SCIM_JSON} if who is not None else {}
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return {**headers, **extra}

    async def request(self, method: str, path: str, *, who: str | None = "scim-admin", json=None,
                      headers: dict | None = None, **kwargs) -> httpx.Response:
        return await self.http.request(method, f"/scim/v2{path}", json=json,
                                       headers={**self.headers(who), **(headers or {})}, **kwargs)

    async def get(self, path: str, **kwargs) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, json=None, **kwargs) -> httpx.Response:
        return await self.request("POST", path, json=json, **kwargs)

    async def put(self, path: str, json=None, **kwargs) -> httpx.Response:
        return await self.request("PUT", path, json=json, **kwargs)

    async def patch(self, path: str, operations: list, **kwargs) -> httpx.Response:
        return await self.request("PATCH", path, json={"schemas": [PATCH_OP], "Operations": operations}, **kwargs)

    async def delete(self, path: str, **kwargs) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)

    async def create_user(self, user_name: str | None = None, **attributes) -> dict:
        body = {"schemas": [USER_SCHEMA], "userName": user_name or unique(), **attributes}
        response = await self.post("/Users", body)
        assert response.status_code == 201, response.text
        return response.json()

    async def create_group(self, display_name: str | None = None, members: tuple[str, ...] = (), **extra) -> dict:
        body = {"schemas": [GROUP_SCHEMA], "displayName": display_name or unique("g"),
                "members": [{"value": m} for m in members], **extra}
        response = await self.post("/Groups", body)
        assert response.status_code == 201, response.text
        return response.json()

    async def list(self, resource: str = "/Users", **params) -> dict:
        response = await self.get(resource, params=params)
        assert response.status_code == 200, response.text
        return response.json()


def scim_error(response: httpx.Response, status: int, scim_type: str | None = None) -> dict:
    """Assert a SCIM error response (RFC 7644 §3.12) and answer its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(SCIM_JSON)
    body = response.json()
    assert body["schemas"] == [ERROR]
    assert body["status"] == str(status)
    assert body.get("scimType") == scim_type, body
    assert body["detail"]
    return body


async def dump_store(app, name: str = "users") -> dict[str, list[str]]:
    """Every row of every table of a store, as text (to compare before/after, or search for secrets)."""
    engine = app.state.iam.stores[name].engine
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        dump = {}
        for table in sorted(tables):
            rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()  # noqa: S608 - our table names
            dump[table] = sorted(repr(tuple(row)) for row in rows)
    return dump


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def scim_backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
async def scim_stores(scim_backend, tmp_path_factory, request) -> AsyncIterator[dict[str, str]]:
    if scim_backend == "sqlite":
        directory = tmp_path_factory.mktemp("stores")
        yield {name: f"sqlite+aiosqlite:///{directory}/{name}.db" for name in STORES}
        return
    async with postgres_stores(request.getfixturevalue("postgres_server")) as urls:
        yield urls


@pytest.fixture(scope="module")
async def scim_app(scim_stores, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("scim"), scim_stores, clients=client_config() + scim_clients())
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def scim(scim_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=scim_app), base_url=ISSUER) as http:
        tokens = {cid: await token_for(http, cid) for cid in SCIM_SECRETS}
        yield Scim(http, scim_app, tokens)
