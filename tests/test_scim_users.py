"""SCIM Users (RFC 7643 §4.1, RFC 7644 §3): CRUD, PATCH, ETags, listing, passwords, errors, scopes."""

from __future__ import annotations

import asyncio

import pytest

from iam.peers import PeerUnavailable, ServiceIdentity
from iam.roles import Role
from iam.users.scim.routes import list_query
from iam.users.scim.schemas import MAX_RESULTS
from tests.conftest import basic

pytest.register_assert_rewrite("tests.scim_support")  # before the import: its asserts explain failures
from tests.scim_support import IAM_USER, SCIM_JSON, SEARCH, USER_SCHEMA, dump_store, scim_error, unique  # noqa: E402

pytest_plugins = ("tests.scim_support",)  # the `scim` fixture: one app per backend for this module

PASSWORD = "correct horse battery staple"


# -- CRUD ---------------------------------------------------------------------------------------------------
async def test_create_read_replace_delete(scim):
    name = unique("bjensen")
    response = await scim.post("/Users", {
        "schemas": [USER_SCHEMA, IAM_USER],
        "userName": name,
        "externalId": "hr-701984",
        "name": {"givenName": "Barbara", "familyName": "Jensen", "formatted": "Ms. Barbara J Jensen III"},
        "displayName": "Babs Jensen",
        "nickName": "Babs",
        "title": "Tour Guide",
        "emails": [{"value": "bjensen@Example.com", "type": "work", "primary": True},
                   {"value": "babs@jensen.org", "type": "home"}],
        "phoneNumbers": [{"value": "555-555-8377", "type": "work"}],
        IAM_USER: {"emailVerified": True},
    })
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith(SCIM_JSON)
    created = response.json()
    user_id = created["id"]
    assert response.headers["location"] == f"https://iam.test/scim/v2/Users/{user_id}"
    assert response.headers["etag"] == created["meta"]["version"] == 'W/"1"'
    assert created["schemas"] == [USER_SCHEMA, IAM_USER]
    assert created["userName"] == name and created["active"] is True
    assert created["name"] == {"formatted": "Ms. Barbara J Jensen III", "familyName": "Jensen", "givenName": "Barbara"}
    assert created["emails"][0] == {"value": "bjensen@Example.com", "type": "work", "primary": True}
    assert created["phoneNumbers"] == [{"value": "555-555-8377", "type": "work"}]
    assert created[IAM_USER] == {"emailVerified": True}
    assert created["meta"]["resourceType"] == "User" and created["meta"]["location"] == response.headers["location"]
    assert "groups" not in created and "password" not in created

    read = await scim.get(f"/Users/{user_id}")
    assert read.status_code == 200 and read.json() == created
    assert read.headers["etag"] == 'W/"1"'

    claims = await scim.directory.claims(user_id)
    assert (claims.preferred_username, claims.email, claims.email_verified) == (name, "bjensen@example.com", True)
    assert claims.name == "Babs Jensen" and claims.given_name == "Barbara"

    replaced = await scim.put(f"/Users/{user_id}", {
        "schemas": [USER_SCHEMA], "userName": name.upper(), "name": {"givenName": "Barb"},
        "emails": [{"value": "barb@example.com", "primary": True}],
    })
    assert replaced.status_code == 200, replaced.text
    body = replaced.json()
    assert body["userName"] == name.upper() and body["name"] == {"givenName": "Barb"}
    assert "displayName" not in body and "externalId" not in body and "nickName" not in body  # PUT replaces
    assert body["meta"]["version"] == replaced.headers["etag"] == 'W/"2"'
    assert body["active"] is True  # not given: kept
    assert body[IAM_USER] == {"emailVerified": False}  # a new primary address is not verified
    assert (await scim.get(f"/Users/{user_id}")).json() == body

    assert (await scim.delete(f"/Users/{user_id}")).status_code == 204
    scim_error(await scim.get(f"/Users/{user_id}"), 404)
    scim_error(await scim.delete(f"/Users/{user_id}"), 404)
    scim_error(await scim.put(f"/Users/{user_id}", {"schemas": [USER_SCHEMA], "userName": name}), 404)
    assert await scim.directory.claims(user_id) is None


async def test_attribute_names_are_case_insensitive(scim):
    name = unique("CaseUser")
    response = await scim.post("/Users", {
        "SCHEMAS": [USER_SCHEMA.upper()],
        "USERNAME": name,
        "Name": {"GIVENNAME": "Ada"},
        "EMAILS": [{"VALUE": "ADA@EXAMPLE.ORG", "Primary": True}],
        IAM_USER.lower(): {"EMAILVERIFIED": True},
    })
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["userName"] == name and body["name"] == {"givenName": "Ada"}
    assert body["emails"] == [{"value": "ADA@EXAMPLE.ORG", "primary": True}]
    claims = await scim.directory.claims(body["id"])
    assert claims.email == "ada@example.org" and claims.email_verified is True


