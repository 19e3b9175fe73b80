"""The three roles as three processes, each with its own PostgreSQL database (docs/architecture.md).

The handoff, the user lookups at sign-in, the claims at code redemption and refresh, the SCIM user and its
password (stored by the authentication role), the revocation when `iam users disable` runs, and the end of
sessions that the token role turns into back-channel logout tokens all cross process boundaries over the
internal HTTP API, authenticated with service assertions. No role's database holds another role's tables.
"""

import asyncio
from contextlib import ExitStack

import asyncpg
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from iam.app import store_metadata
from tests import logout_receiver, smtp_server
from tests.conftest import PASSWORD, create_database
from tests.oauth import authorize, follow, hidden_fields, pkce, query, sign_in
from tests.postgres import free_port
from tests.server import iam, serve, write_config

CALLBACK = "https://app.test/cb"
STORE_OF = {"authentication": "authn", "token": "token", "user-management": "users"}
ROLE_TABLES = {role: set(store_metadata(store).tables) for role, store in STORE_OF.items()}


@pytest.fixture(scope="module")
def inbox():
    with smtp_server.running() as server:
        yield server


@pytest.fixture(scope="module")
def receiver():
    """webapp's back-channel logout endpoint."""
    with logout_receiver.running() as running:
        yield running


@pytest.fixture(scope="module")
def cluster_of_roles(tmp_path_factory, postgres_server, inbox, receiver):
    """Start token, authentication and user-management as three `iam serve` processes."""
    ports = {role: free_port() for role in ROLE_TABLES}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    host = postgres_server.split("://", 1)[1]
    databases = {role: asyncio.run(create_database(postgres_server)) for role in ROLE_TABLES}
    store_var = {"authentication": "IAM_AUTHN_DATABASE_URL", "token": "IAM_TOKEN_DATABASE_URL",
                 "user-management": "IAM_USERS_DATABASE_URL"}
    clients = [{
        "client_id": "webapp", "client_secret": "${WEBAPP_SECRET}", "redirect_uris": [CALLBACK],
        "grant_types": ["authorization_code", "refresh_token"], "scope": "openid profile email groups",
        "backchannel_logout_uri": receiver.uri("webapp"),
        "introspection": True,  # it checks its own tokens below
    }, {
        "client_id": "provisioner", "client_secret": "${PROVISIONER_SECRET}", "grant_types": ["client_credentials"],
        "scope": "scim:read scim:write clients:read clients:write",
    }]
    envs = {}
    with ExitStack() as stack:
        for role in ("user-management", "authentication", "token"):
            directory = tmp_path_factory.mktemp(role)
            # The authentication role mails password reset links.
            mail = {"host": "127.0.0.1", "port": inbox.port, "security": "none", "from_address": "iam@iam.test"}
            config = write_config(directory, issuer=urls["token"], authentication_url=urls["authentication"],
                                  keys={"dir": str(directory / "keys")}, clients=clients,
                                  **({"mail": mail} if role == "authentication" else {}))
            envs[role] = {
                "IAM_CONFIG": str(config),
                "SERVICE_ROLE": role,
                store_var[role]: f"postgresql+asyncpg://{host}/{databases[role]}",
                "IAM_TOKEN_URL": urls["token"],
                "IAM_AUTHN_URL": urls["authentication"],
                "IAM_USERS_URL": urls["user-management"],
                "WEBAPP_SECRET": "webapp-secret-0123456789abcdef",
                "PROVISIONER_SECRET": "provisioner-secret-0123456789",
                "cwd": str(directory),
            }
            env = {k: v for k, v in envs[role].items() if k != "cwd"}
            stack.enter_context(serve(env, directory, port=ports[role]))
        yield urls, envs, databases


def run_cli(envs, role, *args, input=None):
    env = dict(envs[role])
    cwd = env.pop("cwd")
    return iam(*args, env=env, cwd=cwd, input=input)


async def logout_tokens(urls, receiver, sub: str, count: int = 1) -> list[dict]:
    """The logout tokens webapp received for `sub` (they come off the request path), validated as an RP would
    against the token role's JWKS."""
    keys, seen = await jwks(urls), set()
    for _ in range(400):
        received = [r for r in receiver.for_client("webapp")
                    if jwt.decode(r.token, KeySet.import_key_set(keys), algorithms=["RS256"]).claims["sub"] == sub]
        if len(received) >= count:
            break
        await asyncio.sleep(0.05)
    return [logout_receiver.validate(r.token, keys, urls["token"], "webapp", seen) for r in received]


