"""LDAP v3 / Active Directory: the password is checked by binding as the person (RFC 4513 §5.1.3), never stored.

One sign-in attempt is one connection: TLS (ldaps:// or StartTLS, RFC 4513 §3, the server's certificate and
host name always verified), the service bind, the user search with the typed username escaped per RFC 4515,
a bind as the one entry found with the typed password, the service bind again, and the group search.

The client is ldap3 (pure Python, sockets with timeouts), run off the event loop in the connector's own
threads. The libldap-based clients (python-ldap, bonsai) cannot bound a TLS handshake with a server that
accepts and never answers on the libldap 2.5 of Debian 12 (the call hangs; in bonsai it blocks the event
loop): here every socket operation is bounded by `timeout`, and so is each whole attempt. At most
`max_connections` attempts per connector talk to the server at once; a connection lives for one attempt.

The person is told the same for every refusal; `reason` (invalid_credentials, account_locked,
account_disabled, password_expired, unavailable) is for metrics and audit. Messages never carry the typed
username or password (a password typed into the username field must not reach a log).

Groups: `group_search` (e.g. `(member={dn})`, `(uniqueMember={dn})`, `(memberUid={username})`) and/or the
user entry's `user_search.groups_attribute` (e.g. `memberOf`; a group is named by its DN's first RDN value).
With `nested_groups`, Active Directory (its root DSE says so) is asked with LDAP_MATCHING_RULE_IN_CHAIN
(1.2.840.113556.1.4.1941) in one search; other servers get a breadth-first expansion: the groups whose
members include a group already found, up to NESTING_DEPTH levels, cycles ignored. Searches are paged
(RFC 2696, PAGE_SIZE) and stop at `max_groups`: the rest are left out and logged, so a huge list costs a
bounded amount of work and token size.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn
from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1.type import namedtype, tag, univ

from iam.authn.connectors import Check, ConnectorUnavailable, InvalidCredentials, UpstreamIdentity
from iam.config import LdapConnectorConfig

log = logging.getLogger("iam.authn.connectors.ldap")

PAGE_SIZE = 500
NESTING_DEPTH = 8
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN
AD_CAPABILITIES = {"1.2.840.113556.1.4.800", "1.2.840.113556.1.4.1851"}  # AD DS, AD LDS
PPOLICY_OID = "1.3.6.1.4.1.42.2.27.8.5.1"  # draft-behera-ldap-password-policy §6.1
AD_ACCOUNT_DISABLED = 0x2  # userAccountControl ACCOUNTDISABLE
# AD's bind diagnostic "... AcceptSecurityContext error, data 775, ..." (MS-ADTS, the Win32 error in hex).
AD_BIND_DATA = re.compile(r"\bdata ([0-9a-f]{3,8})\b", re.IGNORECASE)


class AccountDisabled(InvalidCredentials):
    """The directory disabled the account (AD ACCOUNTDISABLE / data 533, an expired account)."""

    reason = "account_disabled"


class AccountLocked(InvalidCredentials):
    """The account is locked (ppolicy accountLocked / pwdAccountLockedTime, AD data 775)."""

    reason = "account_locked"


class PasswordExpired(InvalidCredentials):
    """The password is right but expired or must be changed first (ppolicy, AD data 532 / 773)."""

    reason = "password_expired"


# AD bind diagnostics → what iam says (the person sees the same answer as for a wrong password).
AD_DATA_CODES: dict[str, type[InvalidCredentials]] = {
    "533": AccountDisabled, "701": AccountDisabled, "530": AccountDisabled, "531": AccountDisabled,
    "775": AccountLocked, "532": PasswordExpired, "773": PasswordExpired,
}
# ppolicy response error values (draft-behera §6.2) → the same.
PPOLICY_ERRORS: dict[int, type[InvalidCredentials]] = {0: PasswordExpired, 1: AccountLocked, 2: PasswordExpired}


class _PasswordPolicyResponse(univ.Sequence):
    """PasswordPolicyResponseValue ::= SEQUENCE { warning [0] CHOICE OPTIONAL, error [1] ENUMERATED OPTIONAL }"""

    componentType = namedtype.NamedTypes(
        namedtype.OptionalNamedType("warning", univ.Any().subtype(
            implicitTag=tag.Tag(tag.tagClassContext, tag.tagFormatConstructed, 0))),
        namedtype.OptionalNamedType("error", univ.Enumerated().subtype(
            implicitTag=tag.Tag(tag.tagClassContext, tag.tagFormatSimple, 1))),
    )


def ppolicy_error(controls: dict | None) -> int | None:
    """The error of a password policy response control, if the server sent one."""
    value = ((controls or {}).get(PPOLICY_OID) or {}).get("value")
    if not value:
        return None
    try:
        decoded, _ = ber_decoder.decode(value, asn1Spec=_PasswordPolicyResponse())
    except Exception:  # a malformed control says nothing we can use
        return None
    error = decoded.getComponentByName("error")
    return int(error) if error.isValue else None


def filter_value(value: str | bytes) -> str:
    """An assertion value for a filter, escaped per RFC 4515 §3 (`*`, `(`, `)`, `\\`, NUL; bytes: every octet)."""
    if isinstance(value, bytes):
        return "".join(f"\\{octet:02x}" for octet in value)
    return escape_filter_chars(value)


def fill(template: str, **values: str | bytes) -> str:
    """A configured filter with `{username}` / `{dn}` replaced by escaped values (never str.format: the
    template may hold other braces, and a value must never be read as filter syntax). One pass: a value that
    itself contains `{username}` stays as it is."""
    names = "|".join(re.escape(name) for name in values)
    return re.sub(r"\{(" + names + r")\}", lambda match: filter_value(values[match.group(1)]), template)


def in_chain(template: str) -> str:
    """`(member={dn})` → `(member:1.2.840.113556.1.4.1941:={dn})`: AD walks the nesting itself."""
    return re.sub(r"\(([A-Za-z][A-Za-z0-9-]*)=\{dn\}\)", rf"(\1:{IN_CHAIN}:={{dn}})", template)


def first_rdn_value(dn: str) -> str | None:
    try:
        return parse_dn(dn, escape=False)[0][1]
    except (LDAPException, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class _Entry:
    dn: str
    attributes: dict[str, list[bytes]]  # lower-cased names, raw values

    def values(self, name: str) -> list[bytes]:
        return self.attributes.get(name.lower(), [])

    def text(self, name: str) -> str | None:
        values = self.values(name)
        return values[0].decode("utf-8", "replace") if values else None


def _entries(response: Iterable[dict]) -> list[_Entry]:
    return [_Entry(item["dn"], {k.lower(): list(v) for k, v in item.get("raw_attributes", {}).items()})
            for item in response if item.get("type") == "searchResEntry"]


class _VerifiedTls(ldap3.Tls):
    """TLS for ldaps:// and StartTLS with Python's own verification in the handshake: the chain against
    `ca_file` (or the system's CAs) and the host name (RFC 6125; RFC 4513 §3.1.3). ldap3's own wrapping turns
    the handshake's host name check off and checks afterwards, leaving the socket open when that fails."""

    def __init__(self, host: str, ca_file: str | None) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)  # ldap3 keeps its settings; the context below decides
        self._host = host
        try:
            self._context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)  # check_hostname on
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca_file {ca_file}: cannot be read as PEM certificates ({exc})") from None

    def wrap_socket(self, connection, do_handshake=False):  # noqa: D102 (ldap3's hook)
        connection.socket = self._context.wrap_socket(connection.socket, server_hostname=self._host,
                                                      do_handshake_on_connect=do_handshake)