async def test_user_name_is_unique_case_insensitively(scim):
    name = unique("Taken")
    first = await scim.create_user(name)
    other = await scim.create_user()
    before = await dump_store(scim.app)
    scim_error(await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": name.upper()}), 409, "uniqueness")
    scim_error(await scim.put(f"/Users/{other['id']}", {"schemas": [USER_SCHEMA], "userName": name.lower()}),
               409, "uniqueness")
    scim_error(await scim.patch(f"/Users/{other['id']}", [{"op": "replace", "path": "userName", "value": name}]),
               409, "uniqueness")
    assert await dump_store(scim.app) == before
    # renaming a user to another spelling of its own name is fine
    renamed = await scim.patch(f"/Users/{first['id']}", [{"op": "replace", "path": "userName", "value": name.upper()}])
    assert renamed.status_code == 200 and renamed.json()["userName"] == name.upper()


async def test_concurrent_creates_of_one_user_name(scim):
    name = unique("race")
    bodies = [{"schemas": [USER_SCHEMA], "userName": name if i % 2 else name.upper()} for i in range(10)]
    responses = await asyncio.gather(*(scim.post("/Users", body) for body in bodies))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 9, [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            scim_error(response, 409, "uniqueness")
    assert (await scim.list(filter=f'userName eq "{name}"'))["totalResults"] == 1


# -- passwords ------------------------------------------------------------------------------------------------
async def test_password_is_write_only_and_kept_only_by_the_credential_store(scim, scim_backend):
    credentials = scim.app.state.iam.authn.credentials
    created = await scim.create_user(password=PASSWORD)
    user_id = created["id"]
    assert "password" not in created
    assert "password" not in (await scim.get(f"/Users/{user_id}")).text
    assert await credentials.verify(user_id, PASSWORD)

    second = "second password for the test"
    patched = await scim.patch(f"/Users/{user_id}", [{"op": "replace", "path": "password", "value": second}])
    assert patched.status_code == 200 and "password" not in patched.json()
    assert await credentials.verify(user_id, second) and not await credentials.verify(user_id, PASSWORD)

    third = "third password for the test"
    put = await scim.put(f"/Users/{user_id}", {"schemas": [USER_SCHEMA], "userName": created["userName"],
                                                "password": third})
    assert put.status_code == 200 and "password" not in put.json()
    assert await credentials.verify(user_id, third)

    fourth = "fourth password, no path"
    no_path = await scim.patch(f"/Users/{user_id}", [{"op": "replace", "value": {"password": fourth}}])
    assert no_path.status_code == 200
    assert await credentials.verify(user_id, fourth)

    # a password is never filtered on, returned, or removed
    scim_error(await scim.get("/Users", params={"filter": 'password eq "x"'}), 400, "invalidFilter")
    scim_error(await scim.patch(f"/Users/{user_id}", [{"op": "remove", "path": "password"}]), 400, "mutability")
    only = await scim.get(f"/Users/{user_id}", params={"attributes": "password,userName"})
    assert "password" not in only.json()

    dump = repr(await dump_store(scim.app))
    for secret in (PASSWORD, second, third, fourth, "$argon2"):
        assert secret not in dump
    assert "$argon2" in repr(await dump_store(scim.app, "authn"))



async def test_a_hash_of_older_parameters_still_verifies_and_is_rehashed_at_the_next_sign_in(scim):
    """A password hashed before the one-lane parameters (argon2-cffi's p=4): the right password still works and
    leaves a hash at iam's parameters (iam/security.py HASHER); a wrong one changes nothing stored."""
    from argon2 import PasswordHasher, Type, extract_parameters

    from iam.security import HASHER

    def at_iams_parameters(encoded: str) -> bool:
        used = extract_parameters(encoded)
        return (used.type, used.time_cost, used.memory_cost, used.parallelism) == (
            Type.ID, HASHER.time_cost, HASHER.memory_cost, HASHER.parallelism)

    credentials = scim.app.state.iam.authn.credentials
    user_id = (await scim.create_user(password=PASSWORD))["id"]
    assert at_iams_parameters(await credentials.store.password_hash(user_id)) and HASHER.parallelism == 1
    older = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4).hash(PASSWORD)
    await credentials.store.upgrade_password_hash(user_id, older)
    assert not await credentials.verify(user_id, PASSWORD + "x")
    assert await credentials.store.password_hash(user_id) == older
    assert await credentials.verify(user_id, PASSWORD)
    rehashed = await credentials.store.password_hash(user_id)
    assert rehashed != older and at_iams_parameters(rehashed) and await credentials.verify(user_id, PASSWORD)

async def test_a_password_the_policy_refuses_is_invalid_value_and_changes_nothing(scim):
    before = await dump_store(scim.app)
    name = unique()
    body = scim_error(await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": name, "password": "short"}),
                      400, "invalidValue")
    assert "at least 8 characters" in body["detail"]
    for common in ("password1", "Qwerty123", "iloveyou1"):  # ASVS 5 V6.2.4, compared case-insensitively
        body = scim_error(await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": name, "password": common}),
                          400, "invalidValue")
        assert "commonly used" in body["detail"]
    scim_error(await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": name, "password": 12345678}),
               400, "invalidValue")
    assert await dump_store(scim.app) == before
    assert await scim.directory.find(name) is None

    created = await scim.create_user(name, displayName="Before")
    before = await dump_store(scim.app)
    scim_error(await scim.patch(f"/Users/{created['id']}", [
        {"op": "replace", "path": "displayName", "value": "After"},
        {"op": "replace", "path": "password", "value": "short"},
    ]), 400, "invalidValue")
    scim_error(await scim.put(f"/Users/{created['id']}", {"schemas": [USER_SCHEMA], "userName": name,
                                                           "displayName": "After", "password": "x" * 300}),
               400, "invalidValue")
    assert await dump_store(scim.app) == before


class FailingCredentials:
    """The authentication role, down: every call fails as a peer outage would."""

    async def set_password(self, sub: str, password: str) -> None:
        raise PeerUnavailable("the authentication role did not answer (test)")

    async def remove(self, sub: str) -> None:
        raise PeerUnavailable("the authentication role did not answer (test)")


async def test_a_credential_store_outage_half_way_leaves_nothing_and_a_retry_succeeds(scim):
    directory = scim.directory
    real = directory.credentials
    name = unique("halfway")
    existing = await scim.create_user(displayName="Kept", password=PASSWORD)
    before = await dump_store(scim.app)
    directory.credentials = FailingCredentials()
    try:
        scim_error(await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": name, "password": PASSWORD}), 503)
        scim_error(await scim.put(f"/Users/{existing['id']}", {
            "schemas": [USER_SCHEMA], "userName": existing["userName"], "displayName": "Changed",
            "password": "another password here"}), 503)
        scim_error(await scim.patch(f"/Users/{existing['id']}", [
            {"op": "replace", "path": "active", "value": False},
            {"op": "replace", "path": "password", "value": "another password here"}]), 503)
        scim_error(await scim.delete(f"/Users/{existing['id']}"), 503)
        assert await dump_store(scim.app) == before
        assert await directory.find(name) is None
        assert (await scim.list(filter=f'userName eq "{name}"'))["totalResults"] == 0
    finally:
        directory.credentials = real
    assert await scim.app.state.iam.authn.credentials.verify(existing["id"], PASSWORD)  # the old password still works
    retried = await scim.create_user(name, password=PASSWORD)
    assert await scim.app.state.iam.authn.credentials.verify(retried["id"], PASSWORD)


# -- PATCH ------------------------------------------------------------------------------------------------------
async def test_patch_add_replace_remove(scim):
    user = await scim.create_user(
        name={"givenName": "Ann", "familyName": "Lee"},
        emails=[{"value": "ann@work.example", "type": "work", "primary": True},
                {"value": "ann@home.example", "type": "home"}],
    )
    path = f"/Users/{user['id']}"

    async def patch(*operations):
        response = await scim.patch(path, list(operations))
        assert response.status_code == 200, response.text
        return response.json()

    body = await patch({"op": "replace", "path": "name.givenName", "value": "Anne"},
                       {"op": "add", "path": "displayName", "value": "Anne Lee"},
                       {"op": "add", "path": "name", "value": {"middleName": "M"}})
    assert body["name"] == {"familyName": "Lee", "givenName": "Anne", "middleName": "M"}
    assert body["displayName"] == "Anne Lee"

    body = await patch({"op": "replace", "path": 'emails[type eq "work"].value', "value": "anne@work.example"})
    assert [e["value"] for e in body["emails"]] == ["anne@work.example", "ann@home.example"]
    assert (await scim.directory.claims(user["id"])).email == "anne@work.example"
    body = await patch({"op": "add", "path": 'emails[type eq "work"]', "value": {"display": "Work mail"}})
    assert body["emails"][0] == {"value": "anne@work.example", "type": "work", "primary": True, "display": "Work mail"}

    # a new primary value takes the flag from the old one
    body = await patch({"op": "add", "path": "emails", "value": [{"value": "a@new.example", "primary": True}]})
    assert [e.get("primary", False) for e in body["emails"]] == [False, False, True]
    assert (await scim.directory.claims(user["id"])).email == "a@new.example"

    body = await patch({"op": "remove", "path": 'emails[type eq "home"]'},
                       {"op": "remove", "path": 'emails[value eq "nothing@there"]'})  # no match: already absent
    assert [e["value"] for e in body["emails"]] == ["anne@work.example", "a@new.example"]

    # add through a value filter that matches nothing adds a value (filter of eq terms only)
    body = await patch({"op": "add", "path": 'emails[type eq "other"].value', "value": "x@other.example"})
    assert body["emails"][-1] == {"value": "x@other.example", "type": "other"}

    # no path: the keys are attributes (or paths); extension by its URN
    body = await patch({"op": "replace", "value": {"active": False, "name.familyName": "Li",
                                                   IAM_USER: {"emailVerified": True}}})
    assert body["active"] is False and body["name"]["familyName"] == "Li" and body[IAM_USER]["emailVerified"] is True
    claims = await scim.directory.claims(user["id"])
    assert claims.active is False and claims.email_verified is True

    body = await patch({"op": "remove", "path": "name.middleName"}, {"op": "remove", "path": "displayName"},
                       {"op": "replace", "path": f"{IAM_USER}:emailVerified", "value": False},
                       {"op": "Replace", "path": "ACTIVE", "value": True})
    assert "displayName" not in body and body["name"] == {"familyName": "Li", "givenName": "Anne"}
    assert body[IAM_USER]["emailVerified"] is False and body["active"] is True

    body = await patch({"op": "replace", "path": "emails", "value": [{"value": "only@example.com"}]})
    assert body["emails"] == [{"value": "only@example.com"}]
    body = await patch({"op": "remove", "path": "emails"})
    assert "emails" not in body
    assert (await scim.directory.claims(user["id"])).email is None
    assert body["meta"]["version"] == 'W/"11"'


async def test_patch_errors_change_nothing(scim):
    user = await scim.create_user(displayName="Same", emails=[{"value": "p@example.com", "type": "work"}])
    path = f"/Users/{user['id']}"
    before = await dump_store(scim.app)
    cases = [
        ([{"op": "replace", "path": "id", "value": "other"}], "mutability"),
        ([{"op": "replace", "path": "meta.lastModified", "value": "2020-01-01T00:00:00Z"}], "mutability"),
        ([{"op": "add", "path": "groups", "value": [{"value": "g"}]}], "mutability"),
        ([{"op": "replace", "value": {"groups": []}}], "mutability"),
        ([{"op": "remove"}], "noTarget"),
        ([{"op": "replace", "path": 'emails[type eq "home"].value', "value": "h@example.com"}], "noTarget"),
        ([{"op": "add", "path": 'emails[value co "zzz"].type', "value": "home"}], "noTarget"),
        ([{"op": "replace", "path": "nosuch", "value": 1}], "invalidPath"),
        ([{"op": "replace", "path": "name.nosuch", "value": "x"}], "invalidPath"),
        ([{"op": "replace", "path": 'emails[type zz "work"]', "value": {}}], "invalidPath"),
        ([{"op": "replace", "path": 'emails[nosuch eq "x"].value', "value": "x"}], "invalidPath"),
        ([{"op": "replace", "path": 'userName[value eq "x"]', "value": "x"}], "invalidPath"),
        ([{"op": "replace", "value": {"nosuch": 1}}], "invalidSyntax"),
        ([{"op": "replace", "path": "displayName", "value": "Changed"}, {"op": "remove", "path": "userName"}],
         "invalidValue"),
        ([{"op": "replace", "path": "active", "value": "False"}], "invalidValue"),
        ([{"op": "replace", "path": "displayName", "value": ["x"]}], "invalidValue"),
        ([{"op": "replace", "path": "emails", "value": [{"value": "a@x"}, {"value": "b@x", "primary": True},
                                                      {"value": "c@x", "primary": True}]}], "invalidValue"),
        ([{"op": "replace", "value": "not an object"}], "invalidValue"),
        ([{"op": "move", "path": "displayName"}], "invalidSyntax"),
        ([{"op": "add", "path": "displayName"}], "invalidSyntax"),
        ([{"op": "add", "path": "displayName", "value": "x", "extra": 1}], "invalidSyntax"),
        ([], "invalidSyntax"),
        (["add"], "invalidSyntax"),
    ]
    for operations, scim_type in cases:
        scim_error(await scim.patch(path, operations), 400, scim_type)
    for body in ({"Operations": [{"op": "remove", "path": "displayName"}]},  # no schemas
                 {"schemas": [USER_SCHEMA], "Operations": [{"op": "remove", "path": "displayName"}]},
                 [{"op": "remove", "path": "displayName"}]):
        scim_error(await scim.request("PATCH", path, json=body), 400, "invalidSyntax")
    assert await dump_store(scim.app) == before


# -- unassigned attributes (RFC 7643 §2.5, RFC 7644 §3.5.1, §3.5.2.2) -------------------------------------------
async def test_active_cannot_be_unassigned_and_a_refusal_changes_nothing(scim):
    """A user is active or not: unassigning `active` (remove, null) is 400 invalidValue, never a silent 200."""
    user = await scim.create_user(active=False)
    path = f"/Users/{user['id']}"
    before = await dump_store(scim.app)
    for operations in ([{"op": "remove", "path": "active"}],
                       [{"op": "replace", "path": "active", "value": None}],
                       [{"op": "replace", "value": {"active": None}}],
                       [{"op": "add", "path": "active", "value": None}],
                       [{"op": "replace", "path": "password", "value": None}],
                       [{"op": "remove", "path": "password"}]):
        body = scim_error(await scim.patch(path, operations), 400, "mutability" if operations[0].get(
            "path") == "password" and operations[0]["op"] == "remove" else "invalidValue")
        assert "unassigned" in body["detail"] or "removed" in body["detail"], body
    for put in ({"active": None}, {"password": None}):
        scim_error(await scim.put(path, {"schemas": [USER_SCHEMA], "userName": user["userName"], **put}), 400,
                   "invalidValue")
    assert await dump_store(scim.app) == before
    assert (await scim.directory.claims(user["id"])).active is False
    # Omitted from a PUT, it is not asserted (RFC 7644 §3.5.1): the current value stays.
    kept = await scim.put(path, {"schemas": [USER_SCHEMA], "userName": user["userName"]})
    assert kept.status_code == 200 and kept.json()["active"] is False


@pytest.mark.parametrize("unassign", [
    [{"op": "remove", "path": f"{IAM_USER}:emailVerified"}],
    [{"op": "replace", "path": f"{IAM_USER}:emailVerified", "value": None}],
    [{"op": "replace", "value": {f"{IAM_USER}:emailVerified": None}}],
    [{"op": "remove", "path": IAM_USER}],
    {IAM_USER: {"emailVerified": None}},
    {IAM_USER: None},
], ids=["patch-remove", "patch-null", "patch-no-path-null", "patch-remove-extension", "put-null",
        "put-null-extension"])
async def test_unassigned_email_verified_is_false(scim, unassign):
    """An address nobody asserted as verified is not verified: the OIDC email_verified claim becomes false."""
    user = await scim.create_user(emails=[{"value": "v@example.com", "primary": True}], **{IAM_USER: {"emailVerified": True}})
    path = f"/Users/{user['id']}"
    if isinstance(unassign, list):
        response = await scim.patch(path, unassign)
    else:
        response = await scim.put(path, {"schemas": [USER_SCHEMA, IAM_USER], "userName": user["userName"],
                                         "emails": user["emails"], **unassign})
    assert response.status_code == 200, response.text
    assert response.json()[IAM_USER] == {"emailVerified": False}
    assert (await scim.directory.claims(user["id"])).email_verified is False
    # Omitted from a PUT with the same primary address, it is not asserted: kept.
    await scim.patch(path, [{"op": "replace", "path": f"{IAM_USER}:emailVerified", "value": True}])
    kept = await scim.put(path, {"schemas": [USER_SCHEMA], "userName": user["userName"], "emails": user["emails"]})
    assert kept.json()[IAM_USER] == {"emailVerified": True}


# -- replace: read-only attributes ------------------------------------------------------------------------------
async def test_put_accepts_what_get_returned_but_no_change_to_read_only_attributes(scim):
    user = await scim.create_user(displayName="Round Trip")
    group = await scim.create_group(members=(user["id"],))
    current = (await scim.get(f"/Users/{user['id']}")).json()
    assert current["groups"][0]["value"] == group["id"]
    echoed = await scim.put(f"/Users/{user['id']}", {**current, "displayName": "Round Tripped"})
    assert echoed.status_code == 200, echoed.text
    assert echoed.json()["displayName"] == "Round Tripped" and echoed.json()["groups"] == current["groups"]

    before = await dump_store(scim.app)
    scim_error(await scim.put(f"/Users/{user['id']}", {**current, "id": "another-id"}), 400, "mutability")
    scim_error(await scim.put(f"/Users/{user['id']}", {**current, "groups": []}), 400, "mutability")
    scim_error(await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": unique(),
                                          "groups": [{"value": group["id"]}]}), 400, "mutability")
    assert await dump_store(scim.app) == before


