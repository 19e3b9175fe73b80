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
    import uvicorn

    from iam.app import create_app

    settings = _settings(args)
    _logging(settings.log_level)
    app = create_app(settings)

    async def serve() -> None:
        await app.state.iam.start()  # fails here, with one line, before the port opens
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=settings.log_level,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=args.grace,
            loop="none",
        )
        await uvicorn.Server(config).serve()

    import uvloop

    uvloop.run(serve())


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
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", help="apply database migrations to the role's store(s)").set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage signing keys").add_subparsers(dest="keys", required=True)
    keys.add_parser("rotate", help="add a new signing key per algorithm").set_defaults(func=cmd_keys_rotate)
    keys.add_parser("list", help="list keys: kid, algorithm, creation, state").set_defaults(func=cmd_keys_list)
    remove = keys.add_parser("remove", help="stop publishing a retired key")
    remove.add_argument("kid")
    remove.set_defaults(func=cmd_keys_remove)

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
    from iam.keys import KeyRingError
    from iam.store import StoreError

    try:
        args.func(args)
    except (ConfigError, StartupError, StoreError, KeyRingError) as exc:
        print(f"iam: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
