"""SCIM Groups (RFC 7643 §4.2): CRUD with members, PATCH of members, uniqueness, claims, ETags, filters."""

from __future__ import annotations

import asyncio

import pytest

pytest.register_assert_rewrite("tests.scim_support")  # before the import: its asserts explain failures
from tests.scim_support import GROUP_SCHEMA, dump_store, scim_error, unique  # noqa: E402

pytest_plugins = ("tests.scim_support",)  # the `scim` fixture: one app per backend for this module


async def test_create_read_replace_delete_with_members(scim):
    alice = await scim.create_user(unique("alice"), displayName="Alice")
    bob = await scim.create_user(unique("bob"))
    name = unique("Engineering")
    response = await scim.post("/Groups", {
        "schemas": [GROUP_SCHEMA], "displayName": name, "externalId": "ext-1",
        "members": [{"value": alice["id"], "display": "ignored", "type": "User"}, {"value": bob["id"].upper()}],
    })
    assert response.status_code == 201, response.text
    group = response.json()
    group_id = group["id"]
    assert response.headers["location"] == f"https://iam.test/scim/v2/Groups/{group_id}"
    assert response.headers["etag"] == group["meta"]["version"] == 'W/"1"'
    assert group["schemas"] == [GROUP_SCHEMA] and group["displayName"] == name and group["externalId"] == "ext-1"
    members = {m["value"]: m for m in group["members"]}
    assert set(members) == {alice["id"], bob["id"]}
    assert members[alice["id"]] == {"value": alice["id"], "$ref": f"https://iam.test/scim/v2/Users/{alice['id']}",
                                    "display": "Alice", "type": "User"}
    assert members[bob["id"]]["display"] == bob["userName"]
    assert (await scim.get(f"/Groups/{group_id}")).json() == group

    # membership shows on the users (read-only `groups`) and in their claims
    alice_now = (await scim.get(f"/Users/{alice['id']}")).json()
    assert alice_now["groups"] == [{"value": group_id, "$ref": f"https://iam.test/scim/v2/Groups/{group_id}",
                                    "display": name, "type": "direct"}]
    assert alice_now["meta"]["version"] != alice["meta"]["version"]  # her representation changed
    assert (await scim.directory.claims(alice["id"])).groups == [name]

    renamed = unique("Platform")
    replaced = await scim.put(f"/Groups/{group_id}", {"schemas": [GROUP_SCHEMA], "displayName": renamed,
                                                      "members": [{"value": bob["id"]}]})
    assert replaced.status_code == 200, replaced.text
    body = replaced.json()
    assert body["displayName"] == renamed and "externalId" not in body
    assert [m["value"] for m in body["members"]] == [bob["id"]] and body["meta"]["version"] == 'W/"2"'
    assert (await scim.directory.claims(alice["id"])).groups == []
    assert (await scim.directory.claims(bob["id"])).groups == [renamed]
    assert "groups" not in (await scim.get(f"/Users/{alice['id']}")).json()

    assert (await scim.delete(f"/Groups/{group_id}")).status_code == 204
    scim_error(await scim.get(f"/Groups/{group_id}"), 404)
    scim_error(await scim.delete(f"/Groups/{group_id}"), 404)
    assert (await scim.directory.claims(bob["id"])).groups == []
    assert (await scim.get(f"/Users/{bob['id']}")).status_code == 200  # users stay


async def test_display_name_is_unique_case_insensitively(scim):
    name = unique("Admins")
    await scim.create_group(name)
    other = await scim.create_group()
    before = await dump_store(scim.app)
    scim_error(await scim.post("/Groups", {"schemas": [GROUP_SCHEMA], "displayName": name.upper()}), 409, "uniqueness")
    scim_error(await scim.put(f"/Groups/{other['id']}", {"schemas": [GROUP_SCHEMA], "displayName": name.lower()}),
               409, "uniqueness")
    scim_error(await scim.patch(f"/Groups/{other['id']}", [{"op": "replace", "value": {"displayName": name}}]),
               409, "uniqueness")
    assert await dump_store(scim.app) == before


async def test_concurrent_creates_of_one_group_name(scim):
    name = unique("race-group")
    responses = await asyncio.gather(*(scim.post("/Groups", {"schemas": [GROUP_SCHEMA], "displayName": name})
                                       for _ in range(6)))
    assert sorted(r.status_code for r in responses) == [201] + [409] * 5, [r.text for r in responses]