async def test_deactivation_and_deletion_reach_the_claims_at_once(scim):
    user = await scim.create_user(password=PASSWORD)
    sub = user["id"]
    # what the token and authentication roles call: /internal/v1/users/{sub}, with a service assertion
    assertion = ServiceIdentity(Role.TOKEN, scim.app.state.iam.keys).assertion(Role.USER_MANAGEMENT)
    internal = {"Authorization": f"Bearer {assertion}"}

    async def internal_claims():
        return await scim.http.get(f"/internal/v1/users/{sub}", headers=internal)

    assert (await internal_claims()).json()["active"] is True
    assert (await scim.patch(f"/Users/{sub}", [{"op": "replace", "path": "active", "value": False}])).status_code == 200
    assert (await scim.directory.claims(sub)).active is False
    assert (await internal_claims()).json()["active"] is False
    put = await scim.put(f"/Users/{sub}", {"schemas": [USER_SCHEMA], "userName": user["userName"], "active": True})
    assert put.json()["active"] is True and (await scim.directory.claims(sub)).active is True

    assert (await scim.delete(f"/Users/{sub}")).status_code == 204
    assert await scim.directory.claims(sub) is None
    assert (await internal_claims()).status_code == 404
    assert not await scim.app.state.iam.authn.credentials.verify(sub, PASSWORD)  # the credential went too


