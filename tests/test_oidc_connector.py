"""The OpenID Connect connector against a real upstream (node-oidc-provider) and, for tokens no honest
provider would sign, against a hostile one that follows the same protocol (tests/hostile_provider.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import replace
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jws, jwt
from joserfc.jwk import RSAKey

from iam.authn.connectors import (
    ConnectorError,
    ConnectorUnavailable,
    PendingUpstream,
    UpstreamIdentity,
    UpstreamRejected,
)
from iam.authn.connectors.oidc import JWKS_REFETCH_INTERVAL, AccessDenied, OidcConnector
from iam.config import OidcConnectorConfig
from tests.conftest import ISSUER, LEAK_PATTERNS
from tests.hostile_provider import HostileProvider, b64url
from tests.oidc_upstream import ALICE, BOB, Account
from tests.postgres import free_port

REDIRECT_URI = f"{ISSUER}/authn/connectors/corp/callback"


def connector_for(issuer: str, client_id: str, client_secret: str | None, *, http=None, clock=time.time,
                  **settings) -> OidcConnector:
    config = OidcConnectorConfig.model_validate({
        "id": "corp", "type": "oidc", "name": "Contoso", "issuer": issuer, "client_id": client_id,
        "client_secret": client_secret, "scopes": ["openid", "email", "profile", "groups"], **settings})
    return OidcConnector(config, http=http, clock=clock)


class JwksCounter:
    """An httpx client for the connector that counts its requests by path."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.http = httpx.AsyncClient(event_hooks={"request": [self._count]})

    async def _count(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)


@pytest.fixture
def upstream_client(oidc_upstream):
    """A client of iam's at the real upstream, registered for this test only: (client_id, secret)."""
    entry = oidc_upstream.register_iam(ISSUER, "corp")
    return entry["client_id"], entry["client_secret"]


@pytest.fixture
async def corp(oidc_upstream, upstream_client):
    connector = connector_for(oidc_upstream.issuer, *upstream_client)
    yield connector
    await connector.close()


async def sign_in(upstream, connector, account=ALICE, **start) -> tuple[dict[str, str], PendingUpstream]:
    """start(), then a fresh browser signs in at the upstream; the callback's parameters and what iam kept."""
    url, pending = await connector.start(REDIRECT_URI, **start)
    async with httpx.AsyncClient() as browser:
        params = await upstream.sign_in(browser, url, account.username, account.password, redirect_uri=REDIRECT_URI)
    return params, pending


# -- the real upstream ---------------------------------------------------------------------------------------
async def test_authorization_request_uses_pkce_state_and_nonce(corp, oidc_upstream, upstream_client):
    url, pending = await corp.start(REDIRECT_URI, login_hint="alice")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert f"{parts.scheme}://{parts.netloc}" == oidc_upstream.issuer
    assert query["response_type"] == "code" and query["client_id"] == upstream_client[0]
    assert query["redirect_uri"] == REDIRECT_URI and query["scope"] == "openid email profile groups"
    assert query["state"] == pending.state and query["nonce"] == pending.nonce and query["login_hint"] == "alice"
    # RFC 7636 §4.2: S256 of a verifier of 43 characters (256 bits)
    assert query["code_challenge_method"] == "S256" and len(pending.code_verifier) == 43
    assert query["code_challenge"] == b64url(hashlib.sha256(pending.code_verifier.encode()).digest())
    _, other = await corp.start(REDIRECT_URI)
    assert len({pending.state, pending.nonce, pending.code_verifier, other.state, other.nonce}) == 5


