"""The user store: the directory of users and groups, owned by the user-management role alone.

Passwords are never here: they live in the authentication role's credential store.

`UserStore` holds all of the role's SQL, and the records it reads and writes; the rules (SCIM semantics,
preconditions, optimistic retries, just-in-time users) live above it, in iam/users/directory.py and
iam/users/upstream.py. A write that a concurrent one made impossible raises sqlalchemy's IntegrityError (a
unique key taken, a member deleted meanwhile); the rules above decide what that means.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from iam.audit_store import audit_table

metadata = MetaData()
audit_events = audit_table(metadata)  # with `audit_store: true` (iam/audit_store.py)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),  # stable subject identifier (`sub`), a UUID
    Column("user_name", String(255), nullable=False),
    Column("user_name_key", String(255), nullable=False, unique=True),  # casefolded: SCIM userName is caseExact=false
    Column("external_id", String(255)),
    Column("display_name", String(255)),
    Column("given_name", String(255)),
    Column("family_name", String(255)),
    Column("email", String(320)),  # the primary address, lower-cased, for claims and filters
    Column("email_verified", Boolean, nullable=False, default=False),
    Column("active", Boolean, nullable=False, default=True),
    # The rest of the SCIM resource (name.formatted, nickName, phoneNumbers, ...); never a password.
    Column("attributes", JSON, nullable=False, default=dict),
    Column("version", Integer, nullable=False, default=1),  # ETag source
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)
Index("ix_users_email", users.c.email)

# SCIM `emails` (multi-valued), one row per address so filters like `emails[type eq "work"]` are SQL.
user_emails = Table(
    "user_emails",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),  # the order the client gave
    Column("value", String(320), nullable=False),
    Column("value_key", String(320), nullable=False),  # lower-cased: emails.value is caseExact=false
    Column("type", String(64)),
    Column("is_primary", Boolean, nullable=False, default=False),
    Column("display", String(255)),
)
Index("ix_user_emails_value_key", user_emails.c.value_key)

groups = Table(
    "groups",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("display_name", String(255), nullable=False),
    Column("display_name_key", String(255), nullable=False, unique=True),
    Column("external_id", String(255)),
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)

memberships = Table(
    "memberships",
    metadata,
    Column("group_id", String(64), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)
Index("ix_memberships_user_id", memberships.c.user_id)

# People who sign in through an upstream connector (iam/users/upstream.py): (connector id, upstream subject) is
# the identity, stable across email and username changes. One link per user and connector.
upstream_links = Table(
    "upstream_links",
    metadata,
    Column("connector_id", String(64), primary_key=True),
    Column("subject", String(255), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("provisioned", Boolean, nullable=False),  # true: the connector created the user (it owns the profile)
    Column("created_at", Integer, nullable=False),
    Column("last_sign_in", Integer, nullable=False),
    UniqueConstraint("connector_id", "user_id", name="uq_upstream_links_connector_user"),
)
Index("ix_upstream_links_user_id", upstream_links.c.user_id)

# Groups a connector says a user is in, refreshed at each upstream sign-in; apart from SCIM groups (which SCIM
# alone manages), both appear in the `groups` claim.
connector_groups = Table(
    "connector_groups",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("connector_id", String(64), primary_key=True),
    Column("name", String(255), primary_key=True),
)


CHUNK = 500  # ids per IN (...) list


# -- the records --------------------------------------------------------------------------------------------------
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


class UnknownMember(Exception):
    """A group change names a user id that is not in the store; nothing was written."""

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id)
        self.user_id = user_id


def user_name_key(name: str) -> str:
    """The unique key of a userName: SCIM userName is caseExact=false."""
    return name.casefold()


def primary_email(emails: Sequence[Email]) -> str | None:
    """The address for claims and the `email` column: the primary one, else the first, lower-cased."""
    chosen = next((e for e in emails if e.primary), emails[0] if emails else None)
    return chosen.value.lower() if chosen else None


# -- the SQL ------------------------------------------------------------------------------------------------------
class UserStore:
    """The user-management role's SQL, one method per question or change; every write is one transaction, and a
    change of a user or group bumps its `version` (the SCIM ETag) and `updated_at`, and those of the resources
    whose attributes it changes (a membership shows on both sides)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # -- users ----------------------------------------------------------------------------------------------------
    async def add_user(self, user_id: str, new: NewUser, now: int, group_names: tuple[str, ...] = ()) -> None:
        """A new user, in the groups named (created when missing)."""
        emails = new.all_emails()
        async with self.engine.begin() as conn:
            await conn.execute(insert(users).values(id=user_id, **_user_values(new, emails), version=1,
                                                    created_at=now, updated_at=now))
            await _write_emails(conn, user_id, emails, replace=False)
            for name in group_names:
                group_id = await _ensure_group(conn, name, now)
                await conn.execute(insert(memberships).values(group_id=group_id, user_id=user_id))
                await _bump(conn, groups, [group_id], now)

    async def find_user_id(self, user_name: str) -> str | None:
        """The id of the user with this userName (compared case-insensitively)."""
        async with self.engine.connect() as conn:
            found: str | None = (await conn.execute(
                select(users.c.id).where(users.c.user_name_key == user_name_key(user_name)))).scalar()
        return found

    async def user_row(self, sub: str) -> tuple[Row[Any], list[str]] | None:
        """A user's row and the names of all their groups (SCIM groups and the groups connectors report), sorted."""
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
        return row, names

    async def user_ids(self, offset: int, limit: int) -> list[str]:
        """A page of user ids in userName order."""
        async with self.engine.connect() as conn:
            return list((await conn.execute(
                select(users.c.id).order_by(users.c.user_name_key).offset(offset).limit(limit))).scalars().all())

    async def users_by_id(self, ids: Sequence[str]) -> list[User]:
        """The users with these ids that exist, in the order given."""
        async with self.engine.connect() as conn:
            return await _load_users(conn, ids)

    async def query_users(self, where: ColumnElement[bool] | None, order_by: Any, *, descending: bool,
                          offset: int, limit: int) -> tuple[int, list[User]]:
        """Users matching `where` (a SQL condition over the users table, iam/users/scim/filter.py), and how many
        match in all."""
        async with self.engine.connect() as conn:
            total, ids = await _page(conn, users, where, order_by, descending, offset, limit)
            return total, await _load_users(conn, ids)

    async def update_user(self, current: User, new: NewUser, now: int) -> bool:
        """Replace a user, only if it is still at `current.version`; False if someone changed it meanwhile."""
        emails = new.all_emails()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users)
                .where(users.c.id == current.id, users.c.version == current.version)
                .values(**_user_values(new, emails), version=current.version + 1, updated_at=now)
            )
            if result.rowcount == 0:
                return False
            if emails != current.emails:
                await _write_emails(conn, current.id, emails, replace=True)
        return True

    async def set_active(self, sub: str, active: bool, now: int) -> bool:
        """False if there is no such user."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users).where(users.c.id == sub)
                .values(active=active, version=users.c.version + 1, updated_at=now)
            )
        return bool(result.rowcount)

    async def confirm_email(self, sub: str, email: str, now: int) -> bool:
        """Mark the user's primary address verified, only while it is still `email`; whether it was."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users).where(users.c.id == sub, users.c.email == email, users.c.active.is_(True))
                .values(email_verified=True, version=users.c.version + 1, updated_at=now)
            )
        return bool(result.rowcount)

    async def delete_user(self, sub: str, version: int | None, now: int) -> bool:
        """Delete a user (at `version`, when given) and bump their groups; False if no such user (at it)."""
        return await self._delete(users, sub, version, now)

    async def count_users(self) -> int:
        async with self.engine.connect() as conn:
            count: int = (await conn.execute(select(func.count()).select_from(users))).scalar_one()
        return count

    # -- groups ---------------------------------------------------------------------------------------------------
    async def add_membership(self, sub: str, group_name: str, now: int) -> None:
        """Put a user in the group of this name (created when missing), unless they are in it."""
        async with self.engine.begin() as conn:
            group_id = await _ensure_group(conn, group_name, now)
            exists = (await conn.execute(select(memberships.c.user_id).where(
                memberships.c.group_id == group_id, memberships.c.user_id == sub))).first()
            if not exists:
                await conn.execute(insert(memberships).values(group_id=group_id, user_id=sub))
                await _bump(conn, groups, [group_id], now)
                await _bump(conn, users, [sub], now)

    async def find_group_id(self, display_name: str) -> str | None:
        """The id of the group with this displayName (compared case-insensitively)."""
        async with self.engine.connect() as conn:
            found: str | None = (await conn.execute(
                select(groups.c.id).where(groups.c.display_name_key == display_name.casefold()))).scalar()
        return found

    async def add_group(self, group_id: str, new: NewGroup, members: list[str], now: int) -> None:
        """A new group with these members. Raises UnknownMember for a member id that is not a user."""
        async with self.engine.begin() as conn:
            await _check_members(conn, members)
            await conn.execute(insert(groups).values(
                id=group_id, display_name=new.display_name, display_name_key=new.display_name.casefold(),
                external_id=new.external_id, version=1, created_at=now, updated_at=now))
            await _add_members(conn, group_id, members)
            await _bump(conn, users, members, now)

    async def groups_by_id(self, ids: Sequence[str], *, members: bool) -> list[Group]:
        """The groups with these ids that exist, in the order given; with their members when asked."""
        async with self.engine.connect() as conn:
            return await _load_groups(conn, ids, members)

    async def query_groups(self, where: ColumnElement[bool] | None, order_by: Any, *, descending: bool,
                           offset: int, limit: int, members: bool) -> tuple[int, list[Group]]:
        async with self.engine.connect() as conn:
            total, ids = await _page(conn, groups, where, order_by, descending, offset, limit)
            return total, await _load_groups(conn, ids, members)

    async def update_group(self, current: Group, new: NewGroup, *, added: list[str], removed: list[str],
                           changed_users: list[str], now: int) -> bool:
        """Rename a group and change its members, only if it is still at `current.version` (False if not); the
        users in `changed_users` are bumped. Raises UnknownMember for an added id that is not a user."""
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
                await conn.execute(delete(memberships).where(
                    memberships.c.group_id == current.id, memberships.c.user_id.in_(chunk)))
            await _add_members(conn, current.id, added)
            await _bump(conn, users, changed_users, now)
        return True

    async def delete_group(self, group_id: str, version: int | None, now: int) -> bool:
        """Delete a group (at `version`, when given) and bump its members; False if no such group (at it)."""
        return await self._delete(groups, group_id, version, now)

    async def _delete(self, table: Table, resource_id: str, version: int | None, now: int) -> bool:
        # A user's memberships show on their groups, a group's on its members: those on the other side are bumped.
        mine, theirs, other = ((memberships.c.user_id, memberships.c.group_id, groups) if table is users
                               else (memberships.c.group_id, memberships.c.user_id, users))
        async with self.engine.begin() as conn:
            other_ids = (await conn.execute(select(theirs).where(mine == resource_id))).scalars().all()
            condition = table.c.id == resource_id
            if version is not None:
                condition = condition & (table.c.version == version)
            if (await conn.execute(delete(table).where(condition))).rowcount == 0:
                return False
            await _bump(conn, other, other_ids, now)
        return True

    # -- people from connectors (iam/users/upstream.py) ------------------------------------------------------------
    async def link(self, connector_id: str, subject: str) -> Row[Any] | None:
        """The link of an upstream identity to its user."""
        async with self.engine.connect() as conn:
            return (await conn.execute(select(upstream_links).where(
                upstream_links.c.connector_id == connector_id, upstream_links.c.subject == subject))).first()

    async def upstream_subject(self, sub: str, connector_id: str) -> str | None:
        """The subject a user has at a connector, if linked."""
        async with self.engine.connect() as conn:
            subject: str | None = (await conn.execute(select(upstream_links.c.subject).where(
                upstream_links.c.user_id == sub, upstream_links.c.connector_id == connector_id))).scalar()
        return subject

    async def verified_owners(self, email: str, *, limit: int) -> list[str]:
        """Up to `limit` users whose primary address is this one (lower-cased), verified."""
        async with self.engine.connect() as conn:
            return list((await conn.execute(select(users.c.id).where(
                users.c.email == email, users.c.email_verified.is_(True)).limit(limit))).scalars().all())

    async def linked_at(self, connector_id: str, user_id: str) -> bool:
        """Whether the user has a link at this connector."""
        async with self.engine.connect() as conn:
            return bool((await conn.execute(
                select(func.count()).select_from(upstream_links)
                .where(upstream_links.c.connector_id == connector_id, upstream_links.c.user_id == user_id)
            )).scalar_one())

    async def add_link(self, user_id: str, connector_id: str, subject: str, group_names: list[str],
                       now: int) -> None:
        """Link an existing user to an upstream identity, with the connector's groups."""
        async with self.engine.begin() as conn:
            await _insert_link(conn, user_id, connector_id, subject, provisioned=False, now=now)
            await _replace_groups(conn, user_id, connector_id, group_names)
            await _bump(conn, users, [user_id], now)

    async def add_linked_user(self, user_id: str, new: NewUser, connector_id: str, subject: str,
                              group_names: list[str], now: int) -> None:
        """A new user made for an upstream identity (the connector owns its profile), linked to it."""
        emails = new.all_emails()
        async with self.engine.begin() as conn:
            await conn.execute(insert(users).values(id=user_id, **_user_values(new, emails), version=1,
                                                    created_at=now, updated_at=now))
            await _write_emails(conn, user_id, emails, replace=False)
            await _insert_link(conn, user_id, connector_id, subject, provisioned=True, now=now)
            await _replace_groups(conn, user_id, connector_id, group_names)

    async def refresh_link(self, link: Row[Any], group_names: list[str], now: int, *,
                           profile: dict[str, Any] | None = None, user_name: str | None = None) -> None:
        """An upstream sign-in through an existing link: the connector's groups replaced, the sign-in time noted,
        and with `profile` (`display_name`, `email`, `email_verified`), the user's profile set to it, with the
        `user_name` wanted when nobody else has it. The user is bumped if anything of theirs changed."""
        async with self.engine.begin() as conn:
            changed = await _replace_groups(conn, link.user_id, link.connector_id, group_names)
            if profile is not None:
                row = (await conn.execute(select(users).where(users.c.id == link.user_id))).first()
                if row is not None:
                    changed |= await _set_profile(conn, row, profile, user_name)
            await conn.execute(update(upstream_links)
                               .where(upstream_links.c.connector_id == link.connector_id,
                                      upstream_links.c.subject == link.subject)
                               .values(last_sign_in=now))
            if changed:
                await _bump(conn, users, [link.user_id], now)


