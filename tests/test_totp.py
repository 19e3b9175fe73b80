"""The TOTP second factor on a controlled clock: RFC 6238 §5.2 skew of one step, and every code accepted once."""

from __future__ import annotations

import asyncio

import pyotp
import pytest

from iam.authn.totp import TotpAlreadyEnabled

T0 = 1_800_000_000.0  # the start of a 30 s step


@pytest.fixture
async def totp(app):
    factor = app.state.iam.authn.totp
    factor.clock = lambda: T0
    return factor


async def enrolled(totp, subject: str = "sub-1") -> pyotp.TOTP:
    secret = await totp.start_enrolment(subject)
    generator = pyotp.TOTP(secret)
    assert await totp.verify(subject, generator.at(T0), confirming=True)
    return generator


async def test_the_enrolment_code_cannot_sign_in_in_its_own_step(totp):
    generator = await enrolled(totp)
    assert await totp.enabled("sub-1")
    assert not await totp.verify("sub-1", generator.at(T0))


async def test_one_step_of_skew_each_way_and_no_more(totp):
    generator = await enrolled(totp)
    assert not await totp.verify("sub-1", generator.at(T0 + 60))  # two steps ahead
    assert await totp.verify("sub-1", generator.at(T0 + 30))  # the next step, while the server is still in T0
    totp.clock = lambda: T0 + 90
    assert not await totp.verify("sub-1", generator.at(T0 + 30))  # two steps behind now
    assert await totp.verify("sub-1", generator.at(T0 + 60))  # one behind


async def test_an_older_step_is_refused_after_a_newer_one_was_used(totp):
    generator = await enrolled(totp)
    totp.clock = lambda: T0 + 30
    assert await totp.verify("sub-1", generator.at(T0 + 60))
    assert not await totp.verify("sub-1", generator.at(T0 + 30))  # within skew, but older than the last used


async def test_malformed_codes_are_refused_without_error(totp):
    await enrolled(totp)
    for code in ("", "12345", "1234567", "abcdef", "12 34 5x"):
        assert not await totp.verify("sub-1", code)
    assert not await totp.verify("nobody", "123456")


async def test_concurrent_submissions_of_one_code_succeed_once(totp):
    generator = await enrolled(totp)
    code = generator.at(T0 + 30)
    results = await asyncio.gather(*(totp.verify("sub-1", code) for _ in range(8)))
    assert results.count(True) == 1


async def test_enrolment_restart_never_replaces_a_confirmed_factor(totp):
    generator = await enrolled(totp)
    with pytest.raises(TotpAlreadyEnabled):
        await totp.start_enrolment("sub-1")
    assert await totp.enabled("sub-1")
    assert await totp.verify("sub-1", generator.at(T0 + 30))


async def test_concurrent_enrolments_share_one_pending_secret(totp):
    secrets = set(await asyncio.gather(*(totp.start_enrolment("sub-2") for _ in range(6))))
    pending = await totp.pending_secret("sub-2")
    assert pending in secrets
    assert await totp.verify("sub-2", pyotp.TOTP(pending).at(T0), confirming=True)


# -- secrets at rest: sealed with the key ring's data key ---------------------------------------------------------
async def stored_secret(totp, subject: str) -> str:
    from sqlalchemy import select

    from iam.authn.store import totp as table

    async with totp.store.engine.connect() as conn:
        return (await conn.execute(select(table.c.secret).where(table.c.subject == subject))).scalar_one()


async def test_secrets_are_stored_sealed_with_the_data_key(totp, app):
    generator = await enrolled(totp)
    stored = await stored_secret(totp, "sub-1")
    assert stored.startswith("v1:") and generator.secret not in stored
    key_file = app.state.iam.settings.keys.dir / "data.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and totp.data_key == key_file.read_text().strip()
    assert await totp.verify("sub-1", generator.at(T0 + 30))


async def test_a_sealed_secret_is_bound_to_its_user(totp):
    from sqlalchemy import update

    from iam.authn.store import totp as table

    generator = await enrolled(totp, "sub-a")
    await enrolled(totp, "sub-b")
    async with totp.store.engine.begin() as conn:  # someone with write access copies a's sealed secret to b
        await conn.execute(update(table).where(table.c.subject == "sub-b")
                           .values(secret=await stored_secret(totp, "sub-a")))
    assert not await totp.verify("sub-b", generator.at(T0 + 30))


async def test_a_secret_stored_before_sealing_is_sealed_at_its_next_use(totp):
    from iam.authn.totp import Totp

    unsealed = Totp(totp.store, clock=totp.clock)  # as without a data key
    secret = await unsealed.start_enrolment("sub-old")
    assert await stored_secret(totp, "sub-old") == secret
    assert await unsealed.verify("sub-old", pyotp.TOTP(secret).at(T0), confirming=True)
    assert await totp.verify("sub-old", pyotp.TOTP(secret).at(T0 + 30))  # the keyed service reads it ...
    assert (await stored_secret(totp, "sub-old")).startswith("v1:")  # ... and seals it
    assert not await unsealed.verify("sub-old", pyotp.TOTP(secret).at(T0 + 60))  # no key: cannot open it
