"""Just-in-time users for connector sign-ins, in the user-management role (iam/users/upstream.py), in process
and over its internal API, on SQLite and PostgreSQL."""

import asyncio

import httpx
import pytest

from iam.authn.connectors import UpstreamIdentity
from iam.peers import RemoteDirectory, ServiceIdentity, UserDisabled
from iam.roles import Role
from tests.conftest import ISSUER


def corp(subject="u-1", **fields) -> UpstreamIdentity:
    values = {"username": "carol", "email": "carol@corp.example", "email_verified": True, "name": "Carol C",
              "groups": ["corp:eng"], **fields}
    return UpstreamIdentity(connector_id="corp", subject=subject, **values)


@pytest.fixture
def directory(app):
    return app.state.iam.users.directory


@pytest.fixture
def accounts(app):
    """The user-management role's accounts of people from connectors, in process (iam/users/upstream.py)."""
    return app.state.iam.users.upstream


@pytest.fixture
async def remote(app):
    """The directory as the authentication role reaches it in another process: over /internal/v1."""
    iam = app.state.iam
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        yield RemoteDirectory(http, ISSUER, ServiceIdentity(Role.AUTHENTICATION, iam.keys), Role.USER_MANAGEMENT)


@pytest.fixture(params=["in-process", "internal-api"])
def provisioner(request, accounts):
    return accounts if request.param == "in-process" else request.getfixturevalue("remote")


async def test_a_first_sign_in_creates_the_user_and_the_next_one_finds_and_refreshes_it(provisioner, directory):
    first = await provisioner.provision(corp())
    assert (first.preferred_username, first.email, first.email_verified, first.name, first.groups) == \
        ("carol", "carol@corp.example", True, "Carol C", ["corp:eng"])
    again = await provisioner.provision(corp(name="Carol Changed", email="c2@corp.example",
                                             groups=["corp:ops", "corp:sre"]))
    assert again.sub == first.sub
    assert again.name == "Carol Changed" and again.email == "c2@corp.example"
    assert again.groups == ["corp:ops", "corp:sre"]  # replaced, not added to
    assert (await directory.claims(first.sub)).groups == ["corp:ops", "corp:sre"]
    assert await provisioner.upstream_subject(first.sub, "corp") == "u-1"
    assert await provisioner.upstream_subject(first.sub, "other") is None


async def test_the_identity_is_the_subject_not_the_email_or_the_username(accounts, directory):
    first = await accounts.provision(corp())
    renamed = await accounts.provision(corp(username="carol.new", email="carol.new@corp.example"))
    assert renamed.sub == first.sub and renamed.preferred_username == "carol.new"
    other = await accounts.provision(corp(subject="u-2"))  # another person with carol's old name and address
    assert other.sub != first.sub


async def test_connector_groups_stay_apart_from_scim_groups(accounts, directory, alice):
    linked = await accounts.provision(corp(email="alice@example.com", groups=["corp:eng", "admins"]), "email")
    assert linked.sub == alice
    assert linked.groups == ["admins", "corp:eng", "developers"]  # both kinds in the claim, once each
    total, scim_groups = await directory.query_groups()
    assert sorted(g.display_name for g in scim_groups) == ["admins", "developers"]  # no SCIM Group for corp:eng
    user = await directory.get_user(alice)
    assert sorted(g.display_name for g in user.groups) == ["admins", "developers"]  # SCIM's view: its own groups
    await accounts.provision(corp(email="alice@example.com", groups=[]), "email")
    assert (await directory.claims(alice)).groups == ["admins", "developers"]


async def test_link_by_email_needs_a_verified_address_and_keeps_the_local_profile(accounts, provisioner, directory, alice):
    linked = await provisioner.provision(corp(email="Alice@Example.com", username="ali", name="A."), "email")
    assert linked.sub == alice
    assert linked.preferred_username == "alice" and linked.name == "Alice Liddell"  # SCIM owns this profile
    assert await accounts.upstream_subject(alice, "corp") == "u-1"