# -- ETags -------------------------------------------------------------------------------------------------------
async def test_etags_and_preconditions(scim):
    user = await scim.create_user(displayName="v1")
    path = f"/Users/{user['id']}"
    read = await scim.get(path)
    etag = read.headers["etag"]
    assert etag == read.json()["meta"]["version"] == 'W/"1"'
    not_modified = await scim.get(path, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.headers["etag"] == etag

    updated = await scim.patch(path, [{"op": "replace", "path": "displayName", "value": "v2"}],
                               headers={"If-Match": etag})
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'
    assert (await scim.get(path, headers={"If-None-Match": etag})).status_code == 200

    before = await dump_store(scim.app)
    for stale in (etag, '"1"', 'W/"99"', "garbage"):
        headers = {"If-Match": stale}
        scim_error(await scim.patch(path, [{"op": "replace", "path": "displayName", "value": "v3"}], headers=headers),
                   412)
        scim_error(await scim.put(path, {"schemas": [USER_SCHEMA], "userName": user["userName"]}, headers=headers),
                   412)
        scim_error(await scim.delete(path, headers=headers), 412)
    assert await dump_store(scim.app) == before

    replaced = await scim.put(path, {"schemas": [USER_SCHEMA], "userName": user["userName"]},
                              headers={"If-Match": 'W/"1", W/"2"'})
    assert replaced.status_code == 200 and replaced.headers["etag"] == 'W/"3"'
    assert (await scim.delete(path, headers={"If-Match": "*"})).status_code == 204


# -- listing ------------------------------------------------------------------------------------------------------
async def test_pagination_and_sorting(scim):
    prefix = unique("page")
    names = [f"{prefix}-{c}" for c in "edcba"]
    for name in names:
        await scim.create_user(name)
    in_prefix = f'userName sw "{prefix}"'

    def user_names(page):
        return [r["userName"] for r in page["Resources"]]

    everything = await scim.list(filter=in_prefix, sortBy="userName")
    assert everything["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:ListResponse"]
    assert everything["totalResults"] == 5 and everything["itemsPerPage"] == 5 and everything["startIndex"] == 1
    assert user_names(everything) == sorted(names)

    first = await scim.list(filter=in_prefix, sortBy="userName", count="2")
    second = await scim.list(filter=in_prefix, sortBy="userName", count="2", startIndex="3")
    last = await scim.list(filter=in_prefix, sortBy="userName", count="2", startIndex="5")
    assert (first["totalResults"], first["itemsPerPage"], first["startIndex"]) == (5, 2, 1)
    assert user_names(first) + user_names(second) + user_names(last) == sorted(names)
    assert last["itemsPerPage"] == 1 and second["startIndex"] == 3

    for start in ("0", "-4"):  # less than 1 means 1
        page = await scim.list(filter=in_prefix, sortBy="userName", startIndex=start, count="1")
        assert page["startIndex"] == 1 and user_names(page) == [sorted(names)[0]]
    beyond = await scim.list(filter=in_prefix, startIndex="50")
    assert beyond["totalResults"] == 5 and beyond["Resources"] == [] and beyond["itemsPerPage"] == 0

    only_total = await scim.list(filter=in_prefix, count="0")
    assert only_total["totalResults"] == 5 and only_total["itemsPerPage"] == 0 and only_total["Resources"] == []
    assert (await scim.list(filter=in_prefix, count="-3"))["itemsPerPage"] == 0
    capped = await scim.list(filter=in_prefix, count="100000")
    assert capped["itemsPerPage"] == 5
    assert list_query({"count": "100000"}).count == MAX_RESULTS

    descending = await scim.list(filter=in_prefix, sortBy="USERNAME", sortOrder="descending")
    assert user_names(descending) == sorted(names, reverse=True)
    # without sortBy the order is still stable (creation time, then id), so paging is consistent
    unsorted = user_names(await scim.list(filter=in_prefix))
    assert sorted(unsorted) == sorted(names) and user_names(await scim.list(filter=in_prefix)) == unsorted

    for params, scim_type in (({"count": "many"}, "invalidValue"), ({"startIndex": "1.5"}, "invalidValue"),
                              ({"sortOrder": "sideways"}, "invalidValue"), ({"sortBy": "password"}, "invalidValue"),
                              ({"filter": "userName eq"}, "invalidFilter")):
        scim_error(await scim.get("/Users", params=params), 400, scim_type)


async def test_attributes_and_excluded_attributes(scim):
    user = await scim.create_user(name={"givenName": "Al", "familyName": "Bo"}, displayName="Al Bo",
                                  emails=[{"value": "al@example.com", "type": "work"}])
    path = f"/Users/{user['id']}"

    async def shaped(**params):
        response = await scim.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    assert await shaped(attributes="userName") == {"schemas": user["schemas"], "id": user["id"],
                                                   "userName": user["userName"]}
    picked = await shaped(attributes="name.givenName, EMAILS.value,meta.version,nosuch")
    assert picked["name"] == {"givenName": "Al"} and picked["emails"] == [{"value": "al@example.com"}]
    assert picked["meta"] == {"version": 'W/"1"'} and "displayName" not in picked
    assert (await shaped(attributes=f"{IAM_USER}:emailVerified"))[IAM_USER] == {"emailVerified": False}
    assert (await shaped(attributes=IAM_USER))[IAM_USER] == {"emailVerified": False}
    assert "userName" in (await shaped(attributes=f"{USER_SCHEMA}:userName"))

    excluded = await shaped(excludedAttributes="emails,meta,id,name.familyName")
    assert "emails" not in excluded and "meta" not in excluded
    assert excluded["id"] == user["id"]  # returned: always
    assert excluded["name"] == {"givenName": "Al"} and excluded["displayName"] == "Al Bo"

    listed = await scim.list(filter=f'id eq "{user["id"]}"', attributes="displayName")
    assert listed["Resources"] == [{"schemas": user["schemas"], "id": user["id"], "displayName": "Al Bo"}]
    patched = await scim.patch(path, [{"op": "replace", "path": "displayName", "value": "X"}],
                               params={"attributes": "displayName"})
    assert patched.json() == {"schemas": user["schemas"], "id": user["id"], "displayName": "X"}
    created = await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": unique()},
                              params={"excludedAttributes": "meta"})
    assert created.status_code == 201 and "meta" not in created.json()


