"""The `iam` command as an operator runs it: real processes, real HTTP, one clear line on failure."""

import stat

import httpx
import pytest

from tests.conftest import SECRETS, basic, client_config, create_database
from tests.postgres import free_port
from tests.server import iam, serve, write_config

# Internal URLs of the roles a token-role process would call; these tests make no cross-role call.
PEER_ENV = {"IAM_USERS_URL": f"http://127.0.0.1:{free_port()}", "IAM_AUTHN_URL": f"http://127.0.0.1:{free_port()}"}


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_explains_every_command():
    result = iam("--help")
    assert result.returncode == 0
    for command in ("serve", "migrate", "keys", "tokens", "clients", "config"):
        assert command in result.stdout
    for sub in (["serve"], ["keys"], ["keys", "rotate"], ["tokens", "purge"], ["clients", "hash-secret"]):
        assert iam(*sub, "--help").returncode == 0


def test_unknown_role_stops_with_the_valid_ones(tmp_path):
    result = iam("serve", env={"SERVICE_ROLE": "tokens", "IAM_CONFIG": str(write_config(tmp_path))}, cwd=tmp_path)
    one_line_error(result, "unknown SERVICE_ROLE 'tokens'", "authentication, token, user-management, all")


def test_invalid_config_names_the_field(tmp_path):
    config = write_config(tmp_path, clients=[{"client_id": "x", "client_secret": "s", "grant_types": ["implicit"]}])
    one_line_error(iam("serve", env={"IAM_CONFIG": str(config)}, cwd=tmp_path), str(config), "clients.0.grant_types.0")


def test_unset_variable_is_named(tmp_path):
    config = tmp_path / "iam.yaml"
    config.write_text("issuer: ${IAM_TEST_SURELY_UNSET_VAR}\n")
    one_line_error(iam("config", "check", env={"IAM_CONFIG": str(config)}), "IAM_TEST_SURELY_UNSET_VAR", "issuer")


def test_unreachable_store_stops_start_up(tmp_path):
    env = {
        "IAM_CONFIG": str(write_config(tmp_path, keys={"dir": str(tmp_path / "keys")})),
        "SERVICE_ROLE": "token",
        "IAM_TOKEN_DATABASE_URL": f"postgresql+asyncpg://iam:pw@127.0.0.1:{free_port()}/iam",
        **PEER_ENV,
    }
    result = iam("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    one_line_error(result, "token store", "unreachable")
    assert "pw@" not in result.stderr


def test_hash_secret_makes_an_argon2id_hash_that_authenticates(tmp_path):
    result = iam("clients", "hash-secret", input="a-long-client-secret-value\n")
    assert result.returncode == 0
    assert result.stdout.startswith("$argon2id$")
    assert "a-long-client-secret-value" not in result.stdout
    from argon2 import PasswordHasher

    assert PasswordHasher().verify(result.stdout.strip(), "a-long-client-secret-value")


@pytest.fixture
def pg_env(tmp_path, postgres_server):
    """Environment for a token-role process on its own PostgreSQL database, migrations left to `iam migrate`."""
    import asyncio

    name = asyncio.run(create_database(postgres_server))
    host = postgres_server.split("://", 1)[1]
    clients = client_config()
    for c in clients:  # secrets come from the environment, never the file
        if c.get("client_secret"):
            c["client_secret"] = "${SECRET_" + c["client_id"].replace("-", "_").upper() + ":-}"
    config = write_config(tmp_path, issuer="http://localhost:8080", keys={"dir": str(tmp_path / "keys")},
                          migrate_on_start=False, clients=clients)
    return {
        "IAM_CONFIG": str(config),
        "SERVICE_ROLE": "token",
        "IAM_TOKEN_DATABASE_URL": f"postgresql+asyncpg://{host}/{name}",
        "SECRET_SVC_BASIC": SECRETS["svc-basic"],
        "SECRET_SVC_POST": SECRETS["svc-post"],
        **PEER_ENV,
    }


def test_migrate_then_serve_on_postgresql_over_real_http(tmp_path, pg_env):
    first = iam("migrate", env=pg_env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    from iam.store import Store

    head = Store("token", pg_env["IAM_TOKEN_DATABASE_URL"]).head
    assert "token store" in first.stdout and head in first.stdout
    assert iam("migrate", env=pg_env, cwd=tmp_path).returncode == 0  # idempotent

    with serve(pg_env, tmp_path) as (base, _):
        token = httpx.post(f"{base}/oauth/v2/token", data={"grant_type": "client_credentials"},
                           headers=basic("svc-basic")).json()["access_token"]
        phantom = httpx.get(f"{base}/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
        assert phantom.status_code == 200 and phantom.headers["authorization"].startswith("Bearer ey")
        # keys were generated on first run, private to the process owner
        for path in (tmp_path / "keys").glob("*.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

        rotated = iam("keys", "rotate", env=pg_env, cwd=tmp_path)
        assert rotated.returncode == 0 and rotated.stdout.count("added") == 3
        listing = iam("keys", "list", env=pg_env, cwd=tmp_path).stdout
        assert listing.count("signing") == 3 and listing.count("published") == 3

        revoked = httpx.post(f"{base}/oauth/v2/revoke", data={"token": token}, headers=basic("svc-basic"))
        assert revoked.status_code == 200
        assert httpx.get(f"{base}/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"}).status_code == 401

    purge = iam("tokens", "purge", env=pg_env, cwd=tmp_path)
    assert purge.returncode == 0 and "deleted 0 expired tokens" in purge.stdout


def test_server_without_migrations_is_live_but_not_ready(tmp_path, pg_env):
    with serve(pg_env, tmp_path, wait_for="/health/live") as (base, _):
        ready = httpx.get(f"{base}/health/ready")
        assert ready.status_code == 503 and "iam migrate" in ready.text
        assert iam("migrate", env=pg_env, cwd=tmp_path).returncode == 0
        assert httpx.get(f"{base}/health/ready").status_code == 200  # no restart needed
