"""Address verification through a real SMTP server: a SCIM create with sendVerification (or `iam users add
--send-verification`, or the account page) mails a link that sets email_verified; a link sent before the address
changed verifies nothing."""

from __future__ import annotations

import httpx
import pytest

from tests import smtp_server
from tests.conftest import ISSUER, PASSWORD, basic, client_config, make_settings
from tests.oauth import hidden_fields, sign_in
from tests.scim_support import IAM_USER, SCIM_JSON, SCIM_SECRETS, USER_SCHEMA, scim_clients, token_for
from tests.test_login import login_page
from tests.test_password_reset import delivered, mail_settings

__all__ = ["basic"]


@pytest.fixture(scope="module")
def inbox():
    with smtp_server.running() as server:
        yield server


@pytest.fixture
def settings(tmp_path, store_urls, inbox):
    inbox.messages.clear()
    return make_settings(tmp_path, store_urls, mail=mail_settings(inbox.port),
                         clients=[*client_config(), *scim_clients()])


@pytest.fixture
async def scim(client):
    token = await token_for(client, "scim-admin")
    assert SCIM_SECRETS
    return {"Authorization": f"Bearer {token}", "Content-Type": SCIM_JSON}


async def create(client, scim, user_name: str, **extension) -> dict:
    created = await client.post("/scim/v2/Users", headers=scim, json={
        "schemas": [USER_SCHEMA, IAM_USER], "userName": user_name, "password": PASSWORD,
        "emails": [{"value": f"{user_name}@example.com", "primary": True}], IAM_USER: extension})
    assert created.status_code == 201, created.text
    return created.json()


async def verified(app, sub: str) -> bool:
    return (await app.state.iam.users.directory.claims(sub)).email_verified


async def verify(client, link: str) -> httpx.Response:
    form = await client.get(link)
    if form.status_code != 200:
        return form
    return await client.post("/authn/email/verify", data=hidden_fields(form.text))


async def test_a_scim_create_with_send_verification_mails_a_link_that_verifies(client, app, scim, inbox, caplog):
    user = await create(client, scim, "vera", sendVerification=True)
    assert "sendVerification" not in user[IAM_USER] and user[IAM_USER]["emailVerified"] is False
    await delivered(app)
    message = inbox.messages[-1]
    assert message["To"] == "vera@example.com" and message["Subject"] == "Verify your email address"
    link = inbox.link(message)
    assert link.startswith(f"{ISSUER}/authn/email/verify?token=")
    assert not await verified(app, user["id"])  # opening the link alone (a mail scanner) does nothing
    form = await client.get(link)
    assert form.status_code == 200 and not await verified(app, user["id"])
    done = await verify(client, link)
    assert done.status_code == 200 and "Your email address is verified" in done.text
    assert await verified(app, user["id"])
    assert any(getattr(r, "audit", {}).get("event") == "email.verified" for r in caplog.records)
    scim_view = await client.get(f"/scim/v2/Users/{user['id']}", headers=scim)
    assert scim_view.json()[IAM_USER]["emailVerified"] is True


async def test_no_message_without_send_verification(client, app, scim, inbox):
    await create(client, scim, "quiet")
    await delivered(app)
    assert inbox.messages == []


async def test_a_link_sent_before_the_address_changed_verifies_nothing(client, app, scim, inbox):
    user = await create(client, scim, "moving", sendVerification=True)
    await delivered(app)
    link = inbox.link(inbox.messages[-1])
    changed = await client.patch(f"/scim/v2/Users/{user['id']}", headers=scim, json={
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "emails", "value": [{"value": "new@example.com", "primary": True}]}]})
    assert changed.status_code == 200, changed.text
    dead = await verify(client, link)
    assert dead.status_code == 400 and "address changed" in dead.text
    assert not await verified(app, user["id"])


async def test_changing_a_verified_address_makes_it_unverified_until_verified_again(client, app, scim, inbox):
    user = await create(client, scim, "mover", emailVerified=True)
    assert await verified(app, user["id"])
    await client.patch(f"/scim/v2/Users/{user['id']}", headers=scim, json={
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "emails", "value": [{"value": "other@example.com",
                                                                        "primary": True}]}]})
    assert not await verified(app, user["id"])
    # The person asks for a link from the account page.
    await sign_in(client, await login_page(client), username="mover")
    account = await client.get("/authn/account")
    assert "Send a verification link" in account.text
    sent = await client.post("/authn/email/verification", data={"csrf": hidden_fields(account.text)["csrf"]})
    assert sent.status_code == 200 and "on its way" in sent.text
    await delivered(app)
    assert inbox.messages[-1]["To"] == "other@example.com"
    assert (await verify(client, inbox.link(inbox.messages[-1]))).status_code == 200
    assert await verified(app, user["id"])
    assert "Send a verification link" not in (await client.get("/authn/account")).text


async def test_bad_links_change_nothing(client, app, scim, inbox):
    user = await create(client, scim, "careful", sendVerification=True)
    await delivered(app)
    link = inbox.link(inbox.messages[-1])
    assert (await verify(client, link[:-3])).status_code == 400  # truncated: the signature fails
    # A statement signed by this role but of another kind (a known-device cookie) is not a verification link.
    device = app.state.iam.authn.throttle.device_cookie("careful")
    assert (await verify(client, f"{ISSUER}/authn/email/verify?token={device}")).status_code == 400
    form = await client.get(link)
    forged = await client.post("/authn/email/verify", data={**hidden_fields(form.text), "csrf": "forged"})
    assert forged.status_code == 403
    assert not await verified(app, user["id"])
    assert (await verify(client, link)).status_code == 200
    assert (await verify(client, link)).status_code == 200  # again: no more than once
    assert await verified(app, user["id"])
