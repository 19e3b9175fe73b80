"""The LDAP connector against a real OpenLDAP slapd (tests/ldap_server.py): sign-in, groups, faults, TLS."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from iam.authn.connectors import ConnectorUnavailable, InvalidCredentials, PasswordConnector
from iam.authn.connectors.ldap import (
    AccountDisabled,
    AccountLocked,
    LdapConnector,
    PasswordExpired,
    fill,
    in_chain,
)
from tests.ldap_server import MANY_GROUPS, PASSWORDS, SERVICE_PASSWORD, free_port, make_ca

pytestmark = pytest.mark.slow


def connector(server, **overrides) -> LdapConnector:
    return LdapConnector(server.connector_config(**overrides))


async def finished(ldap: LdapConnector) -> None:
    """Close, and wait for the attempts still in the connector's threads (each ends on its socket timeouts)."""
    await ldap.close()
    await asyncio.to_thread(ldap._threads.shutdown, True)


@pytest.fixture
def ldap(ldap_server) -> LdapConnector:
    return connector(ldap_server)


async def test_is_a_password_connector(ldap):
    _: PasswordConnector = ldap  # the Protocol the integration calls
    assert ldap.id == "corp-ldap"
    for name in ("authenticate", "lookup", "check", "close"):
        assert asyncio.iscoroutinefunction(getattr(ldap, name))


# -- happy paths -------------------------------------------------------------------------------------------
async def test_sign_in_over_ldaps(ldap, ldap_server):
    identity = await ldap.authenticate("alice", PASSWORDS["alice"])
    assert identity.connector_id == "corp-ldap"
    assert len(identity.subject) == 36 and identity.subject.count("-") == 4  # entryUUID (RFC 4530)
    assert (identity.username, identity.email, identity.name) == ("alice", "alice@example.test", "Alice Liddell")
    assert identity.email_verified is False  # a directory's mail attribute is not a verified address
    assert sorted(identity.groups) == ["engineering", "loop-a"]
    assert identity.amr == ["pwd"]


async def test_sign_in_over_start_tls(ldap_server):
    ldap = connector(ldap_server, url=ldap_server.ldap_url, start_tls=True)
    identity = await ldap.authenticate("bob", PASSWORDS["bob"])
    assert identity.username == "bob" and sorted(identity.groups) == ["ops", "staff"]


async def test_the_subject_is_stable_and_lookup_finds_the_person(ldap):
    first = await ldap.authenticate("alice", PASSWORDS["alice"])
    again = await ldap.authenticate("ALICE", PASSWORDS["alice"])  # uid matching is case-insensitive
    assert again.subject == first.subject and again.username == "alice"
    assert await ldap.lookup(first.subject) == first


async def test_nested_groups_are_expanded_and_cycles_end(ldap_server):
    ldap = connector(ldap_server, nested_groups=True)
    identity = await ldap.authenticate("alice", PASSWORDS["alice"])
    # engineering ⊂ staff ⊂ everyone; loop-a ⊂ loop-b ⊂ loop-a
    assert sorted(identity.groups) == ["engineering", "everyone", "loop-a", "loop-b", "staff"]


async def test_unique_member_groups(ldap_server):
    ldap = connector(ldap_server, group_search={"filter": "(uniqueMember={dn})"})
    assert (await ldap.authenticate("alice", PASSWORDS["alice"])).groups == ["auditors"]


async def test_member_of_on_the_user_entry(ldap_server):
    ldap = connector(ldap_server, group_search=None, user_search={"groups_attribute": "memberOf"})
    assert sorted((await ldap.authenticate("alice", PASSWORDS["alice"])).groups) == ["engineering", "loop-a"]


async def test_group_prefix_and_allow_list(ldap_server):
    ldap = connector(ldap_server, nested_groups=True, groups={"prefix": "corp:", "allow": ["Staff", "everyone"]})
    assert sorted((await ldap.authenticate("alice", PASSWORDS["alice"])).groups) == ["corp:everyone", "corp:staff"]


async def test_a_huge_group_list_is_bounded(ldap_server, caplog):
    ldap = connector(ldap_server, max_groups=1000)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="iam.authn.connectors.ldap"):
        identity = await ldap.authenticate("many", PASSWORDS["many"])
    assert len(identity.groups) == 1000 and len(set(identity.groups)) == 1000
    assert all(name.startswith("bulk-") for name in identity.groups)
    assert any("more than 1000 groups" in r.getMessage() for r in caplog.records)
    assert time.monotonic() - started < 5
    everything = connector(ldap_server, max_groups=MANY_GROUPS)  # paged: more than one page of 500
    assert len((await everything.authenticate("many", PASSWORDS["many"])).groups) == MANY_GROUPS