# -- statements used by more than one method ----------------------------------------------------------------------
def _user_values(new: NewUser, emails: tuple[Email, ...]) -> dict[str, Any]:
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


async def _write_emails(conn: AsyncConnection, user_id: str, emails: Sequence[Email], *, replace: bool) -> None:
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


async def _page(conn: AsyncConnection, table: Table, where: ColumnElement[bool] | None, order_by: Any,
                descending: bool, offset: int, limit: int) -> tuple[int, list[str]]:
    """How many rows match `where`, and the ids of one page of them."""
    counting = select(func.count()).select_from(table)
    total: int = (await conn.execute(counting if where is None else counting.where(where))).scalar_one()
    if limit <= 0 or offset >= total:
        return total, []
    page = select(table.c.id).order_by(*_ordering(order_by, descending, table.c.created_at, table.c.id))
    if where is not None:
        page = page.where(where)
    return total, list((await conn.execute(page.offset(offset).limit(limit))).scalars().all())


async def _load_users(conn: AsyncConnection, ids: Sequence[str]) -> list[User]:
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


async def _load_groups(conn: AsyncConnection, ids: Sequence[str], with_members: bool) -> list[Group]:
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


async def _ensure_group(conn: AsyncConnection, display_name: str, now: int) -> str:
    key = display_name.casefold()
    found: str | None = (await conn.execute(select(groups.c.id).where(groups.c.display_name_key == key))).scalar()
    if found:
        return found
    group_id = str(uuid.uuid4())
    await conn.execute(insert(groups).values(
        id=group_id, display_name=display_name, display_name_key=key, version=1, created_at=now, updated_at=now))
    return group_id


