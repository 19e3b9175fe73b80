"""The credential store: password hashes, TOTP secrets and recovery codes, passkeys, SSO sessions, login
throttling, consents and sign-ins waiting at an upstream provider.

Owned by the authentication role alone. `AuthnStore` holds all of the role's SQL; the rules (argon2, session
expiry, the throttle's arithmetic, TOTP windows, sealing) live in the modules above it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from iam.audit_store import audit_table
from iam.store import doomed

metadata = MetaData()
audit_events = audit_table(metadata)  # with `audit_store: true` (iam/audit_store.py)

credentials = Table(
    "credentials",
    metadata,
    Column("subject", String(64), primary_key=True),  # the user's id in the user store
    Column("password_hash", String(255), nullable=False),  # argon2id, PHC string format
    Column("updated_at", Integer, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),  # SHA-256 of the cookie value
    Column("sid", String(64), nullable=False, unique=True),  # public session id (`sid` claim)
    Column("subject", String(64), nullable=False, index=True),
    Column("auth_time", Integer, nullable=False),
    Column("amr", String(255), nullable=False),
    Column("acr", String(255)),  # the upstream's, for a sign-in through a connector that trusts it
    Column("connector", String(64)),  # the connector the person signed in through (None: iam's own password)
    Column("created_at", Integer, nullable=False),
    Column("last_seen", Integer, nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),
    Column("revoked", Boolean, nullable=False, default=False),
)

totp = Table(
    "totp",
    metadata,
    Column("subject", String(64), primary_key=True),
    Column("secret", String(255), nullable=False),  # RFC 6238 shared secret, sealed with the data key (totp.py)
    Column("confirmed", Boolean, nullable=False, default=False),
    Column("last_step", Integer, nullable=False, default=0),  # a code is accepted once (RFC 6238 §5.2)
)

# TOTP recovery codes (iam/authn/totp.py): ten per confirmed factor, each a SHA-256 digest, deleted when used.
recovery_codes = Table(
    "recovery_codes",
    metadata,
    Column("subject", String(64), primary_key=True),
    Column("digest", LargeBinary(32), primary_key=True),
    Column("created_at", Integer, nullable=False),
)

# A password reset link (iam/authn/reset.py): the SHA-256 of its 256-bit token, for one user, used once.
password_resets = Table(
    "password_resets",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),
    Column("subject", String(64), nullable=False, index=True),
    Column("expires_at", Integer, nullable=False, index=True),
)

# A passkey (iam/authn/passkeys.py): a WebAuthn credential public key, as py_webauthn verified it at registration.
passkeys = Table(
    "passkeys",
    metadata,
    Column("id", String(32), primary_key=True),  # random: what the account page's forms name
    Column("subject", String(64), nullable=False, index=True),
    Column("credential_id", LargeBinary(1023), nullable=False, unique=True),  # WebAuthn §5.8.3: at most 1023 bytes
    Column("public_key", LargeBinary, nullable=False),  # COSE_Key, as the authenticator gave it
    Column("sign_count", BigInteger, nullable=False),  # a 32-bit unsigned counter (WebAuthn §6.1.1)
    Column("backup_eligible", Boolean, nullable=False),  # BE: fixed for the credential's life (WebAuthn L3 §6.1)
    Column("backup_state", Boolean, nullable=False),  # BS: as of its last use
    Column("transports", String(255), nullable=False),  # space-separated hints for allowCredentials
    Column("name", String(64), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("last_used_at", Integer),
)

# A WebAuthn challenge handed to one browser (iam/authn/passkeys.py): the SHA-256 of its 32 random bytes, for one
# purpose, bound to the session or sign-in that asked (`binding`), deleted by its first use, short-lived.
passkey_challenges = Table(
    "passkey_challenges",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),
    Column("purpose", String(16), nullable=False),
    Column("subject", String(64)),  # the user it is for; None for a sign-in with a passkey alone
    Column("binding", LargeBinary(32), nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),
)

login_failures = Table(
    "login_failures",
    metadata,
    Column("key", String(320), primary_key=True),  # "acct:<account>", "pair:<address> <account>", "addr:<address>"
    Column("failures", Integer, nullable=False),
    Column("window_start", Integer, nullable=False),
    Column("locked_until", Integer, nullable=False),
)

# What a person allowed a client that asks for consent (`require_consent`): the scopes, until they remove it.
consents = Table(
    "consents",
    metadata,
    Column("subject", String(64), primary_key=True),
    Column("client_id", String(128), primary_key=True),
    Column("scope", Text, nullable=False),
    Column("updated_at", Integer, nullable=False),
)

# A sign-in waiting at an upstream provider (iam/authn/connectors/pending.py): used once, for ≤ 10 minutes, only
# by the browser that started it (the digest of a random value in its HttpOnly cookie).
upstream_requests = Table(
    "upstream_requests",
    metadata,
    Column("state_digest", LargeBinary(32), primary_key=True),  # SHA-256 of the `state` sent upstream
    Column("browser_digest", LargeBinary(32), nullable=False),  # SHA-256 of the browser's cookie value
    Column("connector_id", String(64), nullable=False),
    Column("pending", Text, nullable=False),  # nonce and PKCE verifier (JSON), sealed with the data key when set
    Column("flow", Text, nullable=False),  # the iam sign-in to resume (JSON)
    Column("expires_at", Integer, nullable=False, index=True),
)


class AuthnStore:
    """The authentication role's SQL, one method per question or change; every write is one transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- passwords (iam/authn/credentials.py) ------------------------------------------------------------------
    async def password_hash(self, subject: str) -> str | None:
        async with self.engine.connect() as conn:
            hashed: str | None = (await conn.execute(
                select(credentials.c.password_hash).where(credentials.c.subject == subject))).scalar()
        return hashed

    async def set_password_hash(self, subject: str, password_hash: str, now: int) -> None:
        """The subject's password, added or replaced."""
        async with self.engine.begin() as conn:
            await _upsert(conn, credentials, [credentials.c.subject], {"subject": subject},
                          {"password_hash": password_hash, "updated_at": now})

    async def upgrade_password_hash(self, subject: str, password_hash: str) -> None:
        """The same password under a stronger hash: `updated_at` stays (the password did not change)."""
        async with self.engine.begin() as conn:
            await conn.execute(update(credentials).where(credentials.c.subject == subject)
                               .values(password_hash=password_hash))

    async def remove_credentials(self, subject: str) -> None:
        """Every credential of a subject (the password, any second factor), and their consents."""
        async with self.engine.begin() as conn:
            for table in (credentials, totp, recovery_codes, passkeys, password_resets, consents):
                await conn.execute(delete(table).where(table.c.subject == subject))

    # -- SSO sessions (iam/authn/sessions.py) -------------------------------------------------------------------
    async def add_session(self, digest: bytes, *, sid: str, subject: str, amr: str, acr: str | None,
                          connector: str | None, now: int, expires_at: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(sessions).values(
                digest=digest, sid=sid, subject=subject, auth_time=now, amr=amr, acr=acr, connector=connector,
                created_at=now, last_seen=now, expires_at=expires_at, revoked=False))

    async def find_session(self, digest: bytes) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(sessions).where(sessions.c.digest == digest))).first()

    async def touch_session(self, digest: bytes, now: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(sessions).where(sessions.c.digest == digest).values(last_seen=now))

    async def count_live_sessions(self, now: int, seen_after: int) -> int:
        async with self.engine.connect() as conn:
            count: int = (await conn.execute(
                select(func.count()).select_from(sessions)
                .where(sessions.c.revoked.is_(False), sessions.c.expires_at > now, sessions.c.last_seen > seen_after)
            )).scalar_one()
        return count

    async def revoke_session(self, *, digest: bytes | None = None, sid: str | None = None) -> list[Row[Any]]:
        """The session with this cookie digest, else the one with this `sid`; its (sid, subject) if it was not
        revoked yet."""
        return await self._revoke_sessions(sessions.c.digest == digest if digest is not None
                                           else sessions.c.sid == sid)

    async def revoke_sessions_of(self, subject: str, *, but: str | None = None) -> list[Row[Any]]:
        """Every session of a subject, but the one with sid `but` when given; (sid, subject) of each that was not
        revoked yet."""
        condition = sessions.c.subject == subject
        if but is not None:
            condition &= sessions.c.sid != but
        return await self._revoke_sessions(condition)

    async def _revoke_sessions(self, condition: ColumnElement[bool]) -> list[Row[Any]]:
        # One UPDATE ... RETURNING: of two concurrent logouts of a session, only one learns that it ended it.
        async with self.engine.begin() as conn:
            return list(await conn.execute(update(sessions).where(condition, sessions.c.revoked.is_(False))
                                           .values(revoked=True).returning(sessions.c.sid, sessions.c.subject)))

    async def purge_sessions(self, now: int, seen_before: int, batch: int) -> int:
        """Delete at most `batch` sessions revoked, expired at `now`, or last seen before `seen_before`."""
        ended = doomed(sessions.c.digest, sessions.c.revoked.is_(True) | (sessions.c.expires_at <= now)
                       | (sessions.c.last_seen < seen_before), batch=batch)
        async with self.engine.begin() as conn:
            deleted: int = (await conn.execute(delete(sessions).where(sessions.c.digest.in_(ended)))).rowcount
        return deleted

    # -- login throttling (iam/authn/throttle.py) ---------------------------------------------------------------
    async def failure_counts(self, keys: list[str]) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(select(login_failures).where(login_failures.c.key.in_(keys)))).all())

    async def count_failures(self, keys: list[str], counted: Callable[[str, Row[Any] | None], Mapping[str, int]]
                             ) -> None:
        """For each key, under a lock on its row, store `counted(key, row)` (the row as it was, or None)."""
        async with self.engine.begin() as conn:
            for key in keys:
                query = select(login_failures).where(login_failures.c.key == key)
                row = (await conn.execute(query.with_for_update())).first()
                await _upsert(conn, login_failures, [login_failures.c.key], {"key": key}, dict(counted(key, row)))

    async def forget_failures(self, key: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(login_failures).where(login_failures.c.key == key))

    async def purge_failures(self, now: int, window_start_before: int, batch: int) -> int:
        """Delete at most `batch` counters not locked at `now` whose window started before `window_start_before`."""
        stale = doomed(login_failures.c.key, login_failures.c.locked_until < now,
                       login_failures.c.window_start < window_start_before, batch=batch)
        async with self.engine.begin() as conn:
            deleted: int = (await conn.execute(delete(login_failures).where(login_failures.c.key.in_(stale)))).rowcount
        return deleted

    # -- TOTP (iam/authn/totp.py): secrets as stored, sealed or not ------------------------------------------
    async def totp_confirmed(self, subject: str) -> bool:
        async with self.engine.connect() as conn:
            return bool((await conn.execute(select(totp.c.confirmed).where(totp.c.subject == subject))).scalar())

    async def start_totp(self, subject: str, secret: str) -> bool:
        """A new unconfirmed secret, replacing an unconfirmed one. False when a confirmed factor (or a concurrent
        enrolment's secret) is there: nothing is written then."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(delete(totp).where(totp.c.subject == subject, totp.c.confirmed.is_(False)))
                await conn.execute(insert(totp).values(subject=subject, secret=secret, confirmed=False, last_step=0))
        except IntegrityError:
            return False
        return True

    async def totp_factor(self, subject: str, *, confirmed: bool) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(totp).where(totp.c.subject == subject, totp.c.confirmed.is_(confirmed)))).first()

    async def use_totp_step(self, subject: str, *, last_step: int, step: int, secret: str) -> bool:
        """Record `step` as the last one used (and the factor as confirmed, its secret as given), only if the last
        step is still `last_step`: of two requests with the same code, one wins."""
        async with self.engine.begin() as conn:
            won = await conn.execute(
                update(totp).where(totp.c.subject == subject, totp.c.last_step == last_step)
                .values(last_step=step, confirmed=True, secret=secret))
        return bool(won.rowcount == 1)

    async def remove_totp(self, subject: str) -> bool:
        """Whether there was a factor, confirmed or not; its recovery codes go with it."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(recovery_codes).where(recovery_codes.c.subject == subject))
            return bool((await conn.execute(delete(totp).where(totp.c.subject == subject))).rowcount > 0)

    async def remove_second_factors(self, subject: str) -> bool:
        """TOTP (with its recovery codes) and every passkey of a subject, in one transaction; whether there was any."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(recovery_codes).where(recovery_codes.c.subject == subject))
            removed = [(await conn.execute(delete(table).where(table.c.subject == subject))).rowcount
                       for table in (totp, passkeys)]
        return sum(removed) > 0

    async def replace_recovery_codes(self, subject: str, digests: list[bytes], now: int) -> None:
        """The subject's recovery codes are these, and only these, from now on."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(recovery_codes).where(recovery_codes.c.subject == subject))
            await conn.execute(insert(recovery_codes),
                               [{"subject": subject, "digest": d, "created_at": now} for d in digests])

    async def take_recovery_code(self, subject: str, digest: bytes) -> bool:
        """Remove the code; True for the one caller that removed it (single use)."""
        async with self.engine.begin() as conn:
            won = await conn.execute(delete(recovery_codes).where(recovery_codes.c.subject == subject,
                                                                  recovery_codes.c.digest == digest))
        return bool(won.rowcount == 1)

    async def count_recovery_codes(self, subject: str) -> int:
        async with self.engine.connect() as conn:
            count: int = (await conn.execute(select(func.count()).select_from(recovery_codes)
                                             .where(recovery_codes.c.subject == subject))).scalar_one()
        return count

    # -- passkeys (iam/authn/passkeys.py) -------------------------------------------------------------------------
    async def add_passkey(self, **values: Any) -> bool:
        """A new passkey; False when its credential id is registered already (to anyone): nothing is written."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(passkeys).values(**values))
        except IntegrityError:
            return False
        return True

    async def passkeys_of(self, subject: str) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(select(passkeys).where(passkeys.c.subject == subject)
                                            .order_by(passkeys.c.created_at, passkeys.c.id))).all())

    async def count_passkeys(self, subject: str) -> int:
        async with self.engine.connect() as conn:
            count: int = (await conn.execute(select(func.count()).select_from(passkeys)
                                             .where(passkeys.c.subject == subject))).scalar_one()
        return count

    async def passkey_by_credential_id(self, credential_id: bytes) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(passkeys).where(passkeys.c.credential_id == credential_id))).first()

    async def use_passkey(self, passkey_id: str, *, sign_count: int, new_sign_count: int, backup_state: bool,
                          now: int) -> bool:
        """Record a use (the authenticator's new counter and backup state), only if the counter is still
        `sign_count`: of two assertions racing with the same counter, one wins."""
        async with self.engine.begin() as conn:
            won = await conn.execute(
                update(passkeys).where(passkeys.c.id == passkey_id, passkeys.c.sign_count == sign_count)
                .values(sign_count=new_sign_count, backup_state=backup_state, last_used_at=now))
        return bool(won.rowcount == 1)

    async def rename_passkey(self, subject: str, passkey_id: str, name: str) -> bool:
        async with self.engine.begin() as conn:
            done = await conn.execute(update(passkeys).where(passkeys.c.subject == subject,
                                                             passkeys.c.id == passkey_id).values(name=name))
        return bool(done.rowcount == 1)

    async def remove_passkey(self, subject: str, passkey_id: str) -> bool:
        async with self.engine.begin() as conn:
            done = await conn.execute(delete(passkeys).where(passkeys.c.subject == subject,
                                                             passkeys.c.id == passkey_id))
        return bool(done.rowcount == 1)

    async def add_passkey_challenge(self, digest: bytes, *, purpose: str, subject: str | None, binding: bytes,
                                    expires_at: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(passkey_challenges).values(digest=digest, purpose=purpose, subject=subject,
                                                                 binding=binding, expires_at=expires_at))

    async def take_passkey_challenge(self, digest: bytes) -> Row[Any] | None:
        """Remove the challenge and return it, to the one caller that removed it (single use); else None."""
        async with self.engine.begin() as conn:
            return (await conn.execute(delete(passkey_challenges).where(passkey_challenges.c.digest == digest)
                                       .returning(passkey_challenges))).first()

    async def purge_passkey_challenges(self, now: int, batch: int) -> int:
        expired = select(passkey_challenges.c.digest).where(passkey_challenges.c.expires_at <= now).limit(batch)
        async with self.engine.begin() as conn:
            deleted: int = (await conn.execute(
                delete(passkey_challenges).where(passkey_challenges.c.digest.in_(expired)))).rowcount
        return deleted

    # -- password reset links (iam/authn/reset.py) ---------------------------------------------------------------
    async def add_password_reset(self, digest: bytes, subject: str, expires_at: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(password_resets).values(digest=digest, subject=subject, expires_at=expires_at))

    async def password_reset_subject(self, digest: bytes, now: int) -> str | None:
        """The user of the link with this digest, while it is unused and unexpired."""
        async with self.engine.connect() as conn:
            subject: str | None = (await conn.execute(select(password_resets.c.subject).where(
                password_resets.c.digest == digest, password_resets.c.expires_at > now))).scalar()
        return subject

    async def take_password_reset(self, digest: bytes, subject: str, now: int) -> bool:
        """Spend the link, and with it every other link of its user; True for the one caller that spent it."""
        async with self.engine.begin() as conn:
            won = await conn.execute(delete(password_resets).where(
                password_resets.c.digest == digest, password_resets.c.subject == subject,
                password_resets.c.expires_at > now))
            if won.rowcount != 1:
                return False
            await conn.execute(delete(password_resets).where(password_resets.c.subject == subject))
        return True

    async def purge_password_resets(self, now: int, batch: int) -> int:
        expired = select(password_resets.c.digest).where(password_resets.c.expires_at <= now).limit(batch)
        async with self.engine.begin() as conn:
            deleted: int = (await conn.execute(
                delete(password_resets).where(password_resets.c.digest.in_(expired)))).rowcount
        return deleted

    # -- consents (iam/authn/consent.py) ------------------------------------------------------------------------
    async def consented_scopes(self, subject: str, client_id: str) -> set[str]:
        async with self.engine.connect() as conn:
            scope = (await conn.execute(select(consents.c.scope).where(
                consents.c.subject == subject, consents.c.client_id == client_id))).scalar()
        return set(scope.split()) if scope else set()

    async def set_consent(self, subject: str, client_id: str, scopes: set[str], now: int) -> None:
        async with self.engine.begin() as conn:
            await _upsert(conn, consents, [consents.c.subject, consents.c.client_id],
                          {"subject": subject, "client_id": client_id},
                          {"scope": " ".join(sorted(scopes)), "updated_at": now})

    async def remove_consent(self, subject: str, client_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(consents).where(consents.c.subject == subject, consents.c.client_id == client_id))

    # -- sign-ins waiting upstream (iam/authn/connectors/pending.py) -------------------------------------------
    async def add_upstream_request(self, state_digest: bytes, *, browser_digest: bytes, connector_id: str,
                                   pending: str, flow: str, expires_at: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(upstream_requests).values(
                state_digest=state_digest, browser_digest=browser_digest, connector_id=connector_id,
                pending=pending, flow=flow, expires_at=expires_at))

    async def find_upstream_request(self, state_digest: bytes) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(upstream_requests).where(upstream_requests.c.state_digest == state_digest))).first()

    async def take_upstream_request(self, state_digest: bytes) -> bool:
        """Remove the request; True for the one caller that removed it (single use)."""
        async with self.engine.begin() as conn:
            won = await conn.execute(delete(upstream_requests).where(upstream_requests.c.state_digest == state_digest))
        return bool(won.rowcount == 1)

    async def purge_upstream_requests(self, now: int, batch: int) -> int:
        expired = select(upstream_requests.c.state_digest).where(upstream_requests.c.expires_at < now).limit(batch)
        async with self.engine.begin() as conn:
            deleted: int = (await conn.execute(
                delete(upstream_requests).where(upstream_requests.c.state_digest.in_(expired)))).rowcount
        return deleted


async def _upsert(conn: AsyncConnection, table: Table, key_columns: list[Column[Any]], key: dict[str, Any],
                  values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE: the row with `key` gets `values`, whether it existed or not."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    await conn.execute(dialect.insert(table).values(**key, **values)
                       .on_conflict_do_update(index_elements=key_columns, set_=values))