async def test_search_with_post(scim):
    prefix = unique("search")
    for suffix in ("a", "b", "c"):
        await scim.create_user(f"{prefix}{suffix}")
    group = await scim.create_group(f"{prefix}-group")
    found = await scim.post("/Users/.search", {
        "schemas": [SEARCH], "filter": f'userName sw "{prefix}"', "sortBy": "userName", "sortOrder": "descending",
        "startIndex": 1, "count": 2, "attributes": ["userName"],
    })
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["totalResults"] == 3 and [r["userName"] for r in body["Resources"]] == [f"{prefix}c", f"{prefix}b"]
    assert set(body["Resources"][0]) == {"schemas", "id", "userName"}

    both = await scim.post("/.search", {"schemas": [SEARCH],
                                        "filter": f'userName sw "{prefix}" or displayName sw "{prefix}"'})
    assert both.status_code == 200, both.text
    kinds = [r["meta"]["resourceType"] for r in both.json()["Resources"]]
    assert both.json()["totalResults"] == 4 and kinds == ["User"] * 3 + ["Group"]
    paged = await scim.post("/.search", {"schemas": [SEARCH], "startIndex": 3, "count": 2,
                                         "filter": f'userName sw "{prefix}" or displayName sw "{prefix}"'})
    assert [r["id"] for r in paged.json()["Resources"]][-1] == group["id"] and paged.json()["itemsPerPage"] == 2

    for body, scim_type in (({"filter": "userName pr"}, "invalidSyntax"),  # no schemas
                            ({"schemas": [SEARCH], "count": "2"}, "invalidValue"),
                            ({"schemas": [SEARCH], "nosuch": 1}, "invalidSyntax"),
                            ({"schemas": [SEARCH], "filter": "userName xx 1"}, "invalidFilter")):
        scim_error(await scim.post("/Users/.search", body), 400, scim_type)
    scim_error(await scim.post("/Users/.search", {"schemas": [SEARCH]}, who="scim-writer"), 403)