async def test_sign_in_maps_claims_from_userinfo_and_filters_groups(oidc_upstream, upstream_client):
    # The provider's default (OIDC Core §5.4): profile claims only at userinfo, not in the ID token.
    connector = connector_for(oidc_upstream.issuer, *upstream_client,
                              groups={"prefix": "corp:", "allow": ["engineering", "admins", "nobody"]})
    params, pending = await sign_in(oidc_upstream, connector)
    assert params["iss"] == oidc_upstream.issuer  # RFC 9207
    identity = await connector.finish(REDIRECT_URI, params, pending)
    assert identity == UpstreamIdentity(
        connector_id="corp", subject=ALICE.sub, username="alice", email="alice@contoso.example",
        email_verified=True, name="Alice Liddell", groups=["corp:engineering", "corp:admins"], amr=["pwd"])
    await connector.close()


async def test_claims_from_the_id_token_alone_with_dotted_paths(oidc_upstream, upstream_client):
    dave = Account("dave", "dave-upstream-password-1e4b", "7a1d-dave", {
        "preferred_username": "dave", "email": "dave@contoso.example", "email_verified": "true", "name": "Dave",
        "realm_access": {"roles": ["operators", "viewers"]}, "https://contoso.example/login": "d.ave"},
        amr=["pwd", "otp"], acr="urn:contoso:loa:2")
    oidc_upstream.add_account(dave)
    scope_claims = {"openid": ["sub", "acr", "amr"], "email": ["email", "email_verified"],
                    "profile": ["name", "preferred_username", "realm_access", "https://contoso.example/login"]}
    counter = JwksCounter()
    connector = connector_for(oidc_upstream.issuer, *upstream_client, http=counter.http, userinfo=False,
                              scopes=["openid", "email", "profile"],
                              claims={"username": "https://contoso.example/login", "groups": "realm_access.roles"})
    with oidc_upstream.configured(claims_in_id_token=True, scope_claims=scope_claims):
        params, pending = await sign_in(oidc_upstream, connector, dave)
        identity = await connector.finish(REDIRECT_URI, params, pending)
    assert identity.subject == dave.sub and identity.username == "d.ave" and identity.name == "Dave"
    assert identity.groups == ["operators", "viewers"]
    assert identity.email == "dave@contoso.example" and identity.email_verified is False  # "true" is not true
    assert identity.amr == ["pwd", "otp"] and identity.acr == "urn:contoso:loa:2"
    assert "/me" not in counter.paths  # userinfo: false
    await counter.http.aclose()


async def test_unverified_email_stays_unverified(corp, oidc_upstream):
    identity = await corp.finish(REDIRECT_URI, *await sign_in(oidc_upstream, corp, BOB))
    assert identity.subject == BOB.sub and identity.email == "bob@contoso.example"
    assert identity.email_verified is False


async def test_client_secret_post_when_the_provider_offers_only_that(oidc_upstream):
    client_id, secret = "iam-post-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    oidc_upstream.add_client(client_id, secret, [REDIRECT_URI], token_endpoint_auth_method="client_secret_post")
    with oidc_upstream.configured(client_auth_methods=["client_secret_post"]):
        connector = connector_for(oidc_upstream.issuer, client_id, secret)
        identity = await connector.finish(REDIRECT_URI, *await sign_in(oidc_upstream, connector))
        checks = {c.step: c for c in await connector.check()}
    assert identity.subject == ALICE.sub
    assert checks["client authentication"].detail == "client_secret_post"
    await connector.close()


async def test_upstream_access_denied(corp, oidc_upstream):
    url, pending = await corp.start(REDIRECT_URI)
    async with httpx.AsyncClient() as browser:
        params = await oidc_upstream.decline(browser, url, redirect_uri=REDIRECT_URI)
    assert params["error"] == "access_denied" and "code" not in params
    with pytest.raises(AccessDenied) as failure:
        await corp.finish(REDIRECT_URI, params, pending)
    assert failure.value.reason == "access_denied" and isinstance(failure.value, UpstreamRejected)