async def jwks(urls) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{urls['token']}/oauth/v2/jwks")).json()


async def scim_user(urls, user_name: str, group_names: list[str]) -> str:
    """Create a user with a password and groups over SCIM, as a provisioning system would."""
    async with httpx.AsyncClient() as http:
        token = (await http.post(f"{urls['token']}/oauth/v2/token", auth=("provisioner", "provisioner-secret-0123456789"),
                                 data={"grant_type": "client_credentials"})).json()["access_token"]
        scim = {"Authorization": f"Bearer {token}", "Content-Type": "application/scim+json"}
        created = await http.post(f"{urls['user-management']}/scim/v2/Users", headers=scim, json={
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                        "urn:ietf:params:scim:schemas:extension:iam:2.0:User"],
            "userName": user_name, "password": PASSWORD, "active": True,
            "emails": [{"value": f"{user_name}@example.com", "primary": True}],
            "urn:ietf:params:scim:schemas:extension:iam:2.0:User": {"emailVerified": True}})
        assert created.status_code == 201, created.text
        user_id = created.json()["id"]
        for name in group_names:
            group = await http.post(f"{urls['user-management']}/scim/v2/Groups", headers=scim, json={
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": name,
                "members": [{"value": user_id}]})
            assert group.status_code == 201, group.text
        return user_id


async def test_sign_in_and_tokens_across_three_processes(cluster_of_roles, receiver):
    urls, envs, _ = cluster_of_roles
    carol = await scim_user(urls, "carol", ["platform", "sre"])

    async with httpx.AsyncClient(base_url=urls["token"]) as http:
        verifier, challenge = pkce()
        start = await authorize(http, "webapp", CALLBACK, "openid email groups", challenge, nonce="n1")
        assert start.headers["location"].startswith(urls["authentication"] + "/authn/login?")
        page = await follow(http, start, CALLBACK)
        assert str(page.url).startswith(urls["authentication"])
        done = await follow(http, await sign_in(http, page, "carol"), CALLBACK)
        params = query(done.headers["location"])
        assert params["iss"] == urls["token"]
        token = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
            "grant_type": "authorization_code", "code": params["code"], "redirect_uri": CALLBACK,
            "code_verifier": verifier})
        assert token.status_code == 200, token.text
        body = token.json()
        keys = KeySet.import_key_set((await http.get("/oauth/v2/jwks")).json())
        claims = jwt.decode(body["id_token"], keys, algorithms=["RS256"]).claims
        assert claims["sub"] == carol and claims["groups"] == ["platform", "sre"]
        assert claims["email"] == "carol@example.com" and claims["email_verified"] is True

        # Disabling the user in the user-management role stops the refresh in the token role at once.
        assert run_cli(envs, "user-management", "users", "disable", "carol").returncode == 0
        refreshed = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
            "grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
        assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
        # ... and the user-management role told the token role: the live access token is revoked too.
        introspected = await http.post("/oauth/v2/introspect", auth=("webapp", "webapp-secret-0123456789abcdef"),
                                       data={"token": body["access_token"]})
        assert introspected.json() == {"active": False}
        # ... and the authentication role, ending carol's sessions, had the token role tell webapp.
        assert [claims.get("sid") for claims in await logout_tokens(urls, receiver, carol)] == [None]


async def test_the_account_page_lists_and_removes_applications_held_by_the_token_role(cluster_of_roles):
    urls, _, _ = cluster_of_roles
    await scim_user(urls, "dave", [])
    async with httpx.AsyncClient(base_url=urls["token"]) as http:
        verifier, challenge = pkce()
        page = await follow(http, await authorize(http, "webapp", CALLBACK, "openid", challenge), CALLBACK)
        done = await follow(http, await sign_in(http, page, "dave"), CALLBACK)
        token = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
            "grant_type": "authorization_code", "code": query(done.headers["location"])["code"],
            "redirect_uri": CALLBACK, "code_verifier": verifier})
        account = await http.get(f"{urls['authentication']}/authn/account")
        assert account.status_code == 200 and 'name="client_id" value="webapp"' in account.text
        removed = await http.post(f"{urls['authentication']}/authn/account/applications", data={
            "csrf": hidden_fields(account.text)["csrf"], "client_id": "webapp"})
        assert removed.status_code == 200 and "Access removed." in removed.text
        refreshed = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
            "grant_type": "refresh_token", "refresh_token": token.json()["refresh_token"]})
        assert refreshed.json()["error"] == "invalid_grant"


