"""Fixtures: every store-backed test runs on SQLite and on a real PostgreSQL, through the real ASGI app."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from argon2 import PasswordHasher

from iam.app import create_app
from iam.config import Settings
from iam.observability import JsonFormatter
from tests.postgres import cluster

ISSUER = "https://iam.test"
SECRETS = {
    "svc-basic": "basic-secret-0123456789abcdef",
    "svc-post": "post-secret-0123456789abcdef",
    "gateway": "gateway-secret-0123456789abcdef",
    "odd:id &+": "odd secret:&=+%/é",
    "webapp": "webapp-secret-0123456789abcdef",
    "legacy": "legacy-secret-0123456789abcdef",
    "partner": "partner-secret-0123456789abcdef",
}
WEBAPP_CALLBACK = "https://app.test/cb?dummy1=lorem&dummy2=ipsum"
PASSWORD = "correct horse battery staple"


@functools.cache
def _gateway_hash() -> str:
    return PasswordHasher().hash(SECRETS["gateway"])  # an argon2 run per worker, not one per test


def client_config() -> list[dict]:
    return [
        {
            "client_id": "svc-basic",
            "client_secret": SECRETS["svc-basic"],
            "grant_types": ["client_credentials"],
            "scope": "api:read api:write",
            "access_token_ttl": 600,
            "audience": ["https://api.test"],
            "introspection": True,
        },
        {
            "client_id": "svc-post",
            "client_secret": SECRETS["svc-post"],
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_post",
            "scope": "api:read",
            "introspection": True,
        },
        {
            "client_id": "gateway",
            # the same secret kept only as an argon2id hash in config
            "client_secret_hash": _gateway_hash(),
            "grant_types": ["client_credentials"],
        },
        {"client_id": "odd:id &+", "client_secret": SECRETS["odd:id &+"], "grant_types": ["client_credentials"]},
        {"client_id": "native", "token_endpoint_auth_method": "none", "redirect_uris": ["http://127.0.0.1/cb"]},
        {
            "client_id": "webapp",
            "client_name": "Web App",
            "client_secret": SECRETS["webapp"],
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [WEBAPP_CALLBACK, "https://app.test/other"],
            "post_logout_redirect_uris": ["https://app.test/bye"],
            "scope": "openid profile email groups offline_access api:read",
            # also the back end of https://api.test: it may introspect the tokens meant for that API
            "introspection": {"audiences": ["https://api.test"]},
        },
        {
            # a confidential client that cannot send PKCE (like the OpenID conformance suite's)
            "client_id": "legacy",
            "client_secret": SECRETS["legacy"],
            "grant_types": ["authorization_code"],
            "redirect_uris": ["https://legacy.test/cb"],
            "scope": "openid",
            "require_pkce": False,
        },
        {
            "client_id": "kubectl",
            "token_endpoint_auth_method": "none",
            "client_name": "kubectl",
            "application_type": "native",
            "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
            "redirect_uris": ["http://localhost:8000", "http://127.0.0.1/callback"],
            "scope": "openid profile email groups offline_access",
            "id_token_ttl": 60,
            "refresh_reuse_window": 5,
        },
        {"client_id": "disabled", "client_secret": "", "grant_types": ["client_credentials"]},
        {
            # a third-party application: the person is asked before it gets anything
            "client_id": "partner",
            "client_name": "Partner App",
            "client_secret": SECRETS["partner"],
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": ["https://partner.test/cb"],
            "scope": "openid profile email offline_access",
            "require_consent": True,
        },
    ]


def basic(client_id: str, secret: str | None = None) -> dict[str, str]:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded, then joined and base64-encoded."""
    from urllib.parse import quote_plus

    secret = SECRETS[client_id] if secret is None else secret
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture(scope="session")
def postgres_server():
    with cluster() as url:
        yield url


@pytest.fixture(scope="session")
def ldap_server():
    """A running OpenLDAP slapd with the test directory (tests/ldap_server.py says what is in it)."""
    from tests import ldap_server as slapd

    with slapd.running() as server:
        yield server


@pytest.fixture(scope="module")
def kube():
    """A Kubernetes service-account token issuer, its discovery and JWKS on a real port (tests/workload_issuer.py)."""
    from tests.workload_issuer import ServiceAccountIssuer

    with ServiceAccountIssuer() as issuer:
        yield issuer


@pytest.fixture(scope="session")
def oidc_upstream(tmp_path_factory):
    """A real upstream OpenID Connect provider (node-oidc-provider) for the run: see tests/oidc_upstream.py."""
    from tests.oidc_upstream import running_upstream

    with running_upstream(tmp_path_factory.mktemp("oidc-upstream")) as upstream:
        yield upstream


async def create_database(server: str, template: str | None = None) -> str:
    name = "iam_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(server + "/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()
    return name


STORES = ("authn", "token", "users")


@contextlib.asynccontextmanager
async def postgres_stores(server: str, templates: dict[str, str] | None = None) -> AsyncIterator[dict[str, str]]:
    """Three fresh databases on the test cluster (copies of `templates` when given), dropped afterwards.

    Each empty database is ~7.5 MB of files in memory (tests/postgres.py): kept until the end of the run, a
    full run's would fill the machine's memory.
    """
    host = server.split("://", 1)[1]
    names = {store: await create_database(server, (templates or {}).get(store)) for store in STORES}
    try:
        yield {store: f"postgresql+asyncpg://{host}/{name}" for store, name in names.items()}
    finally:
        conn = await asyncpg.connect(server + "/postgres")
        try:
            for name in names.values():  # FORCE (PostgreSQL 13+): a server process of the test may still be connected
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# What a first start leaves behind (stores migrated to head, a generated key ring) is made once per worker and
# copied for each test: the same state a fresh instance starts from, without the migrations and the key
# generation (about half a second) in every test. Migrations and key generation have tests of their own.
def _first_start(directory: Path, store_urls: dict[str, str]) -> None:
    async def start_and_stop() -> None:
        application = create_app(make_settings(directory, store_urls))
        async with application.router.lifespan_context(application):
            pass

    # on a thread of its own: these fixtures are first asked for from inside a test's running event loop
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, start_and_stop()).result()


