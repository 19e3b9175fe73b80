"""The directory: users and groups, and the claims the other roles read from it.

The SCIM API, the `iam users` commands and the internal claims API all go through this module.
Passwords are handed to the authentication role (through `Credentials`) and never stored here.

Every change bumps the changed resource's `version` (the SCIM ETag) and `updated_at`; a change of group
membership bumps the group and the users whose `groups` attribute it changes. Changes are optimistic:
read, compute, then write only if the version read is still current (else re-read and recompute).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from iam.observability import audit
from iam.peers import Credentials, UserClaims
from iam.users.store import connector_groups, groups, memberships, user_emails, users

log = logging.getLogger("iam.users")

RETRIES = 5  # optimistic writes re-read and recompute this often under concurrent changes
CHUNK = 500  # ids per IN (...) list


class DirectoryError(Exception):
    """A request the directory refuses; `kind` maps to SCIM scimType / HTTP status at the API edge."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "uniqueness" | "not_found" | "invalid" | "precondition" | "conflict"


@dataclass(frozen=True)
class Email:
    value: str
    type: str | None = None
    primary: bool = False
    display: str | None = None


@dataclass(frozen=True)
class NewUser:
    user_name: str
    email: str | None = None  # shorthand for one primary address, used when `emails` is None
    email_verified: bool = False
    given_name: str | None = None
    family_name: str | None = None
    display_name: str | None = None
    external_id: str | None = None
    active: bool = True
    attributes: dict | None = None
    emails: tuple[Email, ...] | None = None

    def all_emails(self) -> tuple[Email, ...]:
        if self.emails is not None:
            return tuple(self.emails)
        return (Email(self.email, primary=True),) if self.email else ()


@dataclass(frozen=True)
class GroupRef:
    id: str
    display_name: str


@dataclass(frozen=True)
class User:
    """A stored user, as the SCIM API reads it."""

    id: str
    user_name: str
    external_id: str | None
    display_name: str | None
    given_name: str | None
    family_name: str | None
    email_verified: bool
    active: bool
    attributes: dict
    emails: tuple[Email, ...]
    groups: tuple[GroupRef, ...]
    version: int
    created_at: int
    updated_at: int

    @property
    def email(self) -> str | None:
        return primary_email(self.emails)


@dataclass(frozen=True)
class NewGroup:
    display_name: str
    external_id: str | None = None
    members: tuple[str, ...] = ()  # user ids


@dataclass(frozen=True)
class Member:
    id: str
    user_name: str
    display_name: str | None


@dataclass(frozen=True)
class Group:
    id: str
    display_name: str
    external_id: str | None
    members: tuple[Member, ...] | None  # None when not loaded
    version: int
    created_at: int
    updated_at: int


IfMatch = frozenset[int] | str | None  # None: no precondition; "*": any version; else the versions accepted


def user_name_key(name: str) -> str:
    return name.casefold()


def primary_email(emails: Sequence[Email]) -> str | None:
    """The address for claims and the `email` column: the primary one, else the first, lower-cased."""
    chosen = next((e for e in emails if e.primary), emails[0] if emails else None)
    return chosen.value.lower() if chosen else None