# -- refused sign-ins -------------------------------------------------------------------------------------
async def test_wrong_password(ldap):
    with pytest.raises(InvalidCredentials) as caught:
        await ldap.authenticate("alice", "not-her-password")
    assert caught.value.reason == "invalid_credentials"


async def test_unknown_user(ldap):
    with pytest.raises(InvalidCredentials) as caught:
        await ldap.authenticate("nobody", "whatever-password")
    assert type(caught.value) is InvalidCredentials


async def test_a_search_matching_two_entries_signs_nobody_in(ldap_server):
    ldap = connector(ldap_server, user_search={"filter": "(&(objectClass=inetOrgPerson)(|(uid={username})(uid=bob)))"})
    with pytest.raises(InvalidCredentials, match="more than one entry matched"):
        await ldap.authenticate("alice", PASSWORDS["alice"])


async def test_empty_password_is_refused_before_any_network_call(ldap_server):
    # RFC 4513 §5.1.2: a simple bind with a DN and no password is an unauthenticated bind, and slapd says success.
    ldap = connector(ldap_server, url=f"ldaps://127.0.0.1:{free_port()}")  # nothing listens: no call is made
    with pytest.raises(InvalidCredentials):
        await ldap.authenticate("alice", "")


async def test_locked_account(ldap):
    with pytest.raises(AccountLocked) as caught:
        await ldap.authenticate("carol", PASSWORDS["carol"])
    assert isinstance(caught.value, InvalidCredentials) and caught.value.reason == "account_locked"


async def test_the_server_refuses_a_locked_bind_too(ldap_server):
    """Without the attribute check, slapd's ppolicy answers the bind with accountLocked (draft-behera §6.2)."""
    from iam.authn.connectors import ldap as module

    conn = connector(ldap_server)._connect()
    try:
        with pytest.raises(AccountLocked):
            connector(ldap_server)._user_bind(conn, ldap_server.user_dn("carol"), PASSWORDS["carol"])
    finally:
        module._close(conn)


@pytest.mark.parametrize("username", ["*", "*)(uid=*", "alice)(|(uid=*", "al*", "*)(objectClass=*))(|(uid=*",
                                      "alice\x00", "\\2a", "alice)", "(uid=alice)"])
async def test_filter_injection_finds_nothing(ldap, username):
    """RFC 4515 §3: `*`, `(`, `)`, `\\` and NUL in the username are escaped, never filter syntax."""
    with pytest.raises(InvalidCredentials) as caught:
        await ldap.authenticate(username, PASSWORDS["alice"])
    assert str(caught.value) == "no entry matched"  # not "more than one": the filter matched nobody


async def test_a_username_with_filter_specials_signs_in(ldap):
    identity = await ldap.authenticate("special(*)\\", PASSWORDS["special(*)\\"])
    assert identity.username == "special(*)\\"
    with pytest.raises(InvalidCredentials):
        await ldap.authenticate("special*", PASSWORDS["special(*)\\"])


async def test_the_password_is_not_a_filter_either(ldap):
    with pytest.raises(InvalidCredentials):
        await ldap.authenticate("alice", "*")


def test_filters_are_filled_with_escaped_values():
    assert fill("(&(uid={username})(x={username}))", username="*)(a=b") == r"(&(uid=\2a\29\28a=b)(x=\2a\29\28a=b))"
    assert fill("(objectGUID={dn})", dn=b"\x01\xff") == r"(objectGUID=\01\ff)"
    assert fill("(|(member={dn})(memberUid={username}))", dn="cn={username}", username="x") == "(|(member=cn={username})(memberUid=x))"
    assert in_chain("(&(objectClass=group)(member={dn}))") == "(&(objectClass=group)(member:1.2.840.113556.1.4.1941:={dn}))"


# -- faults ------------------------------------------------------------------------------------------------
async def test_wrong_service_password(ldap_server):
    ldap = connector(ldap_server, bind_password="not-the-service-password")
    with pytest.raises(ConnectorUnavailable) as caught:
        await ldap.authenticate("alice", PASSWORDS["alice"])
    assert caught.value.reason == "unavailable"
    assert "service bind refused" in str(caught.value)


