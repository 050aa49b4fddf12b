"""Rate limits shared in Redis by every process that uses the same key and model.

The schedule of :class:`~taskexec._limits.LocalLimiter`, kept in Redis on Redis's clock (so that
machines whose clocks differ agree), and changed only by server-side scripts: an acquisition is
one round trip, atomic however many processes acquire at once.

Each script also records the numbers this process asks for, next to the schedule, and follows
the smallest of those that any process asked for in the last two minutes: processes that
disagree on a limit share it, and the strictest wins.

A request in flight holds a place under a lease: an entry in a sorted set that ends
``lease_s`` from now on Redis's clock, renewed by the holder every third of that. A process
that dies stops renewing, and its places come back within a lease, not at its task's deadline.

Redis that does not answer is asked again, with backoff, until the task's deadline; then the
task fails (kind ``connection``) with the URL, its password redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._limits import (
    HEADROOM,
    Limiter,
    LimiterUnavailable,
    Limits,
    LimitWaitTooLong,
    RateHeaders,
    _loop_time,
)
from . import _store
from ._config import redact_url, url_redactor

__all__ = ("PLACE_LEASE_S", "RedisLimiter")

log = logging.getLogger("taskexec")
T = TypeVar("T")

#: Keys of a limit (and the numbers a process asked for) live this long past their last use.
_TTL_MS = 120_000
#: A connection or two per limiter and loop: each acquisition is one short script.
_CONNECTIONS = 8
#: How long a place in flight lives unrenewed; its holder renews it every third of this.
PLACE_LEASE_S = 1.5
#: Waits between tries while Redis does not answer: doubling from the first to the longest.
_RETRY_FIRST_S = 0.05
_RETRY_LONGEST_S = 1.0
#: A limiter gives up on Redis this long before the task's deadline, so that the task ends
#: with the limiter's error (kind ``connection``), not with the deadline's (``timeout``).
_GIVE_UP_BEFORE_S = 0.1
#: The longest a Redis write that nothing waits on may take (a correction, a pause, a place
#: given back): it is skipped after that, as when Redis is away.
_ADVISORY_S = 1.0
#: What a Redis that is away (or failing over) raises: asked again until the deadline.
_AWAY = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

_NOW = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = {_TTL_MS}
"""
# The numbers in force. KEY: a hash of 'rpm:<n>', 'tpm:<n>', 'mif:<n>' (max_in_flight), each
# to when it lapses (ms). Drops lapsed (and foreign) fields, records this process's numbers
# (MINE: rpm, tpm, mif, '0' for none) for another two minutes when they have less than one
# left (a write a minute, not one per call), and returns the smallest of each (0: none).
_IN_FORCE = (
    _NOW
    + """
local function in_force(key, mine)
  local index = {rpm = 1, tpm = 2, mif = 3}
  local least, ends = {0, 0, 0}, {}
  local found = redis.call('HGETALL', key)
  for j = 1, #found, 2 do
    local kind, n = string.match(found[j], '^(%l+):(%d+)$')
    local i, lapses = index[kind or ''], tonumber(found[j + 1])
    n = tonumber(n or '0')
    if i == nil or lapses == nil or lapses <= now or n < 1 then
      redis.call('HDEL', key, found[j])
    else
      ends[found[j]] = lapses
      if least[i] == 0 or n < least[i] then least[i] = n end
    end
  end
  local names, refresh = {'rpm', 'tpm', 'mif'}, false
  for i = 1, 3 do
    local n = tonumber(mine[i])
    if n > 0 then
      local field = names[i] .. ':' .. mine[i]
      if (ends[field] or 0) < now + ttl / 2 then
        redis.call('HSET', key, field, now + ttl)
        refresh = true
      end
      if least[i] == 0 or n < least[i] then least[i] = n end
    end
  end
  if refresh then redis.call('PEXPIRE', key, ttl) end
  return least
end
"""
)
# KEYS: next request, next tokens, paused until, numbers. ARGV: this process's rpm, tpm,
# max_in_flight ('0' for none), the request's tokens, the most wait ms, the headroom.
# Returns {taken (1/0), wait ms, slot ms, rpm, tpm, max_in_flight in force}.
_RESERVE = (
    _IN_FORCE
    + """
local limit = in_force(KEYS[4], {ARGV[1], ARGV[2], ARGV[3]})
local headroom = tonumber(ARGV[6])
local request_ms, token_ms = 0, 0
if limit[1] > 0 then request_ms = 60000 / (limit[1] * headroom) end
if limit[2] > 0 then token_ms = tonumber(ARGV[4]) * 60000 / (limit[2] * headroom) end
local start = now
for i = 1, 3 do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  if v > start then start = v end
end
local wait = tostring(start - now)
if start - now > tonumber(ARGV[5]) then
  return {0, wait, tostring(start), limit[1], limit[2], limit[3]}
end
local px = math.ceil(start - now + request_ms + token_ms) + ttl
redis.call('SET', KEYS[1], tostring(start + request_ms), 'PX', px)
redis.call('SET', KEYS[2], tostring(start + token_ms), 'PX', px)
return {1, wait, tostring(start), limit[1], limit[2], limit[3]}
"""
)
# KEYS: paused until, next request, next tokens. ARGV: pause ms.
_PAUSE = (
    _NOW
    + """
local untl = now + tonumber(ARGV[1])
if untl <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
local px = math.ceil(tonumber(ARGV[1])) + ttl
redis.call('SET', KEYS[1], tostring(untl), 'PX', px)
for i = 2, 3 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') < untl then
    redis.call('SET', KEYS[i], tostring(untl), 'PX', px)
  end
end
return 1
"""
)
# KEYS: one schedule. ARGV: ms to move it by, ms from now it must at least be (or '').
_MOVE = (
    _NOW
    + """
local v = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if ARGV[2] ~= '' and v < now + tonumber(ARGV[2]) then v = now + tonumber(ARGV[2]) end
if v < now then v = now end
redis.call('SET', KEYS[1], tostring(v), 'PX', math.ceil(v - now) + ttl)
return 0
"""
)
# KEYS: the places held (a sorted set of holders by lease end), numbers. ARGV: this process's
# rpm, tpm, max_in_flight, the holder, the lease ms. Drops lapsed leases (of holders that
# died), then takes a place if one is free under the max_in_flight in force.
# Returns {taken (1/0), rpm, tpm, max_in_flight in force}.
_ENTER = (
    _IN_FORCE
    + """
local limit = in_force(KEYS[2], {ARGV[1], ARGV[2], ARGV[3]})
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if limit[3] > 0 and redis.call('ZCARD', KEYS[1]) >= limit[3] then
  return {0, limit[1], limit[2], limit[3]}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])) + ttl)
return {1, limit[1], limit[2], limit[3]}
"""
)
# KEYS: the places held. ARGV: the lease ms, then the holders of this process. Each lease is
# moved to end a lease from now; one that lapsed while its holder could not reach Redis is
# held again, as its request is still out (the count stays true after an outage).
_RENEW = (
    _NOW
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + ttl)
return 0
"""
)
#: How often a request waiting for a place in flight asks Redis again.
_PLACE_POLL_S = 0.02


class RedisLimiter(Limiter):
    """A limit kept in Redis under ``taskexec:limit:<name>:*``.

    Args:
        url: The Redis URL.
        name: The limit's identity (a hash of endpoint, key and model; no part of the key).
        rpm: Requests per minute. tpm: Tokens per minute.
        max_in_flight: Requests out at once, across every process.
        lease_s: How long a place in flight lives unless its holder renews it (every third of
            this): a process that dies gives its places back within about this long.
    """

    def __init__(
        self,
        url: str,
        name: str,
        rpm: int | None,
        tpm: int | None,
        max_in_flight: int | None,
        *,
        lease_s: float = PLACE_LEASE_S,
    ) -> None:
        super().__init__(rpm, tpm, max_in_flight, name=name)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_CONNECTIONS,
            timeout=30,
            socket_connect_timeout=5,
            socket_timeout=_store.REDIS_COMMAND_TIMEOUT_S,
            # No retries inside the client: _ask asks again itself, with backoff that knows
            # the task's deadline (the client's own would wait up to 10 tries regardless).
            retry=Retry(NoBackoff(), 0),
        )
        self.client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._where = redact_url(url)
        self._redact = url_redactor(url)
        self._lease_ms = max(1.0, lease_s * 1000)
        prefix = f"taskexec:limit:{name}"
        self._keys = [f"{prefix}:{part}" for part in ("requests", "tokens", "paused")]
        self._numbers = f"{prefix}:numbers"
        self._places = f"{prefix}:in-flight"
        self._reserve_script = self.client.register_script(_RESERVE)
        self._pause_script = self.client.register_script(_PAUSE)
        self._move_script = self.client.register_script(_MOVE)
        self._enter_script = self.client.register_script(_ENTER)
        self._renew_script = self.client.register_script(_RENEW)
        #: The places this limiter holds now, renewed by :meth:`_renew` while there are any.
        self._held: set[str] = set()
        self._renewing: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _mine(self) -> list[int]:
        own = self.own
        return [own.rpm or 0, own.tpm or 0, own.max_in_flight or 0]

    def _follow(self, rpm: Any, tpm: Any, max_in_flight: Any) -> None:
        """Follow the numbers in force that a script returned (0: none)."""
        self._apply(Limits(int(rpm) or None, int(tpm) or None, int(max_in_flight) or None))

    async def _ask(self, deadline: float, command: Callable[[], Awaitable[T]]) -> T:
        """Run ``command`` against Redis, asking again with backoff while Redis is away, until
        shortly before ``deadline`` (a ``time.monotonic()``).

        Raises:
            LimiterUnavailable: Redis did not answer in time.
        """
        give_up = deadline - _GIVE_UP_BEFORE_S
        delay = _RETRY_FIRST_S
        while True:
            # No try is left unbounded: a Redis that stopped answering (a partition, a paused
            # host) would hold the task past its deadline. One whose deadline has passed
            # still gets one try (bounded by the client's command timeout).
            bound = (
                asyncio.timeout_at(_loop_time(give_up))
                if give_up > time.monotonic()
                else contextlib.nullcontext()
            )
            try:
                async with bound:
                    return await command()
            except _AWAY as exc:  # also the bound's TimeoutError, an OSError
                cause = self._redact(str(exc) or type(exc).__name__)
            if time.monotonic() + delay >= give_up:
                raise LimiterUnavailable(
                    f"the rate limit's Redis at {self._where} did not answer before the task's "
                    f"deadline (last error: {cause})"
                )
            log.debug("rate limit: Redis at %s is away (%s); asking again", self._where, cause)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_LONGEST_S)

    async def _advise(self, command: Callable[[], Awaitable[object]]) -> None:
        """Run a write that nothing waits on; skip it if Redis is away (it only refines the
        schedule, and the task it comes from should not fail or wait for it)."""
        try:
            async with asyncio.timeout(_ADVISORY_S):
                await command()
        except _AWAY as exc:
            cause = self._redact(str(exc) or type(exc).__name__)
            log.debug("rate limit: skipped a write to Redis at %s: %s", self._where, cause)

    async def reserve(self, tokens: int, max_wait_s: float) -> tuple[float, float]:
        args = [*self._mine(), tokens, max(0.0, max_wait_s) * 1000, HEADROOM]
        taken, wait_ms, slot_ms, *in_force = await self._ask(
            time.monotonic() + max_wait_s,
            lambda: self._reserve_script(keys=[*self._keys, self._numbers], args=args),
        )
        self._follow(*in_force)
        wait_s = float(wait_ms) / 1000
        if not int(taken):
            raise LimitWaitTooLong(wait_s)
        return wait_s, float(slot_ms)

    async def _enter(self, deadline: float) -> str:
        holder = uuid.uuid4().hex
        keys = [self._places, self._numbers]
        args: list[str | float] = [*self._mine(), holder, self._lease_ms]
        while True:
            taken, *in_force = await self._ask(
                deadline, lambda: self._enter_script(keys=keys, args=args)
            )
            self._follow(*in_force)
            if int(taken):
                self._held.add(holder)
                if self._renewing is None:
                    self._renewing = asyncio.create_task(self._renew())
                return holder
            if time.monotonic() + _PLACE_POLL_S >= deadline:
                raise LimitWaitTooLong(0.0)
            await asyncio.sleep(_PLACE_POLL_S)

    async def _leave(self, token: str) -> None:
        # Not renewed from now on: if Redis is away, the place lapses by itself within a lease.
        self._held.discard(token)
        await self._advise(lambda: self.client.zrem(self._places, token))

    async def _renew(self) -> None:
        """Renew this limiter's places every third of a lease, while it holds any."""
        try:
            while self._held and not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._lease_ms / 3000)
                if not self._held or self._stop.is_set():
                    break
                await self._advise(self._renew_held)
        finally:
            self._renewing = None

    async def _renew_held(self) -> None:
        args: list[str | float] = [self._lease_ms, *self._held]
        await self._renew_script(keys=[self._places], args=args)

    async def aclose(self) -> None:
        try:
            await super().aclose()
            renewing = self._renewing
            if renewing is not None:
                # Stopped between two renewals, never in the middle of a Redis command.
                self._stop.set()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(renewing, _ADVISORY_S * 2)
        finally:
            await self.client.aclose()

    async def paused_until(self, deadline: float = math.inf) -> float:
        value = await self._ask(deadline, lambda: self.client.get(self._keys[2]))
        return float(value or 0)

    async def pause(self, seconds: float) -> None:
        keys = [self._keys[2], self._keys[0], self._keys[1]]
        await self._advise(lambda: self._pause_script(keys=keys, args=[seconds * 1000]))

    async def correct(self, estimated: int, actual: int) -> None:
        if self.token_interval_s and actual != estimated:
            delta_ms = (actual - estimated) * self.token_interval_s * 1000
            await self._advise(lambda: self._move_script(keys=[self._keys[1]], args=[delta_ms, ""]))

    async def tighten(self, headers: RateHeaders) -> None:
        for left, reset in (
            (headers.requests_left, headers.requests_reset_s),
            (headers.tokens_left, headers.tokens_reset_s),
        ):
            if left is not None and reset is not None and left <= 0:
                await self.pause(reset)
        left, reset = headers.requests_left, headers.requests_reset_s
        if left and reset is not None and reset / left > self.request_interval_s:
            move = [0, reset / left * 1000]
            await self._advise(lambda: self._move_script(keys=[self._keys[0]], args=move))
