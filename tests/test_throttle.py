"""Sign-in throttling (iam/authn/throttle.py, ASVS 5 V6.3.1): password guessing stays slow, and it never keeps
the owner out."""

from __future__ import annotations

import contextlib
import re

import httpx

from iam.authn.store import AuthnStore
from iam.authn.throttle import BURST, Throttle
from tests.conftest import ISSUER
from tests.oauth import authorize, follow, pkce, sign_in


@contextlib.asynccontextmanager
async def browser(app, address: str):
    """A browser of its own (cookie jar) at a client address of its own."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        yield http


async def login_page(http):
    return await follow(http, await authorize(http, challenge=pkce()[1]), "https://app.test/")


def signed_in(response: httpx.Response) -> bool:
    return response.status_code == 303 and any("iam_session" in c for c in response.headers.get_list("set-cookie"))


async def spend_the_account_budget(app, username: str) -> None:
    # Guesses from as many addresses as there are guesses: no address and no pair ever locks.
    for i in range(BURST):
        await app.state.iam.authn.throttle.fail(username, f"198.51.100.{i}")


async def test_an_attacker_at_one_address_does_not_lock_the_owner_out(app, alice):
    async with browser(app, "192.0.2.66") as attacker, browser(app, "192.0.2.10") as owner:
        page = await login_page(attacker)
        statuses = [(await sign_in(attacker, page, password="not the password")).status_code for _ in range(6)]
        assert statuses[:5] == [401] * 5 and statuses[5] == 429  # the attacker's address is locked out of alice
        assert (await sign_in(attacker, page)).status_code == 429  # even with the right password, from there
        assert signed_in(await sign_in(owner, await login_page(owner)))  # the owner, elsewhere, is not


async def test_a_known_browser_signs_in_while_the_account_budget_is_spent(app, alice):
    async with browser(app, "192.0.2.10") as laptop, browser(app, "192.0.2.11") as new_phone:
        first = await sign_in(laptop, await login_page(laptop))
        assert signed_in(first)  # the laptop is now known for alice
        device = next(c for c in first.headers.get_list("set-cookie") if c.startswith("__Host-iam_device="))
        for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Path=/", "Max-Age="):
            assert attribute.lower() in device.lower()
        laptop.cookies.delete("__Host-iam_session")  # signed out: the next sign-in needs the password
        await spend_the_account_budget(app, "alice")
        refused = await sign_in(new_phone, await login_page(new_phone))
        assert refused.status_code == 429 and "Too many attempts" in refused.text  # an unknown browser waits
        assert signed_in(await sign_in(laptop, await login_page(laptop), username="Alice"))  # the known one not


async def test_a_known_device_cookie_is_bound_to_its_account(app, alice):
    from iam.users.directory import NewUser

    await app.state.iam.users.directory.create_user(NewUser(user_name="bob"), password="bob's long passphrase")
    async with browser(app, "192.0.2.10") as shared:
        assert signed_in(await sign_in(shared, await login_page(shared), username="bob",
                                       password="bob's long passphrase"))
        shared.cookies.delete("__Host-iam_session")
        await spend_the_account_budget(app, "alice")
        assert (await sign_in(shared, await login_page(shared))).status_code == 429  # known for bob, not alice
        shared.cookies.delete("__Host-iam_device")
        shared.cookies.set("__Host-iam_device", "forged", domain="iam.test")
        assert (await sign_in(shared, await login_page(shared))).status_code == 429


async def test_with_the_budget_spent_a_known_and_an_unknown_account_get_the_same_answer(app, alice):
    await spend_the_account_budget(app, "alice")
    await spend_the_account_budget(app, "mallory")  # no such user
    async with browser(app, "192.0.2.20") as first, browser(app, "192.0.2.21") as second:
        known = await sign_in(first, await login_page(first), password="a guess")
        unknown = await sign_in(second, await login_page(second), username="mallory", password="a guess")
    assert known.status_code == unknown.status_code == 429
    strip = lambda response, name: re.sub(r'value="[^"]*"', "", response.text).replace(name, "")  # noqa: E731
    assert strip(known, "alice") == strip(unknown, "mallory")
    assert {k: v for k, v in known.headers.items() if k != "content-length"} == \
        {k: v for k, v in unknown.headers.items() if k != "content-length"}


async def test_at_most_100_guesses_per_account_per_hour_from_any_number_of_addresses(app):
    now = [1_000_000.0]
    throttle = Throttle(AuthnStore(app.state.iam.stores["authn"].engine), clock=lambda: now[0])
    guesses, longest_wait = 0, 0
    for second in range(0, 3600, 5):
        now[0] = 1_000_000 + second
        address = f"203.0.113.{second // 5 % 250}"  # another address for every guess
        wait = await throttle.check("victim", address)
        longest_wait = max(longest_wait, wait)
        if wait == 0:
            await throttle.fail("victim", address)
            guesses += 1
    assert 90 <= guesses <= 100
    assert 0 < longest_wait <= 40  # it slows guessing down; it never locks the account for long
