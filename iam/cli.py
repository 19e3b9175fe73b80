"""The `iam` command: serve, migrate, keys, tokens, clients.

Every command reads the same configuration (`IAM_CONFIG`, default config/iam.yaml) and `SERVICE_ROLE`.
A problem that stops a command is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
import time

from iam import __version__
from iam.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


# -- serve ---------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    from iam.app import create_app
    from iam.server import serve

    settings = _settings(args)
    _logging(settings.log_level)
    serve(create_app(settings), args.host, args.port, args.grace, args.drain_delay, settings.log_level)


def cmd_migrate(args: argparse.Namespace) -> None:
    from iam.store import Store

    settings = _settings(args)
    _logging(settings.log_level)

    async def migrate() -> None:
        for name in settings.role.stores:
            store = Store(name, getattr(settings.stores, name))
            try:
                await store.migrate()
            finally:
                await store.close()
            print(f"{name} store at {store.describe}: at {store.head}")

    asyncio.run(migrate())


# -- keys ----------------------------------------------------------------------------------------------
def _ring(args: argparse.Namespace):
    from iam.keys import KeyRing

    settings = _settings(args)
    return KeyRing(settings.keys.dir, settings.keys.activation_delay)


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    ring = _ring(args)
    for kid in ring.rotate():
        print(f"added {kid}")
    print("older keys stay published; remove one with `iam keys remove KID` once its tokens have expired")


def cmd_keys_list(args: argparse.Namespace) -> None:
    ring = _ring(args).load()
    signing = {ring.signing_key(alg).kid for alg in ring.algorithms}
    for key in sorted(ring.public_keys(), key=lambda k: k.created):
        state = "signing" if key.kid in signing else "published"
        print(f"{key.kid}\t{key.alg}\t{key.created:%Y-%m-%dT%H:%M:%SZ}\t{state}")


def cmd_keys_remove(args: argparse.Namespace) -> None:
    _ring(args).load().remove(args.kid)
    print(f"removed {args.kid}")


# -- users ---------------------------------------------------------------------------------------------
def _with_directory(args: argparse.Namespace, action) -> None:
    """Run `action(directory)` with the user-management role's service, as the running role would."""
    from iam.app import Runtime
    from iam.roles import Role

    settings = _settings(args)
    if not settings.role.serves(Role.USER_MANAGEMENT):
        raise ConfigError("`iam users` runs with SERVICE_ROLE user-management or all")

    async def run() -> None:
        runtime = Runtime(settings)
        try:
            await runtime.start()
            await action(runtime.directory_service)
        finally:
            await runtime.stop()

    asyncio.run(run())


def _read_password(args: argparse.Namespace) -> str | None:
    if not getattr(args, "password_stdin", False):
        return None
    return sys.stdin.readline().rstrip("\n")


def cmd_users_add(args: argparse.Namespace) -> None:
    from iam.users.directory import NewUser

    password = _read_password(args)

    async def add(directory) -> None:
        new = NewUser(user_name=args.username, email=args.email, email_verified=args.email_verified,
                      given_name=args.given_name, family_name=args.family_name, display_name=args.name)
        user_id = await directory.create_user(new, password=password, group_names=tuple(args.group))
        print(user_id)

    _with_directory(args, add)


def cmd_users_list(args: argparse.Namespace) -> None:
    async def show(directory) -> None:
        for user in await directory.list_users(limit=args.limit):
            state = "active" if user.active else "disabled"
            print(f"{user.sub}\t{user.preferred_username}\t{user.email or '-'}\t{state}\t{','.join(user.groups)}")

    _with_directory(args, show)


def _by_name(directory, username: str):
    async def find() -> str:
        user_id = await directory.find_id(username)
        if user_id is None:
            raise ConfigError(f"no user {username!r}")
        return user_id

    return find()


def cmd_users_disable(args: argparse.Namespace) -> None:
    async def disable(directory) -> None:
        await directory.set_active(await _by_name(directory, args.username), args.enable)
        print(f"{args.username}: {'enabled' if args.enable else 'disabled'}")

    _with_directory(args, disable)


def cmd_users_set_password(args: argparse.Namespace) -> None:
    password = _read_password(args) if args.password_stdin else getpass.getpass("new password: ")

    async def set_password(directory) -> None:
        await directory.set_password(await _by_name(directory, args.username), password)
        print(f"{args.username}: password set")

    _with_directory(args, set_password)


# -- tokens, clients -------------------------------------------------------------------------------------
def cmd_tokens_purge(args: argparse.Namespace) -> None:
    from iam.store import Store
    from iam.token.store import TokenStore

    settings = _settings(args)

    async def purge() -> int:
        store = Store("token", settings.stores.token)
        await store.check()
        total = 0
        try:
            while (deleted := await TokenStore(store.engine).purge_expired(int(time.time()), args.batch)) > 0:
                total += deleted
        finally:
            await store.close()
        return total

    print(f"deleted {asyncio.run(purge())} expired tokens")