class Directory:
    def __init__(self, engine: AsyncEngine, credentials: Credentials, clock=time.time,
                 on_disabled: Sequence[Callable[[str], Awaitable[object]]] = ()) -> None:
        self.engine = engine
        self.credentials = credentials
        self.clock = clock
        # Called when a user is disabled or deleted: the token role revokes their grants and the
        # authentication role ends their sessions (ASVS 5 V7.4.2), so nothing issued before goes on working.
        self.on_disabled = list(on_disabled)

    async def _switched_off(self, sub: str, event: str) -> None:
        audit(event, actor=sub, user=sub)
        for hook in self.on_disabled:
            try:
                await hook(sub)
            except Exception as exc:  # refresh and sign-in re-read `active` anyway; say what could not be done
                log.warning("could not revoke the grants or sessions of %s: %s", sub, exc)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # -- users --------------------------------------------------------------------------------------------
    async def create_user(self, new: NewUser, *, password: str | None = None, group_names: tuple[str, ...] = ()) -> str:
        """Create a user; with a password, the credential is written first under the new id.

        A credential without a user row cannot log in (login starts at the directory), so a failure after
        it leaves nothing usable and nothing that blocks a retry; the orphan is removed on a best effort.
        """
        _check_user_name(new.user_name)
        emails = new.all_emails()
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
                        **_user_values(new, emails),
                        version=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
                await _write_emails(conn, user_id, emails, replace=False)
                for name in group_names:
                    group_id = await self._ensure_group(conn, name, now)
                    await conn.execute(insert(memberships).values(group_id=group_id, user_id=user_id))
                    await _bump(conn, groups, [group_id], now)
        except IntegrityError:
            if password is not None:
                await self._forget_credential(user_id)
            raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken") from None
        except BaseException:
            if password is not None:
                await self._forget_credential(user_id)
            raise
        audit("user.created", actor=user_id, user=user_id, groups=list(group_names))
        return user_id

    async def _forget_credential(self, sub: str) -> None:
        try:
            await self.credentials.remove(sub)
        except Exception as exc:  # an orphan credential cannot log in: log it, keep the original error
            log.warning("could not remove the credential of %s: %s", sub, exc)

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
            scim_groups = (
                select(groups.c.display_name.label("name"))
                .join(memberships, memberships.c.group_id == groups.c.id)
                .where(memberships.c.user_id == sub)
            )
            from_connectors = select(connector_groups.c.name).where(connector_groups.c.user_id == sub)
            names = sorted(set((await conn.execute(scim_groups.union_all(from_connectors))).scalars().all()))
        formatted = ((row.attributes or {}).get("name") or {}).get("formatted")  # SCIM name.formatted
        full = row.display_name or formatted or " ".join(p for p in (row.given_name, row.family_name) if p) or None
        return UserClaims(
            sub=row.id,
            active=row.active,
            preferred_username=row.user_name,
            name=full,
            given_name=row.given_name,
            family_name=row.family_name,
            email=row.email,
            email_verified=bool(row.email and row.email_verified),
            groups=names,  # SCIM groups and the groups connectors report (iam/users/upstream.py)
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

    async def get_user(self, sub: str) -> User | None:
        async with self.engine.connect() as conn:
            found = await _load_users(conn, [sub])
        return found[0] if found else None

    async def query_users(self, where=None, order_by=None, *, descending: bool = False, offset: int = 0,
                          limit: int = 100) -> tuple[int, list[User]]:
        """Users matching `where` (a SQL condition over the users table), and how many match in all."""
        async with self.engine.connect() as conn:
            counting = select(func.count()).select_from(users)
            total = (await conn.execute(counting if where is None else counting.where(where))).scalar_one()
            if limit <= 0 or offset >= total:
                return total, []
            page = select(users.c.id).order_by(*_ordering(order_by, descending, users.c.created_at, users.c.id))
            if where is not None:
                page = page.where(where)
            ids = (await conn.execute(page.offset(offset).limit(limit))).scalars().all()
            return total, await _load_users(conn, ids)

    async def modify_user(self, sub: str, change: Callable[[User], tuple[NewUser, str | None]], *,
                          if_match: IfMatch = None) -> User:
        """Replace a user with what `change(current)` computes; `change` raises to refuse (nothing written).

        A new password (the second item) goes to the credential store first: if that fails, nothing else
        changed. The row is then written only if nobody changed it meanwhile; else the change is recomputed.
        """
        for _ in range(RETRIES):
            current = await self.get_user(sub)
            if current is None:
                raise DirectoryError("not_found", f"no user {sub}")
            _check_precondition(if_match, current.version)
            new, password = change(current)
            _check_user_name(new.user_name)
            if user_name_key(new.user_name) != user_name_key(current.user_name):
                other = await self.find_id(new.user_name)
                if other is not None and other != sub:
                    raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken")
            if password is not None:
                await self.credentials.set_password(sub, password)
            if await self._update_user(current, new):
                updated = await self.get_user(sub)
                if updated is None:
                    raise DirectoryError("not_found", f"no user {sub}")
                audit("user.changed", actor=sub, user=sub)
                if current.active and not updated.active:
                    await self._switched_off(sub, "user.disabled")
                return updated
        raise DirectoryError("conflict", "the user changed concurrently too often; retry")

    async def _update_user(self, current: User, new: NewUser) -> bool:
        emails = new.all_emails()
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    update(users)
                    .where(users.c.id == current.id, users.c.version == current.version)
                    .values(**_user_values(new, emails), version=current.version + 1, updated_at=int(self.clock()))
                )
                if result.rowcount == 0:
                    return False
                if emails != current.emails:
                    await _write_emails(conn, current.id, emails, replace=True)
        except IntegrityError:
            raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken") from None
        return True

    async def set_active(self, sub: str, active: bool) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users)
                .where(users.c.id == sub)
                .values(active=active, version=users.c.version + 1, updated_at=int(self.clock()))
            )
        if result.rowcount == 0:
            raise DirectoryError("not_found", f"no user {sub}")
        if not active:
            await self._switched_off(sub, "user.disabled")
        else:
            audit("user.changed", actor=sub, user=sub, active=True)

    async def set_password(self, sub: str, password: str) -> None:
        if await self.claims(sub) is None:
            raise DirectoryError("not_found", f"no user {sub}")
        await self.credentials.set_password(sub, password)

    async def sign_out_everywhere(self, sub: str) -> None:
        """End every session and revoke every grant of a user who stays active (a suspected compromise, a lost
        device). Unlike disabling, nothing else would stop what was issued, so a hook that fails is an error."""
        if await self.claims(sub) is None:
            raise DirectoryError("not_found", f"no user {sub}")
        for hook in self.on_disabled:
            await hook(sub)
        audit("user.signed_out", actor="operator", user=sub)

    async def reset_second_factor(self, sub: str) -> bool:
        """An operator removes a user's second factor (a lost authenticator): the password alone signs in again,
        and the user can enrol a new authenticator."""
        if await self.claims(sub) is None:
            raise DirectoryError("not_found", f"no user {sub}")
        removed = await self.credentials.reset_second_factor(sub)
        if removed:
            audit("mfa.reset", actor="operator", user=sub)
        return removed

    async def delete_user(self, sub: str, *, if_match: IfMatch = None) -> None:
        """Delete a user: its credential first (a peer outage then changes nothing), then the row."""
        current = await self.get_user(sub)
        if current is None:
            raise DirectoryError("not_found", f"no user {sub}")
        _check_precondition(if_match, current.version)
        await self.credentials.remove(sub)
        now = int(self.clock())
        async with self.engine.begin() as conn:
            group_ids = (
                await conn.execute(select(memberships.c.group_id).where(memberships.c.user_id == sub))
            ).scalars().all()
            condition = users.c.id == sub
            if if_match is not None and if_match != "*":
                condition = condition & (users.c.version == current.version)
            result = await conn.execute(delete(users).where(condition))
            if result.rowcount == 0:
                raise DirectoryError("precondition" if if_match else "not_found", f"no user {sub} at that version")
            await _bump(conn, groups, group_ids, now)
        await self._switched_off(sub, "user.deleted")

    async def count_users(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(users))).scalar_one()

    # -- groups -------------------------------------------------------------------------------------------
    async def add_to_group(self, sub: str, group_name: str) -> None:
        now = int(self.clock())
        async with self.engine.begin() as conn:
            group_id = await self._ensure_group(conn, group_name, now)
            exists = (
                await conn.execute(
                    select(memberships.c.user_id).where(
                        memberships.c.group_id == group_id, memberships.c.user_id == sub
                    )
                )
            ).first()
            if not exists:
                await conn.execute(insert(memberships).values(group_id=group_id, user_id=sub))
                await _bump(conn, groups, [group_id], now)
                await _bump(conn, users, [sub], now)

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

    async def find_group_id(self, display_name: str) -> str | None:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(select(groups.c.id).where(groups.c.display_name_key == display_name.casefold()))
            ).scalar()

    async def create_group(self, new: NewGroup) -> str:
        _check_display_name(new.display_name)
        if await self.find_group_id(new.display_name) is not None:
            raise DirectoryError("uniqueness", f"displayName {new.display_name!r} is already taken")
        group_id = str(uuid.uuid4())
        members = _unique(new.members)
        now = int(self.clock())
        try:
            async with self.engine.begin() as conn:
                await _check_members(conn, members)
                await conn.execute(
                    insert(groups).values(
                        id=group_id, display_name=new.display_name, display_name_key=new.display_name.casefold(),
                        external_id=new.external_id, version=1, created_at=now, updated_at=now,
                    )
                )
                await _add_members(conn, group_id, members)
                await _bump(conn, users, members, now)
        except IntegrityError:
            raise await self._group_conflict(new.display_name, group_id) from None
        return group_id

    async def _group_conflict(self, display_name: str, group_id: str) -> DirectoryError:
        if await self.find_group_id(display_name) not in (None, group_id):
            return DirectoryError("uniqueness", f"displayName {display_name!r} is already taken")
        return DirectoryError("invalid", "members: a member user was deleted meanwhile")

    async def get_group(self, group_id: str, *, members: bool = True) -> Group | None:
        async with self.engine.connect() as conn:
            found = await _load_groups(conn, [group_id], members)
        return found[0] if found else None

    async def query_groups(self, where=None, order_by=None, *, descending: bool = False, offset: int = 0,
                           limit: int = 100, members: bool = True) -> tuple[int, list[Group]]:
        async with self.engine.connect() as conn:
            counting = select(func.count()).select_from(groups)
            total = (await conn.execute(counting if where is None else counting.where(where))).scalar_one()
            if limit <= 0 or offset >= total:
                return total, []
            page = select(groups.c.id).order_by(*_ordering(order_by, descending, groups.c.created_at, groups.c.id))
            if where is not None:
                page = page.where(where)
            ids = (await conn.execute(page.offset(offset).limit(limit))).scalars().all()
            return total, await _load_groups(conn, ids, members)

    async def modify_group(self, group_id: str, change: Callable[[Group], NewGroup], *,
                           if_match: IfMatch = None) -> Group:
        for _ in range(RETRIES):
            current = await self.get_group(group_id)
            if current is None:
                raise DirectoryError("not_found", f"no group {group_id}")
            _check_precondition(if_match, current.version)
            new = change(current)
            _check_display_name(new.display_name)
            if new.display_name.casefold() != current.display_name.casefold():
                other = await self.find_group_id(new.display_name)
                if other is not None and other != group_id:
                    raise DirectoryError("uniqueness", f"displayName {new.display_name!r} is already taken")
            if await self._update_group(current, new):
                updated = await self.get_group(group_id)
                if updated is None:
                    raise DirectoryError("not_found", f"no group {group_id}")
                return updated
        raise DirectoryError("conflict", "the group changed concurrently too often; retry")

    async def _update_group(self, current: Group, new: NewGroup) -> bool:
        old = [m.id for m in current.members or ()]
        wanted = _unique(new.members)
        old_set, wanted_set = set(old), set(wanted)
        added = [m for m in wanted if m not in old_set]
        removed = [m for m in old if m not in wanted_set]
        now = int(self.clock())
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    update(groups)
                    .where(groups.c.id == current.id, groups.c.version == current.version)
                    .values(display_name=new.display_name, display_name_key=new.display_name.casefold(),
                            external_id=new.external_id, version=current.version + 1, updated_at=now)
                )
                if result.rowcount == 0:
                    return False
                await _check_members(conn, added)
                for chunk in _chunks(removed):
                    await conn.execute(
                        delete(memberships).where(
                            memberships.c.group_id == current.id, memberships.c.user_id.in_(chunk)
                        )
                    )
                await _add_members(conn, current.id, added)
                # The members' `groups` attribute shows the group's name: a rename changes every member.
                renamed = new.display_name != current.display_name
                await _bump(conn, users, wanted + removed if renamed else added + removed, now)
        except IntegrityError:
            raise await self._group_conflict(new.display_name, current.id) from None
        return True

    async def delete_group(self, group_id: str, *, if_match: IfMatch = None) -> None:
        current = await self.get_group(group_id, members=False)
        if current is None:
            raise DirectoryError("not_found", f"no group {group_id}")
        _check_precondition(if_match, current.version)
        now = int(self.clock())
        async with self.engine.begin() as conn:
            member_ids = (
                await conn.execute(select(memberships.c.user_id).where(memberships.c.group_id == group_id))
            ).scalars().all()
            condition = groups.c.id == group_id
            if if_match is not None and if_match != "*":
                condition = condition & (groups.c.version == current.version)
            result = await conn.execute(delete(groups).where(condition))
            if result.rowcount == 0:
                raise DirectoryError(
                    "precondition" if if_match else "not_found", f"no group {group_id} at that version"
                )
            await _bump(conn, users, member_ids, now)