# -- bad input: never a 500, never a change ------------------------------------------------------------------------
async def test_bad_input_is_a_scim_error_and_changes_nothing(scim):
    user = await scim.create_user(displayName="Untouched")
    path = f"/Users/{user['id']}"
    before = await dump_store(scim.app)
    valid = {"schemas": [USER_SCHEMA], "userName": unique()}
    deep: object = "x"
    for _ in range(20):
        deep = {"value": deep}
    very_deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ({**valid, "nosuch": 1}, 400, "invalidSyntax"),
        ({**valid, "name": {"nosuch": "x"}}, 400, "invalidSyntax"),
        ({**valid, "urn:example:unknown": {"x": 1}}, 400, "invalidSyntax"),
        ({**valid, IAM_USER: {"nosuch": True}}, 400, "invalidSyntax"),
        ({**valid, "schemas": ["urn:example:other"]}, 400, "invalidSyntax"),
        ({"userName": valid["userName"]}, 400, "invalidSyntax"),  # no schemas
        ({**valid, "userName": 42}, 400, "invalidValue"),
        ({**valid, "userName": ""}, 400, "invalidValue"),
        ({**valid, "userName": " padded "}, 400, "invalidValue"),
        ({**valid, "userName": "x" * 256}, 400, "invalidValue"),
        ({"schemas": [USER_SCHEMA]}, 400, "invalidValue"),  # no userName
        ({**valid, "active": "true"}, 400, "invalidValue"),
        ({**valid, "active": 1}, 400, "invalidValue"),
        ({**valid, "emails": {"value": "a@b"}}, 400, "invalidValue"),
        ({**valid, "emails": ["a@b"]}, 400, "invalidValue"),
        ({**valid, "emails": [{"type": "work"}]}, 400, "invalidValue"),
        ({**valid, "emails": [{"value": "a" * 400}]}, 400, "invalidValue"),
        ({**valid, "name": "Ann"}, 400, "invalidValue"),
        ({**valid, "displayName": "nul\u0000byte"}, 400, "invalidValue"),
        ({**valid, IAM_USER: {"emailVerified": "yes"}}, 400, "invalidValue"),
        ({**valid, "userName": "dup", "USERNAME": "dup2"}, 400, "invalidSyntax"),
        ({**valid, "displayName": deep}, 400, "invalidSyntax"),
        ([valid], 400, "invalidSyntax"),
        ("a string", 400, "invalidSyntax"),
    ]
    for body, status, scim_type in cases:
        for method, target in (("POST", "/Users"), ("PUT", path)):
            scim_error(await scim.request(method, target, json=body), status, scim_type)

    raw_cases = [
        (b"{not json", {}, 400, "invalidSyntax"),
        (b'{"userName": NaN}', {}, 400, "invalidSyntax"),
        (b"\xff\xfe{}", {}, 400, "invalidSyntax"),
        (very_deep.encode(), {}, 413, None),
        (b'{"a": ' * 500 + b"1" + b"}" * 500, {}, 400, "invalidSyntax"),
        (b"x" * (64 * 1024 + 1), {}, 413, None),
        (b'{"schemas": []}', {"Content-Type": "text/plain"}, 415, None),
        (b'{"schemas": []}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
        (b'{"schemas": []}', {"Content-Type": "application/json; charset=utf-16"}, 415, None),
        (b"", {}, 400, "invalidSyntax"),
        (b'{"schemas": ["%s"], "userName": "lone-surrogate", "displayName": "\\ud800"}' % USER_SCHEMA.encode(), {}, 400,
         "invalidValue"),
    ]
    for content, headers, status, scim_type in raw_cases:
        for method, target in (("POST", "/Users"), ("PUT", path), ("PATCH", path)):
            response = await scim.request(method, target, content=content, headers=headers)
            scim_error(response, status, scim_type)

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(80):
            yield b" " * 1024

    scim_error(await scim.request("POST", "/Users", content=chunks()), 413)
    missing_type = await scim.http.post("/scim/v2/Users", content=b"{}",
                                        headers={"Authorization": scim.headers()["Authorization"]})
    scim_error(missing_type, 415)
    plain_json = await scim.post("/Users", valid, headers={"Content-Type": "application/json"})
    assert plain_json.status_code == 201  # application/json is accepted too
    await scim.delete(f"/Users/{plain_json.json()['id']}")

    for weird in ("%00", "a" * 65, "..%2F..%2Fetc", "%F0%9F%98%80"):
        scim_error(await scim.get(f"/Users/{weird}"), 404)
    for bad_filter in ('userName eq "\\u0000"', 'userName eq "\\ud800"', "x" * 5000, "(" * 40 + "userName pr" + ")" * 40,
                       " or ".join(["userName pr"] * 201), "meta.created gt \"yesterday\"", "active gt true",
                       'emails[type eq "work"', 'name eq "x"', "userName eq 1", "nosuch eq 1"):
        scim_error(await scim.get("/Users", params={"filter": bad_filter}), 400, "invalidFilter")
    scim_error(await scim.get("/Users", params={"filter": "x", "FILTER": "y"}), 400, "invalidValue")
    twice = [("attributes", "userName"), ("attributes", "id")]  # refused before anything is written
    scim_error(await scim.post("/Users", valid, params=twice), 400, "invalidValue")
    scim_error(await scim.patch(path, [{"op": "remove", "path": "displayName"}], params=twice), 400, "invalidValue")
    scim_error(await scim.get("/Nope"), 404)
    scim_error(await scim.delete("/Users"), 405)
    scim_error(await scim.post("/Bulk", {}), 501)
    assert await dump_store(scim.app) == before


# -- authorization ----------------------------------------------------------------------------------------------------
async def test_scopes(scim):
    user = await scim.create_user()
    path = f"/Users/{user['id']}"
    body = {"schemas": [USER_SCHEMA], "userName": unique()}

    anonymous = scim_error(await scim.get("/Users", who=None), 401)
    assert anonymous["detail"]
    response = await scim.get("/Users", who=None)
    assert response.headers["www-authenticate"].startswith("Bearer")
    bogus = await scim.http.get("/scim/v2/Users", headers={"Authorization": "Bearer not-a-live-token"})
    scim_error(bogus, 401)
    assert 'error="invalid_token"' in bogus.headers["www-authenticate"]
    scim_error(await scim.http.get("/scim/v2/Users", headers={"Authorization": "Basic eDp5"}), 401)
    scim_error(await scim.post("/Users", body, who=None), 401)
    scim_error(await scim.get("/ServiceProviderConfig", who=None), 401)

    # a reader reads, and changes nothing
    assert (await scim.get("/Users", who="scim-reader")).status_code == 200
    assert (await scim.get(path, who="scim-reader")).status_code == 200
    for method, target, payload in (("POST", "/Users", body), ("PUT", path, body), ("DELETE", path, None),
                                    ("PATCH", path, {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                                     "Operations": [{"op": "remove", "path": "displayName"}]})):
        refused = await scim.request(method, target, json=payload, who="scim-reader")
        scim_error(refused, 403)
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
        assert 'scope="scim:write"' in refused.headers["www-authenticate"]

    # a writer writes, and may not read (writing implies nothing about reading)
    created = await scim.post("/Users", body, who="scim-writer")
    assert created.status_code == 201
    for target in ("/Users", path, "/Groups", "/Schemas"):
        refused = await scim.get(target, who="scim-writer")
        scim_error(refused, 403)
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    # a token of another client without SCIM scopes
    other = (await scim.http.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                                  headers=basic("svc-basic"))).json()
    scim_error(await scim.http.get("/scim/v2/Users", headers={"Authorization": f"Bearer {other['access_token']}"}),
               403)