class LdapConnector:
    """A `PasswordConnector` for an LDAP v3 / Active Directory server (see the module docstring)."""

    def __init__(self, config: LdapConnectorConfig) -> None:
        self.id = config.id
        self.config = config
        parts = urlsplit(config.url)
        self._host = parts.hostname or ""
        self._use_ssl = parts.scheme == "ldaps"
        self._port = parts.port or (636 if self._use_ssl else 389)
        self._socket_timeout = max(1, math.ceil(config.timeout))  # ldap3 takes whole seconds
        self._slots = asyncio.Semaphore(config.max_connections)
        # Threads of its own: a hung server must not starve the default executor (password hashing runs there).
        self._threads = ThreadPoolExecutor(config.max_connections, thread_name_prefix=f"ldap-{config.id}")
        self._is_ad: bool | None = None  # from the root DSE, once
        self._tls = _VerifiedTls(self._host, str(config.ca_file) if config.ca_file else None)

    # -- the PasswordConnector protocol ------------------------------------------------------------------
    async def authenticate(self, username: str, password: str) -> UpstreamIdentity:
        if not password:
            # An empty password is an unauthenticated bind (RFC 4513 §5.1.2) that servers accept as success.
            raise InvalidCredentials("empty password")
        if not username or len(username) > 256:
            raise InvalidCredentials("empty or overlong username")
        return await self._run(self._authenticate, username, password)

    async def lookup(self, subject: str) -> UpstreamIdentity | None:
        return await self._run(self._lookup, subject)

    async def check(self) -> list[Check]:
        try:
            return await self._run(self._check)
        except ConnectorUnavailable as exc:
            return [Check("connect", False, str(exc))]

    async def close(self) -> None:
        """No connection stays open between attempts; attempts still running end on their own timeouts."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- running one attempt off the event loop, bounded --------------------------------------------------
    async def _run(self, work, *args):
        """`work` in a worker thread, holding one of the connector's slots until the thread ends (not merely
        until the caller gives up), so at most `max_connections` threads ever talk to the server."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.timeout):
                await self._slots.acquire()
                try:
                    thread = loop.run_in_executor(self._threads, work, *args)
                except BaseException:
                    self._slots.release()
                    raise
                thread.add_done_callback(self._finished)
                # On timeout the thread goes on, bounded by its own socket timeouts, and then frees the slot.
                return await asyncio.shield(thread)
        except TimeoutError:
            raise ConnectorUnavailable(f"{self.config.url}: no answer within {self.config.timeout:g} s") from None
        except (LDAPException, OSError) as exc:  # whatever ldap3 raised where no step expected it
            raise ConnectorUnavailable(f"{self.config.url}: {type(exc).__name__}") from None
        finally:
            log.debug("ldap connector %s: %.1f ms", self.id, (time.monotonic() - started) * 1000)

    def _finished(self, thread: asyncio.Future) -> None:
        self._slots.release()
        if not thread.cancelled() and thread.exception() is not None:
            # Retrieved here: after a timeout nobody awaits it, and its failure was already answered.
            late = thread.exception()
            reason = getattr(late, "reason", type(late).__name__)
            log.debug("ldap connector %s: late attempt ended: %s", self.id, reason)

    def _connect(self) -> ldap3.Connection:
        """An open connection over verified TLS (or plain, on loopback when configured), bound as the service."""
        config = self.config
        server = ldap3.Server(self._host, port=self._port, use_ssl=self._use_ssl, tls=self._tls, get_info=ldap3.NONE,
                              connect_timeout=self._socket_timeout)
        conn = ldap3.Connection(server, authentication=ldap3.SIMPLE, auto_bind=ldap3.AUTO_BIND_NONE,
                                receive_timeout=self._socket_timeout, auto_referrals=False, auto_range=False,
                                auto_escape=False, read_only=True, raise_exceptions=False)
        try:
            conn.open()
            # start_tls() answers False (it raises nothing) when the server refuses: never go on in the clear.
            if config.start_tls and not (conn.start_tls() and isinstance(conn.socket, ssl.SSLSocket)):
                description = (conn.result or {}).get("description")
                _close(conn)
                raise ConnectorUnavailable(f"{config.url}: StartTLS refused ({description})")
        except LDAPException as exc:
            _close(conn)
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise ConnectorUnavailable(f"{config.url}: cannot connect: {why}") from None
        self._service_bind(conn)
        return conn

    def _service_bind(self, conn: ldap3.Connection) -> None:
        config = self.config
        secret = config.bind_password.get_secret_value() if config.bind_password else ""
        if config.bind_dn and not secret:
            _close(conn)
            raise ConnectorUnavailable("bind_password is not set")
        try:
            # No bind_dn: the searches run anonymously (a directory that allows it).
            conn.authentication = ldap3.SIMPLE if config.bind_dn else ldap3.ANONYMOUS
            conn.user, conn.password = config.bind_dn or None, secret or None
            ok = conn.bind()
        except LDAPException as exc:
            _close(conn)
            raise ConnectorUnavailable(f"{config.url}: service bind failed: {type(exc).__name__}") from None
        finally:
            conn.password = None
        if not ok:
            result = conn.result or {}
            _close(conn)
            raise ConnectorUnavailable(f"{config.url}: service bind refused ({result.get('description')})")

    def _search(self, conn: ldap3.Connection, base: str, search_filter: str, attributes: list[str],
                limit: int, scope=ldap3.SUBTREE) -> list[_Entry]:
        """Up to `limit` entries, paged; a server-side size limit also ends it quietly."""
        found: list[_Entry] = []
        cookie = None
        while len(found) < limit:
            try:
                conn.search(base, search_filter, search_scope=scope, attributes=attributes,
                            size_limit=limit if limit < PAGE_SIZE else 0,
                            paged_size=PAGE_SIZE if limit >= PAGE_SIZE else None, paged_cookie=cookie)
            except LDAPException as exc:
                raise ConnectorUnavailable(f"search failed: {type(exc).__name__}") from None
            result = conn.result or {}
            if result.get("result") not in (0, 4):  # success, sizeLimitExceeded (noSuchObject: a wrong base_dn)
                raise ConnectorUnavailable(f"search under {base!r} failed ({result.get('description')})")
            found += _entries(conn.response or [])
            cookie = (((result.get("controls") or {}).get("1.2.840.113556.1.4.319") or {}).get("value") or {}).get(
                "cookie")
            if not cookie:
                break
        return found[:limit]

    # -- authenticate ---------------------------------------------------------------------------------
    def _user_attributes(self) -> list[str]:
        search = self.config.user_search
        names = [search.id_attribute, search.username_attribute, search.email_attribute, search.name_attribute,
                 "userAccountControl", "pwdAccountLockedTime"]
        if search.groups_attribute:
            names.append(search.groups_attribute)
        return list(dict.fromkeys(names))

    def _authenticate(self, username: str, password: str) -> UpstreamIdentity:
        search = self.config.user_search
        conn = self._connect()
        try:
            entries = self._search(conn, search.base_dn, fill(search.filter, username=username),
                                   self._user_attributes(), limit=2)
            if len(entries) != 1:
                raise InvalidCredentials("no entry matched" if not entries else "more than one entry matched")
            entry = entries[0]
            _refuse_disabled(entry)
            self._user_bind(conn, entry.dn, password)
            self._service_bind(conn)
            return self._identity(conn, entry)
        finally:
            _close(conn)

    def _user_bind(self, conn: ldap3.Connection, dn: str, password: str) -> None:
        try:
            conn.authentication, conn.user, conn.password = ldap3.SIMPLE, dn, password
            ok = conn.bind(controls=[(PPOLICY_OID, False, None)])
        except LDAPException as exc:
            raise ConnectorUnavailable(f"bind as the user failed: {type(exc).__name__}") from None
        finally:
            conn.password = None
        result = conn.result or {}
        error = ppolicy_error(result.get("controls"))
        if error is not None:
            # RFC-draft ppolicy: accountLocked comes with invalidCredentials; expiry may come with success.
            raise PPOLICY_ERRORS.get(error, InvalidCredentials)(f"{dn}: password policy error {error}")
        if ok:
            return
        if result.get("result") == 49:  # invalidCredentials
            match = AD_BIND_DATA.search(result.get("message") or "")
            refusal = AD_DATA_CODES.get(match.group(1).lower(), InvalidCredentials) if match else InvalidCredentials
            raise refusal(f"{dn}: bind refused" + (f" (AD data {match.group(1)})" if match else ""))
        if result.get("result") in (48, 50, 53):  # inappropriateAuthentication, insufficientAccess, unwilling
            raise AccountDisabled(f"{dn}: bind refused ({result.get('description')})")
        raise ConnectorUnavailable(f"{dn}: bind failed ({result.get('description')})")

    def _identity(self, conn: ldap3.Connection, entry: _Entry) -> UpstreamIdentity:
        search = self.config.user_search
        subject = _subject(entry, search.id_attribute)
        if not subject:
            raise ConnectorUnavailable(f"{entry.dn}: no {search.id_attribute} (user_search.id_attribute)")
        return UpstreamIdentity(
            connector_id=self.id, subject=subject, username=entry.text(search.username_attribute),
            email=entry.text(search.email_attribute), email_verified=self.config.email_verified,
            name=entry.text(search.name_attribute),
            groups=self._groups(conn, entry), amr=["pwd"])

    # -- groups -------------------------------------------------------------------------------------------
    def _groups(self, conn: ldap3.Connection, entry: _Entry) -> list[str]:
        config = self.config
        limit = config.max_groups
        names: list[str] = []
        if config.user_search.groups_attribute:
            for value in entry.values(config.user_search.groups_attribute)[:limit]:
                name = first_rdn_value(value.decode("utf-8", "replace"))
                if name:
                    names.append(name)
        if config.group_search:
            names += self._searched_groups(conn, entry, limit)
        if len(names) > limit:
            log.warning("ldap connector %s: %s is in more than %d groups; the rest are left out",
                        self.id, entry.dn, limit)
        return self._filtered(names[: limit])

    def _searched_groups(self, conn: ldap3.Connection, entry: _Entry, limit: int) -> list[str]:
        groups = self.config.group_search
        assert groups is not None
        attribute = groups.name_attribute
        username = entry.text(self.config.user_search.username_attribute) or ""
        template = groups.filter
        nested = self.config.nested_groups and "{dn}" in template
        if nested and self._active_directory(conn):
            template, nested = in_chain(template), False
        found = self._search(conn, groups.base_dn, fill(template, dn=entry.dn, username=username), [attribute],
                             limit=limit + 1)
        seen = {group.dn.lower() for group in found}
        frontier = [group.dn for group in found]
        depth = 1
        while nested and frontier and depth < NESTING_DEPTH and len(found) <= limit:
            parents: list[_Entry] = []
            for chunk in _chunks(frontier, 50):
                # A {username} part of the filter cannot name a group: NUL matches nothing there.
                either = "".join(fill(template, dn=dn, username="\x00") for dn in chunk)
                for parent in self._search(conn, groups.base_dn, f"(|{either})", [attribute],
                                           limit=limit + 1 - len(found)):
                    if parent.dn.lower() not in seen:
                        seen.add(parent.dn.lower())
                        parents.append(parent)
            found += parents
            frontier = [group.dn for group in parents]
            depth += 1
        return [name for group in found if (name := group.text(attribute))]

    def _active_directory(self, conn: ldap3.Connection) -> bool:
        if self._is_ad is None:
            root = self._search(conn, "", "(objectClass=*)", ["supportedCapabilities"], limit=1, scope=ldap3.BASE)
            capabilities = {v.decode() for v in root[0].values("supportedCapabilities")} if root else set()
            self._is_ad = bool(capabilities & AD_CAPABILITIES)
        return self._is_ad

    def _filtered(self, names: list[str]) -> list[str]:
        """The connector's allow-list (before the prefix), then the prefix; each group once, in order."""
        allow = {name.lower() for name in self.config.groups.allow}
        kept = [name for name in dict.fromkeys(names) if not allow or name.lower() in allow]
        return [self.config.groups.prefix + name for name in kept]

    # -- lookup and check -------------------------------------------------------------------------------
    def _lookup(self, subject: str) -> UpstreamIdentity | None:
        search = self.config.user_search
        value = _subject_value(subject, search.id_attribute)
        if value is None:
            return None
        conn = self._connect()
        try:
            entries = self._search(conn, search.base_dn, f"({search.id_attribute}={filter_value(value)})",
                                   self._user_attributes(), limit=2)
            if len(entries) != 1:
                return None
            try:
                _refuse_disabled(entries[0])
            except InvalidCredentials:
                return None
            return self._identity(conn, entries[0])
        finally:
            _close(conn)

    def _check(self) -> list[Check]:
        config = self.config
        checks: list[Check] = []
        transport = "ldaps" if self._use_ssl else "StartTLS" if config.start_tls else "no TLS (insecure_no_tls)"
        try:
            conn = self._connect()
        except ConnectorUnavailable as exc:
            return [Check("connect and service bind", False, str(exc))]
        try:
            checks.append(Check("connect", True, f"{self._host}:{self._port} over {transport}"))
            checks.append(Check("service bind", True, config.bind_dn or "anonymous"))
            for step, base in (("user search base", config.user_search.base_dn),
                               ("group search base", config.group_search.base_dn if config.group_search else None)):
                if base is None:
                    continue
                try:
                    reachable = bool(self._search(conn, base, "(objectClass=*)", ["1.1"], limit=1, scope=ldap3.BASE))
                    checks.append(Check(step, reachable, base if reachable else f"{base}: not found or not readable"))
                except ConnectorUnavailable as exc:
                    checks.append(Check(step, False, str(exc)))
        finally:
            _close(conn)
        return checks


