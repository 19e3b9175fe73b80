"""`iam connectors list` and `iam connectors test ID` as an operator runs them, against the real upstreams."""

import secrets

from tests.postgres import free_port
from tests.server import iam, write_config


def run(tmp_path, connectors, *args):
    config = write_config(tmp_path, issuer="https://iam.example", keys={"dir": str(tmp_path / "keys")},
                          connectors=connectors)
    return iam("connectors", *args, env={"IAM_CONFIG": str(config), "UPSTREAM_SECRET": "upstream-s3cret-value"},
               cwd=tmp_path)


def oidc(issuer, **extra):
    return {"id": "corp", "type": "oidc", "name": "Contoso", "issuer": issuer, "client_id": "iam",
            "client_secret": "${UPSTREAM_SECRET}", **extra}


def ldap(server, **overrides):
    config = server.connector_config(id="ad", **overrides).model_dump(mode="json")
    config["bind_password"] = overrides.get("bind_password", server.service_password)
    return config


def test_list_prints_each_connector_with_the_callback_url_to_register(tmp_path, ldap_server):
    done = run(tmp_path, [oidc("https://login.contoso.example"), ldap(ldap_server)], "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split("\t") == ["corp", "oidc", "Contoso", "https://iam.example/authn/connectors/corp/callback"]
    assert lines[1].split("\t") == ["ad", "ldap", "Example Directory", "-"]


def test_test_checks_an_oidc_provider_and_fails_with_exit_1_when_it_is_unreachable(tmp_path, oidc_upstream):
    ok = run(tmp_path, [oidc(oidc_upstream.issuer)], "test", "corp")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok    discovery" in ok.stdout and "ok    jwks" in ok.stdout
    dead = run(tmp_path, [oidc(f"http://127.0.0.1:{free_port()}")], "test", "corp")
    assert dead.returncode == 1 and "FAIL  discovery" in dead.stdout
    assert "upstream-s3cret-value" not in ok.stdout + ok.stderr + dead.stdout + dead.stderr


def test_test_checks_an_ldap_server_and_a_wrong_service_password_fails(tmp_path, ldap_server):
    ok = run(tmp_path, [ldap(ldap_server)], "test", "ad")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = "wrong-" + secrets.token_hex(6)
    bad = run(tmp_path, [ldap(ldap_server, bind_password=wrong)], "test", "ad")
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    assert wrong not in bad.stdout + bad.stderr and ldap_server.service_password not in ok.stdout + ok.stderr


def test_test_names_an_unknown_connector(tmp_path):
    done = run(tmp_path, [], "test", "nope")
    assert done.returncode == 2 and "no connector 'nope'" in done.stderr