async def _check_members(conn: AsyncConnection, ids: Sequence[str]) -> None:
    for chunk in _chunks(ids):
        found = set((await conn.execute(select(users.c.id).where(users.c.id.in_(chunk)))).scalars().all())
        missing = [i for i in chunk if i not in found]
        if missing:
            raise UnknownMember(missing[0])


async def _add_members(conn: AsyncConnection, group_id: str, ids: Sequence[str]) -> None:
    if ids:
        await conn.execute(insert(memberships), [{"group_id": group_id, "user_id": i} for i in ids])


async def _bump(conn: AsyncConnection, table: Table, ids: Iterable[str], now: int) -> None:
    for chunk in _chunks(sorted(set(ids))):
        await conn.execute(
            update(table).where(table.c.id.in_(chunk)).values(version=table.c.version + 1, updated_at=now)
        )


async def _insert_link(conn: AsyncConnection, user_id: str, connector_id: str, subject: str, *, provisioned: bool,
                       now: int) -> None:
    await conn.execute(insert(upstream_links).values(
        connector_id=connector_id, subject=subject, user_id=user_id, provisioned=provisioned, created_at=now,
        last_sign_in=now))


async def _replace_groups(conn: AsyncConnection, user_id: str, connector_id: str, names: list[str]) -> bool:
    """Set a user's groups from one connector; True if they changed."""
    where = (connector_groups.c.user_id == user_id, connector_groups.c.connector_id == connector_id)
    current = set((await conn.execute(select(connector_groups.c.name).where(*where))).scalars().all())
    if current == set(names):
        return False
    gone = sorted(current - set(names))
    if gone:
        await conn.execute(delete(connector_groups).where(*where, connector_groups.c.name.in_(gone)))
    new = [name for name in names if name not in current]
    if new:
        await conn.execute(insert(connector_groups),
                           [{"user_id": user_id, "connector_id": connector_id, "name": name} for name in new])
    return True


