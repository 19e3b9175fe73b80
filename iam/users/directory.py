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

from sqlalchemy.exc import IntegrityError

from iam.errors import PeerUnavailable
from iam.observability import audit
from iam.peers import Credentials, UserClaims
from iam.users.store import (
    Email,
    Group,
    GroupRef,
    Member,
    NewGroup,
    NewUser,
    UnknownMember,
    User,
    UserStore,
    primary_email,
    user_name_key,
)

__all__ = ["Directory", "DirectoryError", "Email", "Group", "GroupRef", "IfMatch", "Member", "NewGroup", "NewUser",
           "User", "primary_email", "user_name_key"]  # the records are the store's; read them from here

log = logging.getLogger("iam.users")

RETRIES = 5  # optimistic writes re-read and recompute this often under concurrent changes


class DirectoryError(Exception):
    """A request the directory refuses; `kind` maps to SCIM scimType / HTTP status at the API edge."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "uniqueness" | "not_found" | "invalid" | "precondition" | "conflict"


IfMatch = frozenset[int] | str | None  # None: no precondition; "*": any version; else the versions accepted


class Directory:
    def __init__(self, store: UserStore, credentials: Credentials, clock=time.time,
                 on_disabled: Sequence[Callable[[str], Awaitable[object]]] = ()) -> None:
        self.store = store
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
        return self.store.dialect

    # -- users --------------------------------------------------------------------------------------------
    async def create_user(self, new: NewUser, *, password: str | None = None, group_names: tuple[str, ...] = (),
                          send_verification: bool = False) -> str:
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
        try:
            await self.store.add_user(user_id, new, int(self.clock()), group_names)
        except IntegrityError:
            if password is not None:
                await self._forget_credential(user_id)
            raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken") from None
        except BaseException:
            if password is not None:
                await self._forget_credential(user_id)
            raise
        audit("user.created", actor=user_id, user=user_id, groups=list(group_names))
        if send_verification:  # sent only for an address that is not verified already
            await self.send_verification(user_id)
        return user_id

    async def send_verification(self, sub: str) -> bool:
        """Have the authentication role mail the user a link that verifies their address; a role that cannot be
        reached is logged (the user exists; the link can be asked for again from the account page)."""
        try:
            return await self.credentials.send_verification(sub)
        except PeerUnavailable:
            log.warning("the verification message could not be requested: the authentication role did not answer")
            return False

    async def _forget_credential(self, sub: str) -> None:
        try:
            await self.credentials.remove(sub)
        except Exception as exc:  # an orphan credential cannot log in: log it, keep the original error
            log.warning("could not remove the credential of %s: %s", sub, exc)

    async def find_id(self, user_name: str) -> str | None:
        return await self.store.find_user_id(user_name)

    async def claims(self, sub: str) -> UserClaims | None:
        found = await self.store.user_row(sub)
        if found is None:
            return None
        row, names = found
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

    async def find_by_email(self, email: str) -> UserClaims | None:
        """The one user whose verified primary address this is (case-insensitively); None for none or several."""
        owners = await self.store.verified_owners(email.strip().lower(), limit=2)
        return await self.claims(owners[0]) if len(owners) == 1 else None

    async def list_users(self, offset: int = 0, limit: int = 100) -> list[UserClaims]:
        ids = await self.store.user_ids(offset, limit)
        return [claims for user_id in ids if (claims := await self.claims(user_id)) is not None]

    async def get_user(self, sub: str) -> User | None:
        found = await self.store.users_by_id([sub])
        return found[0] if found else None

    async def query_users(self, where=None, order_by=None, *, descending: bool = False, offset: int = 0,
                          limit: int = 100) -> tuple[int, list[User]]:
        """Users matching `where` (a SQL condition over the users table), and how many match in all."""
        return await self.store.query_users(where, order_by, descending=descending, offset=offset, limit=limit)

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
            try:
                written = await self.store.update_user(current, new, int(self.clock()))
            except IntegrityError:
                raise DirectoryError("uniqueness", f"userName {new.user_name!r} is already taken") from None
            if written:
                updated = await self.get_user(sub)
                if updated is None:
                    raise DirectoryError("not_found", f"no user {sub}")
                audit("user.changed", actor=sub, user=sub)
                if current.active and not updated.active:
                    await self._switched_off(sub, "user.disabled")
                return updated
        raise DirectoryError("conflict", "the user changed concurrently too often; retry")

    async def set_active(self, sub: str, active: bool) -> None:
        if not await self.store.set_active(sub, active, int(self.clock())):
            raise DirectoryError("not_found", f"no user {sub}")
        if not active:
            await self._switched_off(sub, "user.disabled")
        else:
            audit("user.changed", actor=sub, user=sub, active=True)

    async def set_password(self, sub: str, password: str) -> None:
        if await self.claims(sub) is None:
            raise DirectoryError("not_found", f"no user {sub}")
        await self.credentials.set_password(sub, password)

    async def sign_out_everywhere(self, sub: str, actor: str = "operator") -> None:
        """End every session and revoke every grant of a user who stays active (a suspected compromise, a lost
        device). Unlike disabling, nothing else would stop what was issued, so a hook that fails is an error."""
        if await self.claims(sub) is None:
            raise DirectoryError("not_found", f"no user {sub}")
        for hook in self.on_disabled:
            await hook(sub)
        audit("user.signed_out", actor=actor, user=sub)

    async def confirm_email(self, sub: str, email: str) -> bool:
        """The person opened a verification link sent to `email`: verified, if it is still their address."""
        confirmed = await self.store.confirm_email(sub, email.lower(), int(self.clock()))
        if confirmed:
            audit("email.verified", actor=sub, user=sub)
        return confirmed

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
        if not await self.store.delete_user(sub, _version(if_match, current.version), int(self.clock())):
            raise DirectoryError("precondition" if if_match else "not_found", f"no user {sub} at that version")
        await self._switched_off(sub, "user.deleted")

    async def count_users(self) -> int:
        return await self.store.count_users()

    # -- groups -------------------------------------------------------------------------------------------
    async def add_to_group(self, sub: str, group_name: str) -> None:
        await self.store.add_membership(sub, group_name, int(self.clock()))

    async def find_group_id(self, display_name: str) -> str | None:
        return await self.store.find_group_id(display_name)

    async def create_group(self, new: NewGroup) -> str:
        _check_display_name(new.display_name)
        if await self.find_group_id(new.display_name) is not None:
            raise DirectoryError("uniqueness", f"displayName {new.display_name!r} is already taken")
        group_id = str(uuid.uuid4())
        try:
            await self.store.add_group(group_id, new, _unique(new.members), int(self.clock()))
        except UnknownMember as exc:
            raise _unknown_member(exc) from None
        except IntegrityError:
            raise await self._group_conflict(new.display_name, group_id) from None
        return group_id

    async def _group_conflict(self, display_name: str, group_id: str) -> DirectoryError:
        if await self.find_group_id(display_name) not in (None, group_id):
            return DirectoryError("uniqueness", f"displayName {display_name!r} is already taken")
        return DirectoryError("invalid", "members: a member user was deleted meanwhile")

    async def get_group(self, group_id: str, *, members: bool = True) -> Group | None:
        found = await self.store.groups_by_id([group_id], members=members)
        return found[0] if found else None

    async def query_groups(self, where=None, order_by=None, *, descending: bool = False, offset: int = 0,
                           limit: int = 100, members: bool = True) -> tuple[int, list[Group]]:
        return await self.store.query_groups(where, order_by, descending=descending, offset=offset, limit=limit,
                                             members=members)

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
        # The members' `groups` attribute shows the group's name: a rename changes every member.
        renamed = new.display_name != current.display_name
        try:
            return await self.store.update_group(current, new, added=added, removed=removed,
                                                 changed_users=wanted + removed if renamed else added + removed,
                                                 now=int(self.clock()))
        except UnknownMember as exc:
            raise _unknown_member(exc) from None
        except IntegrityError:
            raise await self._group_conflict(new.display_name, current.id) from None

    async def delete_group(self, group_id: str, *, if_match: IfMatch = None) -> None:
        current = await self.get_group(group_id, members=False)
        if current is None:
            raise DirectoryError("not_found", f"no group {group_id}")
        _check_precondition(if_match, current.version)
        if not await self.store.delete_group(group_id, _version(if_match, current.version), int(self.clock())):
            raise DirectoryError("precondition" if if_match else "not_found", f"no group {group_id} at that version")


# -- helpers ----------------------------------------------------------------------------------------------
def _version(if_match: IfMatch, version: int) -> int | None:
    """The version a delete must find (the one checked against If-Match), or None for any."""
    return None if if_match is None or if_match == "*" else version


def _unknown_member(exc: UnknownMember) -> DirectoryError:
    return DirectoryError("invalid", f"members: no user with id {exc.user_id!r}")


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