@pytest.mark.parametrize("state", [None, "", "another-browsers-state"])
async def test_state_missing_or_wrong_is_refused_before_the_code_is_spent(corp, oidc_upstream, state):
    params, pending = await sign_in(oidc_upstream, corp)
    forged = {k: v for k, v in params.items() if k != "state"} | ({"state": state} if state is not None else {})
    with pytest.raises(UpstreamRejected, match="state"):
        await corp.finish(REDIRECT_URI, forged, pending)
    # nothing was sent upstream: the code is still good for the browser it belongs to
    assert (await corp.finish(REDIRECT_URI, params, pending)).subject == ALICE.sub


async def test_state_of_another_sign_in_is_refused(corp, oidc_upstream):
    params, _ = await sign_in(oidc_upstream, corp)
    _, other_browser = await corp.start(REDIRECT_URI)
    with pytest.raises(UpstreamRejected, match="state"):
        await corp.finish(REDIRECT_URI, params, other_browser)


async def test_callback_from_another_issuer_is_refused(corp, oidc_upstream):
    params, pending = await sign_in(oidc_upstream, corp)
    with pytest.raises(UpstreamRejected, match="iss"):  # RFC 9207 §2.4: a mix-up
        await corp.finish(REDIRECT_URI, {**params, "iss": "https://evil.example"}, pending)
    with pytest.raises(UpstreamRejected, match="iss"):  # the provider always sends it, so it must be there
        await corp.finish(REDIRECT_URI, {k: v for k, v in params.items() if k != "iss"}, pending)


async def test_nonce_mismatch(corp, oidc_upstream):
    params, pending = await sign_in(oidc_upstream, corp)
    with pytest.raises(UpstreamRejected, match="nonce"):
        await corp.finish(REDIRECT_URI, params, replace(pending, nonce=secrets.token_urlsafe(32)))


async def test_code_is_used_once_and_only_with_its_verifier(corp, oidc_upstream):
    params, pending = await sign_in(oidc_upstream, corp)
    with pytest.raises(UpstreamRejected, match="refused the code"):  # the provider checks PKCE (RFC 7636 §4.6)
        await corp.finish(REDIRECT_URI, params, replace(pending, code_verifier=secrets.token_urlsafe(32)))
    params, pending = await sign_in(oidc_upstream, corp)
    await corp.finish(REDIRECT_URI, params, pending)
    with pytest.raises(UpstreamRejected, match="refused the code"):
        await corp.finish(REDIRECT_URI, params, pending)


async def test_wrong_client_secret_makes_the_connector_unavailable(oidc_upstream, upstream_client):
    connector = connector_for(oidc_upstream.issuer, upstream_client[0], "not-the-secret")
    with pytest.raises(ConnectorUnavailable, match="client credentials"):
        await connector.finish(REDIRECT_URI, *await sign_in(oidc_upstream, connector))
    await connector.close()


async def test_key_rotation_upstream_fetches_the_jwks_once(oidc_upstream, upstream_client):
    counter = JwksCounter()
    connector = connector_for(oidc_upstream.issuer, *upstream_client, http=counter.http)
    await connector.finish(REDIRECT_URI, *await sign_in(oidc_upstream, connector))
    await connector.finish(REDIRECT_URI, *await sign_in(oidc_upstream, connector))
    assert counter.paths.count("/jwks") == 1  # cached
    assert counter.paths.count("/.well-known/openid-configuration") == 1
    before_rotation = await sign_in(oidc_upstream, connector)
    new_kid = oidc_upstream.rotate_keys(keep_old=False)
    identity = await connector.finish(REDIRECT_URI, *before_rotation)  # the ID token is signed at the token call
    assert identity.subject == ALICE.sub and counter.paths.count("/jwks") == 2  # the new kid, fetched once
    assert new_kid in [c.detail for c in await connector.check() if c.step == "jwks"][0]
    await connector.finish(REDIRECT_URI, *await sign_in(oidc_upstream, connector))
    assert counter.paths.count("/jwks") == 3  # check() fetched it; sign-ins do not
    await connector.close()
    await counter.http.aclose()