async def test_discovery(scim):
    config = await scim.get("/ServiceProviderConfig", who="scim-reader")
    assert config.status_code == 200 and config.headers["content-type"].startswith(SCIM_JSON)
    body = config.json()
    assert body["patch"]["supported"] is True and body["bulk"]["supported"] is False
    assert body["filter"] == {"supported": True, "maxResults": MAX_RESULTS}
    assert body["etag"]["supported"] is True and body["sort"]["supported"] is True
    assert body["authenticationSchemes"][0]["type"] == "oauthbearertoken"

    types = (await scim.get("/ResourceTypes")).json()
    assert {r["id"] for r in types["Resources"]} == {"User", "Group"} and types["totalResults"] == 2
    user_type = (await scim.get("/ResourceTypes/User")).json()
    assert user_type["endpoint"] == "/Users" and user_type["schemaExtensions"] == [{"schema": IAM_USER,
                                                                                     "required": False}]
    scim_error(await scim.get("/ResourceTypes/Nope"), 404)

    schemas = (await scim.get("/Schemas")).json()
    assert {s["id"] for s in schemas["Resources"]} == {USER_SCHEMA, IAM_USER, *(
        f"urn:ietf:params:scim:schemas:core:2.0:{name}" for name in ("Group", "ServiceProviderConfig",
                                                                     "ResourceType", "Schema"))}
    user_schema = (await scim.get(f"/Schemas/{USER_SCHEMA}")).json()
    attrs = {a["name"]: a for a in user_schema["attributes"]}
    assert attrs["password"]["returned"] == "never" and attrs["password"]["mutability"] == "writeOnly"
    assert attrs["groups"]["mutability"] == "readOnly"
    assert attrs["userName"]["uniqueness"] == "server" and attrs["userName"]["caseExact"] is False
    assert (await scim.get(f"/Schemas/{IAM_USER}")).json()["attributes"][0]["name"] == "emailVerified"
    scim_error(await scim.get("/Schemas/urn:nope"), 404)
    scim_error(await scim.get("/Schemas", params={"filter": 'id eq "x"'}), 403)


