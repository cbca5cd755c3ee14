"""The lock service: Redis, holding the lease the lease modes sell under, and minting its fencing tokens.

A lease is redis-py's ``Lock`` (``SET key value NX PX ttl``, released by a compare-and-delete script): the key
expires by itself after ``TICKETLOCK_LEASE_MS``, so a holder that dies cannot keep it forever, and a holder
that pauses past it is no longer protected (Kleppmann, "How to do distributed locking", 2016). Its value names
the holder (host, worker pid and a random part), so ``redis-cli GET ticketlock:lease`` shows who holds it.

The grant and the fencing token are one script: a token that a separate ``INCR`` handed out after the grant could
reach the store out of order. Tokens must keep growing even after Redis restarts empty: the store refuses a
token older than the one it holds (``StaleFence``), and the worker then asks for its next token above that one
(``learn_fence``), so one refused claim seeds the counter from the store.

Each worker process opens its own connection pool on first use, after the fork (``lock_service_for``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import LockNotOwnedError, RedisError
from redis.lock import Lock

from service.errors import LockUnavailable

log = logging.getLogger(__name__)

LEASE_KEY = "ticketlock:lease"
FENCE_KEY = "ticketlock:fence"
TIMEOUT_S = 1.0  # a lease is a round trip on a local network: a second without an answer is an outage
RETRY_EVERY_S = 0.002  # how often a waiter asks again while another worker holds the lease

# KEYS[1] the lease, KEYS[2] the fencing counter; ARGV[1] the holder's name, ARGV[2] the lease in ms, ARGV[3] the
# newest token the store was seen to hold. The grant, and the token it comes with: nil if someone holds the lease.
GRANT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return false
end
local fence = redis.call('INCR', KEYS[2])
if fence <= tonumber(ARGV[3]) then
    fence = tonumber(ARGV[3]) + 1
    redis.call('SET', KEYS[2], fence)
end
return fence
"""


@dataclass(frozen=True)
class Grant:
    """A lease held: its fencing token, and when it runs out (epoch seconds) unless let go first."""

    fence: int
    until: float


class FencedLease(Lock):
    """redis-py's lease, granted by the script that also hands out the fencing token.

    It overrides two of redis-py's own hooks (``register_scripts``, ``do_acquire``), which is why pyproject.toml pins
    redis-py to one major version.
    """

    lua_grant: Any = None

    def __init__(self, client: redis.Redis, lease_ms: int, floor: int) -> None:
        super().__init__(client, LEASE_KEY, timeout=lease_ms / 1000, sleep=RETRY_EVERY_S)
        self.lease_ms = lease_ms
        self.floor = floor
        self.grant: Grant | None = None

    def register_scripts(self) -> None:
        super().register_scripts()
        if FencedLease.lua_grant is None:
            FencedLease.lua_grant = self.redis.register_script(GRANT)

    def do_acquire(self, token: str) -> bool:
        granted_at = time.time()
        # On this lease's own client: a registered script otherwise runs on the first client that registered it.
        fence = self.lua_grant(keys=[LEASE_KEY, FENCE_KEY], args=[token, self.lease_ms, self.floor], client=self.redis)
        if fence is None:
            return False
        self.grant = Grant(fence=int(fence), until=granted_at + self.lease_ms / 1000)
        return True


class LockService:
    """One worker process's way to the lock service: its connection pool, and the leases it takes."""

    def __init__(self, url: str, lease_ms: int, host_name: str, shown_url: str) -> None:
        self.shown_url = shown_url  # the URL with any password masked, for messages
        self.lease_ms = lease_ms
        self.host_name = host_name
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self.newest_fence_seen = 0  # in the store, by this worker: the floor of the next token

    def acquire(self, timeout_s: float) -> tuple[FencedLease, Grant] | None:
        """Wait at most ``timeout_s`` for the lease: the lease and its grant, or None while someone else holds it."""
        lease = FencedLease(self.client, self.lease_ms, self.newest_fence_seen)
        holder = f"{self.host_name} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
        with self._reaching("take the lease"):
            if not lease.acquire(blocking_timeout=timeout_s, token=holder):
                return None
        assert lease.grant is not None
        return lease, lease.grant

    def release(self, lease: FencedLease) -> None:
        """Let go of the lease, unless it ran out and someone else holds it now (then say so in the log)."""
        try:
            lease.release()
        except LockNotOwnedError:
            log.warning("lease %s ran out before its holder let go: another may have sold meanwhile", lease.grant)
        except RedisError as error:  # the sale is done either way; the lease runs out by itself
            log.warning("could not let go of lease %s: %s", lease.grant, error)

    def learn_fence(self, fence: int) -> None:
        """The store holds token ``fence``: this worker's next token will be larger (after a Redis restart)."""
        self.newest_fence_seen = max(self.newest_fence_seen, fence)

    def check(self) -> None:
        """A round trip to the lock service (GET /health): LockUnavailable if it does not answer."""
        with self._reaching("answer"):
            self.client.ping()

    @contextmanager
    def _reaching(self, what: str) -> Iterator[None]:
        """Turn the lock service's errors into LockUnavailable (503, Retry-After, nothing sold)."""
        try:
            yield
        except RedisError as error:
            raise LockUnavailable(
                f"The lock service at {self.shown_url} did not {what} ({error}): nothing was sold. Retry shortly."
            ) from None


@functools.cache
def lock_service_for(url: str, lease_ms: int, host_name: str, shown_url: str, pid: int) -> LockService:
    """This worker process's lock service, made on first use: keyed by pid, so no worker uses its master's pool."""
    return LockService(url, lease_ms, host_name, shown_url)