async def test_check_against_the_real_provider(corp, oidc_upstream):
    checks = await corp.check()
    assert all(check.ok for check in checks), checks
    steps = {check.step: check.detail for check in checks}
    assert steps["discovery"] == f"issuer {oidc_upstream.issuer}"
    assert oidc_upstream.signing_kid in steps["jwks"]
    assert steps["signing algorithms"] == "RS256" and steps["client authentication"] == "client_secret_basic"
    assert steps["pkce"] == "S256" and steps["userinfo"] == oidc_upstream.issuer + "/me"


# -- a hostile provider: ID tokens an honest one never signs ------------------------------------------------
HOSTILE_SECRET = "hostile-client-secret-5b7e"


@pytest.fixture
def hostile():
    with HostileProvider("iam", HOSTILE_SECRET) as provider:
        yield provider


async def hostile_callback(connector) -> tuple[dict[str, str], PendingUpstream]:
    url, pending = await connector.start(REDIRECT_URI)
    async with httpx.AsyncClient() as browser:
        response = await browser.get(url)
    assert response.status_code == 302
    return dict(parse_qsl(urlsplit(response.headers["location"]).query)), pending


async def hostile_finish(connector) -> UpstreamIdentity:
    return await connector.finish(REDIRECT_URI, *await hostile_callback(connector))