def _refuse_disabled(entry: _Entry) -> None:
    """What the directory itself records: AD's ACCOUNTDISABLE bit, OpenLDAP ppolicy's pwdAccountLockedTime."""
    control = entry.text("userAccountControl")
    if control and control.strip().lstrip("-").isdigit() and int(control) & AD_ACCOUNT_DISABLED:
        raise AccountDisabled(f"{entry.dn}: userAccountControl ACCOUNTDISABLE")
    if entry.values("pwdAccountLockedTime"):
        raise AccountLocked(f"{entry.dn}: pwdAccountLockedTime is set")


def _subject(entry: _Entry, id_attribute: str) -> str | None:
    values = entry.values(id_attribute)
    if not values:
        return None
    if id_attribute.lower() == "objectguid" and len(values[0]) == 16:
        return str(uuid.UUID(bytes_le=values[0]))  # the form AD's own tools show
    return values[0].decode("utf-8", "replace")


def _subject_value(subject: str, id_attribute: str) -> str | bytes | None:
    """The id attribute's value to search for (objectGUID: its 16 octets, in AD's byte order)."""
    if id_attribute.lower() == "objectguid":
        try:
            return uuid.UUID(subject).bytes_le
        except ValueError:
            return None
    return subject or None


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass  # already closed by the server, or never opened
    sock = getattr(conn, "socket", None)  # ldap3 keeps the socket of a failed open or TLS start: close it too
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
