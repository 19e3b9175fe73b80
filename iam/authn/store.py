"""The credential store: password hashes, TOTP secrets, SSO sessions, login throttling, and consents.

Owned by the authentication role alone.
"""

import time

from sqlalchemy import Boolean, Column, Integer, LargeBinary, MetaData, String, Table, Text, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from iam.audit_store import audit_table

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

class Consents:
    """What each person allowed each client that asks for consent (iam/authn/consent.py shows the page)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def scopes(self, subject: str, client_id: str) -> set[str]:
        async with self.engine.connect() as conn:
            scope = (await conn.execute(select(consents.c.scope).where(
                consents.c.subject == subject, consents.c.client_id == client_id))).scalar()
        return set(scope.split()) if scope else set()

    async def allow(self, subject: str, client_id: str, scopes: set[str]) -> set[str]:
        """Add scopes to what the person allowed the client; returns everything allowed now."""
        allowed = await self.scopes(subject, client_id) | scopes
        values = {"scope": " ".join(sorted(allowed)), "updated_at": int(time.time())}
        async with self.engine.begin() as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            await conn.execute(dialect.insert(consents).values(subject=subject, client_id=client_id, **values)
                               .on_conflict_do_update(index_elements=[consents.c.subject, consents.c.client_id],
                                                      set_=values))
        return allowed

    async def remove(self, subject: str, client_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(consents).where(consents.c.subject == subject, consents.c.client_id == client_id))
