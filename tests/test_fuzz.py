"""Every endpoint with garbage (hypothesis, bounded and derandomized): never a 5xx, every 4xx a well-formed
OAuth error (RFC 6749 §5.2, RFC 6750 §3), SCIM error (RFC 7644 §3.12) or HTML error page, and a refused
request changes no row in any store.

One in-process app with every role, on SQLite and PostgreSQL (which, unlike SQLite, enforces column types
and lengths). The values mix random text with the names, ids and secrets the server knows, so requests get
past client authentication and into the protocol rules. A 2xx or 3xx may change the stores (garbage can be a
valid request); only failed sign-ins are counted even when refused (`login_failures`: that is their purpose).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from iam.app import create_app
from iam.peers import SERVICE_TYP
from iam.roles import Role
from iam.users.directory import NewUser
from tests.conftest import ISSUER, PASSWORD, WEBAPP_CALLBACK, basic, make_settings

pytest.register_assert_rewrite("tests.scim_support")  # before the import: its asserts explain failures
from tests.scim_support import (  # noqa: E402
    ERROR,
    GROUP_SCHEMA,
    IAM_USER,
    PATCH_OP,
    SCIM_JSON,
    SEARCH,
    USER_SCHEMA,
    dump_store,
    token_for,
)

pytest_plugins = ("tests.scim_support",)  # `scim_app`: one app per backend for this module

EXAMPLES = 5  # per endpoint and backend: some 650 requests in all
# No shrinking: a failure reports the request as generated, and CI time stays bounded even then.
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# RFC 6749 §5.2: error is %x20-21 / %x23-5B / %x5D-7E
ERROR_CODE = set(map(chr, range(0x20, 0x7F))) - {'"', "\\"}
COUNTED_WHEN_REFUSED = {"login_failures"}
PEERS = (Role.TOKEN, Role.AUTHENTICATION, Role.USER_MANAGEMENT)
CSRF = "fuzz-csrf"  # the double-submit cookie and form field, when a request carries both
SKIPPED_ROUTES = {"/health/live", "/health/ready", "/metrics", "/assets/iam.css", "/assets/passkeys.js"}  # no input to fuzz


@pytest.fixture(scope="module")
async def world(scim_app):
    """One app per backend (every role, the SCIM clients too), an HTTP client, and real values to mix into the
    garbage: tokens, ids, a session."""
    alice = await scim_app.state.iam.users.directory.create_user(NewUser(user_name="alice"), password=PASSWORD)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=scim_app), base_url=ISSUER) as http:
        scim_token = await token_for(http, "scim-admin")
        access = (await http.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                                  headers=basic("svc-basic"))).json()["access_token"]
        group = (await http.post("/scim/v2/Groups", json={"schemas": [GROUP_SCHEMA], "displayName": "fuzzers"},
                                 headers={"Authorization": f"Bearer {scim_token}"})).json()["id"]
        runtime = scim_app.state.iam
        peers = [runtime.identity.sign(owner, SERVICE_TYP, issuer=caller) for owner in PEERS for caller in PEERS]
        session, _ = await runtime.authn.sessions.create(alice, ["pwd"])
        yield World({"app": scim_app, "http": http, "scim_token": scim_token, "access": access, "alice": alice,
               "group": group, "peers": peers, "session": session})


class World(dict):
    def __repr__(self) -> str:  # a failure report shows the request, not every token and row
        return "world"


async def snapshot(app) -> dict:
    return {name: await dump_store(app, name) for name in app.state.iam.stores}


def without_counters(state: dict) -> dict:
    return {store: {t: rows for t, rows in tables.items() if t not in COUNTED_WHEN_REFUSED}
            for store, tables in state.items()}


# -- strategies ----------------------------------------------------------------------------------------------
# (no "gateway": its secret is an argon2 hash, and every wrong guess would run argon2; nothing shaped like a
# token either: a client_id is logged as sent, and the suite fails on anything in its logs that looks like one)
KNOWN = ["svc-basic", "webapp", "kubectl", "native", "partner", "legacy", "disabled", "alice", WEBAPP_CALLBACK,
         "https://app.test/other", "http://127.0.0.1:8123/cb", "code", "token", "S256", "plain", "openid",
         "openid profile email groups offline_access", "api:read", "none", "login", "consent", "select_account",
         "authorization_code", "refresh_token", "client_credentials", "urn:ietf:params:oauth:grant-type:device_code",
         "access_token", "refresh_token", "urn:iam:acr:mfa", "urn:ietf:params:oauth:request_uri:A", "0", "-1", "99999999999", "true", "null", "[]", "{}",
         "%00", "\x00", "é", "\ud7ff", "a" * 300, "a" * 5000, PASSWORD, CSRF, "allow", "deny"]
junk = st.one_of(st.sampled_from(KNOWN), st.text(max_size=30), st.text(st.characters(codec="ascii"), max_size=80))
OAUTH_PARAMS = ["grant_type", "client_id", "client_secret", "code", "code_verifier", "redirect_uri", "scope",
                "refresh_token", "token", "token_type_hint", "response_type", "state", "nonce", "code_challenge",
                "code_challenge_method", "prompt", "max_age", "login_hint", "id_token_hint", "acr_values", "claims",
                "request", "request_uri", "response_mode", "device_code", "user_code", "audience", "resource",
                "post_logout_redirect_uri", "handoff", "username", "password", "csrf", "decision", "mfa",
                "logout", "current_password", "new_password", "device", "client_assertion"]
# Each known parameter is present or not, so a request carries several at once.
params = st.builds(lambda known, extra: {**known, **extra}, st.fixed_dictionaries(
    {}, optional=dict.fromkeys(OAUTH_PARAMS, junk)), st.dictionaries(st.text(max_size=8), junk, max_size=2))

SCIM_KEYS = ["schemas", "userName", "name", "givenName", "displayName", "emails", "value", "primary", "type",
             "active", "password", "externalId", "members", "groups", "id", "meta", "Operations", "op", "path",
             "filter", "startIndex", "count", "attributes", "sortBy", IAM_USER, "emailVerified", "phoneNumbers"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), junk,
              st.sampled_from([USER_SCHEMA, GROUP_SCHEMA, PATCH_OP, SEARCH, "add", "replace", "remove",
                               'emails[type eq "work"].value', "members", "active", f"{IAM_USER}:emailVerified"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(SCIM_KEYS) | st.text(max_size=6),
                                                                 inner, max_size=5),
    max_leaves=16)
scim_bodies = st.one_of(
    json_values,
    st.builds(lambda rest: {"schemas": [USER_SCHEMA, IAM_USER], **rest}, st.dictionaries(st.sampled_from(SCIM_KEYS),
                                                                                      json_values, max_size=6)),
    st.builds(lambda ops: {"schemas": [PATCH_OP], "Operations": ops}, st.lists(st.fixed_dictionaries(
        {"op": st.sampled_from(["add", "replace", "remove", "Replace", "move"]),
         "path": st.sampled_from(["active", "userName", "emails", 'emails[type eq "work"]', "members", IAM_USER,
                                  f"{IAM_USER}:emailVerified", "name.givenName", "password", "groups", "id"])
         | st.text(max_size=20)},
        optional={"value": json_values}), max_size=3)),
)


def path_value(world: dict, kind: str):
    known = {"sub": [world["alice"]], "user_id": [world["alice"]], "group_id": [world["group"]],
             "name": ["User", "Group"], "urn": [USER_SCHEMA, IAM_USER], "client_id": ["webapp", "kubectl"],
             "user_code": ["BCDF-GHJK"]}.get(kind, [])
    return st.one_of(st.sampled_from(known or ["x"]), st.text(min_size=1, max_size=20))


# -- every endpoint ---------------------------------------------------------------------------------------------
def routes(app) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves."""
    def flat(entries):
        for route in entries:
            if hasattr(route, "original_router"):  # an included router
                yield from flat(route.original_router.routes)
            else:
                yield route
    return sorted({(method, route.path) for route in flat(app.routes) for method in route.methods or ()
                   if method not in ("HEAD", "OPTIONS") and route.path not in SKIPPED_ROUTES})