# -- helpers ----------------------------------------------------------------------------------------------
def _user_values(new: NewUser, emails: tuple[Email, ...]) -> dict:
    return {
        "user_name": new.user_name,
        "user_name_key": user_name_key(new.user_name),
        "external_id": new.external_id,
        "display_name": new.display_name,
        "given_name": new.given_name,
        "family_name": new.family_name,
        "email": primary_email(emails),
        "email_verified": new.email_verified,
        "active": new.active,
        "attributes": new.attributes or {},
    }


async def _write_emails(conn, user_id: str, emails: Sequence[Email], *, replace: bool) -> None:
    if replace:
        await conn.execute(delete(user_emails).where(user_emails.c.user_id == user_id))
    if emails:
        await conn.execute(
            insert(user_emails),
            [
                {"user_id": user_id, "position": i, "value": e.value, "value_key": e.value.lower(), "type": e.type,
                 "is_primary": e.primary, "display": e.display}
                for i, e in enumerate(emails)
            ],
        )


async def _load_users(conn, ids: Sequence[str]) -> list[User]:
    if not ids:
        return []
    rows = {r.id: r for r in (await conn.execute(select(users).where(users.c.id.in_(ids)))).all()}
    emails: dict[str, list[Email]] = {}
    for r in (
        await conn.execute(
            select(user_emails).where(user_emails.c.user_id.in_(ids)).order_by(user_emails.c.user_id,
                                                                              user_emails.c.position)
        )
    ).all():
        emails.setdefault(r.user_id, []).append(Email(r.value, r.type, bool(r.is_primary), r.display))
    refs: dict[str, list[GroupRef]] = {}
    for r in (
        await conn.execute(
            select(memberships.c.user_id, groups.c.id, groups.c.display_name)
            .join(groups, groups.c.id == memberships.c.group_id)
            .where(memberships.c.user_id.in_(ids))
            .order_by(groups.c.display_name_key)
        )
    ).all():
        refs.setdefault(r.user_id, []).append(GroupRef(r.id, r.display_name))
    return [
        User(
            id=row.id,
            user_name=row.user_name,
            external_id=row.external_id,
            display_name=row.display_name,
            given_name=row.given_name,
            family_name=row.family_name,
            email_verified=bool(row.email_verified),
            active=bool(row.active),
            attributes=dict(row.attributes or {}),
            emails=tuple(emails.get(row.id, ())),
            groups=tuple(refs.get(row.id, ())),
            version=row.version,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for user_id in ids
        if (row := rows.get(user_id)) is not None
    ]


async def _load_groups(conn, ids: Sequence[str], with_members: bool) -> list[Group]:
    if not ids:
        return []
    rows = {r.id: r for r in (await conn.execute(select(groups).where(groups.c.id.in_(ids)))).all()}
    members: dict[str, list[Member]] = {}
    if with_members:
        for r in (
            await conn.execute(
                select(memberships.c.group_id, users.c.id, users.c.user_name, users.c.display_name)
                .join(users, users.c.id == memberships.c.user_id)
                .where(memberships.c.group_id.in_(ids))
                .order_by(users.c.user_name_key)
            )
        ).all():
            members.setdefault(r.group_id, []).append(Member(r.id, r.user_name, r.display_name))
    return [
        Group(
            id=row.id,
            display_name=row.display_name,
            external_id=row.external_id,
            members=tuple(members.get(row.id, ())) if with_members else None,
            version=row.version,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for group_id in ids
        if (row := rows.get(group_id)) is not None
    ]


async def _check_members(conn, ids: Sequence[str]) -> None:
    for chunk in _chunks(ids):
        found = set((await conn.execute(select(users.c.id).where(users.c.id.in_(chunk)))).scalars().all())
        missing = [i for i in chunk if i not in found]
        if missing:
            raise DirectoryError("invalid", f"members: no user with id {missing[0]!r}")


async def _add_members(conn, group_id: str, ids: Sequence[str]) -> None:
    if ids:
        await conn.execute(insert(memberships), [{"group_id": group_id, "user_id": i} for i in ids])


async def _bump(conn, table, ids: Iterable[str], now: int) -> None:
    for chunk in _chunks(sorted(set(ids))):
        await conn.execute(
            update(table).where(table.c.id.in_(chunk)).values(version=table.c.version + 1, updated_at=now)
        )


def _ordering(column, descending: bool, *tiebreak) -> list:
    if column is None:
        return list(tiebreak)
    missing = case((column.is_(None), 1), else_=0)  # RFC 7644 §3.4.2.3: no value sorts last when ascending
    if descending:
        return [missing.desc(), column.desc(), *tiebreak]
    return [missing, column, *tiebreak]


def _chunks(items: Sequence[str]) -> Iterable[list[str]]:
    items = list(items)
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _check_precondition(if_match: IfMatch, version: int) -> None:
    if if_match is None or if_match == "*":
        return
    if version not in if_match:
        raise DirectoryError("precondition", f"the resource is at version {version}, not the one in If-Match")


def _printable(name: str) -> bool:
    return bool(name) and len(name) <= 255 and name == name.strip() and not any(ord(c) < 0x20 for c in name)


def _check_user_name(name: str) -> None:
    if not _printable(name):
        raise DirectoryError("invalid", "userName must be 1-255 printable characters without surrounding spaces")


def _check_display_name(name: str) -> None:
    if not _printable(name):
        raise DirectoryError("invalid", "displayName must be 1-255 printable characters without surrounding spaces")