def unsigned(claims) -> str:
    header = b64url(json.dumps({"alg": "none"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hs256_keyed_with_public_key(provider: HostileProvider):
    """The classic: the provider's RSA public key (as PEM, and as the JWK's n) used as an HMAC secret."""
    pem = provider.key.get_op_key("verify").public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)

    def forge(claims) -> str:
        header = b64url(json.dumps({"alg": "HS256", "kid": provider.key.kid}).encode())
        signing_input = f"{header}.{b64url(json.dumps(claims).encode())}"
        return f"{signing_input}.{b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"

    return forge


async def test_a_well_behaved_hostile_token_passes(hostile):
    # The baseline: the crafted tokens below fail for the one thing each changes, nothing else.
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    identity = await hostile_finish(connector)
    assert identity.subject == "mallory" and identity.email_verified is True
    await connector.close()


FORGERIES = {
    "unknown key": (lambda op: lambda c: op.sign(c, key=RSAKey.generate_key(2048, parameters={"kid": "k-evil"})),
                    "key the provider does not publish"),
    "alg none": (lambda op: unsigned, "alg 'none'"),
    "HS256 keyed with the public key": (hs256_keyed_with_public_key, "alg 'HS256'"),
    "tampered payload": (lambda op: lambda c: ".".join([(t := op.sign(c)).split(".")[0],
                                                       b64url(json.dumps({**c, "sub": "admin"}).encode()),
                                                       t.split(".")[2]]), "bad signature"),
    "expired": (lambda op: lambda c: op.sign({**c, "exp": c["iat"] - 300, "iat": c["iat"] - 900}), "expired"),
    "issued in the future": (lambda op: lambda c: op.sign({**c, "iat": c["iat"] + 600, "exp": c["exp"] + 600}), "iat"),
    "another audience": (lambda op: lambda c: op.sign({**c, "aud": "someone-else"}), "aud"),
    "several audiences without azp": (lambda op: lambda c: op.sign({**c, "aud": ["iam", "someone-else"]}), "azp"),
    "azp of another client": (lambda op: lambda c: op.sign({**c, "azp": "someone-else"}), "azp"),
    "another issuer": (lambda op: lambda c: op.sign({**c, "iss": "https://login.contoso.example"}), "iss"),
    "no nonce": (lambda op: lambda c: op.sign({k: v for k, v in c.items() if k != "nonce"}), "nonce"),
    "another nonce": (lambda op: lambda c: op.sign({**c, "nonce": secrets.token_urlsafe(32)}), "nonce"),
    "not valid yet": (lambda op: lambda c: op.sign({**c, "nbf": c["iat"] + 600}), "nbf"),
    "no subject": (lambda op: lambda c: op.sign({k: v for k, v in c.items() if k != "sub"}), "sub"),
    "exp as a string": (lambda op: lambda c: op.sign({**c, "exp": str(c["exp"])}), "expired"),
    "not a JWT": (lambda op: lambda c: "not-a-token", "not a compact JWS"),
    "claims not a JSON object": (lambda op: lambda c: jws.serialize_compact({"alg": "RS256", "kid": op.key.kid}, b"[]",
                                                                         op.key), "not a JSON object"),
}


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_forged_id_token_is_rejected(hostile, forgery):
    make, why = FORGERIES[forgery]
    hostile.id_token = make(hostile)
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    with pytest.raises(UpstreamRejected, match=why) as failure:
        await hostile_finish(connector)
    assert failure.value.reason == "upstream_rejected"
    await connector.close()


async def test_an_alg_the_provider_does_not_advertise_is_refused(hostile):
    other = RSAKey.generate_key(2048, parameters={"kid": "no-alg"}, private=True)
    hostile.published = [hostile.key, other]  # a key that names no alg, usable for PS256 as for RS256
    hostile.id_token = lambda c: jwt.encode({"alg": "PS256", "kid": "no-alg"}, c, other, algorithms=["PS256"])
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    with pytest.raises(UpstreamRejected, match="alg 'PS256' is not one the provider signs with"):
        await hostile_finish(connector)
    hostile.id_token = lambda c: hostile.sign(c, key=other)
    assert (await hostile_finish(connector)).subject == "mallory"  # the same key with the advertised RS256
    await connector.close()


async def test_several_audiences_with_azp_is_accepted(hostile):
    hostile.id_token = lambda c: hostile.sign({**c, "aud": ["iam", "api.contoso"], "azp": "iam"})
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    assert (await hostile_finish(connector)).subject == "mallory"  # OIDC Core §3.1.3.7 rules 3-5
    await connector.close()


async def test_a_flood_of_unknown_kids_refetches_the_jwks_at_most_once_a_minute(hostile):
    now = [time.time()]
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET, clock=lambda: now[0])
    stranger = RSAKey.generate_key(2048)
    hostile.id_token = lambda c: hostile.sign(c, key=stranger, header={"alg": "RS256", "kid": secrets.token_hex(8)})
    for _ in range(20):
        with pytest.raises(UpstreamRejected, match="does not publish"):
            await hostile_finish(connector)
    assert hostile.requests.count("/jwks") == 2  # the first fetch, then one retry for an unknown kid
    hostile.id_token = hostile.sign
    assert (await hostile_finish(connector)).subject == "mallory"  # the provider's own key still works
    now[0] += JWKS_REFETCH_INTERVAL + 1
    hostile.id_token = lambda c: hostile.sign(c, key=stranger, header={"alg": "RS256", "kid": "k-later"})
    with pytest.raises(UpstreamRejected):
        await hostile_finish(connector)
    assert hostile.requests.count("/jwks") == 3
    await connector.close()


async def test_keys_the_provider_publishes_for_another_alg_or_use_are_not_used(hostile):
    enc = RSAKey.generate_key(2048, parameters={"kid": "enc-1"}, private=True)
    ps = RSAKey.generate_key(2048, parameters={"kid": "ps-1"}, private=True)
    oct_key = {"kty": "oct", "kid": "oct-1", "k": b64url(b"a shared secret has no place in a JWKS")}
    hostile.published = [hostile.key, {**enc.as_dict(private=False), "use": "enc"},
                         {**ps.as_dict(private=False), "alg": "PS256"}, oct_key]
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    for key in (enc, ps):  # RS256 signatures by a key for encryption, by a key only for PS256
        hostile.id_token = lambda c, key=key: hostile.sign(c, key=key)
        with pytest.raises(UpstreamRejected, match="does not publish"):
            await hostile_finish(connector)
    steps = {check.step: check.detail for check in await connector.check()}
    assert steps["jwks"] == "1 signing key(s) for the advertised algorithms: hostile-1"
    await connector.close()


async def test_userinfo_about_another_person_is_refused(hostile):
    hostile.userinfo = {"sub": "someone-else", "preferred_username": "admin"}  # OIDC Core §5.3.4
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    with pytest.raises(UpstreamRejected, match="another subject"):
        await hostile_finish(connector)
    hostile.userinfo = {"sub": "mallory", "preferred_username": "mallory", "email": "admin@contoso.example"}
    identity = await hostile_finish(connector)
    assert identity.username == "mallory" and identity.email == "mallory@evil.example"  # the ID token wins
    await connector.close()


@pytest.mark.parametrize(("error", "failure", "reason"), [
    ("access_denied", AccessDenied, "access_denied"),
    ("login_required", UpstreamRejected, "upstream_rejected"),
    ("temporarily_unavailable", ConnectorUnavailable, "unavailable"),
    ("x-secret-laden-code", UpstreamRejected, "upstream_rejected"),
])
async def test_callback_errors_by_kind(hostile, error, failure, reason):
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    _, pending = await connector.start(REDIRECT_URI)
    params = {"error": error, "error_description": "a text", "state": pending.state, "iss": hostile.issuer}
    with pytest.raises(failure) as raised:
        await connector.finish(REDIRECT_URI, params, pending)
    assert raised.value.reason == reason and "x-secret" not in str(raised.value)
    assert "/token" not in hostile.requests
    await connector.close()


async def test_token_endpoint_failure_and_oversized_answers_are_unavailable(hostile):
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    hostile.token_status = 503
    with pytest.raises(ConnectorUnavailable, match="token endpoint answered 503"):
        await hostile_finish(connector)
    hostile.token_status = 200
    hostile.published = [{"kty": "RSA", "kid": "big", "n": "A" * (1 << 20), "e": "AQAB"}]
    with pytest.raises(ConnectorUnavailable, match="more than 1 MiB"):
        await hostile_finish(connector)
    await connector.close()


async def test_check_ignores_hmac_and_none_the_provider_advertises(hostile):
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    steps = {check.step: check for check in await connector.check()}
    assert steps["signing algorithms"].ok and steps["signing algorithms"].detail == "RS256 (ignored: HS256, none)"
    hostile.algs = ["HS256", "none"]
    steps = {check.step: check for check in await connector.check()}
    assert not steps["signing algorithms"].ok and "none iam accepts" in steps["signing algorithms"].detail
    with pytest.raises(ConnectorUnavailable, match="no signing algorithm"):  # nobody is sent there in vain
        await connector.start(REDIRECT_URI)
    await connector.close()


async def test_discovery_for_another_issuer_is_unusable(hostile):
    connector = connector_for(hostile.issuer.replace("127.0.0.1", "localhost"), "iam", HOSTILE_SECRET)
    with pytest.raises(ConnectorUnavailable, match="not the configured issuer"):
        await connector.start(REDIRECT_URI)
    assert not (await connector.check())[0].ok
    await connector.close()


# -- unreachable and slow --------------------------------------------------------------------------------
async def test_unreachable_provider_is_unavailable():
    connector = connector_for(f"http://127.0.0.1:{free_port()}", "iam", HOSTILE_SECRET, timeout=2)
    with pytest.raises(ConnectorUnavailable, match="unreachable"):
        await connector.start(REDIRECT_URI)
    checks = await connector.check()
    assert [c.step for c in checks] == ["discovery"] and not checks[0].ok
    await connector.close()


@pytest.mark.parametrize(("path", "mode"), [
    ("/.well-known/openid-configuration", "delay"),
    ("/.well-known/openid-configuration", "drip"),  # every byte in time, the whole answer not: still bounded
    ("/token", "delay"),
    ("/jwks", "drip"),
])
async def test_slow_provider_is_unavailable_within_the_timeout(hostile, path, mode):
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET, timeout=0.5)
    if mode == "delay":
        hostile.delay[path] = 5
    else:
        hostile.drip.add(path)
    if path == "/.well-known/openid-configuration":
        step = connector.start(REDIRECT_URI)
    else:
        step = connector.finish(REDIRECT_URI, *await hostile_callback(connector))
    started = time.monotonic()
    with pytest.raises(ConnectorUnavailable, match="did not answer within 0.5 s"):
        await step
    assert time.monotonic() - started < 1.5  # one bounded call, not a hanging sign-in page
    await connector.close()


