"""Each role loads only its own code: a role's process never imports another role's package (nor its tables)."""

import os
import subprocess
import sys

import pytest

PACKAGES = {"token": "token", "authentication": "authn", "user-management": "users"}

PROBE = """
import sys
from iam.app import create_app
from iam.config import load_settings
create_app(load_settings())
print(" ".join(sorted({name.split(".")[1] for name in sys.modules
                       if name.split(".")[:2] in (["iam", "authn"], ["iam", "token"], ["iam", "users"])})))
"""


@pytest.mark.parametrize("role", sorted(PACKAGES))
def test_a_role_imports_only_its_own_package(role, tmp_path):
    env = {**os.environ, "SERVICE_ROLE": role, "IAM_TOKEN_URL": "http://token.internal",
           "IAM_AUTHN_URL": "http://authn.internal", "IAM_USERS_URL": "http://users.internal",
           "IAM_KEYS_DIR": str(tmp_path / "keys")}
    for var in ("IAM_AUTHN_DATABASE_URL", "IAM_TOKEN_DATABASE_URL", "IAM_USERS_DATABASE_URL"):
        env[var] = f"sqlite+aiosqlite:///{tmp_path / var}.db"
    loaded = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [PACKAGES[role]]


def test_the_internal_api_is_declared_in_four_modules(tmp_path):
    """The never-exposed surface (`/internal/v1/...`) can be reviewed in iam/internal.py and one module per role."""
    from iam.app import create_app
    from iam.config import Settings

    stores = {name: f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in ("authn", "token", "users")}
    app = create_app(Settings(stores=stores, keys={"dir": str(tmp_path / "keys")}))

    def routes(router):
        for route in router.routes:
            inner = getattr(route, "original_router", None)  # an included router
            yield from routes(inner) if inner is not None else [route]

    modules = {route.endpoint.__module__ for route in routes(app.router)
               if getattr(route, "path", "").startswith("/internal/")}
    assert modules == {"iam.internal", "iam.authn.internal", "iam.token.internal", "iam.users.internal"}
