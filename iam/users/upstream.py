"""Just-in-time users for people who sign in through an upstream connector (README, "Sign-in through a connector").

The identity is (connector id, upstream subject): stable across email and username changes. At each upstream
sign-in `provision()` finds the link and refreshes what the connector owns; a first sign-in links an existing
local account only by a verified address when the connector says `link_by: email`, and otherwise creates a user.
A username that an unrelated local user holds is never linked: the new user is named `<username>@<connector id>`.

Groups a connector reports are kept in their own table, apart from SCIM groups, and replaced at every sign-in;
both appear in the `groups` claim. Concurrent first sign-ins of one person end with one user: the user row and
its link are written in one transaction, and the loser of the race finds the winner's link when it retries.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from iam.errors import UserDisabled
from iam.observability import audit
from iam.peers import UpstreamIdentity, UserClaims
from iam.users.directory import RETRIES, DirectoryError, Email, NewUser, _user_values, _write_emails
from iam.users.store import connector_groups, upstream_links, users

log = logging.getLogger("iam.users.upstream")

MAX_GROUPS = 1000  # a huge upstream group list is cut here (fail safe: fewer groups, never more)
MAX_NAME = 255


def _clean(value: str | None) -> str | None:
    """A profile value fit for the directory (printable, trimmed, ≤ 255), else None."""
    if value is None:
        return None
    value = value.strip()[:MAX_NAME].strip()
    return value if value and not any(ord(c) < 0x20 for c in value) else None


def _group_names(upstream: UpstreamIdentity) -> list[str]:
    names = sorted({name for g in upstream.groups if (name := _clean(g)) is not None})
    if len(names) > MAX_GROUPS:
        log.warning("connector %s reported %d groups for one user; keeping the first %d",
                    upstream.connector_id, len(names), MAX_GROUPS)
    return names[:MAX_GROUPS]


class UpstreamAccounts:
    """The user-management side of connector sign-ins, over the directory's store."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.engine = directory.engine

    async def provision(self, identity: UpstreamIdentity, link_by: str | None = None) -> UserClaims:
        """The user for an upstream sign-in: found by link, linked by verified email, or created.

        Raises UserDisabled for a user disabled in the directory (the sign-in must fail).
        """
        groups = _group_names(identity)
        for _ in range(RETRIES):
            link = await self._link(identity)
            owner = None if link is not None or link_by != "email" else await self._verified_owner(identity)
            try:
                if link is not None:
                    await self._active_claims(link.user_id)  # refused before anything is written
                    await self._refresh(link, identity, groups)
                    user_id = link.user_id
                elif owner is not None:
                    await self._active_claims(owner)  # a disabled owner is refused, never bypassed
                    user_id = await self._add_link(owner, identity, groups)
                    audit("user.linked", actor=owner, user=owner, connector=identity.connector_id, link_by="email")
                else:
                    user_id = await self._create(identity, groups)
                    audit("user.created", actor=user_id, user=user_id, connector=identity.connector_id,
                          groups=groups)
            except IntegrityError:
                continue  # a concurrent first sign-in won (or took the name): look again
            return await self._active_claims(user_id)
        raise DirectoryError("conflict", "concurrent sign-ins changed this user too often; retry")

    async def upstream_subject(self, sub: str, connector_id: str) -> str | None:
        """The subject a user has at a connector (for re-checks with the upstream), if linked."""
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(upstream_links.c.subject)
                .where(upstream_links.c.user_id == sub, upstream_links.c.connector_id == connector_id)
            )).scalar()

    async def _active_claims(self, user_id: str) -> UserClaims:
        claims = await self.directory.claims(user_id)
        if claims is None:
            raise DirectoryError("conflict", "the user was deleted meanwhile; retry")
        if not claims.active:
            raise UserDisabled(f"user {user_id} is disabled")
        return claims

    async def _link(self, upstream: UpstreamIdentity):
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(upstream_links)
                .where(upstream_links.c.connector_id == upstream.connector_id,
                       upstream_links.c.subject == upstream.subject)
            )).first()

    async def _verified_owner(self, upstream: UpstreamIdentity) -> str | None:
        """The one local user whose primary address is this verified one, not yet linked at this connector."""
        email = _clean(upstream.email)
        if not upstream.email_verified or email is None:
            return None  # never by an unverified address: that would be an account takeover
        async with self.engine.connect() as conn:
            owners = (await conn.execute(
                select(users.c.id).where(users.c.email == email.lower(), users.c.email_verified.is_(True)).limit(2)
            )).scalars().all()
            if len(owners) != 1:
                return None
            taken = (await conn.execute(
                select(func.count()).select_from(upstream_links)
                .where(upstream_links.c.connector_id == upstream.connector_id, upstream_links.c.user_id == owners[0])
            )).scalar_one()
        return None if taken else owners[0]

    async def _add_link(self, user_id: str, upstream: UpstreamIdentity, groups: list[str]) -> str:
        now = int(time.time())
        async with self.engine.begin() as conn:
            await conn.execute(insert(upstream_links).values(
                connector_id=upstream.connector_id, subject=upstream.subject, user_id=user_id, provisioned=False,
                created_at=now, last_sign_in=now))
            await _replace_groups(conn, user_id, upstream.connector_id, groups)
            await conn.execute(update(users).where(users.c.id == user_id)
                               .values(version=users.c.version + 1, updated_at=now))
        return user_id

    async def _free_name(self, upstream: UpstreamIdentity) -> str:
        """The username for a new user: the upstream's, unless someone has it (then `<name>@<connector id>`)."""
        base = _clean(upstream.username) or _clean(upstream.email) or _clean(upstream.subject) or "user"
        suffix = hashlib.sha256(upstream.subject.encode()).hexdigest()[:8]
        for candidate in (base, f"{base}@{upstream.connector_id}", f"{base}@{upstream.connector_id}-{suffix}"):
            candidate = candidate[-MAX_NAME:].strip()
            if await self.directory.find_id(candidate) is None:
                return candidate
        raise DirectoryError("uniqueness", "every candidate username is taken")

    async def _create(self, upstream: UpstreamIdentity, groups: list[str]) -> str:
        user_name = await self._free_name(upstream)
        email = _clean(upstream.email)
        new = NewUser(user_name=user_name, email=email.lower() if email else None,
                      email_verified=bool(email and upstream.email_verified), display_name=_clean(upstream.name))
        emails = new.all_emails()
        user_id, now = str(uuid.uuid4()), int(time.time())
        async with self.engine.begin() as conn:
            await conn.execute(insert(users).values(id=user_id, **_user_values(new, emails), version=1,
                                                    created_at=now, updated_at=now))
            await _write_emails(conn, user_id, emails, replace=False)
            await conn.execute(insert(upstream_links).values(
                connector_id=upstream.connector_id, subject=upstream.subject, user_id=user_id, provisioned=True,
                created_at=now, last_sign_in=now))
            await _replace_groups(conn, user_id, upstream.connector_id, groups)
        return user_id

    async def _refresh(self, link, upstream: UpstreamIdentity, groups: list[str]) -> None:
        """What the connector owns, as the upstream says now: its groups, and the profile of a user it created."""
        now = int(time.time())
        async with self.engine.begin() as conn:
            changed = await _replace_groups(conn, link.user_id, upstream.connector_id, groups)
            if link.provisioned:
                row = (await conn.execute(select(users).where(users.c.id == link.user_id))).first()
                if row is not None:
                    changed |= await self._refresh_profile(conn, row, upstream)
            await conn.execute(update(upstream_links)
                               .where(upstream_links.c.connector_id == link.connector_id,
                                      upstream_links.c.subject == link.subject)
                               .values(last_sign_in=now))
            if changed:
                await conn.execute(update(users).where(users.c.id == link.user_id)
                                   .values(version=users.c.version + 1, updated_at=now))

    async def _refresh_profile(self, conn, row, upstream: UpstreamIdentity) -> bool:
        email = _clean(upstream.email)
        email = email.lower() if email else None
        values = {"display_name": _clean(upstream.name), "email": email,
                  "email_verified": bool(email and upstream.email_verified)}
        wanted = _clean(upstream.username)
        if wanted and wanted != row.user_name and wanted.casefold() != row.user_name_key:
            # A renamed upstream account takes its new name when nobody else has it; else it keeps the old one.
            taken = (await conn.execute(select(users.c.id).where(users.c.user_name_key == wanted.casefold()))).scalar()
            if taken is None:
                values.update(user_name=wanted, user_name_key=wanted.casefold())
        if all(getattr(row, key) == value for key, value in values.items()):
            return False
        await conn.execute(update(users).where(users.c.id == row.id).values(**values))
        if email != row.email:
            await _write_emails(conn, row.id, (Email(email, primary=True),) if email else (), replace=True)
        return True


async def _replace_groups(conn, user_id: str, connector_id: str, names: list[str]) -> bool:
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
