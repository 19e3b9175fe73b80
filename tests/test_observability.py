"""Metrics, audit events, structured logs and traces (the observability issue)."""

import http.server
import json
import logging
import threading
import uuid
from contextlib import ExitStack

import httpx
import pytest

from iam.app import create_app
from iam.observability import AUDIT_EVENTS, JsonFormatter, tracing_requested
from tests.conftest import ISSUER, PASSWORD, basic, create_database, make_settings
from tests.oauth import authorize, follow, pkce, query, sign_in
from tests.postgres import free_port
from tests.server import iam, serve, write_config
from tests.test_token_endpoint import get_token


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_tokens_introspections_and_logins(client, alice):
    before = (await client.get("/metrics")).text
    token = (await get_token(client))["access_token"]
    await client.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"))
    await client.post("/oauth/v2/introspect", data={"token": "A" * 43}, headers=basic("svc-basic"))
    await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
    await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic", "no"))
    page = await follow(client, await authorize(client, challenge=pkce()[1]), "https://app.test/")
    await sign_in(client, page, password="wrong password")
    await sign_in(client, page)
    after = (await client.get("/metrics")).text
    assert after.startswith("# HELP") and "iam_build_info" in after

    def grew(name, by=1.0, **labels):
        assert metric(after, name, **labels) - metric(before, name, **labels) == by, (name, labels)

    grew("iam_tokens_issued_total", grant_type="client_credentials", client_id="svc-basic")
    grew("iam_introspections_total", endpoint="introspect", result="active")
    grew("iam_introspections_total", endpoint="introspect", result="inactive")
    grew("iam_introspections_total", endpoint="phantom", result="active")
    grew("iam_client_auth_failures_total")
    grew("iam_logins_total", result="failure")
    grew("iam_logins_total", result="success")
    grew("iam_http_requests_total", route="/oauth/v2/introspect", method="POST", status="200", by=2)
    assert metric(after, "iam_http_request_duration_seconds_count", route="/oauth/v2/token", method="POST") > 0
    assert metric(after, "iam_store_query_duration_seconds_count", store="token") > 0
    assert 'iam_store_pool_connections_in_use{store="token"}' in after


async def test_metric_labels_never_carry_tokens_users_or_raw_paths(client, app, alice):
    token = (await get_token(client))["access_token"]
    segment = uuid.uuid4().hex  # a path segment no other test (in this process's one registry) can have used
    await client.get(f"/oauth/v2/phantom/{segment}/{alice}", headers={"Authorization": f"Bearer {token}"})
    await client.get(f"/no/such/path/{alice}")
    await client.get(f"/internal/v1/users/{alice}")
    text = (await client.get("/metrics")).text
    for secret in (token, alice, "alice", segment):
        assert secret not in text
    assert 'route="/oauth/v2/phantom/{_path:path}"' in text and 'route="unmatched"' in text
    assert 'route="/internal/v1/users/{sub}"' in text


async def test_the_sso_session_gauge_follows_sign_ins(client, app, alice):
    page = await follow(client, await authorize(client, challenge=pkce()[1]), "https://app.test/")
    await sign_in(client, page)
    await app.state.iam.update_gauges()
    assert metric((await client.get("/metrics")).text, "iam_sso_sessions_active") >= 1


@pytest.mark.parametrize("role", ["token", "authentication", "user-management"])
async def test_every_role_serves_metrics(tmp_path, role):
    peers = {name: f"http://127.0.0.1:{free_port()}" for name in ("authentication", "token", "user_management")}
    stores = {name: f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("authn", "token", "users")}
    app = create_app(make_settings(tmp_path, stores, role=role, peers=peers))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
            response = await http.get("/metrics")
    assert response.status_code == 200 and "iam_http_requests_total" in response.text


async def test_audit_events_for_security_relevant_actions(client, app, alice, caplog):
    caplog.set_level(logging.INFO, logger="iam.audit")
    from tests.oauth import code_flow, redeem, refresh

    await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic", "x"))
    params, verifier, _ = await code_flow(client)
    tokens = (await redeem(client, params["code"], verifier)).json()
    await redeem(client, params["code"], verifier)  # replay
    params, verifier, _ = await code_flow(client)
    second = (await redeem(client, params["code"], verifier)).json()
    await refresh(client, second["refresh_token"])
    await refresh(client, second["refresh_token"])  # reuse
    await client.post("/oauth/v2/revoke", data={"token": tokens["access_token"]}, headers=basic("webapp"))
    events = [record.audit for record in caplog.records if record.name == "iam.audit"]
    names = [event["event"] for event in events]
    for expected in ("client.auth_failed", "login.succeeded", "token.issued", "code.replayed", "token.refreshed",
                     "refresh.reuse_detected", "token.revoked"):
        assert expected in names, (expected, names)
    for event in events:
        assert set(event) == {"schema", "event", "outcome", "actor", "client_id", "source", "details"}
        assert event["event"] in AUDIT_EVENTS and event["outcome"] in ("success", "failure")
    issued = next(e for e in events if e["event"] == "token.issued" and e["client_id"] == "webapp")
    assert issued["actor"] == alice and issued["source"] == "127.0.0.1"
    assert next(e for e in events if e["event"] == "login.succeeded")["actor"] == alice