@pytest.fixture(scope="session")
def first_start(tmp_path_factory) -> Path:
    """A directory with the three SQLite stores and the `keys` of a first start."""
    directory = tmp_path_factory.mktemp("first-start")
    _first_start(directory, _sqlite_urls(directory))
    assert not list(directory.glob("*.db-*")), "a store's journal outlived its engine: the copies would lack it"
    return directory


@pytest.fixture(scope="session")
def postgres_templates(postgres_server) -> dict[str, str]:
    """The three PostgreSQL databases of a first start, names by store: templates for CREATE DATABASE."""
    host = postgres_server.split("://", 1)[1]

    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        names = {store: thread.submit(asyncio.run, create_database(postgres_server)).result() for store in STORES}
    with tempfile.TemporaryDirectory() as tmp:
        _first_start(Path(tmp), {store: f"postgresql+asyncpg://{host}/{name}" for store, name in names.items()})
    return names


def _sqlite_urls(directory: Path) -> dict[str, str]:
    return {name: f"sqlite+aiosqlite:///{directory}/{name}.db" for name in STORES}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
async def store_urls(backend, tmp_path, request, first_start) -> AsyncIterator[dict[str, str]]:
    """Fresh stores for one test, migrated to head, and the key ring in tmp_path/keys, as after a first start:
    three SQLite files, or three PostgreSQL databases."""
    shutil.copytree(first_start / "keys", tmp_path / "keys")
    if backend == "sqlite":
        for name in STORES:
            shutil.copyfile(first_start / f"{name}.db", tmp_path / f"{name}.db")
        yield _sqlite_urls(tmp_path)
        return
    templates = request.getfixturevalue("postgres_templates")
    async with postgres_stores(request.getfixturevalue("postgres_server"), templates) as urls:
        yield urls


@pytest.fixture
async def empty_store_urls(backend, tmp_path, request) -> AsyncIterator[dict[str, str]]:
    """Fresh, empty stores for one test (no schema yet): three SQLite files, or three PostgreSQL databases."""
    if backend == "sqlite":
        yield _sqlite_urls(tmp_path)
        return
    async with postgres_stores(request.getfixturevalue("postgres_server")) as urls:
        yield urls


def make_settings(tmp_path: Path, store_urls: dict[str, str], **overrides) -> Settings:
    data = {
        "issuer": ISSUER,
        "stores": store_urls,
        "keys": {"dir": str(tmp_path / "keys")},
        "clients": client_config(),
        "purge_interval": 0,
        # A generous bound: a test's first connection on a busy machine may take seconds. The bound itself
        # (store_timeout's default) is what tests/test_operations.py checks.
        "store_timeout": 15,
        **overrides,
    }
    return Settings.model_validate(data)


@pytest.fixture
def settings(tmp_path, store_urls) -> Settings:
    return make_settings(tmp_path, store_urls)


@pytest.fixture
async def app(settings):
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        yield http



@pytest.fixture
async def alice(app) -> str:
    """A user in the directory with a password in the credential store; returns their subject."""
    from iam.users.directory import NewUser

    new = NewUser(user_name="alice", email="alice@example.com", email_verified=True, given_name="Alice",
                  family_name="Liddell")
    return await app.state.iam.users.directory.create_user(new, password=PASSWORD,
                                                             group_names=("admins", "developers"))


# -- no secret ever reaches a log ----------------------------------------------------------------------------
class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is a bug elsewhere; keep its message
            self.lines.append(str(record.msg))


_captured = _Captured()
# What a secret looks like here: opaque tokens and codes (43 base64url characters), JWTs, password hashes.
LEAK_PATTERNS = [re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
                 re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ"), re.compile(r"\$argon2")]


def pytest_sessionstart(session):
    logging.getLogger().addHandler(_captured)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the tests' own HTTP client, as the server sets it


def find_leaks(lines: list[str]) -> list[str]:
    secrets_used = [*SECRETS.values(), PASSWORD]
    return [line for line in lines
            if any(secret in line for secret in secrets_used) or any(p.search(line) for p in LEAK_PATTERNS)]


def pytest_sessionfinish(session, exitstatus):
    """Grep every log line of the run (in-process, and every server process's log) for secrets.

    Under pytest-xdist each worker writes its in-process lines into its own base temp dir, which lies inside
    the controller's; the controller, which finishes last, greps them all.
    """
    base = Path(session.config._tmp_path_factory.getbasetemp())
    if hasattr(session.config, "workerinput"):
        (base / "in-process.log").write_text("\n".join(_captured.lines))
        return
    lines = list(_captured.lines)
    for log in [*base.rglob("server.log"), *base.rglob("in-process.log")]:
        lines += log.read_text(errors="replace").splitlines()
    leaks = find_leaks(lines)
    if leaks:
        print("\nSECRETS IN LOGS:\n" + "\n".join(leaks[:20]))
        session.exitstatus = 1
