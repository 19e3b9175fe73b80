"""TOTP recovery codes: ten shown once at enrolment, each accepted once instead of a TOTP code at the second step,
throttled as TOTP codes are, and renewed only after the password is asked again."""

from __future__ import annotations

import asyncio
import re

import pyotp
from sqlalchemy import select

from iam.authn.store import recovery_codes as table
from tests.conftest import PASSWORD
from tests.oauth import hidden_fields, sign_in
from tests.test_login import login_page


def audited(caplog, event: str) -> list[dict]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == event]


def codes_on(html: str) -> list[str]:
    return re.findall(r"<li><code>([A-Z2-7 ]+)</code></li>", html)


def codes_left(html: str) -> int:
    return int(re.search(r'id="recovery-codes-left">(\d+)<', html).group(1))


async def enrol(client) -> tuple[pyotp.TOTP, list[str]]:
    """Sign in, turn on TOTP through the pages; the codes page that follows."""
    await sign_in(client, await login_page(client))
    setup = await client.get("/authn/totp/setup")
    generator = pyotp.TOTP(re.search(r"<code>([A-Z2-7]+)</code>", setup.text).group(1))
    done = await client.post("/authn/totp/setup", data={"csrf": hidden_fields(setup.text)["csrf"],
                                                        "code": generator.now(), "password": PASSWORD})
    assert done.status_code == 200 and "Two-step verification is on" in done.text
    assert "no-store" in done.headers["cache-control"]  # shown once: never kept by a cache
    return generator, codes_on(done.text)


async def second_step(client, code: str):
    """A new browser signs in with the password, then passes the second step with `code`."""
    client.cookies.clear()
    step = await sign_in(client, await login_page(client, prompt="login"))
    assert step.status_code == 200 and "Use a recovery code" in step.text
    return await client.post("/authn/login/totp", data={**hidden_fields(step.text), "code": code})


async def test_enrolment_shows_ten_codes_once_and_each_signs_in_once(client, app, alice, caplog):
    _, codes = await enrol(client)
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[A-Z2-7]{4}( [A-Z2-7]{4}){3}", code) for code in codes)  # 80 bits each
    assert codes_left((await client.get("/authn/account")).text) == 10
    assert audited(caplog, "mfa.recovery_codes_created")[-1]["details"]["count"] == 10

    used = await second_step(client, codes[3].lower().replace(" ", "-"))  # as typed: case and separators vary
    assert used.status_code == 303
    assert audited(caplog, "mfa.recovery_code_used")[-1]["details"]["left"] == 9
    assert codes_left((await client.get("/authn/account")).text) == 9

    again = await second_step(client, codes[3])  # spent
    assert again.status_code == 401 and "not valid" in again.text
    assert await app.state.iam.authn.totp.recovery_codes_left(alice) == 9
    assert (await second_step(client, codes[4])).status_code == 303


async def test_only_digests_are_stored_each_bound_to_its_user(client, app, alice):
    _, codes = await enrol(client)
    store = app.state.iam.authn.store
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(table))).all()
    assert len(rows) == 10 and all(len(row.digest) == 32 for row in rows)
    stored = b"".join(row.digest for row in rows)
    assert not any(code.replace(" ", "").encode() in stored for code in codes)
    totp = app.state.iam.authn.totp
    assert not await totp.use_recovery_code("someone-else", codes[0])  # another user's code is nothing
    assert await totp.recovery_codes_left(alice) == 10


async def test_concurrent_use_of_one_code_succeeds_once(client, app, alice):
    _, codes = await enrol(client)
    totp = app.state.iam.authn.totp
    results = await asyncio.gather(*(totp.use_recovery_code(alice, codes[0]) for _ in range(8)))
    assert results.count(True) == 1
    assert await totp.recovery_codes_left(alice) == 9


async def test_guessing_recovery_codes_is_throttled_as_totp_codes_are(client, alice):
    _, codes = await enrol(client)
    client.cookies.clear()
    step = await sign_in(client, await login_page(client, prompt="login"))
    fields = hidden_fields(step.text)
    statuses = [(await client.post("/authn/login/totp", data={**fields, "code": f"AAAA BBBB CCCC DD{n}{n}"}))
                .status_code for n in range(2, 8)]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429
    locked = await client.post("/authn/login/totp", data={**fields, "code": codes[0]})
    assert locked.status_code == 429  # even a right one, while locked: and it is not spent
    assert "iam_session" not in client.cookies


async def test_new_codes_need_the_password_and_replace_the_old_ones(client, app, alice, caplog):
    _, old = await enrol(client)
    account = await client.get("/authn/account")
    csrf = hidden_fields(account.text)["csrf"]
    wrong = await client.post("/authn/totp/recovery-codes", data={"csrf": csrf, "password": "not the password"})
    assert wrong.status_code == 401 and "password is not correct" in wrong.text and not codes_on(wrong.text)
    assert audited(caplog, "reauthentication.failed")[-1]["details"]["purpose"] == "recovery codes"
    forged = await client.post("/authn/totp/recovery-codes", data={"csrf": "forged", "password": PASSWORD})
    assert forged.status_code == 403
    assert await app.state.iam.authn.totp.recovery_codes_left(alice) == 10  # nothing changed so far

    renewed = await client.post("/authn/totp/recovery-codes", data={"csrf": csrf, "password": PASSWORD})
    new = codes_on(renewed.text)
    assert renewed.status_code == 200 and len(new) == 10 and not set(new) & set(old)
    assert (await second_step(client, old[0])).status_code == 401
    assert (await second_step(client, new[0])).status_code == 303


async def test_codes_go_with_the_factor_and_stand_in_for_no_factor(client, app, alice):
    _, codes = await enrol(client)
    await app.state.iam.users.directory.reset_second_factor(alice)  # `iam users reset-2fa`: a lost phone
    totp = app.state.iam.authn.totp
    assert await totp.recovery_codes_left(alice) == 0
    assert not await totp.use_recovery_code(alice, codes[0])
    for malformed in ("", "ABCD", "1234 5678 9012 3456", "ÀBCD EFGH IJKL MNOP", codes[0] + "A"):
        assert not await totp.use_recovery_code(alice, malformed)
