"""The directory: users and groups, and the claims the other roles read from it.

The SCIM API, the `iam users` commands and the internal claims API all go through this module.
Passwords are handed to the authentication role (through `Credentials`) and never stored here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from iam.peers import Credentials, UserClaims
from iam.users.store import groups, memberships, users


class DirectoryError(Exception):
    """A request the directory refuses; `kind` maps to SCIM scimType / HTTP status at the API edge."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "uniqueness" | "not_found" | "invalid"


@dataclass(frozen=True)
class NewUser:
    user_name: str
    email: str | None = None
    email_verified: bool = False
    given_name: str | None = None
    family_name: str | None = None
    display_name: str | None = None
    external_id: str | None = None
    active: bool = True
    attributes: dict | None = None


def user_name_key(name: str) -> str:
    return name.casefold()


class Directory:
    def __init__(self, engine: AsyncEngine, credentials: Credentials, clock=time.time) -> None:
        self.engine = engine
        self.credentials = credentials
        self.clock = clock

    # -- users --------------------------------------------------------------------------------------------
    async def create_user(self, new: NewUser, *, password: str | None = None, group_names: tuple[str, ...] = ()) -> str:
        """Create a user; with a password, the credential is written first under the new id.

        A credential without a user row cannot log in (login starts at the directory), so a failure after
        it leaves nothing usable and nothing that blocks a retry; the orphan is removed on a best effort.
        """
        _check_user_name(new.user_name)
        if await self.find_id(new.user_name) is not None:
            raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken")
        user_id = str(uuid.uuid4())
        if password is not None:
            await self.credentials.set_password(user_id, password)
        now = int(self.clock())
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(users).values(
                        id=user_id,
                        user_name=new.user_name,
                        user_name_key=user_name_key(new.user_name),
                        external_id=new.external_id,
                        display_name=new.display_name,
                        given_name=new.given_name,
                        family_name=new.family_name,
                        email=new.email.lower() if new.email else None,
                        email_verified=new.email_verified,
                        active=new.active,
                        attributes=new.attributes or {},
                        version=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
                for name in group_names:
                    group_id = await self._ensure_group(conn, name, now)
                    await conn.execute(insert(memberships).values(group_id=group_id, user_id=user_id))
        except IntegrityError:
            if password is not None:
                await self.credentials.remove(user_id)
            raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken") from None
        except BaseException:
            if password is not None:
                await self.credentials.remove(user_id)
            raise
        return user_id

    async def find_id(self, user_name: str) -> str | None:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(select(users.c.id).where(users.c.user_name_key == user_name_key(user_name)))
            ).scalar()

    async def claims(self, sub: str) -> UserClaims | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.id == sub))).first()
            if row is None:
                return None
            names = (
                await conn.execute(
                    select(groups.c.display_name)
                    .join(memberships, memberships.c.group_id == groups.c.id)
                    .where(memberships.c.user_id == sub)
                    .order_by(groups.c.display_name)
                )
            ).scalars().all()
        full = row.display_name or " ".join(p for p in (row.given_name, row.family_name) if p) or None
        return UserClaims(
            sub=row.id,
            active=row.active,
            preferred_username=row.user_name,
            name=full,
            given_name=row.given_name,
            family_name=row.family_name,
            email=row.email,
            email_verified=bool(row.email and row.email_verified),
            groups=list(names),
            updated_at=row.updated_at,
        )

    async def find(self, username: str) -> UserClaims | None:
        user_id = await self.find_id(username)
        return None if user_id is None else await self.claims(user_id)

    async def list_users(self, offset: int = 0, limit: int = 100) -> list[UserClaims]:
        async with self.engine.connect() as conn:
            ids = (
                await conn.execute(select(users.c.id).order_by(users.c.user_name_key).offset(offset).limit(limit))
            ).scalars().all()
        return [claims for user_id in ids if (claims := await self.claims(user_id)) is not None]

    async def set_active(self, sub: str, active: bool) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users)
                .where(users.c.id == sub)
                .values(active=active, version=users.c.version + 1, updated_at=int(self.clock()))
            )
        if result.rowcount == 0:
            raise DirectoryError("not_found", f"no user {sub}")

    async def set_password(self, sub: str, password: str) -> None:
        if await self.claims(sub) is None:
            raise DirectoryError("not_found", f"no user {sub}")
        await self.credentials.set_password(sub, password)

    async def delete_user(self, sub: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(users).where(users.c.id == sub))
        if result.rowcount == 0:
            raise DirectoryError("not_found", f"no user {sub}")
        await self.credentials.remove(sub)

    async def count_users(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(users))).scalar_one()

    # -- groups -------------------------------------------------------------------------------------------
    async def add_to_group(self, sub: str, group_name: str) -> None:
        async with self.engine.begin() as conn:
            group_id = await self._ensure_group(conn, group_name, int(self.clock()))
            exists = (
                await conn.execute(
                    select(memberships.c.user_id).where(
                        memberships.c.group_id == group_id, memberships.c.user_id == sub
                    )
                )
            ).first()
            if not exists:
                await conn.execute(insert(memberships).values(group_id=group_id, user_id=sub))

    async def _ensure_group(self, conn, display_name: str, now: int) -> str:
        key = display_name.casefold()
        found = (await conn.execute(select(groups.c.id).where(groups.c.display_name_key == key))).scalar()
        if found:
            return found
        group_id = str(uuid.uuid4())
        await conn.execute(
            insert(groups).values(
                id=group_id, display_name=display_name, display_name_key=key, version=1, created_at=now, updated_at=now
            )
        )
        return group_id


def _check_user_name(name: str) -> None:
    if not name or len(name) > 255 or name != name.strip() or any(ord(c) < 0x20 for c in name):
        raise DirectoryError("invalid", "userName must be 1-255 printable characters without surrounding spaces")