async def test_server_down(ldap_server):
    ldap = connector(ldap_server)
    with ldap_server.stopped():
        started = time.monotonic()
        with pytest.raises(ConnectorUnavailable):
            await ldap.authenticate("alice", PASSWORDS["alice"])
        assert time.monotonic() - started < 2
        checks = await ldap.check()
        assert len(checks) == 1 and not checks[0].ok
    assert (await ldap.authenticate("alice", PASSWORDS["alice"])).username == "alice"  # back up


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("start_tls", [False, True])
async def test_a_hung_server_is_bounded_by_the_timeout(ldap_server, silent_server, start_tls):
    scheme = "ldap" if start_tls else "ldaps"
    ldap = connector(ldap_server, url=f"{scheme}://127.0.0.1:{silent_server}", start_tls=start_tls, timeout=1)
    started = time.monotonic()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.1)
            ticks += 1

    running = asyncio.create_task(ticker())
    try:
        with pytest.raises(ConnectorUnavailable):
            await ldap.authenticate("alice", PASSWORDS["alice"])
    finally:
        running.cancel()
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.5
    assert ticks >= 7  # the event loop kept running meanwhile
    await finished(ldap)


async def test_a_frozen_slapd_is_bounded_by_the_timeout_and_then_answers_again(ldap_server):
    ldap = connector(ldap_server, timeout=1)
    with ldap_server.paused():
        started = time.monotonic()
        with pytest.raises(ConnectorUnavailable, match="no answer within 1 s"):
            await ldap.authenticate("alice", PASSWORDS["alice"])
        assert time.monotonic() - started < 2
    await finished(ldap)
    assert (await connector(ldap_server).authenticate("alice", PASSWORDS["alice"])).username == "alice"


async def test_concurrent_sign_ins_share_the_bounded_slots(ldap_server):
    ldap = connector(ldap_server, max_connections=3)
    people = ["alice", "bob", "many", "special(*)\\"] * 5
    identities = await asyncio.gather(*(ldap.authenticate(uid, PASSWORDS[uid]) for uid in people))
    assert [identity.username for identity in identities] == people
    await finished(ldap)


async def test_an_untrusted_certificate_is_refused(ldap_server, tmp_path):
    other_ca, _, _ = make_ca(tmp_path, "other")
    for overrides in ({"ca_file": str(other_ca)}, {"ca_file": None},  # another CA; the system's CAs
                      {"ca_file": str(other_ca), "url": ldap_server.ldap_url, "start_tls": True}):
        with pytest.raises(ConnectorUnavailable):
            await connector(ldap_server, **overrides).authenticate("alice", PASSWORDS["alice"])


async def test_a_certificate_for_another_host_is_refused(ldap_server):
    # The certificate names 127.0.0.1 and ldap.test, not localhost (RFC 6125 / RFC 4513 §3.1.3).
    ldap = connector(ldap_server, url=f"ldaps://localhost:{ldap_server.ldaps_port}")
    with pytest.raises(ConnectorUnavailable):
        await ldap.authenticate("alice", PASSWORDS["alice"])


async def test_a_wrong_search_base_is_the_operators_problem_not_the_persons(ldap_server):
    ldap = connector(ldap_server, user_search={"base_dn": "ou=nowhere,dc=example,dc=test"})
    with pytest.raises(ConnectorUnavailable, match="noSuchObject"):
        await ldap.authenticate("alice", PASSWORDS["alice"])


def test_an_unreadable_ca_file_is_refused_at_start(ldap_server, tmp_path):
    with pytest.raises(ValueError, match="ca_file"):
        connector(ldap_server, ca_file=str(tmp_path / "missing.pem"))


# -- lookup (refresh) ----------------------------------------------------------------------------------------
async def test_lookup_after_the_person_is_locked_or_deleted(ldap, ldap_server):
    uid = "dora"
    ldap_server.modify(f"""dn: {ldap_server.user_dn(uid)}
changetype: add
objectClass: inetOrgPerson
uid: {uid}
cn: Dora Explorer
sn: Explorer
mail: dora@example.test
userPassword: dora-pw-Explorer-6
""")
    try:
        identity = await ldap.authenticate(uid, "dora-pw-Explorer-6")
        assert (await ldap.lookup(identity.subject)).username == uid
        ldap_server.modify(f"""dn: {ldap_server.user_dn(uid)}
changetype: modify
add: pwdAccountLockedTime
pwdAccountLockedTime: 000001010000Z
""")
        assert await ldap.lookup(identity.subject) is None
        with pytest.raises(AccountLocked):
            await ldap.authenticate(uid, "dora-pw-Explorer-6")
    finally:
        ldap_server.delete(ldap_server.user_dn(uid))
    assert await ldap.lookup(identity.subject) is None
    assert await ldap.lookup("not-a-uuid*") is None


