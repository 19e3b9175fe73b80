"""Stored clients across real processes: two token-role replicas (`iam serve`) on one PostgreSQL store see every
change made on the other; `iam clients …` changes the store a running server reads; a YAML client's new secret is
taken from the config file without a restart, and an invalid file keeps the running clients."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack

import httpx
import pytest
import yaml

from tests.conftest import basic, client_config, create_database
from tests.server import iam, serve, token_role_env
from tests.test_admin_clients import ADMIN_SECRETS, admin_clients

SERVICE = {"grant_types": ["client_credentials"], "scope": "api:read"}
WAIT = 10  # seconds a change may take to show before a test gives up (the design says: well under one)


def token(base: str, client_id: str, secret: str) -> httpx.Response:
    return httpx.post(f"{base}/oauth/v2/token", data={"grant_type": "client_credentials"},
                      headers=basic(client_id, secret))


def admin_token(base: str) -> str:
    response = token(base, "clients-admin", ADMIN_SECRETS["clients-admin"])
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def active(base: str, access_token: str) -> bool:
    response = httpx.post(f"{base}/oauth/v2/introspect", data={"token": access_token}, headers=basic("svc-basic"))
    return response.json()["active"]


def eventually(check, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def replicas(stack: ExitStack, tmp_path, postgres_server: str, **settings) -> list[str]:
    """The base URLs of two token-role `iam serve` processes on one fresh PostgreSQL store."""
    database = asyncio.run(create_database(postgres_server))
    url = f"postgresql+asyncpg://{postgres_server.split('://', 1)[1]}/{database}"
    bases = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        env = {**token_role_env(directory, clients=client_config() + admin_clients(), **settings),
               "IAM_TOKEN_DATABASE_URL": url}
        bases.append(stack.enter_context(serve(env, directory))[0])
    return bases


def test_two_replicas_on_one_postgresql_store_see_each_others_changes(tmp_path, postgres_server):
    with ExitStack() as stack:
        a, b = replicas(stack, tmp_path, postgres_server)
        headers = {"Authorization": f"Bearer {admin_token(a)}"}

        created = httpx.post(f"{a}/admin/v1/clients", json=SERVICE, headers=headers)
        assert created.status_code == 201, created.text
        client_id, secret = created.json()["client_id"], created.json()["client_secret"]
        eventually(lambda: token(b, client_id, secret).status_code == 200, "replica b never saw the new client")
        on_b = token(b, client_id, secret).json()["access_token"]
        assert active(b, on_b) and active(b, on_b)  # the second answer from b's hot cache

        disabled = httpx.patch(f"{a}/admin/v1/clients/{client_id}", json={"enabled": False}, headers=headers)
        assert disabled.status_code == 200
        eventually(lambda: not active(b, on_b), "replica b kept a disabled client's cached token active")
        assert token(b, client_id, secret).status_code == 401
        phantom = httpx.get(f"{b}/oauth/v2/phantom", headers={"Authorization": f"Bearer {on_b}"})
        assert phantom.status_code == 401

        httpx.patch(f"{a}/admin/v1/clients/{client_id}", json={"enabled": True}, headers=headers)
        eventually(lambda: active(b, on_b), "replica b did not see the client enabled again")
        rotated = httpx.post(f"{a}/admin/v1/clients/{client_id}/secret", json={"grace": 0}, headers=headers)
        new = rotated.json()["client_secret"]
        eventually(lambda: token(b, client_id, new).status_code == 200, "replica b never took the new secret")
        assert token(b, client_id, secret).status_code == 401

        assert httpx.delete(f"{a}/admin/v1/clients/{client_id}", headers=headers).status_code == 204
        eventually(lambda: token(b, client_id, new).status_code == 401, "replica b kept a deleted client")
        assert not active(b, on_b)


def test_a_client_registered_on_one_replica_works_and_ends_on_the_other(tmp_path, postgres_server):
    with ExitStack() as stack:
        a, b = replicas(stack, tmp_path, postgres_server, registration={"enabled": True})
        issued = httpx.post(f"{a}/admin/v1/initial-access-tokens", json={"grant_types": ["client_credentials"],
                                                                         "scope": "api:read"},
                            headers={"Authorization": f"Bearer {admin_token(a)}"})
        assert issued.status_code == 201, issued.text
        registered = httpx.post(f"{a}/oauth/v2/register", json=SERVICE,
                                headers={"Authorization": f"Bearer {issued.json()['token']}"})
        assert registered.status_code == 201, registered.text
        client = registered.json()
        client_id, secret = client["client_id"], client["client_secret"]
        eventually(lambda: token(b, client_id, secret).status_code == 200, "replica b never saw the registered client")
        on_b = token(b, client_id, secret).json()["access_token"]
        assert active(b, on_b)
        management = {"Authorization": f"Bearer {client['registration_access_token']}"}
        assert httpx.get(f"{b}/oauth/v2/register/{client_id}", headers=management).status_code == 200
        assert httpx.delete(f"{b}/oauth/v2/register/{client_id}", headers=management).status_code == 204
        eventually(lambda: token(a, client_id, secret).status_code == 401, "replica a kept a deregistered client")
        assert not active(a, on_b)


@pytest.fixture
def server(tmp_path):
    """A token-role `iam serve` on SQLite, and the environment `iam clients` needs to reach the same store."""
    env = token_role_env(tmp_path, clients=client_config() + admin_clients(), client_sync_interval=0.2,
                         config_reload_interval=0.2)
    with serve(env, tmp_path) as (base, _process):
        yield base, env


def test_iam_clients_changes_what_a_running_server_sees(server, tmp_path):
    base, env = server
    added = iam("clients", "add", "--client-id", "batch-job", "--grant-type", "client_credentials",
                "--scope", "api:read", "--name", "Batch job", env=env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    shown = json.loads(added.stdout)
    secret = shown["client_secret"]
    assert shown["client_id"] == "batch-job" and shown["client_name"] == "Batch job"
    eventually(lambda: token(base, "batch-job", secret).status_code == 200, "the server never saw the client")

    listed = iam("clients", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0 and "batch-job\tenabled\tclient_secret_basic\tBatch job" in listed.stdout
    show = iam("clients", "show", "batch-job", env=env, cwd=tmp_path)
    assert json.loads(show.stdout)["etag"] == '"1"' and "client_secret" not in show.stdout

    rotated = iam("clients", "rotate-secret", "batch-job", "--grace", "3600", env=env, cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    eventually(lambda: token(base, "batch-job", new).status_code == 200, "the server never took the new secret")
    assert token(base, "batch-job", secret).status_code == 200  # the grace period

    stale = iam("clients", "update", "batch-job", "--disable", "--if-match", '"1"', env=env, cwd=tmp_path)
    assert stale.returncode == 1 and "changed" in stale.stderr and "Traceback" not in stale.stderr
    disabled = iam("clients", "update", "batch-job", "--disable", env=env, cwd=tmp_path)
    assert disabled.returncode == 0 and json.loads(disabled.stdout)["enabled"] is False
    eventually(lambda: token(base, "batch-job", new).status_code == 401, "the server kept a disabled client")

    refused = iam("clients", "add", "--redirect-uri", "https://x.test/cb#f", env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "invalid_redirect_uri" in refused.stderr
    yaml_owned = iam("clients", "delete", "svc-basic", env=env, cwd=tmp_path)
    assert yaml_owned.returncode == 1 and "configuration file" in yaml_owned.stderr

    assert iam("clients", "delete", "batch-job", env=env, cwd=tmp_path).returncode == 0
    assert iam("clients", "show", "batch-job", env=env, cwd=tmp_path).returncode == 1


def test_a_yaml_clients_new_secret_is_taken_without_a_restart_and_a_bad_file_is_not(server, tmp_path):
    base, env = server
    config_file = tmp_path / "iam.yaml"
    config = yaml.safe_load(config_file.read_text())
    old = next(c for c in config["clients"] if c["client_id"] == "svc-post")["client_secret"]
    new = "svc-post-rotated-secret-0123456789"
    for client in config["clients"]:
        if client["client_id"] == "svc-post":
            client["client_secret"] = new
    config_file.write_text(yaml.safe_dump(config))

    def post_token(secret: str) -> int:
        return httpx.post(f"{base}/oauth/v2/token", data={"grant_type": "client_credentials",
                                                           "client_id": "svc-post", "client_secret": secret}
                          ).status_code

    eventually(lambda: post_token(new) == 200, "the new secret of the config file was never taken")
    assert post_token(old) == 401

    config_file.write_text("clients: [{client_id: broken, grant_types: [implicit]}]\n")
    eventually(lambda: "the changed config file is invalid" in (tmp_path / "server.log").read_text(),
               "the invalid config file was not reported")
    assert post_token(new) == 200  # the running clients were kept


def test_iam_clients_initial_token_lets_a_running_server_register_one_client(tmp_path):
    env = token_role_env(tmp_path, clients=client_config() + admin_clients(), registration={"enabled": True})
    with serve(env, tmp_path) as (base, _process):
        issued = iam("clients", "initial-token", "--ttl", "600", "--grant-type", "client_credentials",
                     "--scope", "api:read", "--auth-method", "client_secret_basic", env=env, cwd=tmp_path)
        assert issued.returncode == 0, issued.stderr
        shown = json.loads(issued.stdout)
        assert shown["uses"] == 1 and shown["policy"]["grant_types"] == ["client_credentials"] and shown["id"]
        assert 590 <= shown["expires_at"] - time.time() <= 600 and "shown this once" in issued.stderr
        bearer = {"Authorization": f"Bearer {shown['token']}"}
        registered = httpx.post(f"{base}/oauth/v2/register", json=SERVICE, headers=bearer)
        assert registered.status_code == 201, registered.text
        client = registered.json()
        assert token(base, client["client_id"], client["client_secret"]).status_code == 200
        again = httpx.post(f"{base}/oauth/v2/register", json=SERVICE, headers=bearer)
        assert again.status_code == 401 and again.json()["error"] == "invalid_token"
        refused = iam("clients", "initial-token", "--ttl", "99999999", env=env, cwd=tmp_path)
        assert refused.returncode == 1 and "ttl" in refused.stderr and "Traceback" not in refused.stderr