def test_json_log_lines_carry_the_event_fields():
    record = logging.LogRecord("iam.test", logging.WARNING, __file__, 1, "store %s down", ("token",), None)
    record.client_id = "svc"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "store token down" and line["level"] == "warning" and line["client_id"] == "svc"
    assert line["logger"] == "iam.test" and line["time"].endswith("+00:00")


def test_tracing_is_off_unless_asked():
    import iam.observability as observability

    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert observability._tracer is None  # this test process never asked: no spans, no tracing code runs


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes what the exporters send."""

    spans: list = []

    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    _Collector.spans.append((service, span.trace_id.hex(), span.name, span.parent_span_id.hex()))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


async def test_a_sign_in_is_one_trace_across_the_roles(tmp_path, postgres_server):
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    otlp = f"http://127.0.0.1:{collector.server_port}"
    ports = {role: free_port() for role in ("authentication", "token", "user-management")}
    token_store = "postgresql+asyncpg://" + postgres_server.split("://", 1)[1]
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    clients = [{"client_id": "webapp", "client_secret": "${S}", "redirect_uris": ["https://app.test/cb"],
                "grant_types": ["authorization_code"], "scope": "openid"}]
    env = {"IAM_TOKEN_URL": urls["token"], "IAM_AUTHN_URL": urls["authentication"], "S": "s" * 20,
           "IAM_USERS_URL": urls["user-management"], "OTEL_EXPORTER_OTLP_ENDPOINT": otlp}
    try:
        with ExitStack() as stack:
            for role in ("user-management", "authentication", "token"):
                directory = tmp_path / role
                directory.mkdir()
                config = write_config(directory, issuer=urls["token"], authentication_url=urls["authentication"],
                                      keys={"dir": str(directory / "keys")}, clients=clients)
                role_env = {**env, "IAM_CONFIG": str(config), "SERVICE_ROLE": role}
                if role == "token":  # on PostgreSQL, the hot statements run straight on asyncpg
                    role_env["IAM_TOKEN_DATABASE_URL"] = f"{token_store}/{await create_database(postgres_server)}"
                stack.enter_context(serve(role_env, directory, port=ports[role]))
                if role == "user-management":
                    users_env, users_dir = role_env, directory
            added = iam("users", "add", "--username", "tina", "--password-stdin", env=users_env, cwd=users_dir,
                        input=PASSWORD + "\n")
            assert added.returncode == 0, added.stderr
            async with httpx.AsyncClient(base_url=urls["token"]) as browser:
                verifier, challenge = pkce()
                page = await follow(browser, await authorize(browser, "webapp", "https://app.test/cb", "openid",
                                                             challenge), "https://app.test/")
                done = await follow(browser, await sign_in(browser, page, "tina"), "https://app.test/")
                assert "code=" in done.headers["location"]
                tokens = await browser.post("/oauth/v2/token", headers=basic("webapp", "s" * 20), data={
                    "grant_type": "authorization_code", "code": query(done.headers["location"])["code"],
                    "redirect_uri": "https://app.test/cb", "code_verifier": verifier})
                assert tokens.status_code == 200, tokens.text
                phantom = await browser.get("/oauth/v2/phantom",
                                            headers={"authorization": f"Bearer {tokens.json()['access_token']}"})
                assert phantom.status_code == 200
        # The processes flushed their spans on shutdown.
    finally:
        collector.shutdown()
    # One span per request (FastAPI's native telemetry would add a second, unrelated root span).
    names = [name for _, _, name, _ in _Collector.spans]
    assert [names.count(n) for n in ("POST /authn/login", "POST /oauth/v2/token", "GET /oauth/v2/phantom")] == [1] * 3
    by_trace: dict[str, set[str]] = {}
    for service, trace_id, *_ in _Collector.spans:
        by_trace.setdefault(trace_id, set()).add(service)
    services = set().union(*by_trace.values()) if by_trace else set()
    assert {"iam-authentication", "iam-user-management", "iam-token"} <= services, services
    # The sign-in POST (authentication) called the user-management role: one trace, two roles.
    assert any({"iam-authentication", "iam-user-management"} <= s for s in by_trace.values()), by_trace
    assert any(name.startswith("db ") for name in names)
    # The phantom lookup runs straight on asyncpg, past SQLAlchemy's events: it has its span all the same.
    phantom = next(trace for _, trace, name, _ in _Collector.spans if name == "GET /oauth/v2/phantom")
    assert [name for _, trace, name, parent in _Collector.spans if trace == phantom and parent] == ["db SELECT"]


def test_dashboard_and_alerts_only_use_metrics_iam_exports():
    """Every series the shipped dashboard and alert rules query is one iam exports (or Prometheus's `up`)."""
    import re
    from pathlib import Path

    import yaml

    from iam.observability import REGISTRY

    exported = {"up"}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    for family in REGISTRY.collect():
        exported |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    root = Path(__file__).resolve().parent.parent / "k8s" / "monitoring"
    dashboard = json.loads((root / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((root / "prometheus-rules.yaml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) > 15
    functions = {"sum", "rate", "by", "histogram_quantile", "max", "count", "increase", "le", "route", "store",
                 "status", "result", "endpoint", "grant_type", "outcome", "version", "job", "instance"}
    for expr in expressions:
        names = set(re.findall(r"\b(iam_[a-z_]+|up)\b", expr))
        assert names and names <= exported, (expr, names - exported)
        assert set(re.findall(r"\b([a-z_]+)\s*\(", expr)) <= functions, expr


async def test_store_timing_includes_the_direct_hot_statements(client, backend):
    """The hot lookup and the issuance INSERT bypass SQLAlchemy (asyncpg, or sqlite3 directly); they are timed
    all the same."""
    before = metric((await client.get("/metrics")).text, "iam_store_query_duration_seconds_count", store="token")
    token = (await get_token(client))["access_token"]
    await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
    after = metric((await client.get("/metrics")).text, "iam_store_query_duration_seconds_count", store="token")
    assert after - before >= 2  # the INSERT and the lookup


async def test_user_lifecycle_and_key_rotation_are_audited(app, caplog, tmp_path):
    from iam.users.directory import NewUser
    from tests.server import iam as run_iam

    caplog.set_level(logging.INFO, logger="iam.audit")
    directory = app.state.iam.users.directory
    sub = await directory.create_user(NewUser(user_name="ursula"), password=PASSWORD)
    await directory.set_active(sub, False)
    await directory.delete_user(sub)
    events = [(r.audit["event"], r.audit["actor"]) for r in caplog.records if r.name == "iam.audit"]
    assert [e for e in events if e[0].startswith("user.")] == [
        ("user.created", sub), ("user.disabled", sub), ("user.deleted", sub)]

    config = write_config(tmp_path, keys={"dir": str(tmp_path / "cli-keys")})
    rotated = run_iam("keys", "rotate", env={"IAM_CONFIG": str(config)}, cwd=tmp_path)
    audits = [json.loads(line)["audit"] for line in rotated.stderr.splitlines() if '"iam.audit"' in line]
    assert rotated.returncode == 0 and [a["event"] for a in audits] == ["key.rotated"] * 3
    assert {a["details"]["kid"] for a in audits} <= set(rotated.stdout.replace("added ", "").split())


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_log_level_debug_prints_no_token_code_secret_cookie_or_password(tmp_path, request, database):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secret = "debug-secret-0123456789abcdef"
    clients = [{"client_id": "webapp", "client_secret": "${S}", "redirect_uris": ["https://app.test/cb"],
                "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
                "scope": "openid email"}]
    config = write_config(tmp_path, issuer=base, keys={"dir": str(tmp_path / "keys")}, clients=clients,
                          log_level="debug")
    env = {"IAM_CONFIG": str(config), "S": secret}
    if database == "postgresql":
        server = request.getfixturevalue("postgres_server")
        host = server.split("://", 1)[1]
        for store in ("AUTHN", "TOKEN", "USERS"):
            env[f"IAM_{store}_DATABASE_URL"] = f"postgresql+asyncpg://{host}/{await create_database(server)}"
    else:
        for store in ("AUTHN", "TOKEN", "USERS"):
            env[f"IAM_{store}_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/{store.lower()}.db"
    seen: list[str] = [secret, PASSWORD]
    with serve(env, tmp_path, port=port):
        added = iam("users", "add", "--username", "dora", "--password-stdin", env=env, cwd=tmp_path,
                    input=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
        async with httpx.AsyncClient(base_url=base) as browser:
            verifier, challenge = pkce()
            page = await follow(browser, await authorize(browser, "webapp", "https://app.test/cb", "openid email",
                                                         challenge), "https://app.test/")
            await sign_in(browser, page, "dora", "a wrong password")
            done = await follow(browser, await sign_in(browser, page, "dora"), "https://app.test/")
            code = query(done.headers["location"])["code"]
            tokens = (await browser.post("/oauth/v2/token", headers=basic("webapp", secret), data={
                "grant_type": "authorization_code", "code": code, "redirect_uri": "https://app.test/cb",
                "code_verifier": verifier})).json()
            jwt = (await browser.post("/oauth/v2/introspect", headers={**basic("webapp", secret),
                                                                       "Accept": "application/jwt"},
                                      data={"token": tokens["access_token"]})).text
            refreshed = (await browser.post("/oauth/v2/token", headers=basic("webapp", secret), data={
                "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})).json()
            phantom = await browser.get("/oauth/v2/phantom",
                                        headers={"authorization": f"Bearer {refreshed['access_token']}"})
            assert phantom.status_code == 200
            seen += [code, verifier, jwt, *browser.cookies.values(), tokens["access_token"], tokens["refresh_token"],
                     tokens["id_token"], refreshed["access_token"], refreshed["refresh_token"],
                     phantom.headers["authorization"].split()[1]]
    log = (tmp_path / "server.log").read_text()
    assert all(line.startswith("{") for line in log.splitlines())  # uvicorn's lines too are the process's JSON
    leaked = [value[:12] + "..." for value in seen if value in log]
    assert leaked == [], leaked
