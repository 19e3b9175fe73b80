"""Sign-in throttling (ASVS 5 V6.3.1, V6.3.8): guessing stays slow, the owner can still sign in, and the answer
never tells whether an account exists.

Every guess of a secret for an account (a password at sign-in, a TOTP code, the password asked again before a
credential change; LDAP connectors call it the same way) is checked and counted under three keys:

- the pair (account, client address): 5 failures in 15 minutes lock that pair for 5 minutes. An attacker's
  failures lock the attacker's address out of that account, never the owner's address.
- the client address alone: 30 failures in 15 minutes, whatever the accounts, lock it for 15 minutes.
- the account, from every address together: a token bucket of 10 guesses, refilled by one every 40 s, so at
  most 10 + 3600 / 40 = 100 guesses per account per hour however many addresses guess. An empty bucket slows
  guessing (the next guess is at most 40 s away) rather than locking the account.

A browser that has signed in as the account before carries a signed, HttpOnly "known device" cookie bound to
that account (set at each successful sign-in, 90 days): it is exempt from the account's bucket, so an attacker
who keeps the bucket empty from elsewhere does not keep the owner out. The pair and address limits still hold.
Sign-in through an upstream identity provider (OpenID Connect connectors) never passes through here: password
guessing cannot block it.

Keys are checked before the account is looked up and counted whether it exists or not, so an unknown account
and a known one get the same answer (status, body, timing).
"""

from __future__ import annotations

import time

from iam.authn.store import AuthnStore
from iam.roles import Role

WINDOW = 15 * 60
# fixed-window counters: key prefix -> (failures allowed in a window, lock seconds once reached)
LIMITS = {"pair": (5, 5 * 60), "addr": (30, 15 * 60),
          # password reset requests (iam/authn/reset.py): each request counts, not only failures
          "reset-acct": (3, 60 * 60), "reset-addr": (10, 15 * 60)}
# The account's token bucket, kept as a debt in seconds: each guess adds GUESS_COST, time pays it back, and a
# guess is allowed while the debt leaves room for one more within BURST guesses.
GUESS_COST = 40
BURST = 10
MAX_DEBT = WINDOW  # guesses that raced past the check are charged too, up to this; older rows are then stale

DEVICE_COOKIE = "iam_device"
DEVICE_TYP = "iam-device+jwt"
DEVICE_TTL = 90 * 86400


def account_key(username: str) -> str:
    """How an account is named here: the username as the directory matches it (case-insensitively)."""
    return username.strip().casefold()[:255]


class Throttle:
    def __init__(self, store: AuthnStore, identity=None, peer_keys=None, clock=time.time) -> None:
        self.store = store
        self.identity = identity  # signs known-device cookies (iam.peers.ServiceIdentity)
        self.peer_keys = peer_keys  # and verifies them (iam.peers.PeerKeys)
        self.clock = clock

    @staticmethod
    def _keys(account: str | None, address: str) -> list[str]:
        keys = [f"addr:{address}"]
        if account is not None:
            keys += [f"pair:{address} {account_key(account)}", f"acct:{account_key(account)}"]
        return keys

    async def check(self, account: str | None, address: str, device: str | None = None) -> int:
        """Seconds until this guess may be made (0: now). `account` is the username as typed (None throttles by
        address only, for user codes); `device` is the browser's known-device cookie, if it sent one."""
        keys = self._keys(account, address)
        if account is not None and device and await self._known(account, device):
            keys.pop()  # the account's bucket
        now = int(self.clock())
        rows = await self.store.failure_counts(keys)
        return max([row.locked_until - now for row in rows if row.locked_until > now], default=0)

    async def fail(self, account: str | None, address: str) -> None:
        now = int(self.clock())
        await self.store.count_failures(
            self._keys(account, address),
            lambda key, row: _bucket(row, now) if key.startswith("acct:") else _counter(key, row, now))

    async def succeeded(self, account: str, address: str) -> None:
        """The right secret from this address: its pair counter starts afresh. The account's bucket does not (a
        sign-in by the owner must not hand an attacker elsewhere a new burst of guesses)."""
        await self.store.forget_failures(self._keys(account, address)[1])

    async def spend_reset(self, account: str, address: str) -> bool:
        """Count a password reset request for `account` (as typed) from `address`; True when it is throttled
        (then it is not counted)."""
        keys = [f"reset-addr:{address}", f"reset-acct:{account_key(account)}"]
        now = int(self.clock())
        if any(row.locked_until > now for row in await self.store.failure_counts(keys)):
            return True
        await self.store.count_failures(keys, lambda key, row: _counter(key, row, now))
        return False

    def device_cookie(self, account: str) -> str:
        """The known-device cookie's value for a browser that just signed in as `account`."""
        return self.identity.sign(Role.AUTHENTICATION, DEVICE_TYP, {"acct": account_key(account)},
                                  issuer=Role.AUTHENTICATION, ttl=DEVICE_TTL)

    async def _known(self, account: str, device: str) -> bool:
        claims = await self.peer_keys.verify_own(device, role=Role.AUTHENTICATION, typ=DEVICE_TYP, max_ttl=DEVICE_TTL)
        return claims is not None and claims.get("acct") == account_key(account)

    async def purge_stale(self, now: int, batch: int) -> int:
        """Delete at most `batch` rows that neither lock, count nor owe any more (their window is over)."""
        return await self.store.purge_failures(now, window_start_before=now - WINDOW, batch=batch)


def _counter(key: str, row, now: int) -> dict:
    allowed, lock = LIMITS[key.split(":", 1)[0]]
    if row is None or now - row.window_start > WINDOW:
        failures, start = 1, now
    else:
        failures, start = row.failures + 1, row.window_start
    locked_until = now + lock if failures >= allowed else 0
    if locked_until:
        failures, start = 0, now  # the lock is the penalty; counting starts afresh after it
    return {"failures": failures, "window_start": start, "locked_until": locked_until}


def _bucket(row, now: int) -> dict:
    # `failures` holds the debt (seconds) as of `window_start`; the next guess is allowed once the debt is at most
    # (BURST - 1) * GUESS_COST, which is when `locked_until` falls.
    debt = 0 if row is None else max(0, row.failures - (now - row.window_start))
    debt = min(debt + GUESS_COST, MAX_DEBT)
    locked_until = now + debt - (BURST - 1) * GUESS_COST
    return {"failures": debt, "window_start": now, "locked_until": max(locked_until, 0)}