def served_routes() -> list[tuple[str, str]]:
    """What an app with every role serves (built, not started: no store is opened)."""
    with tempfile.TemporaryDirectory() as directory:
        stores = {name: f"sqlite+aiosqlite:///{directory}/{name}.db" for name in ("authn", "token", "users")}
        return routes(create_app(make_settings(Path(directory), stores)))


ROUTES = served_routes()
BROWSER = ("/authn/", "/oauth/v2/authorize", "/oauth/v2/end_session")  # HTML error pages are their errors


def family(path: str) -> str:
    return next(name for prefix, name in (("/scim/", "scim"), ("/internal/", "internal"), ("/authn/", "pages"))
                if path.startswith(prefix)) if path.startswith(("/scim/", "/internal/", "/authn/")) else "oauth"


@st.composite
def requests(draw, world: dict, method: str, template: str) -> dict:
    kind_of = family(template)
    path = template
    for segment in [s for s in template.split("/") if s.startswith("{")]:
        kind = segment.strip("{}").split(":")[0]
        value = draw(path_value(world, kind))
        if kind == "rest" and value.split("/")[0] in ("Bulk", "Me"):
            value = "Nope"  # 501 Not Implemented, by design (ServiceProviderConfig says so)
        path = path.replace(segment, quote(value, safe="") if kind != "rest" else quote(value, safe="/"))
    headers = {}
    likely = {"scim": "scim", "internal": "peer", "oauth": "basic", "pages": "none"}[kind_of]
    auth = draw(st.sampled_from([likely] * 4 + ["none", "basic", "bad-basic", "bearer", "scim", "peer", "garbage"]))
    headers["Authorization"] = {
        "none": None, "basic": basic(draw(st.sampled_from(["svc-basic", "webapp", "svc-post"])))["Authorization"],
        "bad-basic": "Basic " + draw(junk), "bearer": f"Bearer {world['access']}",
        "scim": f"Bearer {world['scim_token']}", "peer": f"Bearer {draw(st.sampled_from(world['peers']))}",
        "garbage": draw(junk)}[auth]
    cookies = {name: value for name, value, given in (
        ("__Host-iam_csrf", CSRF, draw(st.booleans())), ("__Host-iam_session", world["session"], draw(st.booleans())),
    ) if given}
    headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items()) or None
    body_kind = draw(st.sampled_from(["form", "form", "json", "bytes", "empty"] if kind_of != "scim" else
                                     ["json", "json", "json", "bytes", "empty"]))
    content, content_type = {
        "form": lambda: (urlencode(draw(params)).encode(), "application/x-www-form-urlencoded"),
        "json": lambda: (json.dumps(draw(scim_bodies if kind_of == "scim" else json_values)).encode(),
                         draw(st.sampled_from([SCIM_JSON, "application/json", "text/plain"]))),
        "bytes": lambda: (draw(st.binary(max_size=200)), draw(st.sampled_from([SCIM_JSON, "application/json",
                                                                              "application/x-www-form-urlencoded"]))),
        "empty": lambda: (b"", None),
    }[body_kind]()
    headers["Content-Type"] = content_type
    if kind_of == "scim" and method in ("PUT", "PATCH", "DELETE") and draw(st.booleans()):
        headers["If-Match"] = draw(st.sampled_from(['W/"1"', "*", "garbage"]))
    query = urlencode(draw(params if kind_of != "scim" else st.fixed_dictionaries({}, optional=dict.fromkeys(
        ["filter", "attributes", "excludedAttributes", "sortBy", "sortOrder", "count", "startIndex"], junk))))
    return {"method": method, "url": path + (f"?{query}" if query else ""), "content": content if method not in
            ("GET", "DELETE") else None, "headers": {k: v.encode() for k, v in headers.items() if v is not None}}


