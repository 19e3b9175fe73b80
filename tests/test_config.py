"""Configuration: YAML with ${VAR} expansion, env overrides for the contracts, errors naming the field."""

import pytest

from iam.config import ConfigError, expand, load_settings

BASE = "issuer: https://iam.example.com\n"


def load(tmp_path, text: str, **env):
    path = tmp_path / "iam.yaml"
    path.write_text(text)
    return load_settings(path, env=env)


def test_expansion_forms():
    env = {"A": "1", "EMPTY": ""}
    assert expand("x${A}y", env, "f") == "x1y"
    assert expand("${MISSING:-fallback}", env, "f") == "fallback"
    assert expand("${EMPTY:-fallback}", env, "f") == ""
    assert expand("$${A}", env, "f") == "${A}"
    with pytest.raises(ConfigError, match="MISSING"):
        expand("${MISSING}", env, "f")


def test_secrets_come_from_the_environment(tmp_path):
    text = BASE + "clients:\n  - client_id: a\n    client_secret: ${A_SECRET}\n    grant_types: [client_credentials]\n"
    settings = load(tmp_path, text, A_SECRET="from-env-0123456789")
    assert settings.clients[0].client_secret.get_secret_value() == "from-env-0123456789"
    assert "from-env" not in repr(settings)  # never printed or logged in clear


def test_contract_variables_override_the_file(tmp_path):
    settings = load(tmp_path, BASE + "role: all\n", SERVICE_ROLE="token",
                    IAM_TOKEN_DATABASE_URL="postgresql+asyncpg://db/token",
                    IAM_USERS_URL="http://users:8080", IAM_AUTHN_URL="http://authn:8080")
    assert settings.role == "token"
    assert settings.stores.token == "postgresql+asyncpg://db/token"
    assert settings.stores.users.startswith("sqlite")


def test_shipped_config_is_valid_and_has_no_secrets():
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "config" / "iam.yaml"
    settings = load_settings(shipped, env={})
    assert settings.role == "all" and settings.stores.token.startswith("sqlite+aiosqlite:///var/")
    assert all(not c.enabled for c in settings.clients if not c.is_public)  # secrets must come from env


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("issuer: http://iam.example.com\n", "issuer: must use https"),
        ("issuer: https://iam.example.com/?x=1\n", "issuer: must have no query"),
        (BASE + "stores:\n  token: mysql://x\n", "stores.token"),
        (BASE + "clients:\n  - client_id: a\n    scope: 'ok bad\"'\n", "clients.0.scope"),
        (BASE + "clients:\n  - {client_id: a, client_secret: s, grant_types: [client_credentials]}\n"
         "  - {client_id: a, client_secret: t, grant_types: [client_credentials]}\n", "duplicate"),
        (BASE + "clients:\n  - {client_id: a, client_secret: s}\n", "needs at least one redirect_uri"),
        (BASE + "clients:\n  - {client_id: a, client_secret: s, redirect_uris: ['http://app.test/cb']}\n",
         "http is allowed for loopback redirect URIs only"),
        (BASE + "clients:\n  - {client_id: a, client_secret: s, redirect_uris: ['https://app.test/cb#x']}\n",
         "no fragment"),
        (BASE + "clients:\n  - {client_id: p, token_endpoint_auth_method: none, redirect_uris: ['http://127.0.0.1/cb'],"
         " require_pkce: false}\n", "public clients must use PKCE"),
        (BASE + "clients:\n  - {client_id: p, token_endpoint_auth_method: none, client_secret: s}\n", "public client"),
        (BASE + "clients:\n  - {client_id: a, client_secret_hash: plain}\n", "argon2id"),
        (BASE + "unknown_key: 1\n", "unknown_key"),
        ("- a list\n", "top level must be a mapping"),
        ("issuer: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text)
    assert str(tmp_path / "iam.yaml") in str(error.value)
    assert fragment in str(error.value)


def test_a_role_apart_needs_its_peers(tmp_path):
    with pytest.raises(ConfigError, match="peers.user_management is required when SERVICE_ROLE is token"):
        load(tmp_path, BASE, SERVICE_ROLE="token")
    settings = load(tmp_path, BASE, SERVICE_ROLE="token", IAM_USERS_URL="http://users:8080",
                    IAM_AUTHN_URL="http://authn:8080")
    assert settings.peers.user_management == "http://users:8080"


def test_missing_named_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_every_setting_is_described_in_the_model_and_in_the_readme():
    from pathlib import Path

    from iam.config import settings_reference, settings_table

    undescribed = [path for path, _, description in settings_reference() if not description.strip()]
    assert undescribed == [], f"settings without Field(description=...): {undescribed}"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [row for row in settings_table().splitlines() if row not in readme]
    assert missing == [], ("README.md's Settings table differs from the model; regenerate it with "
                           "python3 -c 'from iam.config import settings_table; print(settings_table())'\n"
                           + "\n".join(missing))
def test_a_clients_connector_allow_list_names_configured_connectors(tmp_path):
    connector = ("connectors:\n  - {id: corp, type: oidc, name: Contoso, issuer: 'https://login.contoso.example',"
                 " client_id: iam}\n")
    client = "clients:\n  - {client_id: a, client_secret: s3cret-s3cret-s3cret, grant_types: [client_credentials], "
    assert load(tmp_path, BASE + connector + client + "connectors: [corp]}\n").clients[0].connectors == ["corp"]
    with pytest.raises(ConfigError, match="clients.0.connectors: no connector 'nope'"):
        load(tmp_path, BASE + connector + client + "connectors: [nope]}\n")
