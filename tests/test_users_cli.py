"""`iam users ...` as an operator runs it (real processes): the same directory code as the SCIM API."""

import sqlite3

from tests.server import iam, write_config


def test_users_commands(tmp_path):
    stores = {name: f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("authn", "token", "users")}
    env = {"IAM_CONFIG": str(write_config(tmp_path, stores=stores, keys={"dir": str(tmp_path / "keys")}))}

    def run(*args, input=None):
        result = iam("users", *args, env=env, cwd=tmp_path, input=input)
        assert "Traceback" not in result.stderr
        return result

    added = run("add", "--username", "Grace", "--email", "Grace@Example.com", "--email-verified", "--group", "ops",
                "--password-stdin", input="a long enough password\n")
    assert added.returncode == 0, added.stderr
    user_id = added.stdout.strip()
    assert run("disable", "grace").returncode == 0  # names match case-insensitively
    listed = run("list")
    assert listed.stdout.split("\t") == [user_id, "Grace", "grace@example.com", "disabled", "ops\n"]
    assert run("delete", "Grace").stdout.strip() == "Grace: deleted"
    again = run("delete", "Grace")
    assert again.returncode == 2 and again.stderr.strip() == "iam: error: no user 'Grace'"


def test_reset_mfa_removes_a_lost_authenticator_and_delete_removes_every_credential(tmp_path):
    stores = {name: f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("authn", "token", "users")}
    env = {"IAM_CONFIG": str(write_config(tmp_path, stores=stores, keys={"dir": str(tmp_path / "keys")}))}

    def run(*args, input=None):
        result = iam("users", *args, env=env, cwd=tmp_path, input=input)
        assert "Traceback" not in result.stderr
        return result

    def factors() -> list:
        with sqlite3.connect(tmp_path / "authn.db") as db:
            return db.execute("SELECT subject FROM totp").fetchall()

    user_id = run("add", "--username", "ada", "--password-stdin", input="a long enough password\n").stdout.strip()
    with sqlite3.connect(tmp_path / "authn.db") as db:  # ada enrolled an authenticator, then lost it
        db.execute("INSERT INTO totp (subject, secret, confirmed, last_step) VALUES (?, 'JBSWY3DPEHPK3PXP', 1, 0)",
                   (user_id,))
    assert run("reset-mfa", "ada").stdout.strip() == "ada: two-step verification removed; they can enrol again " \
                                                     "after signing in"
    assert factors() == []
    assert run("reset-mfa", "ada").stdout.strip() == "ada: had no two-step verification"
    assert run("reset-mfa", "nobody").returncode == 2
    assert run("sign-out", "ada").stdout.strip() == "ada: signed out everywhere; every grant revoked"
    assert run("sign-out", "nobody").returncode == 2

    with sqlite3.connect(tmp_path / "authn.db") as db:
        db.execute("INSERT INTO totp (subject, secret, confirmed, last_step) VALUES (?, 'JBSWY3DPEHPK3PXP', 1, 0)",
                   (user_id,))
    assert run("delete", "ada").returncode == 0
    assert factors() == []  # a deleted user leaves no credential behind
    with sqlite3.connect(tmp_path / "authn.db") as db:
        assert db.execute("SELECT count(*) FROM credentials").fetchone() == (0,)


def test_add_with_send_verification_mails_the_link_before_the_command_exits(tmp_path):
    from tests import smtp_server

    stores = {name: f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("authn", "token", "users")}
    with smtp_server.running() as inbox:
        mail = {"host": "127.0.0.1", "port": inbox.port, "security": "none", "from_address": "iam@iam.test"}
        env = {"IAM_CONFIG": str(write_config(tmp_path, stores=stores, keys={"dir": str(tmp_path / "keys")},
                                              mail=mail))}
        added = iam("users", "add", "--username", "hal", "--email", "hal@example.com", "--send-verification",
                    env=env, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        assert [m["To"] for m in inbox.messages] == ["hal@example.com"]
        assert "/authn/email/verify?token=" in inbox.link(inbox.messages[0])
        quiet = iam("users", "add", "--username", "ida", "--email", "ida@example.com", "--email-verified",
                    "--send-verification", env=env, cwd=tmp_path)
        assert quiet.returncode == 0 and len(inbox.messages) == 1  # verified already: nothing to send


def test_sign_out_in_one_process_tells_the_clients_before_the_command_exits(tmp_path):
    """With every role in the command's process, it delivers the back-channel logout itself, then exits."""
    import json
    import time

    from iam.keys import KeyRing
    from tests import logout_receiver

    stores = {name: f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("authn", "token", "users")}
    with logout_receiver.running() as receiver:
        client = {"client_id": "rp", "token_endpoint_auth_method": "none", "redirect_uris": ["https://rp.test/cb"],
                  "backchannel_logout_uri": receiver.uri("rp")}
        env = {"IAM_CONFIG": str(write_config(tmp_path, stores=stores, keys={"dir": str(tmp_path / "keys")},
                                              clients=[client]))}
        added = iam("users", "add", "--username", "ivy", env=env, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        ivy, now = added.stdout.strip(), int(time.time())
        with sqlite3.connect(tmp_path / "token.db") as db:  # what a sign-in to rp left: a grant in a session
            db.execute("INSERT INTO grants (id, client_id, subject, scope, sid, auth_time, amr, offline, created_at, "
                       "expires_at, revoked) VALUES ('g1', 'rp', ?, 'openid', 's1', ?, 'pwd', 0, ?, ?, 0)",
                       (ivy, now, now, now + 3600))
        signed_out = iam("users", "sign-out", "ivy", env=env, cwd=tmp_path)
        assert signed_out.returncode == 0, signed_out.stderr
        received = receiver.for_client("rp")  # already there: the command waited for the delivery
        assert len(received) == 1
    ring = KeyRing(tmp_path / "keys", 0)  # the issuer's JWKS, as /oauth/v2/jwks would serve it
    ring.load(generate=False)
    claims = logout_receiver.validate(received[0].token, json.loads(ring.jwks_json), "http://localhost:8080", "rp",
                                      set())
    assert claims["sub"] == ivy and "sid" not in claims  # every session of ivy's at rp
