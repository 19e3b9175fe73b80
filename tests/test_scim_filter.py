"""SCIM filters (RFC 7644 §3.4.2.2) and PATCH paths: the parser, in-memory matching, and SQL on both stores."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from iam.users.directory import Email, NewGroup, NewUser
from iam.users.scim.errors import ScimError, invalid_path
from iam.users.scim.filter import (
    MAX_FILTER,
    And,
    AttrPath,
    Compare,
    Not,
    Or,
    PatchPath,
    Present,
    ValuePath,
    matches,
    parse_filter,
    parse_path,
    to_sql,
)
from iam.users.scim.schemas import CORE_USER as USER_SCHEMA
from iam.users.scim.schemas import GROUP, USER
from iam.users.store import users

pytest.register_assert_rewrite("tests.scim_support")  # before the import: its asserts explain failures
from tests.scim_support import scim_error  # noqa: E402

pytest_plugins = ("tests.scim_support",)  # the `scim` fixture: one app per backend for this module

IAM = "urn:ietf:params:scim:schemas:extension:iam:2.0:User"


def path(name: str, sub: str | None = None, urn: str | None = None) -> AttrPath:
    return AttrPath(urn, name, sub)


def eq(name: str, value, op: str = "eq") -> Compare:
    return Compare(path(name), op, value)


# -- the parser ----------------------------------------------------------------------------------------------------
def test_operators_values_and_attribute_paths():
    assert parse_filter('userName eq "bjensen"') == eq("userName", "bjensen")
    for op in ("eq", "ne", "co", "sw", "ew", "gt", "lt", "ge", "le"):
        assert parse_filter(f'title {op.upper()} "x"') == Compare(path("title"), op, "x")
    assert parse_filter("title pr") == Present(path("title"))
    assert parse_filter("active eq true") == eq("active", True)
    assert parse_filter("active Eq FALSE") == eq("active", False)
    assert parse_filter("displayName eq null") == eq("displayName", None)
    assert parse_filter("x gt 42") == Compare(path("x"), "gt", 42)
    assert parse_filter("x lt -1.5e3") == Compare(path("x"), "lt", -1500.0)
    assert parse_filter('name.familyName co "O\'Malley"') == Compare(path("name", "familyName"), "co", "O'Malley")
    assert parse_filter('meta.lastModified gt "2011-05-13T04:42:34Z"') == Compare(
        path("meta", "lastModified"), "gt", "2011-05-13T04:42:34Z")
    assert parse_filter(f'{USER_SCHEMA}:name.givenName sw "B"') == Compare(path("name", "givenName", USER_SCHEMA),
                                                                            "sw", "B")
    assert parse_filter(f"{IAM}:emailVerified eq true") == Compare(path("emailVerified", urn=IAM), "eq", True)
    assert parse_filter('members.$ref pr') == Present(path("members", "$ref"))
    assert parse_filter('displayName eq "say \\"hi\\" \\u00e9\\n\\\\"') == eq("displayName", 'say "hi" é\n\\')


def test_precedence_grouping_and_not():
    a, b, c = eq("a", "1"), eq("b", "2"), eq("c", "3")
    assert parse_filter('a eq "1" or b eq "2" and c eq "3"') == Or((a, And((b, c))))
    assert parse_filter('a eq "1" and b eq "2" or c eq "3"') == Or((And((a, b)), c))
    assert parse_filter('(a eq "1" or b eq "2") and c eq "3"') == And((Or((a, b)), c))
    assert parse_filter('a eq "1" and b eq "2" and c eq "3"') == And((a, b, c))
    assert parse_filter('not (a eq "1")') == Not(a)
    assert parse_filter('NOT(a eq "1") AND not ( b eq "2" or c eq "3" )') == And((Not(a), Not(Or((b, c)))))
    assert parse_filter('((((a eq "1"))))') == a


def test_value_paths():
    assert parse_filter('emails[type eq "work" and value co "@example.com"]') == ValuePath(
        path("emails"), And((eq("type", "work"), Compare(path("value"), "co", "@example.com"))))
    assert parse_filter('emails[type eq "work"] or ims[type eq "xmpp" and not (value pr)]') == Or((
        ValuePath(path("emails"), eq("type", "work")),
        ValuePath(path("ims"), And((eq("type", "xmpp"), Not(Present(path("value")))))),
    ))
    assert parse_filter('userName sw "a" and emails[primary eq true]') == And((
        Compare(path("userName"), "sw", "a"), ValuePath(path("emails"), eq("primary", True))))


@pytest.mark.parametrize("text", [
    "", "   ", "userName", "userName eq", 'userName eq "x" and', 'userName zz "x"', '(userName pr', 'userName pr)',
    'userName eq "unterminated', 'emails[value eq "x"', 'emails[type eq "a"] x', 'userName eq "x" extra',
    'emails[members[value eq "x"]]', "not userName pr", "userName eq 'single'", 'a.b.c eq "x"', "and pr",
    'userName eq "x" or', "userName eq bare", 'userName eq "ctl\x01"', 'userName eq "\\u0000"', "userName eq 01",
    'name.givenName[x eq "y"]', 'userName eq "x")', "userName ! pr", "userName eq [", "x" * (MAX_FILTER + 1),
    "(" * 40 + "a pr" + ")" * 40, " or ".join(["a pr"] * 201), 'emails[type eq "work"].value eq "x"',
])
def test_invalid_filters(text):
    with pytest.raises(ScimError) as caught:
        parse_filter(text)
    assert caught.value.status == 400 and caught.value.scim_type == "invalidFilter"


def test_patch_paths():
    assert parse_path("userName", invalid_path) == PatchPath(path("userName"))
    assert parse_path("name.givenName", invalid_path) == PatchPath(path("name", "givenName"))
    assert parse_path('members[value eq "2819c223"]', invalid_path) == PatchPath(
        path("members"), eq("value", "2819c223"))
    assert parse_path('emails[type eq "work"].value', invalid_path) == PatchPath(
        path("emails"), eq("type", "work"), "value")
    assert parse_path(f"{IAM}:emailVerified", invalid_path) == PatchPath(path("emailVerified", urn=IAM))
    assert parse_path(f'{USER_SCHEMA}:emails[type eq "work"].display', invalid_path) == PatchPath(
        path("emails", urn=USER_SCHEMA), eq("type", "work"), "display")
    for text in ("", 'emails[type eq "work"].', 'emails[type eq "work"]value', 'name.givenName[x eq "y"]',
                 'emails[type eq "work"].value.x', "emails[]", "userName eq", '"userName"'):
        with pytest.raises(ScimError) as caught:
            parse_path(text, invalid_path)
        assert caught.value.scim_type == "invalidPath", text


def test_matching_values_in_memory():
    emails = USER.schema.attr("emails")
    work = {"value": "Bjensen@Example.com", "type": "work", "primary": True}
    home = {"value": "babs@jensen.org", "type": "home"}

    def hits(text):
        node = parse_filter(f"emails[{text}]").filter
        return [v["type"] for v in (work, home) if matches(node, v, emails)]

    assert hits('type eq "WORK"') == ["work"]  # caseExact=false
    assert hits('value sw "bjensen@"') == ["work"]
    assert hits('value ew ".ORG"') == ["home"]
    assert hits('value co "jensen"') == ["work", "home"]
    assert hits("primary eq true") == ["work"]
    assert hits("primary ne true") == ["home"]
    assert hits("primary pr") == ["work"]
    assert hits('display eq null') == ["work", "home"]
    assert hits('not (type eq "work")') == ["home"]
    assert hits('type eq "home" or primary eq true') == ["work", "home"]
    assert hits('type gt "home"') == ["work"]
    assert hits('type le "home"') == ["home"]
    assert hits('type ne "other"') == ["work", "home"]


# -- SQL, on SQLite and PostgreSQL -------------------------------------------------------------------------------------
SEED = {
    # userName: (displayName, givenName, familyName, emails, externalId, active, emailVerified, updated_at)
    "alice": ("Alice Liddell", "Alice", "Liddell",
              (Email("alice@Wonder.Land", "work", True), Email("alice@home.example", "home")), "EXT-1", True, True, 100),
    "Bob": ("Bob Builder", "Bob", "Builder", (Email("bob@build.example", "work"),), "ext-2", False, False, 200),
    "carol_x": (None, "Carol", None, (), None, True, False, 300),
    "dave%": ("Dave 100%", None, None, (Email("dave@wonder.land", "other"),), None, True, False, 400),
    "Émile": ("Émile Zola", None, None, (), None, True, False, 500),
}
EVERYONE = set(SEED)


def iso(seconds: int) -> str:
    from iam.users.scim.resources import timestamp

    return timestamp(1_700_000_000 + seconds)


@pytest.fixture(scope="module")
async def seeded(scim_app):
    directory = scim_app.state.iam.users.directory
    ids = {}
    for user_name, (display, given, family, emails, external, active, verified, _) in SEED.items():
        ids[user_name] = await directory.create_user(NewUser(
            user_name=user_name, display_name=display, given_name=given, family_name=family, emails=emails,
            external_id=external, active=active, email_verified=verified))
    ids["readers"] = await directory.create_group(NewGroup("Readers", members=(ids["alice"], ids["Bob"])))
    ids["writers"] = await directory.create_group(NewGroup("Writers", members=(ids["Bob"],)))
    async with directory.store.engine.begin() as conn:
        for user_name, row in SEED.items():
            await conn.execute(update(users).where(users.c.id == ids[user_name])
                               .values(updated_at=1_700_000_000 + row[-1]))
    return ids


async def found(directory, text: str, rtype=USER) -> set[str]:
    where = to_sql(parse_filter(text), rtype, directory.dialect)
    if rtype is USER:
        _, rows = await directory.query_users(where, limit=100)
        return {u.user_name for u in rows}
    _, rows = await directory.query_groups(where, limit=100)
    return {g.display_name for g in rows}


def user_cases(ids: dict) -> list[tuple[str, set[str]]]:
    return [
        ('userName eq "ALICE"', {"alice"}),
        ('USERNAME Eq "bob"', {"Bob"}),
        ('userName eq "ÉMILE"', {"Émile"}),
        ('userName ne "alice"', EVERYONE - {"alice"}),
        ('userName co "O"', {"Bob", "carol_x"}),
        ('userName sw "a"', {"alice"}),
        ('userName ew "X"', {"carol_x"}),
        ('userName co "%"', {"dave%"}),
        ('userName co "_"', {"carol_x"}),
        ("userName pr", EVERYONE),
        ('userName gt "bob"', {"carol_x", "dave%", "Émile"}),
        ('userName ge "bob"', {"Bob", "carol_x", "dave%", "Émile"}),
        ('userName lt "bob"', {"alice"}),
        ('userName le "BOB"', {"alice", "Bob"}),
        (f'{USER_SCHEMA}:userName eq "bob"', {"Bob"}),
        ('displayName co "BUILDER"', {"Bob"}),
        ('displayName sw "dave 100"', {"dave%"}),
        ('displayName ew "liddell"', {"alice"}),
        ("displayName pr", EVERYONE - {"carol_x"}),
        ("not (displayName pr)", {"carol_x"}),
        ("displayName eq null", {"carol_x"}),
        ('displayName ne "Bob Builder"', EVERYONE - {"Bob"}),
        ('externalId eq "EXT-1"', {"alice"}),
        ('externalId eq "ext-1"', set()),  # externalId is caseExact
        ('externalId sw "ext"', {"Bob"}),
        ('externalId co "XT"', {"alice"}),
        ('externalId ew "-2"', {"Bob"}),
        ("externalId pr", {"alice", "Bob"}),
        ("active eq false", {"Bob"}),
        ("active eq true", EVERYONE - {"Bob"}),
        ("active ne true", {"Bob"}),
        ("active pr", EVERYONE),
        (f"{IAM}:emailVerified eq true", {"alice"}),
        ('name.givenName eq "carol"', {"carol_x"}),
        ('name.familyName sw "LID"', {"alice"}),
        ("name.familyName pr", {"alice", "Bob"}),
        ('emails co "wonder.land"', {"alice", "dave%"}),
        ('emails.value eq "BOB@BUILD.EXAMPLE"', {"Bob"}),
        ('emails eq "alice@wonder.land"', {"alice"}),
        ('emails ne "alice@wonder.land"', EVERYONE - {"alice"}),
        ('emails.value sw "dave@"', {"dave%"}),
        ('emails.value ew ".example"', {"alice", "Bob"}),
        ('emails.type eq "other"', {"dave%"}),
        ("emails.primary eq true", {"alice"}),
        ("emails pr", {"alice", "Bob", "dave%"}),
        ('emails[type eq "work" and value ew ".land"]', {"alice"}),
        ('emails[type eq "home"]', {"alice"}),
        ('emails[not (type eq "work")]', {"alice", "dave%"}),
        ('emails[type eq "work" or type eq "other"] and active eq true', {"alice", "dave%"}),
        (f'groups eq "{ids["readers"]}"', {"alice", "Bob"}),
        (f'groups.value eq "{ids["writers"].upper()}"', {"Bob"}),
        ('groups.display eq "WRITERS"', {"Bob"}),
        ("groups pr", {"alice", "Bob"}),
        ('groups[display sw "read"]', {"alice", "Bob"}),
        (f'id eq "{ids["carol_x"]}"', {"carol_x"}),
        (f'meta.lastModified gt "{iso(200)}"', {"carol_x", "dave%", "Émile"}),
        (f'meta.lastModified ge "{iso(200)}"', {"Bob", "carol_x", "dave%", "Émile"}),
        (f'meta.lastModified lt "{iso(250)}"', {"alice", "Bob"}),
        (f'meta.lastModified le "{iso(100)}"', {"alice"}),
        (f'meta.lastModified eq "{iso(300)}"', {"carol_x"}),
        (f'meta.lastModified ne "{iso(300)}"', EVERYONE - {"carol_x"}),
        ("meta.created pr", EVERYONE),
        ('userName eq "bob" or userName eq "alice" and active eq false', {"Bob"}),
        ('(userName eq "bob" or userName eq "alice") and active eq true', {"alice"}),
        ('not (active eq true) or displayName co "dave"', {"Bob", "dave%"}),
        ('not (userName eq "alice" or userName eq "bob")', EVERYONE - {"alice", "Bob"}),
        ('userName pr and not (emails pr) and not (groups pr)', {"carol_x", "Émile"}),
    ]


async def test_every_operator_against_the_store(scim, seeded):
    directory = scim.directory
    failures = []
    for text, expected in user_cases(seeded):
        got = await found(directory, text)
        if got != expected:
            failures.append((text, got, expected))
    assert not failures, failures
    assert await found(directory, 'displayName eq "READERS"', GROUP) == {"Readers"}
    assert await found(directory, 'displayName co "er"', GROUP) == {"Readers", "Writers"}
    assert await found(directory, f'members eq "{seeded["alice"]}"', GROUP) == {"Readers"}
    assert await found(directory, f'members[value eq "{seeded["Bob"]}"] and displayName sw "w"', GROUP) == {"Writers"}


async def test_filters_over_http(scim, seeded):
    listed = (await scim.get("/Users", params={"filter": 'emails[type eq "work"] and name.givenName pr',
                                               "sortBy": "name.givenName"})).json()
    assert [u["userName"] for u in listed["Resources"]] == ["alice", "Bob"] and listed["totalResults"] == 2
    by_email = (await scim.get("/Users", params={"sortBy": "emails", "filter": "emails pr"})).json()
    assert [u["userName"] for u in by_email["Resources"]] == ["alice", "Bob", "dave%"]
    for text in ('emails[type eq "work"].value eq "x"', 'title eq "x"', "active co true", "active eq \"true\"",
                 'meta.lastModified co "2020"', 'emails[nosuch eq "x"]', 'userName[value eq "x"]',
                 'groups.display gt 3', "emails.primary eq \"yes\"", 'urn:nope:x eq "y"'):
        scim_error(await scim.get("/Users", params={"filter": text}), 400, "invalidFilter")
