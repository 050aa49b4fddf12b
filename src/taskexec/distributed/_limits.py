"""Rate limits shared in Redis by every process that uses the same key and model.

The schedule of :class:`~taskexec._limits.LocalLimiter`, kept in Redis on Redis's clock (so that
machines whose clocks differ agree), and changed only by server-side scripts: an acquisition is
one round trip, atomic however many processes acquire at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from .._limits import Limiter, LimitWaitTooLong, RateHeaders
from . import _store

__all__ = ("RedisLimiter",)

#: Keys of a limit live at least this long past the end of its schedule.
_TTL_MS = 120_000
#: A connection or two per limiter and loop: each acquisition is one short script.
_CONNECTIONS = 8

_NOW = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = {_TTL_MS}
"""
# KEYS: next request, next tokens, paused until.
# ARGV: request interval ms, tokens ms, most wait ms. Returns {taken (1/0), wait ms, slot ms}.
_RESERVE = (
    _NOW
    + """
local start = now
for i = 1, 3 do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  if v > start then start = v end
end
if start - now > tonumber(ARGV[3]) then return {0, tostring(start - now), tostring(start)} end
local px = math.ceil(start - now + tonumber(ARGV[1]) + tonumber(ARGV[2])) + ttl
redis.call('SET', KEYS[1], tostring(start + tonumber(ARGV[1])), 'PX', px)
redis.call('SET', KEYS[2], tostring(start + tonumber(ARGV[2])), 'PX', px)
return {1, tostring(start - now), tostring(start)}
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


# KEYS: the places held (a sorted set by lease end). ARGV: most places, holder, lease ms.
# Returns 1 if the holder took a place (expired leases, of holders that died, are dropped).
_ENTER = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + ttl)
return 1
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
        max_in_flight: Requests out at once, across every process (each holds a lease that
            ends with its task's deadline, so a process that dies does not keep its places).
    """

    def __init__(
        self, url: str, name: str, rpm: int | None, tpm: int | None, max_in_flight: int | None
    ) -> None:
        super().__init__(rpm, tpm, max_in_flight)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_CONNECTIONS,
            timeout=30,
            socket_connect_timeout=5,
            socket_timeout=_store.REDIS_COMMAND_TIMEOUT_S,
        )
        self.client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        prefix = f"taskexec:limit:{name}"
        self._keys = [f"{prefix}:{part}" for part in ("requests", "tokens", "paused")]
        self._places = f"{prefix}:in-flight"
        self._reserve_script = self.client.register_script(_RESERVE)
        self._pause_script = self.client.register_script(_PAUSE)
        self._move_script = self.client.register_script(_MOVE)
        self._enter_script = self.client.register_script(_ENTER)

    async def reserve(self, tokens: int, max_wait_s: float) -> tuple[float, float]:
        args = [
            self.request_interval_s * 1000,
            tokens * self.token_interval_s * 1000,
            max(0.0, max_wait_s) * 1000,
        ]
        taken, wait_ms, slot_ms = await self._reserve_script(keys=self._keys, args=args)
        wait_s = float(wait_ms) / 1000
        if not int(taken):
            raise LimitWaitTooLong(wait_s)
        return wait_s, float(slot_ms)

    async def _enter(self, deadline: float) -> str:
        holder = uuid.uuid4().hex
        while True:
            lease_ms = max(1.0, (deadline - time.monotonic()) * 1000)
            args: list[str | float] = [self.max_in_flight or 0, holder, lease_ms]
            if int(await self._enter_script(keys=[self._places], args=args)):
                return holder
            if time.monotonic() + _PLACE_POLL_S >= deadline:
                raise LimitWaitTooLong(0.0)
            await asyncio.sleep(_PLACE_POLL_S)

    async def _leave(self, token: str) -> None:
        await self.client.zrem(self._places, token)

    async def aclose(self) -> None:
        await super().aclose()
        await self.client.aclose()

    async def paused_until(self) -> float:
        return float(await self.client.get(self._keys[2]) or 0)

    async def pause(self, seconds: float) -> None:
        keys = [self._keys[2], self._keys[0], self._keys[1]]
        await self._pause_script(keys=keys, args=[seconds * 1000])

    async def correct(self, estimated: int, actual: int) -> None:
        if self.token_interval_s and actual != estimated:
            delta_ms = (actual - estimated) * self.token_interval_s * 1000
            await self._move_script(keys=[self._keys[1]], args=[delta_ms, ""])

    async def tighten(self, headers: RateHeaders) -> None:
        for left, reset in (
            (headers.requests_left, headers.requests_reset_s),
            (headers.tokens_left, headers.tokens_reset_s),
        ):
            if left is not None and reset is not None and left <= 0:
                await self.pause(reset)
        left, reset = headers.requests_left, headers.requests_reset_s
        if left and reset is not None and reset / left > self.request_interval_s:
            await self._move_script(keys=[self._keys[0]], args=[0, reset / left * 1000])