@pytest.mark.parametrize("link_by, verified", [("email", False), (None, True)])
async def test_never_linked_by_an_unverified_address_or_without_the_rule(accounts, directory, alice, link_by, verified):
    """An unverified address would be an account takeover (the issue's point 3); the name is taken too."""
    user = await accounts.provision(corp(username="alice", email="alice@example.com", email_verified=verified),
                                     link_by)
    assert user.sub != alice
    assert user.preferred_username == "alice@corp"  # never the local alice
    assert user.email_verified is False or link_by is None
    assert await accounts.upstream_subject(alice, "corp") is None


async def test_an_address_two_users_share_links_neither(accounts, directory, alice):
    from iam.users.directory import NewUser

    await directory.create_user(NewUser(user_name="alice2", email="alice@example.com", email_verified=True))
    user = await accounts.provision(corp(email="alice@example.com"), "email")
    assert user.sub != alice and user.preferred_username == "carol"


async def test_a_user_disabled_in_scim_is_refused_and_nothing_changes(accounts, provisioner, directory):
    first = await accounts.provision(corp())
    await directory.set_active(first.sub, False)
    with pytest.raises(UserDisabled):
        await provisioner.provision(corp(groups=["corp:admins"], name="Mallory"))
    after = await directory.claims(first.sub)
    assert after.groups == ["corp:eng"] and after.name == "Carol C" and not after.active


async def test_a_disabled_owner_of_the_address_is_refused_not_bypassed(accounts, directory, alice):
    await directory.set_active(alice, False)
    with pytest.raises(UserDisabled):
        await accounts.provision(corp(email="alice@example.com"), "email")
    assert await directory.count_users() == 1


async def test_concurrent_first_sign_ins_make_one_user(provisioner, directory):
    results = await asyncio.gather(*(provisioner.provision(corp(groups=["corp:eng", f"g{i % 2}"]))
                                     for i in range(6)))
    assert len({claims.sub for claims in results}) == 1
    assert await directory.count_users() == 1


async def test_concurrent_first_sign_ins_linking_by_email_make_one_link(accounts, directory, alice):
    results = await asyncio.gather(*(accounts.provision(corp(email="alice@example.com"), "email")
                                     for _ in range(4)))
    assert {claims.sub for claims in results} == {alice}
    assert await directory.count_users() == 1


async def test_a_deleted_user_signs_in_again_as_a_new_user(accounts, directory):
    first = await accounts.provision(corp())
    await directory.delete_user(first.sub)
    again = await accounts.provision(corp())
    assert again.sub != first.sub and again.preferred_username == "carol"


async def test_a_huge_group_list_is_bounded_and_odd_names_are_dropped(accounts, directory):
    groups = [f"g{i:05}" for i in range(3000)] + ["", " ", "bad\nname"]
    user = await accounts.provision(corp(groups=groups))
    assert len(user.groups) == 1000 and user.groups[0] == "g00000"


async def test_the_internal_api_refuses_malformed_identities_and_stores_nothing(app, directory):
    iam = app.state.iam
    assertion = ServiceIdentity(Role.AUTHENTICATION, iam.keys).assertion(Role.USER_MANAGEMENT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        for body in ({}, {"identity": {"connector_id": "corp"}}, {"identity": {"connector_id": "corp", "subject": 7}},
                     {"identity": {"connector_id": "corp", "subject": "s", "groups": "admins"}},
                     {"identity": {"connector_id": "corp", "subject": "s"}, "link_by": "username"}):
            response = await http.post("/internal/v1/upstream-identities", json=body,
                                       headers={"Authorization": f"Bearer {assertion}"})
            assert response.status_code == 400, body
        token_role = ServiceIdentity(Role.TOKEN, iam.keys).assertion(Role.USER_MANAGEMENT)
        response = await http.post("/internal/v1/upstream-identities",
                                   json={"identity": {"connector_id": "corp", "subject": "s"}},
                                   headers={"Authorization": f"Bearer {token_role}"})
        assert response.status_code == 401  # only the authentication role provisions
    assert await directory.count_users() == 0
    assert (await directory.query_groups())[0] == 0
