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


# Where a role's SQL may be: its store module (iam/<role>/store.py), which holds the statements, and the SCIM
# filter compiler, which turns a filter into a WHERE condition over the user store's tables for the store to run.
SQL_MODULES = {"iam/token/store.py", "iam/authn/store.py", "iam/users/store.py", "iam/users/scim/filter.py"}
# What any module may take from SQLAlchemy: its errors, and the type of a row the store returns.
SQL_FREE = {"sqlalchemy.exc", "sqlalchemy.engine"}


def _sql_in(path):
    """The lines of a module that build or run SQL: an import of SQLAlchemy's statement builders (select, insert,
    update, delete, text, func, dialects, ...), a call of `.execute`, or a connection opened on an engine."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            if node.module not in SQL_FREE:
                yield node.lineno, f"from {node.module} import ..."
        elif isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "sqlalchemy" for alias in node.names):
            yield node.lineno, "import sqlalchemy"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target, name = node.func.value, node.func.attr
            if name in ("execute", "exec_driver_sql", "run_sync"):
                yield node.lineno, f".{name}()"
            elif name in ("begin", "connect") and getattr(target, "attr", getattr(target, "id", None)) == "engine":
                yield node.lineno, f"engine.{name}()"


def test_each_role_keeps_its_sql_in_its_store():
    """One persistence shape (issue #17): a store class per role holds its SQL; the rules live above it."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = [f"{path.relative_to(root)}:{line}: {what}"
             for role in PACKAGES.values() for path in sorted((root / "iam" / role).rglob("*.py"))
             if str(path.relative_to(root)) not in SQL_MODULES for line, what in _sql_in(path)]
    assert found == []
    for module in SQL_MODULES - {"iam/users/scim/filter.py"}:  # the check sees what a store does
        assert list(_sql_in(root / module)), module