async def test_an_operator_resets_a_second_factor_through_the_authentication_role(cluster_of_roles,
                                                                                   postgres_server):
    urls, envs, databases = cluster_of_roles
    erin = await scim_user(urls, "erin", [])
    authn = await asyncpg.connect(f"{postgres_server}/{databases['authentication']}")
    try:  # erin enrolled an authenticator, then lost it
        await authn.execute("INSERT INTO totp (subject, secret, confirmed, last_step) VALUES ($1, $2, true, 0)",
                            erin, "JBSWY3DPEHPK3PXP")
        reset = await asyncio.to_thread(run_cli, envs, "user-management", "users", "reset-mfa", "erin")
        assert reset.returncode == 0 and "two-step verification removed" in reset.stdout, reset.stderr
        assert await authn.fetchval("SELECT count(*) FROM totp WHERE subject = $1", erin) == 0
    finally:
        await authn.close()
    again = await asyncio.to_thread(run_cli, envs, "user-management", "users", "reset-mfa", "erin")
    assert again.stdout.strip() == "erin: had no two-step verification"


async def test_a_password_reset_signs_out_through_the_other_roles(cluster_of_roles, inbox, receiver):
    """The authentication role finds the person by address at the directory, and has the directory end their
    sessions (back at the authentication role, which tells the token role) and grants (at the token role)."""
    urls, _, _ = cluster_of_roles
    fay = await scim_user(urls, "fay", [])
    async with httpx.AsyncClient(base_url=urls["token"]) as http:
        verifier, challenge = pkce()
        page = await follow(http, await authorize(http, "webapp", CALLBACK, "openid", challenge), CALLBACK)
        done = await follow(http, await sign_in(http, page, "fay"), CALLBACK)
        token = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
            "grant_type": "authorization_code", "code": query(done.headers["location"])["code"],
            "redirect_uri": CALLBACK, "code_verifier": verifier})
        async with httpx.AsyncClient(base_url=urls["authentication"]) as other:
            form = await other.get("/authn/password/forgot")
            await other.post("/authn/password/forgot", data={**hidden_fields(form.text),
                                                              "identifier": "fay@example.com"})
            for _ in range(300):  # sent off the request path
                if any(m["To"] == "fay@example.com" for m in inbox.messages):
                    break
                await asyncio.sleep(0.05)
            link = inbox.link(next(m for m in inbox.messages if m["To"] == "fay@example.com"))
            form = await other.get(link)
            reset = await other.post("/authn/password/reset", data={**hidden_fields(form.text),
                                                                     "new": "fay's new passphrase"})
            assert reset.status_code == 200 and "signed out everywhere" in reset.text
        assert (await http.get(f"{urls['authentication']}/authn/account")).status_code == 303
        refreshed = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
            "grant_type": "refresh_token", "refresh_token": token.json()["refresh_token"]})
        assert refreshed.json()["error"] == "invalid_grant"
    assert [claims["sub"] for claims in await logout_tokens(urls, receiver, fay)] == [fay]


async def signed_in_to_webapp(http, urls, user_name: str) -> dict:
    """A code flow of webapp for `user_name` in this browser; the token response."""
    verifier, challenge = pkce()
    page = await follow(http, await authorize(http, "webapp", CALLBACK, "openid", challenge), CALLBACK)
    done = await follow(http, await sign_in(http, page, user_name), CALLBACK)
    token = await http.post("/oauth/v2/token", auth=("webapp", "webapp-secret-0123456789abcdef"), data={
        "grant_type": "authorization_code", "code": query(done.headers["location"])["code"],
        "redirect_uri": CALLBACK, "code_verifier": verifier})
    assert token.status_code == 200, token.text
    return token.json()


