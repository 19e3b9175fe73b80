"""Connector sign-ins with the three roles as three processes (PostgreSQL each): the authentication role
provisions the user over the user-management role's internal API, and the token role asks the authentication
role to re-check an LDAP user at refresh. Nothing but /internal/v1 crosses between them."""

import asyncio
import secrets
from contextlib import ExitStack

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.conftest import create_database
from tests.oauth import authorize, follow, hidden_fields, pkce, query
from tests.postgres import free_port
from tests.server import serve, write_config
from tests.test_ldap_sign_in import add_person

CALLBACK = "https://app.test/cb"
SECRET = "webapp-secret-0123456789abcdef"
STORE_VAR = {"authentication": "IAM_AUTHN_DATABASE_URL", "token": "IAM_TOKEN_DATABASE_URL",
             "user-management": "IAM_USERS_DATABASE_URL"}


@pytest.fixture(scope="module")
def roles(tmp_path_factory, postgres_server, ldap_server):
    ports = {role: free_port() for role in STORE_VAR}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    host = postgres_server.split("://", 1)[1]
    ldap = ldap_server.connector_config(id="ad").model_dump(mode="json")
    ldap["bind_password"] = "${LDAP_BIND_PASSWORD}"
    clients = [{"client_id": "webapp", "client_secret": "${WEBAPP_SECRET}", "redirect_uris": [CALLBACK],
                "grant_types": ["authorization_code", "refresh_token"], "scope": "openid profile groups offline_access"}]
    with ExitStack() as stack:
        for role in ("user-management", "authentication", "token"):
            directory = tmp_path_factory.mktemp(role)
            config = write_config(directory, issuer=urls["token"], authentication_url=urls["authentication"],
                                  keys={"dir": str(directory / "keys")}, clients=clients, connectors=[ldap])
            env = {"IAM_CONFIG": str(config), "SERVICE_ROLE": role, "WEBAPP_SECRET": SECRET,
                   "LDAP_BIND_PASSWORD": ldap_server.service_password,
                   STORE_VAR[role]: f"postgresql+asyncpg://{host}/{asyncio.run(create_database(postgres_server))}",
                   "IAM_TOKEN_URL": urls["token"], "IAM_AUTHN_URL": urls["authentication"],
                   "IAM_USERS_URL": urls["user-management"]}
            stack.enter_context(serve(env, directory, port=ports[role]))
        yield urls


async def test_ldap_sign_in_and_refresh_re_check_across_three_processes(roles, ldap_server):
    uid, password = "fay-" + secrets.token_hex(3), "fay-pw-" + secrets.token_hex(8)
    add_person(ldap_server, uid, password, group="ops")
    async with httpx.AsyncClient(base_url=roles["token"]) as http:
        verifier, challenge = pkce()
        page = await follow(http, await authorize(http, "webapp", CALLBACK, "openid groups offline_access",
                                                  challenge), CALLBACK)
        assert str(page.url).startswith(roles["authentication"]) and "Sign in with Example Directory" in page.text
        form = await http.get(f"{roles['authentication']}/authn/connectors/ad/login",
                              params={k: v for k, v in hidden_fields(page.text).items() if k != "csrf"})
        done = await follow(http, await http.post(f"{roles['authentication']}/authn/connectors/ad/login", data={
            **hidden_fields(form.text), "username": uid, "password": password}), CALLBACK)
        assert done.status_code in (302, 303) and done.headers["location"].startswith(CALLBACK), done.text
        token = await http.post("/oauth/v2/token", auth=("webapp", SECRET), data={
            "grant_type": "authorization_code", "code": query(done.headers["location"])["code"],
            "redirect_uri": CALLBACK, "code_verifier": verifier})
        assert token.status_code == 200, token.text
        keys = KeySet.import_key_set((await http.get("/oauth/v2/jwks")).json())
        claims = jwt.decode(token.json()["id_token"], keys, algorithms=["RS256"]).claims
        assert "ops" in claims["groups"] and claims["amr"] == ["pwd"]

        refreshed = await http.post("/oauth/v2/token", auth=("webapp", SECRET), data={
            "grant_type": "refresh_token", "refresh_token": token.json()["refresh_token"]})
        assert refreshed.status_code == 200, refreshed.text
        ldap_server.delete(ldap_server.user_dn(uid))
        gone = await http.post("/oauth/v2/token", auth=("webapp", SECRET), data={
            "grant_type": "refresh_token", "refresh_token": refreshed.json()["refresh_token"]})
        assert gone.status_code == 400 and gone.json()["error"] == "invalid_grant"


async def test_the_new_internal_apis_refuse_callers_without_a_role_assertion(roles):
    async with httpx.AsyncClient() as http:
        provision = await http.post(f"{roles['user-management']}/internal/v1/upstream-identities",
                                    json={"identity": {"connector_id": "ad", "subject": "x"}})
        recheck = await http.post(f"{roles['authentication']}/internal/v1/upstream-identities/recheck",
                                  json={"sub": "x", "connector": "ad"})
        assert provision.status_code == 401 and recheck.status_code == 401