async def test_discovery_stays_usable_while_the_provider_is_briefly_down(hostile):
    now = [time.time()]
    connector = connector_for(hostile.issuer, "iam", HOSTILE_SECRET, timeout=0.5, clock=lambda: now[0])
    await connector.start(REDIRECT_URI)
    now[0] += 2 * 3600
    hostile.delay["/.well-known/openid-configuration"] = 5
    url, _ = await connector.start(REDIRECT_URI)  # the document fetched before, while the refetch fails
    assert url.startswith(hostile.issuer + "/authorize?")
    await connector.close()


# -- nothing leaks -----------------------------------------------------------------------------------------
@contextmanager
def every_log_line(lines: list[str]):

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(logging.Formatter().format(record))  # the message and any traceback

    handler, root = Collect(logging.DEBUG), logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "httpx", "httpcore", "iam")}
    root.addHandler(handler)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


async def test_no_code_token_secret_or_state_in_logs_or_errors(oidc_upstream, upstream_client, hostile):
    """Every log line while the connector works (the HTTP client's debug lines too), and every error message."""
    client_id, secret = upstream_client
    good = connector_for(oidc_upstream.issuer, client_id, secret)
    bad_secret = connector_for(oidc_upstream.issuer, client_id, "wrong-" + secret)
    hostile.id_token = unsigned
    evil = connector_for(hostile.issuer, "iam", HOSTILE_SECRET)
    lines: list[str] = []
    with every_log_line(lines):
        (url, pending), (url2, pending2), (url3, pending3) = [
            await c.start(REDIRECT_URI) for c in (good, bad_secret, evil)]
    async with httpx.AsyncClient() as browser:  # the browser's requests are not iam's log
        params = await oidc_upstream.sign_in(browser, url, "alice", ALICE.password, redirect_uri=REDIRECT_URI)
    async with httpx.AsyncClient() as browser:
        params2 = await oidc_upstream.sign_in(browser, url2, "alice", ALICE.password, redirect_uri=REDIRECT_URI)
        params3 = dict(parse_qsl(urlsplit((await browser.get(url3)).headers["location"]).query))
    errors: list[ConnectorError] = []
    with every_log_line(lines):
        await good.finish(REDIRECT_URI, params, pending)
        for connector, attempt, kept in ((good, {**params, "state": "x"}, pending), (good, params, pending),
                                         (bad_secret, params2, pending2), (evil, params3, pending3)):
            try:
                await connector.finish(REDIRECT_URI, attempt, kept)
            except ConnectorError as failure:
                errors.append(failure)
    # a wrong state, a spent code, iam's wrong secret, an unsigned ID token
    assert [type(e) for e in errors] == [UpstreamRejected, UpstreamRejected, ConnectorUnavailable, UpstreamRejected]
    assert any("POST " + oidc_upstream.issuer + "/token" in line for line in lines)  # the client's lines are here
    secrets_used = [secret, "wrong-" + secret, HOSTILE_SECRET, ALICE.password]
    for kept, callback in ((pending, params), (pending2, params2), (pending3, params3)):
        secrets_used += [kept.state, kept.nonce, kept.code_verifier, callback["code"]]
    text = [*lines, *(str(e) for e in errors)]
    leaks = [line for line in text if any(s in line for s in secrets_used) or any(p.search(line) for p in LEAK_PATTERNS)]
    assert not leaks
    for connector in (good, bad_secret, evil):
        await connector.close()