async def test_lookup_when_the_server_is_down_is_unavailable_not_gone(ldap, ldap_server):
    identity = await ldap.authenticate("bob", PASSWORDS["bob"])
    with ldap_server.stopped(), pytest.raises(ConnectorUnavailable):
        await ldap.lookup(identity.subject)


# -- check (iam connectors test) ----------------------------------------------------------------------------
async def test_check_reports_each_step(ldap, ldap_server):
    checks = await ldap.check()
    assert [c.step for c in checks] == ["connect", "service bind", "user search base", "group search base"]
    assert all(c.ok for c in checks)
    bad = await connector(ldap_server, user_search={"base_dn": "ou=nowhere,dc=example,dc=test"}).check()
    assert [c.ok for c in bad] == [True, True, False, True]
    refused = await connector(ldap_server, bind_password="wrong").check()
    assert len(refused) == 1 and not refused[0].ok and "service bind refused" in refused[0].detail


# -- AD answers (no AD here: its documented bind diagnostics, through the same classification) ------------
@pytest.mark.parametrize(("message", "error"), [
    ("80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 52e, v3839", InvalidCredentials),
    ("80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 533, v3839", AccountDisabled),
    ("80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 775, v3839", AccountLocked),
    ("80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 532, v3839", PasswordExpired),
])
def test_active_directory_bind_diagnostics(ldap_server, message, error):
    ldap = connector(ldap_server)

    class Refused:  # what ldap3 leaves on a connection after AD refuses a bind
        authentication = user = password = None
        result = {"result": 49, "description": "invalidCredentials", "message": message, "controls": None}

        def bind(self, controls=None):
            return False

    with pytest.raises(error) as caught:
        ldap._user_bind(Refused(), "CN=Alice,CN=Users,DC=example,DC=test", "pw")
    assert type(caught.value) is error


def test_active_directory_disabled_flag_and_object_guid():
    import uuid

    from iam.authn.connectors.ldap import _Entry, _refuse_disabled, _subject, _subject_value

    with pytest.raises(AccountDisabled):
        _refuse_disabled(_Entry("CN=x", {"useraccountcontrol": [b"514"]}))  # NORMAL_ACCOUNT | ACCOUNTDISABLE
    _refuse_disabled(_Entry("CN=x", {"useraccountcontrol": [b"512"]}))
    guid = uuid.uuid4()
    entry = _Entry("CN=x", {"objectguid": [guid.bytes_le]})
    assert _subject(entry, "objectGUID") == str(guid)
    assert _subject_value(str(guid), "objectGUID") == guid.bytes_le


# -- nothing secret in the logs ------------------------------------------------------------------------------
async def test_no_password_or_bind_secret_in_any_log_line(ldap_server, caplog):
    with caplog.at_level(logging.DEBUG):
        ldap = connector(ldap_server, nested_groups=True)
        await ldap.authenticate("alice", PASSWORDS["alice"])
        for attempt in (("alice", "wrong-password-xyz"), ("carol", PASSWORDS["carol"]), ("*)(uid=*", "pw-x")):
            with pytest.raises(InvalidCredentials):
                await ldap.authenticate(*attempt)
        with pytest.raises(ConnectorUnavailable):
            await connector(ldap_server, bind_password="wrong-service-secret").authenticate("bob", PASSWORDS["bob"])
        await ldap.check()
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in (*PASSWORDS.values(), SERVICE_PASSWORD, "wrong-password-xyz", "wrong-service-secret"):
        assert secret not in text


async def test_a_hung_server_holds_only_its_own_threads(ldap_server, silent_server):
    """Twenty attempts against a silent server: all answered in time, at most max_connections threads used,
    and the default executor (password hashing for local sign-ins) stays free."""
    ldap = connector(ldap_server, url=f"ldaps://127.0.0.1:{silent_server}", timeout=1, max_connections=2)
    started = time.monotonic()
    attempts = [asyncio.create_task(ldap.authenticate("alice", PASSWORDS["alice"])) for _ in range(20)]
    local = await asyncio.wait_for(asyncio.to_thread(lambda: "hashed"), 0.5)
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert local == "hashed"
    assert all(isinstance(result, ConnectorUnavailable) for result in results)
    assert time.monotonic() - started < 2.5
    await finished(ldap)


async def test_email_verified_only_when_the_operator_says_so(ldap_server):
    ldap = connector(ldap_server, email_verified=True)
    assert (await ldap.authenticate("alice", PASSWORDS["alice"])).email_verified is True


def test_nested_groups_need_a_dn_filter(ldap_server):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="nested_groups"):
        ldap_server.connector_config(nested_groups=True, group_search={"filter": "(memberUid={username})"})