async def test_urls_come_from_the_configured_base_never_from_the_host_header(scim):
    # A spoofed Host (or X-Forwarded-Host) must not make iam hand out links to another server.
    evil = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    response = await scim.post("/Users", {"schemas": [USER_SCHEMA], "userName": unique()}, headers=evil)
    assert response.status_code == 201, response.text
    user = response.json()
    assert response.headers["location"] == user["meta"]["location"] == f"https://iam.test/scim/v2/Users/{user['id']}"
    group = (await scim.post("/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                         "displayName": unique("g"), "members": [{"value": user["id"]}]},
                             headers=evil)).json()
    assert group["members"][0]["$ref"] == f"https://iam.test/scim/v2/Users/{user['id']}"
    for path in ("/Users", f"/Users/{user['id']}", "/ServiceProviderConfig", "/ResourceTypes"):
        body = (await scim.get(path, headers=evil)).text
        assert "evil.example" not in body, path


def test_the_scim_base_url_is_configurable(tmp_path):
    from iam.config import Settings

    settings = Settings.model_validate({"issuer": "https://iam.test", "scim_url": "https://users.internal:8443/scim/v2/"})
    assert settings.scim_base == "https://users.internal:8443/scim/v2"
    assert Settings.model_validate({"issuer": "https://iam.test"}).scim_base == "https://iam.test/scim/v2"
    with pytest.raises(ValueError, match="scim_url"):
        Settings.model_validate({"issuer": "https://iam.test", "scim_url": "scim.internal"})


SCIM_TYPES = {"string": str, "reference": str, "dateTime": str, "boolean": bool, "integer": int, "complex": dict}


def conforms(value: dict, attributes: list[dict], where: str) -> None:
    """`value` holds only attributes of these definitions, of their type, with every required one present."""
    defined = {a["name"]: a for a in attributes}
    for name in value:
        assert name in defined or name in ("schemas", "meta", "id"), f"{where}.{name} is not in its schema"
    for name, attr in defined.items():
        if name not in value:
            assert not attr["required"] or name == "id", f"{where}.{name} is required"
            continue
        values = value[name] if attr["multiValued"] else [value[name]]
        assert isinstance(values, list), f"{where}.{name} is multi-valued"
        for item in values:
            assert type(item) is SCIM_TYPES[attr["type"]], f"{where}.{name} is not a {attr['type']}"
            if attr["type"] == "complex":  # RFC 7643 §7: subAttributes have the characteristics of attributes
                conforms(item, attributes if name == "subAttributes" else attr["subAttributes"], f"{where}.{name}")
            if "canonicalValues" in attr and attr["type"] == "string":
                assert item in attr["canonicalValues"], f"{where}.{name}: {item!r}"


async def test_discovery_documents_are_described_by_their_schemas_rfc7643_s5_to_s7(scim):
    """A client reads /Schemas to interpret /ServiceProviderConfig, /ResourceTypes and /Schemas themselves."""
    described = {s["id"]: s for s in (await scim.get("/Schemas")).json()["Resources"]}
    documents = [(await scim.get("/ServiceProviderConfig")).json(),
                 *(await scim.get("/ResourceTypes")).json()["Resources"], *described.values()]
    for document in documents:
        (urn,) = document["schemas"]
        assert urn in described, f"/Schemas does not describe {urn}"
        conforms(document, described[urn]["attributes"], urn)
        assert (await scim.get(f"/Schemas/{urn}")).json() == described[urn]
    spc = {a["name"]: a for a in described["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"]["attributes"]}
    assert spc["bulk"]["subAttributes"][1] == {
        "name": "maxOperations", "type": "integer", "multiValued": False, "required": True, "mutability": "readOnly",
        "description": "The maximum number of operations.", "returned": "default", "uniqueness": "none"}