async def _set_profile(conn: AsyncConnection, row: Row[Any], values: dict[str, Any], wanted: str | None) -> bool:
    """The profile values of a user; a new userName (`wanted`) only when nobody else has it. True if changed."""
    if wanted and wanted != row.user_name and user_name_key(wanted) != row.user_name_key:
        taken = (await conn.execute(select(users.c.id).where(users.c.user_name_key == user_name_key(wanted)))).scalar()
        if taken is None:
            values = {**values, "user_name": wanted, "user_name_key": user_name_key(wanted)}
    if all(getattr(row, key) == value for key, value in values.items()):
        return False
    await conn.execute(update(users).where(users.c.id == row.id).values(**values))
    email = values.get("email")
    if email != row.email:
        await _write_emails(conn, row.id, (Email(email, primary=True),) if email else (), replace=True)
    return True


def _ordering(column: Any, descending: bool, *tiebreak: Any) -> list[Any]:
    if column is None:
        return list(tiebreak)
    missing = case((column.is_(None), 1), else_=0)  # RFC 7644 §3.4.2.3: no value sorts last when ascending
    if descending:
        return [missing.desc(), column.desc(), *tiebreak]
    return [missing, column, *tiebreak]


def _chunks(items: Iterable[str]) -> Iterable[list[str]]:
    items = list(items)
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]