async def test_rp_initiated_logout_reaches_the_client_through_the_authentication_role(cluster_of_roles, receiver):
    urls, _, _ = cluster_of_roles
    gil = await scim_user(urls, "gil", [])
    async with httpx.AsyncClient(base_url=urls["token"]) as http:
        body = await signed_in_to_webapp(http, urls, "gil")
        sid = jwt.decode(body["id_token"], KeySet.import_key_set(await jwks(urls)), algorithms=["RS256"]).claims["sid"]
        out = await follow(http, await http.get("/oauth/v2/end_session", params={"id_token_hint": body["id_token"]}),
                           "https://")
        assert out.status_code == 200 and "You are signed out" in out.text
    assert [(claims["sub"], claims["sid"]) for claims in await logout_tokens(urls, receiver, gil)] == [(gil, sid)]


async def test_iam_users_sign_out_reaches_the_client(cluster_of_roles, receiver):
    urls, envs, _ = cluster_of_roles
    hal = await scim_user(urls, "hal", [])
    async with httpx.AsyncClient(base_url=urls["token"]) as http:
        await signed_in_to_webapp(http, urls, "hal")
    signed_out = await asyncio.to_thread(run_cli, envs, "user-management", "users", "sign-out", "hal")
    assert signed_out.returncode == 0, signed_out.stderr
    assert [claims["sub"] for claims in await logout_tokens(urls, receiver, hal)] == [hal]


async def test_internal_apis_refuse_callers_without_a_role_assertion(cluster_of_roles):
    urls, _, _ = cluster_of_roles
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{urls['token']}/internal/v1/subjects/x/applications")).status_code == 401
        assert (await http.post(f"{urls['token']}/internal/v1/sessions/ended", json={"sub": "x", "sids": None})
                ).status_code == 401
        assert (await http.delete(f"{urls['token']}/internal/v1/subjects/x/applications/webapp")).status_code == 401
        assert (await http.delete(f"{urls['authentication']}/internal/v1/credentials/x/second-factor")
                ).status_code == 401
        assert (await http.get(f"{urls['user-management']}/internal/v1/users", params={"username": "carol"})
                ).status_code == 401
        forged = await http.put(f"{urls['authentication']}/internal/v1/credentials/x",
                                headers={"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJpc3MiOiJpYW06dXNlci1tYW5hZ2VtZW50In0."},
                                json={"password": "whatever-long-enough"})
        assert forged.status_code == 401
        # Each role still publishes its public keys for the others.
        assert (await http.get(f"{urls['authentication']}/internal/v1/jwks")).json()["keys"]


async def test_no_role_database_holds_another_roles_tables(cluster_of_roles, postgres_server):
    _, _, databases = cluster_of_roles
    for role, database in databases.items():
        conn = await asyncpg.connect(f"{postgres_server}/{database}")
        try:
            tables = {row["tablename"] for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await conn.close()
        # alembic_version and schema_compatibility (iam/store.py) are every store's own migration bookkeeping
        assert tables - {"alembic_version", "schema_compatibility"} == ROLE_TABLES[role], (role, tables)
        for other, other_tables in ROLE_TABLES.items():
            if other != role:  # every store has its own audit_events (`audit_store: true`), nothing else shared
                assert not tables & other_tables - {"audit_events"}, (role, other, tables)


async def test_a_stored_client_is_named_on_the_sign_in_page_of_the_authentication_process(cluster_of_roles):
    """The authentication role never opens the token store: it copies the stored clients' names and connectors
    from the token role's internal API."""
    urls, _, _ = cluster_of_roles
    async with httpx.AsyncClient(base_url=urls["token"]) as http:
        token = (await http.post("/oauth/v2/token", auth=("provisioner", "provisioner-secret-0123456789"),
                                 data={"grant_type": "client_credentials"})).json()["access_token"]
        created = await http.post("/admin/v1/clients", headers={"Authorization": f"Bearer {token}"}, json={
            "client_name": "Stored Reports", "redirect_uris": [CALLBACK], "token_endpoint_auth_method": "none",
            "scope": "openid"})
        assert created.status_code == 201, created.text
        _, challenge = pkce()
        start = await authorize(http, created.json()["client_id"], CALLBACK, "openid", challenge, nonce="n")
        assert start.headers["location"].startswith(urls["authentication"] + "/authn/login?")
        for _ in range(400):  # copied every client_sync_interval (2 s)
            page = await http.get(start.headers["location"])
            if "Stored Reports" in page.text:
                break
            await asyncio.sleep(0.05)
        assert page.status_code == 200 and "to continue to <strong>Stored Reports</strong>" in page.text
