"""The `iam` command: serve, migrate, keys, tokens, clients.

Every command reads the same configuration (`IAM_CONFIG`, default config/iam.yaml) and `SERVICE_ROLE`.
A problem that stops a command is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from typing import Any

from iam import __version__
from iam.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _logging(settings: Settings) -> None:
    from iam.observability import setup_logging

    setup_logging(settings.log_level, settings.audit_log)


# -- serve ---------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    from iam.app import create_app
    from iam.server import serve

    settings = _settings(args)
    _logging(settings)
    tls = _tls_files(args)
    serve(create_app(settings), args.host, args.port, args.grace, args.drain_delay, settings.log_level, **tls)


def _tls_files(args: argparse.Namespace) -> dict[str, Any]:
    """`--tls-cert` and `--tls-key` (both or neither), and `--tls-client-ca` with `--tls-client-certs` (client
    certificates, RFC 8705), checked before the port opens."""
    import ssl

    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: iam asks for client certificates "
                              "only when it terminates TLS itself")
        return {}
    if not (args.tls_cert and args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together ($IAM_TLS_CERT, $IAM_TLS_KEY)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {args.tls_cert} / key {args.tls_key}: {exc}") from None
    files: dict[str, Any] = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key}
    if args.tls_client_ca:
        try:
            context.load_verify_locations(args.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-client-ca {args.tls_client_ca}: {exc}") from None
        files["ssl_ca_certs"] = args.tls_client_ca
        files["ssl_cert_reqs"] = ssl.CERT_REQUIRED if args.tls_client_certs == "required" else ssl.CERT_OPTIONAL
    return files


def cmd_migrate(args: argparse.Namespace) -> None:
    from iam.app import store_metadata
    from iam.store import Store, StoreUnreachable

    settings = _settings(args)
    _logging(settings)

    async def migrate() -> None:
        for name in settings.role.stores:
            store = Store(name, getattr(settings.stores, name), store_metadata(name))
            try:
                await store.migrate()
            finally:
                await store.close()
            print(f"{name} store at {store.describe}: at {store.head}")

    async def check() -> int:
        """What `iam migrate` would run, and whether the code running now keeps working afterwards."""
        breaking = 0
        for name in settings.role.stores:
            store = Store(name, getattr(settings.stores, name), store_metadata(name))
            try:
                current, pending, stays = await store.plan()
            except Exception as exc:
                raise StoreUnreachable(f"{name} store at {store.describe}: {exc.__class__.__name__}") from None
            finally:
                await store.close()
            would = f"would run {', '.join(pending)}" if pending else "nothing to run"
            if current is not None and current not in store.known:
                would = f"at {current}, later than this release's {store.head}"
            running = ("no code runs on it yet" if current is None
                       else f"code at {current} " + ("stays compatible" if stays else "is NOT compatible"))
            print(f"{name} store at {store.describe}: at {current or 'nothing'}; {would}; {running}")
            breaking += not stays
        return breaking

    if args.check:
        # Exit 1 when a running instance would break: stop it (or roll it) before migrating.
        raise SystemExit(1 if asyncio.run(check()) else 0)
    asyncio.run(migrate())


# -- keys ----------------------------------------------------------------------------------------------
def _ring(args: argparse.Namespace):
    from iam.keys import KeyRing

    settings = _settings(args)
    return KeyRing(settings.keys.dir, settings.keys.activation_delay)


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    from iam.observability import audit

    ring = _ring(args)
    for kid in ring.rotate():
        audit("key.rotated", actor="operator", kid=kid)
        print(f"added {kid}")
    print("older keys stay published; remove one with `iam keys remove KID` once its tokens have expired")


def cmd_keys_list(args: argparse.Namespace) -> None:
    ring = _ring(args).load()
    signing = {ring.signing_key(alg).kid for alg in ring.algorithms}
    for key in sorted(ring.public_keys(), key=lambda k: k.created):
        state = "signing" if key.kid in signing else "published"
        print(f"{key.kid}\t{key.alg}\t{key.created:%Y-%m-%dT%H:%M:%SZ}\t{state}")


def cmd_keys_remove(args: argparse.Namespace) -> None:
    from iam.observability import audit

    _ring(args).load().remove(args.kid)
    audit("key.removed", actor="operator", kid=args.kid)
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
            assert runtime.users is not None  # the role serves user-management (above)
            await action(runtime.users.directory)
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
        user_id = await directory.create_user(new, password=password, group_names=tuple(args.group),
                                              send_verification=args.send_verification)
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


def cmd_users_delete(args: argparse.Namespace) -> None:
    async def remove(directory) -> None:
        await directory.delete_user(await _by_name(directory, args.username))
        print(f"{args.username}: deleted")

    _with_directory(args, remove)


def cmd_users_set_password(args: argparse.Namespace) -> None:
    password = _read_password(args) if args.password_stdin else getpass.getpass("new password: ")

    async def set_password(directory) -> None:
        await directory.set_password(await _by_name(directory, args.username), password)
        print(f"{args.username}: password set")

    _with_directory(args, set_password)


def cmd_users_sign_out(args: argparse.Namespace) -> None:
    async def sign_out(directory) -> None:
        await directory.sign_out_everywhere(await _by_name(directory, args.username))
        print(f"{args.username}: signed out everywhere; every grant revoked")

    _with_directory(args, sign_out)


def cmd_users_reset_mfa(args: argparse.Namespace) -> None:
    async def reset(directory) -> None:
        removed = await directory.reset_second_factor(await _by_name(directory, args.username))
        print(f"{args.username}: " + ("two-step verification removed; they can enrol again after signing in"
                                      if removed else "had no two-step verification"))

    _with_directory(args, reset)


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


def cmd_audit_list(args: argparse.Namespace) -> None:
    """The newest audit events kept in the role's store(s) (`audit_store: true`), as JSON lines."""
    from datetime import UTC, datetime

    from iam.audit_store import recent
    from iam.observability import AUDIT_SCHEMA
    from iam.store import Store

    settings = _settings(args)
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        raise ConfigError(f"--since {args.since!r} is not an ISO 8601 date or time") from None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    since_ms = int(since.timestamp() * 1000) if since else 0

    async def collect() -> list[dict]:
        rows: list[dict] = []
        for name in settings.role.stores:
            store = Store(name, getattr(settings.stores, name))
            try:
                await store.check()
                rows += await recent(store, event=args.event, actor=args.actor, since_ms=since_ms, limit=args.limit)
            finally:
                await store.close()
        return sorted(rows, key=lambda row: row["at"], reverse=True)[: args.limit]

    rows = asyncio.run(collect())
    for row in rows:
        at = datetime.fromtimestamp(row.pop("at") / 1000, UTC).isoformat(timespec="milliseconds")
        print(json.dumps({"time": at, "audit": {"schema": AUDIT_SCHEMA, **row}}, separators=(",", ":")))
    if not rows and not settings.audit_store:
        print("iam: audit_store is off: audit events go only to the audit log stream", file=sys.stderr)


