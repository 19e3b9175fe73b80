"""`iam users ...` as an operator runs it (real processes): the same directory code as the SCIM API."""

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
