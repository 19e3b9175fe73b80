"""The token store: opaque tokens are kept only as SHA-256 digests, next to the JWT signed at issuance."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = MetaData()

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),  # SHA-256 of the opaque token
    Column("client_id", String(128), nullable=False, index=True),
    Column("subject", String(255), nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),  # epoch seconds
    Column("revoked", Boolean, nullable=False, default=False),
    Column("jwt", Text, nullable=False),  # the RFC 9068 JWT paired with the opaque token
)


@dataclass(frozen=True, slots=True)
class AccessTokenRow:
    digest: bytes
    client_id: str
    subject: str
    expires_at: int
    revoked: bool
    jwt: str


# Built once: the introspection hot path runs this statement and nothing else.
_FIND = select(
    access_tokens.c.client_id,
    access_tokens.c.subject,
    access_tokens.c.expires_at,
    access_tokens.c.revoked,
    access_tokens.c.jwt,
).where(access_tokens.c.digest == bindparam("digest"))


class TokenStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Single-statement reads run outside a transaction: no BEGIN/ROLLBACK round trips on the hot path.
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def add_access_token(self, row: AccessTokenRow) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(access_tokens).values(
                    digest=row.digest,
                    client_id=row.client_id,
                    subject=row.subject,
                    expires_at=row.expires_at,
                    revoked=row.revoked,
                    jwt=row.jwt,
                )
            )

    async def find_access_token(self, digest: bytes) -> AccessTokenRow | None:
        async with self.reader.connect() as conn:
            found = (await conn.execute(_FIND, {"digest": digest})).first()
        return None if found is None else AccessTokenRow(digest, *found)

    async def revoke_access_token(self, digest: bytes, client_id: str) -> bool:
        """Revoke a token only for the client it was issued to (RFC 7009 §2.1)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(access_tokens)
                .where(access_tokens.c.digest == digest, access_tokens.c.client_id == client_id)
                .values(revoked=True)
            )
        return result.rowcount > 0

    async def purge_expired(self, now: int, batch: int) -> int:
        """Delete at most `batch` expired rows: bounded work per call, so a backlog never locks the table."""
        async with self.engine.begin() as conn:
            doomed = select(access_tokens.c.digest).where(access_tokens.c.expires_at < now).limit(batch)
            result = await conn.execute(delete(access_tokens).where(access_tokens.c.digest.in_(doomed)))
        return result.rowcount