def cmd_clients_hash_secret(_: argparse.Namespace) -> None:
    from iam.security import hash_secret

    secret = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("client secret: ")
    if len(secret) < 16:
        raise SystemExit("iam: error: a client secret needs at least 16 characters")
    print(hash_secret(secret))


def _with_clients(args: argparse.Namespace, action, service: str = "stored_clients") -> None:
    """Run `action(service)` with that service of the token role (`stored_clients`, `initial_tokens`), as the
    administration API does; a refusal is the command's error message (exit status 1), and changes nothing."""
    from iam.app import Runtime
    from iam.roles import Role
    from iam.token.client_metadata import ClientMetadataError
    from iam.token.initial_tokens import InitialTokenError
    from iam.token.stored_clients import StoredClientError

    settings = _settings(args)
    if not settings.role.serves(Role.TOKEN):
        raise ConfigError("`iam clients` runs with SERVICE_ROLE token or all")

    async def run() -> None:
        runtime = Runtime(settings)
        try:
            await runtime.start()
            assert runtime.token is not None  # the role serves token (above)
            await action(getattr(runtime.token, service))
        finally:
            await runtime.stop()

    try:
        asyncio.run(run())
    except ClientMetadataError as exc:
        raise SystemExit(f"iam: error: {exc.error}: {exc.description}") from None
    except (StoredClientError, InitialTokenError) as exc:
        raise SystemExit(f"iam: error: {exc}") from None