def assert_well_formed(request: dict, response: httpx.Response) -> None:
    path = request["url"].split("?")[0]
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    where = f"{request['method']} {request['url'][:200]} -> {status}: {response.text[:300]}"
    if path.startswith("/scim/"):
        assert content_type.startswith(SCIM_JSON), where
        body = response.json()
        assert body["schemas"] == [ERROR] and body["status"] == str(status) and body["detail"], where
        return
    if content_type.startswith("text/html"):
        assert path.startswith(BROWSER), where
        assert "Traceback" not in response.text, where
        return
    if status == 401 and response.headers.get("www-authenticate", "").startswith("Bearer") and not response.content:
        return  # RFC 6750 §3 (forward-auth answers with the challenge alone)
    assert content_type.startswith("application/json"), where
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"] and set(body["error"]) <= ERROR_CODE, where
    assert isinstance(body.get("error_description", ""), str), where
    if status == 401 and body["error"] == "invalid_client":
        assert "www-authenticate" in response.headers, where


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
@FUZZ
@given(data=st.data())
async def test_garbage_never_breaks_anything_nor_changes_what_is_stored(world, method, path, data):
    request = data.draw(requests(world, method, path), label="request")
    http = world["http"]
    http.cookies.clear()  # only the request's own Cookie header
    before = world.get("state") or await snapshot(world["app"])  # what the previous example left
    response = await http.request(**request)
    assert response.status_code < 500, f"{request['method']} {request['url'][:200]}: {response.text[:300]}"
    world["state"] = after = await snapshot(world["app"])
    if 400 <= response.status_code < 500:
        assert_well_formed(request, response)
        assert without_counters(after) == without_counters(before), f"{request} changed the stores"


async def test_the_credentials_api_answers_oauth_errors(world):
    """Found by the fuzzing above: the authentication role's internal API answered `{"detail"}` and empty 404s."""
    http, alice = world["http"], world["alice"]
    peer = {"Authorization": "Bearer " + world["app"].state.iam.identity.sign(
        Role.AUTHENTICATION, SERVICE_TYP, issuer=Role.USER_MANAGEMENT)}
    before = await snapshot(world["app"])
    short = await http.put(f"/internal/v1/credentials/{alice}", json={"password": "short"}, headers=peer)
    assert short.status_code == 400 and short.json() == {
        "error": "invalid_request", "error_description": "a password needs at least 8 characters"}
    malformed = await http.put(f"/internal/v1/credentials/{alice}", json=["password"], headers=peer)
    assert malformed.status_code == 400 and malformed.json()["error"] == "invalid_request"
    missing = await http.delete("/internal/v1/credentials/nobody/second-factor", headers=peer)
    assert missing.status_code == 404 and missing.json() == {"error": "not_found"}
    assert without_counters(await snapshot(world["app"])) == without_counters(before)