def cmd_clients_hash_secret(_: argparse.Namespace) -> None:
    from argon2 import PasswordHasher

    secret = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("client secret: ")
    if len(secret) < 16:
        raise SystemExit("iam: error: a client secret needs at least 16 characters")
    print(PasswordHasher().hash(secret))


def cmd_config_check(args: argparse.Namespace) -> None:
    settings = _settings(args)
    print(f"ok: role {settings.role.value}, issuer {settings.issuer}, {len(settings.clients)} clients")


# -- parser --------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="iam",
        description="iam: OAuth 2.0 / OpenID Connect authorization server. The role comes from SERVICE_ROLE "
        "(authentication, token, user-management, all).",
    )
    top.add_argument("--version", action="version", version=f"iam {__version__}")
    top.add_argument("--config", help="configuration file (default: $IAM_CONFIG or config/iam.yaml)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server for the configured role")
    serve.add_argument("--host", default=os.environ.get("IAM_HOST", "127.0.0.1"), help="bind address ($IAM_HOST)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("IAM_PORT", "8080")), help="port ($IAM_PORT)")
    serve.add_argument("--grace", type=int, default=20, help="seconds to drain in-flight requests on SIGTERM")
    serve.add_argument(
        "--drain-delay",
        type=float,
        default=os.environ.get("IAM_DRAIN_DELAY", "5"),  # a string default goes through type=, so errors are clean
        help="seconds to keep serving, not ready, after SIGTERM before the graceful shutdown ($IAM_DRAIN_DELAY)",
    )
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", help="apply database migrations to the role's store(s)").set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage signing keys").add_subparsers(dest="keys", required=True)
    keys.add_parser("rotate", help="add a new signing key per algorithm").set_defaults(func=cmd_keys_rotate)
    keys.add_parser("list", help="list keys: kid, algorithm, creation, state").set_defaults(func=cmd_keys_list)
    remove = keys.add_parser("remove", help="stop publishing a retired key")
    remove.add_argument("kid")
    remove.set_defaults(func=cmd_keys_remove)

    users = sub.add_parser("users", help="manage users (role user-management or all)").add_subparsers(
        dest="users", required=True)
    add = users.add_parser("add", help="create a user; prints its id")
    add.add_argument("--username", required=True)
    add.add_argument("--email")
    add.add_argument("--email-verified", action="store_true", help="mark the email address as verified")
    add.add_argument("--name", help="display name")
    add.add_argument("--given-name")
    add.add_argument("--family-name")
    add.add_argument("--group", action="append", default=[], help="group name (repeatable; created if missing)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    add.set_defaults(func=cmd_users_add)
    listing = users.add_parser("list", help="list users: id, username, email, state, groups")
    listing.add_argument("--limit", type=int, default=1000)
    listing.set_defaults(func=cmd_users_list)
    for name, enable, text in (("disable", False, "stop new logins and refreshes"), ("enable", True, "re-enable")):
        toggle = users.add_parser(name, help=f"{text} for a user")
        toggle.add_argument("username")
        toggle.set_defaults(func=cmd_users_disable, enable=enable)
    set_password = users.add_parser("set-password", help="set a user's password (prompted, or --password-stdin)")
    set_password.add_argument("username")
    set_password.add_argument("--password-stdin", action="store_true")
    set_password.set_defaults(func=cmd_users_set_password)

    tokens = sub.add_parser("tokens", help="token store maintenance").add_subparsers(dest="tokens", required=True)
    purge = tokens.add_parser("purge", help="delete expired tokens in bounded batches")
    purge.add_argument("--batch", type=int, default=1000)
    purge.set_defaults(func=cmd_tokens_purge)

    clients = sub.add_parser("clients", help="client helpers").add_subparsers(dest="clients", required=True)
    clients.add_parser(
        "hash-secret", help="read a client secret on stdin, print its argon2id hash for client_secret_hash"
    ).set_defaults(func=cmd_clients_hash_secret)

    config = sub.add_parser("config", help="configuration helpers").add_subparsers(dest="config_cmd", required=True)
    config.add_parser("check", help="validate the configuration").set_defaults(func=cmd_config_check)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from iam.app import StartupError
    from iam.authn.credentials import PasswordRejected
    from iam.keys import KeyRingError
    from iam.peers import PeerRejected, PeerUnavailable
    from iam.store import StoreError
    from iam.users.directory import DirectoryError
    from sqlalchemy.exc import DBAPIError

    try:
        args.func(args)
    except (ConfigError, StartupError, StoreError, KeyRingError, DirectoryError, PasswordRejected, PeerUnavailable,
            PeerRejected) as exc:
        print(f"iam: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"iam: error: store error ({reason}); is the schema current? (`iam migrate`)", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