async def test_members_must_be_existing_users(scim):
    user = await scim.create_user()
    group = await scim.create_group(members=(user["id"],))
    before = await dump_store(scim.app)
    for members in ([{"value": "00000000-0000-4000-8000-000000000000"}],
                    [{"value": user["id"]}, {"value": "no-such-user"}],
                    [{"value": group["id"], "type": "Group"}],  # nested groups are not supported
                    [{"display": "no value"}],
                    [{"value": 42}],
                    [{"value": "x" * 65}],
                    "not-a-list"):
        scim_error(await scim.post("/Groups", {"schemas": [GROUP_SCHEMA], "displayName": unique("g"),
                                               "members": members}), 400, "invalidValue")
        scim_error(await scim.put(f"/Groups/{group['id']}", {"schemas": [GROUP_SCHEMA],
                                                             "displayName": group["displayName"],
                                                             "members": members}), 400, "invalidValue")
    scim_error(await scim.patch(f"/Groups/{group['id']}", [
        {"op": "add", "path": "members", "value": [{"value": "00000000-0000-4000-8000-000000000000"}]}]),
        400, "invalidValue")
    for body in ({"schemas": [GROUP_SCHEMA]}, {"schemas": [GROUP_SCHEMA], "displayName": ""},
                 {"schemas": [GROUP_SCHEMA], "displayName": 7}):
        scim_error(await scim.post("/Groups", body), 400, "invalidValue")
    scim_error(await scim.post("/Groups", {"schemas": [GROUP_SCHEMA], "displayName": "x", "owner": "me"}),
               400, "invalidSyntax")
    scim_error(await scim.post("/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                           "displayName": "x"}), 400, "invalidSyntax")
    assert await dump_store(scim.app) == before


async def test_patch_members(scim):
    users = [await scim.create_user(unique(f"m{i}")) for i in range(4)]
    ids = [u["id"] for u in users]
    group = await scim.create_group(members=(ids[0],))
    path = f"/Groups/{group['id']}"

    async def patch(*operations):
        response = await scim.patch(path, list(operations))
        assert response.status_code == 200, response.text
        return sorted(m["value"] for m in response.json().get("members", ()))

    assert await patch({"op": "add", "path": "members", "value": [{"value": ids[1]}, {"value": ids[2]}]}) == sorted(
        ids[:3])
    assert await patch({"op": "add", "path": "members", "value": [{"value": ids[1]}]}) == sorted(ids[:3])  # no dup
    assert await patch({"op": "remove", "path": f'members[value eq "{ids[0]}"]'}) == sorted(ids[1:3])
    # Microsoft Entra style: remove with a value list; add without a path
    assert await patch({"op": "Remove", "path": "members", "value": [{"value": ids[1].upper()}]}) == [ids[2]]
    assert await patch({"op": "Add", "value": {"members": [{"value": ids[3]}]}}) == sorted([ids[2], ids[3]])
    assert await patch({"op": "replace", "path": "members", "value": [{"value": ids[0]}]}) == [ids[0]]
    assert await patch({"op": "remove", "path": f'members[value eq "{ids[3]}"]'}) == [ids[0]]  # not there: fine
    new_name = unique("renamed")
    await patch({"op": "replace", "value": {"displayName": new_name, "externalId": "e-2"}})
    assert (await scim.directory.claims(ids[0])).groups == [new_name]
    assert await patch({"op": "remove", "path": "members"}) == []
    assert (await scim.directory.claims(ids[0])).groups == []

    body = (await scim.get(path)).json()
    assert body["displayName"] == new_name and body["externalId"] == "e-2" and "members" not in body

    before = await dump_store(scim.app)
    for operations, scim_type in (
        ([{"op": "replace", "path": 'members[value eq "x"]', "value": {"value": ids[1]}}], "noTarget"),
        ([{"op": "replace", "path": "members.display", "value": "x"}], "mutability"),
        ([{"op": "replace", "path": "id", "value": "x"}], "mutability"),
        ([{"op": "remove", "path": "displayName"}], "invalidValue"),
        ([{"op": "add", "path": "userName", "value": "x"}], "invalidPath"),
        ([{"op": "remove", "path": "members", "value": "everyone"}], "invalidValue"),
    ):
        scim_error(await scim.patch(path, operations), 400, scim_type)
    assert await dump_store(scim.app) == before


async def test_deleting_a_user_leaves_its_groups(scim):
    leaving = await scim.create_user()
    staying = await scim.create_user()
    group = await scim.create_group(members=(leaving["id"], staying["id"]))
    assert (await scim.delete(f"/Users/{leaving['id']}")).status_code == 204
    after = (await scim.get(f"/Groups/{group['id']}")).json()
    assert [m["value"] for m in after["members"]] == [staying["id"]]
    assert after["meta"]["version"] != group["meta"]["version"]


async def test_group_etags(scim):
    group = await scim.create_group()
    path = f"/Groups/{group['id']}"
    etag = group["meta"]["version"]
    assert (await scim.get(path, headers={"If-None-Match": etag})).status_code == 304
    before = await dump_store(scim.app)
    body = {"schemas": [GROUP_SCHEMA], "displayName": group["displayName"]}
    scim_error(await scim.put(path, body, headers={"If-Match": 'W/"7"'}), 412)
    scim_error(await scim.patch(path, [{"op": "remove", "path": "members"}], headers={"If-Match": 'W/"7"'}), 412)
    scim_error(await scim.delete(path, headers={"If-Match": 'W/"7"'}), 412)
    assert await dump_store(scim.app) == before
    replaced = await scim.put(path, body, headers={"If-Match": etag})
    assert replaced.status_code == 200 and replaced.headers["etag"] == 'W/"2"'
    assert (await scim.delete(path, headers={"If-Match": 'W/"2"'})).status_code == 204


async def test_list_filter_and_shape_groups(scim):
    prefix = unique("team")
    member = await scim.create_user()
    full = await scim.create_group(f"{prefix}-full", members=(member["id"],))
    await scim.create_group(f"{prefix}-empty")

    def names(page):
        return sorted(r["displayName"] for r in page["Resources"])

    listed = await scim.list("/Groups", filter=f'displayName sw "{prefix.upper()}"', sortBy="displayName")
    assert listed["totalResults"] == 2 and [r["displayName"] for r in listed["Resources"]] == [
        f"{prefix}-empty", f"{prefix}-full"]
    assert names(await scim.list("/Groups", filter=f'displayName eq "{prefix}-FULL"')) == [f"{prefix}-full"]
    assert names(await scim.list("/Groups", filter=f'members eq "{member["id"]}"')) == [f"{prefix}-full"]
    assert names(await scim.list("/Groups", filter=f'members.value eq "{member["id"].upper()}"')) == [f"{prefix}-full"]
    both = f'displayName sw "{prefix}"'
    assert names(await scim.list("/Groups", filter=f"{both} and members pr")) == [f"{prefix}-full"]
    assert names(await scim.list("/Groups", filter=f"{both} and not (members pr)")) == [f"{prefix}-empty"]
    assert names(await scim.list("/Groups", filter=f'{both} and members[value eq "{member["id"]}"]')) == [
        f"{prefix}-full"]
    assert names(await scim.list("/Groups", filter=f'{both} and id eq "{full["id"]}"')) == [f"{prefix}-full"]

    slim = await scim.list("/Groups", filter=both, excludedAttributes="members")
    assert all("members" not in r for r in slim["Resources"])
    only = await scim.list("/Groups", filter=f'displayName eq "{prefix}-full"', attributes="members.value")
    assert only["Resources"] == [{"schemas": [GROUP_SCHEMA], "id": full["id"], "members": [{"value": member["id"]}]}]
    single = await scim.get(f"/Groups/{full['id']}", params={"attributes": "displayName"})
    assert single.json() == {"schemas": [GROUP_SCHEMA], "id": full["id"], "displayName": f"{prefix}-full"}

    # users filtered by their groups
    users = await scim.list(filter=f'groups eq "{full["id"]}"')
    assert [u["id"] for u in users["Resources"]] == [member["id"]]
    users = await scim.list(filter=f'groups.display eq "{prefix.upper()}-FULL"')
    assert [u["id"] for u in users["Resources"]] == [member["id"]]
    scim_error(await scim.get("/Groups", params={"filter": 'userName eq "x"'}), 400, "invalidFilter")