def _client_metadata(args: argparse.Namespace) -> dict[str, Any]:
    """`--metadata` (RFC 7591 JSON; `-` reads it from stdin), with the convenience options laid over it."""
    metadata: Any = {}
    if args.metadata is not None:
        text = sys.stdin.read() if args.metadata == "-" else args.metadata
        try:
            metadata = json.loads(text)
        except ValueError:
            raise SystemExit("iam: error: --metadata is not valid JSON") from None
        if not isinstance(metadata, dict):
            raise SystemExit("iam: error: --metadata must be a JSON object")
    for option, name in (("name", "client_name"), ("scope", "scope"), ("auth_method", "token_endpoint_auth_method")):
        if getattr(args, option, None) is not None:
            metadata[name] = getattr(args, option)
    for option, name in (("redirect_uri", "redirect_uris"), ("grant_type", "grant_types")):
        if getattr(args, option, None):
            metadata[name] = getattr(args, option)
    return metadata


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_clients_add(args: argparse.Namespace) -> None:
    from iam.token.client_metadata import parse_client_metadata
    from iam.token.stored_clients import new_client_id

    metadata = _client_metadata(args)
    client_id = args.client_id or metadata.pop("client_id", None) or new_client_id()

    async def add(stored_clients) -> None:
        config = parse_client_metadata(metadata, client_id=client_id)
        stored, secret = await stored_clients.create(config, actor="operator", enabled=not args.disabled)
        _print_json({**stored.describe(), **({"client_secret": secret} if secret else {})})
        if secret:
            print("iam: the client secret is shown this once; only its digest is kept", file=sys.stderr)

    _with_clients(args, add)


def cmd_clients_list(args: argparse.Namespace) -> None:
    from iam.token.stored_clients import StoredClient

    async def show(stored_clients) -> None:
        for stored in await stored_clients.list(after=args.after, limit=args.limit):
            state = "enabled" if stored.enabled else "disabled"
            if isinstance(stored, StoredClient):
                print(f"{stored.client_id}\t{state}\t{stored.config.token_endpoint_auth_method}\t"
                      f"{stored.config.client_name or '-'}")
            else:  # stored by a newer release, say: not served here
                print(f"{stored.client_id}\t{state}\tunreadable\t{stored.reason}")

    _with_clients(args, show)


def cmd_clients_show(args: argparse.Namespace) -> None:
    async def show(stored_clients) -> None:
        stored = await stored_clients.read(args.client_id)  # an unreadable one too, with why
        if stored is None:
            raise SystemExit(f"iam: error: no stored client {args.client_id!r}")
        _print_json({**stored.describe(), "etag": stored.etag})

    _with_clients(args, show)


def cmd_clients_update(args: argparse.Namespace) -> None:
    changes = _client_metadata(args)
    if args.enabled is not None:
        changes["enabled"] = args.enabled

    async def update(stored_clients) -> None:
        stored, secret = await stored_clients.patch(args.client_id, changes, if_match=args.if_match, actor="operator")
        _print_json({**stored.describe(), **({"client_secret": secret} if secret else {})})

    _with_clients(args, update)


def cmd_clients_rotate_secret(args: argparse.Namespace) -> None:
    grace = args.grace if args.grace is not None else _settings(args).client_secret_grace
    if grace < 0:
        raise SystemExit("iam: error: --grace: seconds, 0 or more")

    async def rotate(stored_clients) -> None:
        _, secret = await stored_clients.rotate_secret(args.client_id, grace=grace, actor="operator")
        print(secret)

    _with_clients(args, rotate)


def cmd_clients_delete(args: argparse.Namespace) -> None:
    async def remove(stored_clients) -> None:
        await stored_clients.delete(args.client_id, if_match=args.if_match, actor="operator")

    _with_clients(args, remove)


