"""Metadata (RFC 8414, OIDC Discovery), JWKS, and the key ring's rotation rules."""

import json
import os
import stat

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from iam.keys import KeyRing, KeyRingError
from tests.conftest import ISSUER, basic
from tests.test_introspection import introspect
from tests.test_token_endpoint import get_token


@pytest.mark.parametrize("path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"])
async def test_metadata_describes_what_is_implemented(client, path):
    response = await client.get(path)
    assert response.status_code == 200
    assert "max-age" in response.headers["cache-control"]
    meta = response.json()
    assert meta["issuer"] == ISSUER  # byte for byte
    assert meta["token_endpoint"] == f"{ISSUER}/oauth/v2/token"
    assert set(meta["grant_types_supported"]) == {
        "authorization_code", "refresh_token", "client_credentials", "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:token-exchange"}
    assert "password" not in meta["grant_types_supported"] and "implicit" not in meta["grant_types_supported"]
    assert set(meta["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
        "self_signed_tls_client_auth", "none"}
    assert meta["tls_client_certificate_bound_access_tokens"] is True  # RFC 8705 §3.3
    assert "mtls_endpoint_aliases" not in meta  # only with mtls.endpoint_base
    assert meta["token_endpoint_auth_signing_alg_values_supported"] == ["RS256", "PS256", "ES256", "EdDSA"]
    # OIDC Discovery §3 required members, and what RFC 9700 / RFC 9207 ask to advertise.
    assert meta["response_types_supported"] == ["code"] and meta["subject_types_supported"] == ["public"]
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]  # never "none"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["request_uri_parameter_supported"] is False and "openid" in meta["scopes_supported"]
    # Every advertised endpoint answers (not 404) on this server.
    for key in ("token_endpoint", "introspection_endpoint", "revocation_endpoint", "device_authorization_endpoint",
                "userinfo_endpoint"):
        assert (await client.post(meta[key].removeprefix(ISSUER))).status_code != 404
    for key in ("authorization_endpoint", "end_session_endpoint"):
        assert (await client.get(meta[key].removeprefix(ISSUER))).status_code != 404
    assert (await client.get(meta["jwks_uri"].removeprefix(ISSUER))).status_code == 200


@pytest.mark.parametrize("path", ["/.well-known/openid-configuration", "/oauth/v2/jwks"])
async def test_static_documents_revalidate_with_etag_rfc9110_s13_1_2(client, path):
    first = await client.get(path)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and "max-age" in first.headers["cache-control"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*", f' "x" ,W/{etag} '):
        again = await client.get(path, headers={"If-None-Match": header})
        assert again.status_code == 304, header
        assert again.content == b"" and again.headers["etag"] == etag
        assert again.headers["cache-control"] == first.headers["cache-control"]
    for header in ('"other"', 'W/"other", "another"', etag.strip('"'), f"{etag} junk", ""):
        changed = await client.get(path, headers={"If-None-Match": header})
        assert changed.status_code == 200 and changed.content == first.content, header
    head = await client.head(path)
    assert head.status_code == 200 and head.headers["etag"] == etag


async def test_a_key_rotation_changes_the_documents_and_their_etags(client, app, settings):
    before = {path: await client.get(path) for path in ("/.well-known/openid-configuration", "/oauth/v2/jwks")}
    KeyRing(settings.keys.dir).load().rotate()  # what `iam keys rotate` does
    assert app.state.iam.keys.reload_if_changed()
    jwks = await client.get("/oauth/v2/jwks", headers={"If-None-Match": before["/oauth/v2/jwks"].headers["etag"]})
    assert jwks.status_code == 200 and jwks.headers["etag"] != before["/oauth/v2/jwks"].headers["etag"]
    assert len(jwks.json()["keys"]) == 2 * len(before["/oauth/v2/jwks"].json()["keys"])
    assert (await client.get("/.well-known/openid-configuration")).content == \
        before["/.well-known/openid-configuration"].content  # the same metadata: the same algorithms
    assert not app.state.iam.keys.reload_if_changed()
    cached = await client.get("/oauth/v2/jwks", headers={"If-None-Match": jwks.headers["etag"]})
    assert cached.status_code == 304


async def test_issuer_with_a_path_and_trailing_slash_is_kept_exactly(tmp_path, store_urls):
    from iam.app import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, store_urls, issuer="https://login.example.com/tenant-a/")
    app = create_app(settings)
    meta = json.loads(app.state.iam.token.documents.current().metadata.body)
    assert meta["issuer"] == "https://login.example.com/tenant-a/"
    assert meta["token_endpoint"] == "https://login.example.com/tenant-a/oauth/v2/token"


async def test_jwks_publishes_public_keys_with_kid(client):
    keys = (await client.get("/oauth/v2/jwks")).json()["keys"]
    assert {k.get("alg") for k in keys} == {"RS256", "ES256", None}
    # The Ed25519 key names no alg: it verifies `EdDSA` (RFC 8037) and `Ed25519` (RFC 9864) alike.
    assert [k["crv"] for k in keys if "alg" not in k] == ["Ed25519"]
    for key in keys:
        assert key["kid"] and key["use"] == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key), "private parameters must never be published"


async def test_generated_keys_are_private_files(app, settings):
    directory = settings.keys.dir
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    files = list(directory.glob("*.json"))
    assert len(files) == 3
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_rotation_keeps_old_tokens_verifiable(client, app, settings):
    old_token = (await get_token(client))["access_token"]
    old_jwt = (await introspect(client, old_token, accept="application/jwt")).text
    old_kid = jwt.decode(old_jwt, KeySet.import_key_set((await client.get("/oauth/v2/jwks")).json())).header["kid"]

    added = KeyRing(settings.keys.dir).load().rotate()  # what `iam keys rotate` does
    assert app.state.iam.keys.reload_if_changed()

    new_jwt = (await introspect(client, (await get_token(client))["access_token"], accept="application/jwt")).text
    keys = KeySet.import_key_set((await client.get("/oauth/v2/jwks")).json())
    new_kid = jwt.decode(new_jwt, keys).header["kid"]
    assert new_kid in added and new_kid != old_kid
    assert jwt.decode(old_jwt, keys).claims["client_id"] == "svc-basic"  # the old key is still published


def test_activation_delay_publishes_before_signing(tmp_path):
    ring = KeyRing(tmp_path / "keys", activation_delay=3600).load(generate=True)
    first = ring.signing_key("ES256").kid
    added = ring.rotate()
    published = {key["kid"] for key in json.loads(ring.jwks_json)["keys"]}
    assert set(added) <= published
    assert ring.signing_key("ES256").kid == first  # the new key waits out the delay


def test_the_signing_key_cannot_be_removed(tmp_path):
    ring = KeyRing(tmp_path / "keys").load(generate=True)
    with pytest.raises(KeyRingError):
        ring.remove(ring.signing_key("RS256").kid)
    old = ring.signing_key("RS256").kid
    ring.rotate()
    ring.remove(old)
    assert old not in ring.jwks_json.decode()


def test_a_corrupt_key_file_is_a_clear_error(tmp_path):
    directory = tmp_path / "keys"
    KeyRing(directory).load(generate=True)
    (directory / "broken.json").write_text("{not json")
    with pytest.raises(KeyRingError, match="broken.json"):
        KeyRing(directory).load()


async def test_token_endpoint_is_unaffected_by_cors_and_unknown_paths(client):
    assert (await client.get("/nope")).status_code == 404
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic"))
    assert "access-control-allow-origin" not in response.headers