def cmd_clients_initial_token(args: argparse.Namespace) -> None:
    """An initial access token for dynamic client registration, over the administration API's code path."""
    request: dict[str, Any] = {"uses": args.uses}
    if args.ttl is not None:
        request["ttl"] = args.ttl
    for option, name in (("grant_type", "grant_types"), ("redirect_uri_pattern", "redirect_uri_patterns"),
                         ("auth_method", "token_endpoint_auth_methods")):
        if getattr(args, option):
            request[name] = getattr(args, option)
    if args.scope is not None:
        request["scope"] = args.scope

    async def issue(initial_tokens) -> None:
        value, token = await initial_tokens.issue_as_asked(request, actor="operator")
        _print_json({"token": value, **token.describe()})
        print("iam: the initial access token is shown this once; only its digest is kept", file=sys.stderr)

    _with_clients(args, issue, "initial_tokens")


def cmd_config_check(args: argparse.Namespace) -> None:
    settings = _settings(args)
    print(f"ok: role {settings.role.value}, issuer {settings.issuer}, {len(settings.clients)} clients")


# -- connectors ------------------------------------------------------------------------------------------
def cmd_connectors_list(args: argparse.Namespace) -> None:
    from iam.authn.connectors.registry import callback_uri

    settings = _settings(args)
    if not settings.connectors:
        print("no connectors configured")
    for connector in settings.connectors:
        callback = callback_uri(settings, connector.id) if connector.type == "oidc" else "-"
        print(f"{connector.id}\t{connector.type}\t{connector.name}\t{callback}")


def cmd_connectors_test(args: argparse.Namespace) -> int:
    """Run a connector's own checks (OIDC: discovery, JWKS; LDAP: service bind, a user search) against the
    real upstream; exit 1 if any fails."""
    from iam.authn.connectors.registry import build

    settings = _settings(args)
    config = next((c for c in settings.connectors if c.id == args.id), None)
    if config is None:
        known = ", ".join(c.id for c in settings.connectors) or "none"
        raise ConfigError(f"no connector {args.id!r} (configured: {known})")

    async def run() -> list:
        connector = build(config)
        try:
            return await connector.check()
        finally:
            await connector.close()

    checks = asyncio.run(run())
    for check in checks:
        detail = f": {check.detail}" if check.detail else ""
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.step}{detail}")
    failed = not checks or not all(check.ok for check in checks)
    print(f"connector {config.id}: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


# -- kubernetes ------------------------------------------------------------------------------------------
def cmd_kubectl_credential(args: argparse.Namespace) -> int:
    """The kubectl exec credential plugin: stdout carries only the ExecCredential (no logging is set up)."""
    from pathlib import Path

    from iam.kube.credential import Options, logout, main

    options = Options(issuer=args.issuer, client_id=args.client_id, scope=" ".join(args.scope.split()),
                      grant=args.grant, certificate_authority=args.certificate_authority,
                      cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None)
    return logout(options, sys.stderr) if args.logout else main(options)


def cmd_kube_apiserver_config(args: argparse.Namespace) -> None:
    from iam.kube import find_cluster
    from iam.kube.apiserver import render

    settings = _settings(args)
    cluster = find_cluster(settings, args.cluster)
    sys.stdout.write(render(settings, cluster, args.format, args.certificate_authority))


def cmd_kube_kubeconfig(args: argparse.Namespace) -> None:
    from iam.kube import find_cluster, kubeconfig

    settings = _settings(args)
    clusters = [find_cluster(settings, args.cluster)] if args.cluster else settings.kubernetes.clusters
    if not clusters:
        raise ConfigError("no Kubernetes clusters are configured (kubernetes.clusters)")
    if args.commands:
        print("\n".join(kubeconfig.commands(settings, args.user, clusters, args.command)))
    else:
        sys.stdout.write(kubeconfig.dump(kubeconfig.build(settings, args.user, clusters, args.command)))


def cmd_kube_selftest(args: argparse.Namespace) -> None:
    from iam.kube import find_cluster
    from iam.kube.selftest import Target, run

    settings = _settings(args)
    cluster = None
    if args.cluster or (len(settings.kubernetes.clusters) == 1 and not args.client_id):
        cluster = find_cluster(settings, args.cluster)
    target = Target(
        issuer=args.issuer or settings.issuer,
        client_id=args.client_id or (cluster.client_id if cluster else None),
        username_claim=cluster.username_claim if cluster else "email",
        groups_claim=cluster.groups_claim if cluster else "groups",
    )
    id_token = args.id_token
    if id_token == "-":
        id_token = sys.stdin.readline().strip()
    checks = run(target, certificate_authority=args.certificate_authority, id_token=id_token, out=sys.stdout)
    failed = sum(check.status == "FAIL" for check in checks)
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    if failed:
        raise SystemExit(1)


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
    serve.add_argument("--tls-cert", default=os.environ.get("IAM_TLS_CERT"),
                       help="serve https with this PEM certificate chain ($IAM_TLS_CERT)")
    serve.add_argument("--tls-key", default=os.environ.get("IAM_TLS_KEY"),
                       help="the certificate's PEM private key ($IAM_TLS_KEY)")
    serve.add_argument("--tls-client-ca", default=os.environ.get("IAM_TLS_CLIENT_CA"),
                       help="ask TLS clients for a certificate issued by a CA of this PEM file (mutual TLS, "
                            "RFC 8705; a self-signed client's certificate goes in it too) ($IAM_TLS_CLIENT_CA)")
    serve.add_argument("--tls-client-certs", choices=["optional", "required"],
                       default=os.environ.get("IAM_TLS_CLIENT_CERTS", "optional"),
                       help="with --tls-client-ca: accept connections without a client certificate (optional, "
                            "the default) or refuse them (required) ($IAM_TLS_CLIENT_CERTS)")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations to the role's store(s)")
    migrate.add_argument("--check", action="store_true",
                         help="apply nothing: say what would run and whether the running code stays compatible "
                              "(exit 1 if not)")
    migrate.set_defaults(func=cmd_migrate)

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
    add.add_argument("--send-verification", action="store_true",
                     help="mail the user a link that verifies the address (needs `mail` settings)")
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
    delete = users.add_parser("delete", help="delete a user, with its group memberships and its password")
    delete.add_argument("username")
    delete.set_defaults(func=cmd_users_delete)
    set_password = users.add_parser("set-password", help="set a user's password (prompted, or --password-stdin)")
    set_password.add_argument("username")
    set_password.add_argument("--password-stdin", action="store_true")
    set_password.set_defaults(func=cmd_users_set_password)
    sign_out = users.add_parser("sign-out", help="end a user's sessions and revoke their grants; they stay active")
    sign_out.add_argument("username")
    sign_out.set_defaults(func=cmd_users_sign_out)
    reset_mfa = users.add_parser("reset-mfa", help=(
        "remove a user's second factors, TOTP and passkeys (lost authenticators)"))
    reset_mfa.add_argument("username")
    reset_mfa.set_defaults(func=cmd_users_reset_mfa)

    tokens = sub.add_parser("tokens", help="token store maintenance").add_subparsers(dest="tokens", required=True)
    purge = tokens.add_parser("purge", help="delete expired tokens in bounded batches")
    purge.add_argument("--batch", type=int, default=1000)
    purge.set_defaults(func=cmd_tokens_purge)

    audit = sub.add_parser("audit", help="audit events kept in the stores (audit_store: true)")
    audit_list = audit.add_subparsers(dest="audit", required=True).add_parser(
        "list", help="the newest audit events of the role's store(s), newest first, as JSON lines")
    audit_list.add_argument("--event", help="only this event, e.g. login.failed")
    audit_list.add_argument("--actor", help="only this actor (a user id, or `operator`)")
    audit_list.add_argument("--since", help="only events at or after this ISO 8601 time (UTC unless stated)")
    audit_list.add_argument("--limit", type=int, default=100)
    audit_list.set_defaults(func=cmd_audit_list)

    clients = sub.add_parser("clients", help="stored clients (role token or all), and client helpers").add_subparsers(
        dest="clients", required=True)
    clients.add_parser(
        "hash-secret", help="read a client secret on stdin, print its argon2id hash for client_secret_hash"
    ).set_defaults(func=cmd_clients_hash_secret)

    def metadata_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--metadata", help="RFC 7591 client metadata as JSON (`-`: read it from stdin)")
        command.add_argument("--name", help="client_name")
        command.add_argument("--redirect-uri", action="append", help="a redirect URI (repeat for more)")
        command.add_argument("--grant-type", action="append", help="a grant type (repeat for more)")
        command.add_argument("--scope", help="the scopes it may be granted, space-separated")
        command.add_argument("--auth-method", help="token_endpoint_auth_method (`none`: a public client)")

    add_client = clients.add_parser("add", help="store a new client; prints it, with its secret this once")
    add_client.add_argument("--client-id", help="its client_id (default: a generated one)")
    add_client.add_argument("--disabled", action="store_true", help="create it disabled")
    metadata_options(add_client)
    add_client.set_defaults(func=cmd_clients_add)
    list_clients = clients.add_parser("list", help="list stored clients: id, state, auth method, name")
    list_clients.add_argument("--after", help="start after this client_id (the last of the previous page)")
    list_clients.add_argument("--limit", type=int, default=1000)
    list_clients.set_defaults(func=cmd_clients_list)
    show_client = clients.add_parser("show", help="print a stored client (its metadata, state and ETag)")
    show_client.add_argument("client_id")
    show_client.set_defaults(func=cmd_clients_show)
    update_client = clients.add_parser("update", help="change a stored client (a JSON merge patch of its metadata)")
    update_client.add_argument("client_id")
    update_client.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None)
    update_client.add_argument("--disable", dest="enabled", action="store_const", const=False)
    update_client.add_argument("--if-match", help="change it only at this ETag (see `show`)")
    metadata_options(update_client)
    update_client.set_defaults(func=cmd_clients_update)
    rotate = clients.add_parser("rotate-secret", help="print a new secret; the old one keeps working for --grace")
    rotate.add_argument("client_id")
    rotate.add_argument("--grace", type=int, help="seconds the old secret keeps working (default: "
                        "client_secret_grace)")
    rotate.set_defaults(func=cmd_clients_rotate_secret)
    delete_client = clients.add_parser("delete", help="delete a stored client; its tokens stop working")
    delete_client.add_argument("client_id")
    delete_client.add_argument("--if-match", help="delete it only at this ETag (see `show`)")
    delete_client.set_defaults(func=cmd_clients_delete)
    initial = clients.add_parser("initial-token", help="issue an initial access token for dynamic client "
                                 "registration (RFC 7591); prints it this once, with its id and expiry")
    initial.add_argument("--uses", type=int, default=1, help="registrations it allows (0: any number until it "
                         "expires; default 1)")
    initial.add_argument("--ttl", type=int, help="its lifetime, seconds (default 86400, at most 2592000)")
    initial.add_argument("--grant-type", action="append", help="a grant type its clients may have (repeat; "
                         "default: authorization_code, refresh_token)")
    initial.add_argument("--redirect-uri-pattern", action="append", help="a pattern its clients' redirect URIs "
                         "must match, `*` one run of letters, digits and - (repeat; default: none, any)")
    initial.add_argument("--scope", help="the scopes its clients may have besides openid, space-separated")
    initial.add_argument("--auth-method", action="append", help="a token_endpoint_auth_method its clients may use "
                         "(repeat; default: client_secret_basic, private_key_jwt, none)")
    initial.set_defaults(func=cmd_clients_initial_token)

    connectors = sub.add_parser("connectors", help="upstream identity connectors (OIDC, LDAP)").add_subparsers(
        dest="connectors", required=True)
    connectors.add_parser("list", help="list connectors: id, type, name, callback URL (register it upstream)"
                          ).set_defaults(func=cmd_connectors_list)
    test = connectors.add_parser("test", help="check a connector against its upstream; exit 1 on a failure")
    test.add_argument("id", help="the connector's id")
    test.set_defaults(func=cmd_connectors_test)

    config = sub.add_parser("config", help="configuration helpers").add_subparsers(dest="config_cmd", required=True)
    config.add_parser("check", help="validate the configuration").set_defaults(func=cmd_config_check)
    credential = sub.add_parser(
        "kubectl-credential", help="kubectl exec credential plugin: print an ExecCredential with an ID token",
        description="A kubectl exec credential plugin (client.authentication.k8s.io/v1): prints the cached "
        "ID token, refreshes it, or logs in (device flow, or a loopback redirect). Only the ExecCredential "
        "goes to stdout.")
    credential.add_argument("--issuer", required=True, help="the issuer URL, exactly as in the tokens' iss")
    credential.add_argument("--client-id", required=True, help="the public iam client for kubectl")
    credential.add_argument("--scope", default="openid email groups offline_access")
    credential.add_argument("--grant", choices=["device", "loopback"], default="device",
                            help="how to log in: device code (default) or a browser redirect to 127.0.0.1")
    credential.add_argument("--certificate-authority", metavar="PATH",
                            help="CA bundle to trust for the issuer")
    credential.add_argument("--cache-dir", metavar="DIR",
                            help="token cache (default: $XDG_CACHE_HOME/iam or ~/.kube/cache/iam)")
    credential.add_argument("--logout", action="store_true",
                            help="revoke the cached refresh token at the issuer and delete the cached tokens")
    credential.set_defaults(func=cmd_kubectl_credential, light=True)

    kube = sub.add_parser("kube", help="Kubernetes: kube-apiserver configuration, kubeconfigs, self-test")
    kube_sub = kube.add_subparsers(dest="kube", required=True)
    apiserver = kube_sub.add_parser("apiserver-config", help="print the kube-apiserver OIDC configuration")
    apiserver.add_argument("--cluster", help="a name from kubernetes.clusters (optional when there is one)")
    apiserver.add_argument("--format", choices=["structured", "flags"], default="structured",
                           help="structured: an AuthenticationConfiguration (default); flags: --oidc-* flags")
    apiserver.add_argument("--certificate-authority", metavar="PATH",
                           help="the issuer's CA, when kube-apiserver does not trust it already")
    apiserver.set_defaults(func=cmd_kube_apiserver_config, light=True)
    kubeconfig_cmd = kube_sub.add_parser("kubeconfig", help="print a kubeconfig that logs in with iam")
    kubeconfig_cmd.add_argument("--cluster", help="only this cluster (default: every configured cluster)")
    kubeconfig_cmd.add_argument("--user", help="a name for the kubeconfig's user entries")
    kubeconfig_cmd.add_argument("--command", default="iam", help="the plugin command (default: iam)")
    kubeconfig_cmd.add_argument("--commands", action="store_true",
                                help="print the equivalent `kubectl config` commands instead")
    kubeconfig_cmd.set_defaults(func=cmd_kube_kubeconfig, light=True)
    selftest = kube_sub.add_parser("selftest", help="check a running issuer as kube-apiserver will")
    selftest.add_argument("--issuer", help="the issuer URL (default: the configured issuer)")
    selftest.add_argument("--cluster", help="a name from kubernetes.clusters: client id and claims to check")
    selftest.add_argument("--client-id", help="the client id the ID token's aud must contain")
    selftest.add_argument("--certificate-authority", metavar="PATH", help="CA bundle to trust for the issuer")
    selftest.add_argument("--id-token", help="also check this ID token (`-`: read it from stdin)")
    selftest.set_defaults(func=cmd_kube_selftest, light=True)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from iam.observability import setup_logging

    setup_logging("warning")  # until a command loads its settings: JSON lines on stderr, audit events too
    # kubectl-credential (run at every kubectl call) and `iam kube`: no server imports, so they start fast.
    if getattr(args, "light", False):
        try:
            raise SystemExit(args.func(args))
        except ConfigError as exc:
            print(f"iam: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    from sqlalchemy.exc import DBAPIError

    from iam.app import StartupError
    from iam.errors import PasswordRejected, PeerRejected, PeerUnavailable
    from iam.keys import KeyRingError
    from iam.store import StoreError
    from iam.users.directory import DirectoryError

    try:
        status = args.func(args)
        if status:
            raise SystemExit(status)
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
