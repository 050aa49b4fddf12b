"""Provider rate limits: requests and tokens per minute, and requests in flight, per agent.

Providers enforce requests per minute (RPM) and tokens per minute (TPM) per key and model, and
quantise them to short windows: a 600 RPM limit may be enforced as 10 requests in any second. So
requests are *spaced*, never sent as a burst at the start of a minute: each acquisition takes
the next free slot of a virtual schedule (the generic cell rate algorithm with no burst), one
slot ``60 / rpm`` seconds after the last, and advances the token schedule by the request's
estimated tokens. The reply's usage then corrects the token schedule.

A 429 pauses the whole agent: its ``Retry-After`` (or the provider's reset headers) moves every
waiting task past it, so the herd does not retry at once. The provider's
``x-ratelimit-remaining-*`` / ``anthropic-ratelimit-*`` headers tighten the schedule when they
say less is left than the limiter thought.

A limit belongs to a key and a model, not to the numbers an agent gives it: agents (and
processes) that use the same key and model with different ``rpm``, ``tpm`` or
``max_in_flight`` share one limit, and the smallest setting of each wins (with a warning, once
per process, where an agent's own number is not the one in force).

The schedule lives in this process (:class:`LocalLimiter`), or in Redis (:class:`RedisLimiter`,
one atomic script per acquisition) so that every process that uses the same key and model
shares it. Time spent waiting counts against the task's deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import os
import re
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from ._loops import close_with_loop
from ._models import Agent
from ._plugins import load_plugin

__all__ = (
    "HEADROOM",
    "LIMITER_ENV_VAR",
    "LimitWaitTooLong",
    "Limiter",
    "LimiterUnavailable",
    "Limits",
    "LocalLimiter",
    "RateHeaders",
    "estimate_tokens",
    "has_limits",
    "limiter_for",
    "over_tpm",
    "waiting_now",
)

#: The share of a limit that taskexec uses. Requests are spaced evenly, but the moment each
#: reaches the provider varies by a few milliseconds (scheduling, the network); spaced at exactly
#: the limit, half of the provider's one-second windows would then see one request too many.
HEADROOM = 0.97
#: Redis for limits shared across processes (default: ``TASKEXEC_RESULTS_URL``).
LIMITER_ENV_VAR = "TASKEXEC_LIMITER_URL"
#: Completion tokens assumed for a request that sets no ``max_tokens``.
DEFAULT_COMPLETION_TOKENS = 1024

log = logging.getLogger("taskexec")


class LimitWaitTooLong(Exception):
    """The limiter's next slot is after the task's deadline (nothing was reserved)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"the rate limit's next free slot is {wait_s:.1f} s away")
        self.wait_s = wait_s


class LimiterUnavailable(Exception):
    """The limiter's Redis did not answer before the task's deadline (nothing was reserved).

    The message names the Redis URL with its password redacted, and the last error.
    """


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers of a limit: requests and tokens per minute, requests in flight (None: none)."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None

    @classmethod
    def of(cls, agent: Agent) -> Limits:
        """The limits an agent sets."""
        return cls(agent.rpm, agent.tpm, agent.max_in_flight)

    def smallest(self, other: Limits) -> Limits:
        """Each number the smaller of the two (an unset number is no limit: the other wins)."""

        def least(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Limits(
            least(self.rpm, other.rpm),
            least(self.tpm, other.tpm),
            least(self.max_in_flight, other.max_in_flight),
        )


#: The settings of a limit, as :class:`Limits` and agents name them.
LIMIT_SETTINGS = tuple(f.name for f in fields(Limits))


def over_tpm(agent: Agent, estimate: int, tpm: int | None = None) -> str | None:
    """Why a request of about ``estimate`` tokens can never fit the ``tpm`` in force for the
    agent's key and model (``tpm``, else the agent's own; None: it can). Such a request would
    take the whole minute's budget and more: it fails at once, instead of being sent and making
    every request after it wait in silence."""
    tpm = tpm or agent.tpm
    if tpm is None or estimate <= tpm:
        return None
    whose = f"agent {agent.name!r}'s tpm of {tpm}"
    if agent.tpm != tpm:
        whose = (
            f"the tpm of {tpm} in force for agent {agent.name!r}'s key and model (another "
            "agent or process sharing them set it; the smallest setting wins)"
        )
    return (
        f"a request of about {estimate} tokens (the prompt and max_tokens) is more than {whose} "
        "allows in a minute: raise tpm, lower max_tokens, or shorten the prompt"
    )


def estimate_tokens(agent: Agent, prompt: str) -> int:
    """Estimate a request's tokens before sending it: about four characters per token of the
    prompt and system prompt, plus the completion it may ask for (``max_tokens``)."""
    text = len(prompt) + len(agent.system_prompt or "")
    return math.ceil(text / 4) + (agent.max_tokens or DEFAULT_COMPLETION_TOKENS)


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """What a provider's reply says is left of its limits, and when each resets (seconds)."""

    requests_left: int | None = None
    requests_reset_s: float | None = None
    tokens_left: int | None = None
    tokens_reset_s: float | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str], now: datetime | None = None) -> RateHeaders:
        """Read OpenAI's ``x-ratelimit-*`` or Anthropic's ``anthropic-ratelimit-*`` headers."""
        lower = {k.lower(): v for k, v in headers.items()}

        def pick(*names: str) -> str | None:
            return next((lower[n] for n in names if n in lower), None)

        return cls(
            requests_left=_int(
                pick("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining")
            ),
            requests_reset_s=_reset(
                pick("x-ratelimit-reset-requests", "anthropic-ratelimit-requests-reset"), now
            ),
            tokens_left=_int(
                pick("x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining")
            ),
            tokens_reset_s=_reset(
                pick("x-ratelimit-reset-tokens", "anthropic-ratelimit-tokens-reset"), now
            ),
        )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _reset(value: str | None, now: datetime | None) -> float | None:
    """A reset as seconds from now: OpenAI's ``6m0s`` / ``1.5s`` / ``20ms``, or Anthropic's
    RFC 3339 time."""
    if not value:
        return None
    parts = _DURATION.findall(value)
    if parts and "".join(n + u for n, u in parts) == value.strip():
        return sum(float(n) * _UNIT_S[u] for n, u in parts)
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    return max(0.0, (at - (now or datetime.now(UTC))).total_seconds())


#: (limit, setting) pairs whose disagreement this process has logged: once each, not per call.
_WARNED: set[tuple[str, str]] = set()


class Limiter(ABC):
    """The limit of one key and model: where requests wait for their slot.

    The numbers in force are the smallest of those of every agent that joined it (and, for a
    limit shared in Redis, of every process that used it lately): :attr:`in_force`, read by
    the schedule through :attr:`request_interval_s`, :attr:`token_interval_s` and
    :attr:`max_in_flight`.
    """

    def __init__(
        self, rpm: int | None, tpm: int | None, max_in_flight: int | None, *, name: str = ""
    ) -> None:
        #: The limit's identity (a hash of endpoint, key and model), for the warnings.
        self.name = name
        #: The smallest numbers of this process's agents of the limit: what it asks for.
        self.own = Limits(rpm, tpm, max_in_flight)
        #: Each agent's own numbers, by name (for the warnings).
        self._agents: dict[str, Limits] = {}
        self.in_force = self.own
        self.request_interval_s = 0.0
        self.token_interval_s = 0.0
        self.max_in_flight: int | None = None
        self._apply(self.own, force=True)
        #: Tasks waiting for a slot now (for the progress line).
        self.waiting = 0
        #: Keeps the generator that closes the limiter with its loop alive (loops hold theirs
        #: weakly).
        self.closer: AsyncGenerator[None, None] | None = None

    def join(self, agent: str, limits: Limits) -> None:
        """Count an agent's numbers in this process's own (the smallest of each wins)."""
        if self._agents.get(agent) == limits:
            return  # the common case, once per task: nothing changes
        self._agents[agent] = limits
        own = Limits()
        for each in self._agents.values():
            own = own.smallest(each)
        self.own = own
        self._apply(self.in_force.smallest(own), force=True)

    def _apply(self, in_force: Limits, *, force: bool = False) -> None:
        """Make ``in_force`` the numbers the schedule follows; log, once per process and
        setting, where this process's numbers differ from them."""
        if in_force == self.in_force and not force:
            return
        self.in_force = in_force
        rpm, tpm = in_force.rpm, in_force.tpm
        self.request_interval_s = 60.0 / (rpm * HEADROOM) if rpm else 0.0
        self.token_interval_s = 60.0 / (tpm * HEADROOM) if tpm else 0.0
        self.max_in_flight = in_force.max_in_flight
        for setting in LIMIT_SETTINGS:
            if (self.name, setting) in _WARNED:
                continue
            value = getattr(in_force, setting)
            mine = {name: getattr(each, setting) for name, each in self._agents.items()}
            differing = {
                name: number
                for name, number in (mine or {"": getattr(self.own, setting)}).items()
                if number != value
            }
            if not differing:
                continue
            _WARNED.add((self.name, setting))
            who = "; ".join(
                f"{f'agent {name!r}' if name else 'this process'} sets "
                f"{f'{setting} {number}' if number else f'no {setting}'}"
                for name, number in sorted(differing.items())
            )
            log.warning(
                "%s, but %s %s is in force for its key and model: agents and processes that "
                "share a key and model share one limit, and the smallest setting wins",
                who,
                setting,
                value,
            )

    @abstractmethod
    async def reserve(self, tokens: int, max_wait_s: float) -> tuple[float, float]:
        """Take the next slot; return (seconds until it, the slot on the limiter's clock).

        Raises:
            LimitWaitTooLong: The slot is more than ``max_wait_s`` away (nothing is reserved).
            LimiterUnavailable: A shared limit's Redis did not answer within ``max_wait_s``.
        """

    @abstractmethod
    async def paused_until(self, deadline: float = math.inf) -> float:
        """The end of the latest pause, on the limiter's clock (0 if never paused).

        Raises:
            LimiterUnavailable: A shared limit's Redis did not answer before ``deadline``.
        """

    @abstractmethod
    async def pause(self, seconds: float) -> None:
        """Hold every request of this key and model for ``seconds`` (after a 429)."""

    @abstractmethod
    async def correct(self, estimated: int, actual: int) -> None:
        """Move the token schedule by what a reply really used, less what was charged."""

    @abstractmethod
    async def tighten(self, headers: RateHeaders) -> None:
        """Spread what the provider says is left over the time until its reset."""

    @contextlib.asynccontextmanager
    async def request(self, deadline: float) -> AsyncIterator[None]:
        """Hold one of ``max_in_flight`` places while a request is out (no bound: no wait).

        Raises:
            LimitWaitTooLong: No place came free before ``deadline`` (a ``time.monotonic()``).
            LimiterUnavailable: A shared limit's Redis did not answer before ``deadline``.
        """
        if not self.max_in_flight:
            yield
            return
        token = await self._enter(deadline)
        try:
            yield
        finally:
            await self._leave(token)

    @abstractmethod
    async def _enter(self, deadline: float) -> str:
        """Wait for a place among ``max_in_flight``; return what identifies it."""

    @abstractmethod
    async def _leave(self, token: str) -> None:
        """Give a place back."""

    async def aclose(self) -> None:
        """Release what the limiter holds (a subclass's Redis connection)."""
        self.closer = None

    async def acquire(self, tokens: int, deadline: float) -> float:
        """Wait for a slot for a request of about ``tokens`` tokens; return the seconds waited.

        ``deadline`` is a ``time.monotonic()``; a slot after it is not taken.

        Raises:
            LimitWaitTooLong: The next slot is after the deadline.
            LimiterUnavailable: A shared limit's Redis did not answer before the deadline.
        """
        started = time.monotonic()
        if not (self.request_interval_s or self.token_interval_s):
            return 0.0
        while True:
            wait, slot = await self.reserve(tokens, deadline - time.monotonic())
            if wait <= 0:
                return time.monotonic() - started
            self.waiting += 1
            try:
                await asyncio.sleep(wait)
            finally:
                self.waiting -= 1
            # A 429 while this task slept paused the agent past its slot: take a new one.
            # Slots after the pause stand, so a pause does not send them all to the back.
            if await self.paused_until(deadline) <= slot:
                return time.monotonic() - started


class LocalLimiter(Limiter):
    """The schedule in this process (on ``clock``, ``time.monotonic`` by default)."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        max_in_flight: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rpm, tpm, max_in_flight)
        self._clock = clock
        # A count and a queue rather than a semaphore: a smaller max_in_flight joining the
        # limit takes effect at once. A place is handed to the first waiter as it comes free.
        self._held = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_request = 0.0
        self._next_tokens = 0.0
        self._paused_until = 0.0

    async def reserve(self, tokens: int, max_wait_s: float) -> tuple[float, float]:
        now = self._clock()
        start = max(now, self._next_request, self._next_tokens, self._paused_until)
        if start - now > max_wait_s:
            raise LimitWaitTooLong(start - now)
        self._next_request = start + self.request_interval_s
        self._next_tokens = start + tokens * self.token_interval_s
        return start - now, start

    async def paused_until(self, deadline: float = math.inf) -> float:
        return self._paused_until

    async def _enter(self, deadline: float) -> str:
        if not self._waiters and self._held < (self.max_in_flight or math.inf):
            self._held += 1
            return ""
        place = asyncio.get_running_loop().create_future()
        self._waiters.append(place)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await place
        except BaseException as exc:  # a timeout or a cancellation: no place taken
            if place.done() and not place.cancelled():
                # Handed a place, then timed out or cancelled before taking it: pass it on.
                self._held -= 1
                self._hand_on()
            else:
                place.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(place)
            if isinstance(exc, TimeoutError):
                raise LimitWaitTooLong(deadline - time.monotonic()) from None
            raise
        return ""

    async def _leave(self, token: str) -> None:
        self._held -= 1
        self._hand_on()

    def _hand_on(self) -> None:
        """Give free places to the first waiters, in order."""
        while self._waiters and self._held < (self.max_in_flight or math.inf):
            place = self._waiters.popleft()
            if not place.done():  # not one cancelled on its way out
                self._held += 1
                place.set_result(None)

    async def pause(self, seconds: float) -> None:
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._next_request = max(self._next_request, until)
            self._next_tokens = max(self._next_tokens, until)

    async def correct(self, estimated: int, actual: int) -> None:
        moved = self._next_tokens + (actual - estimated) * self.token_interval_s
        self._next_tokens = max(moved, self._clock())

    async def tighten(self, headers: RateHeaders) -> None:
        now = self._clock()
        for left, reset, attr in (
            (headers.requests_left, headers.requests_reset_s, "_next_request"),
            (headers.tokens_left, headers.tokens_reset_s, "_next_tokens"),
        ):
            if left is None or reset is None:
                continue
            if left <= 0:
                await self.pause(reset)
            elif attr == "_next_request" and reset / left > self.request_interval_s:
                # Fewer requests left than this schedule would send before the reset.
                self._next_request = max(self._next_request, now + reset / left)


#: Every limiter of this process, per event loop and per (endpoint, key, model).
_LIMITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Limiter]] = (
    weakref.WeakKeyDictionary()
)


#: Makes a limiter shared through Redis: ``(url, name, rpm, tpm, max_in_flight)``. Registered by
#: the optional part that provides it (:mod:`taskexec.distributed`), not imported from here.
SharedLimiterFactory = Callable[[str, str, int | None, int | None, int | None], "Limiter"]
_shared_limiter: SharedLimiterFactory | None = None


def register_shared_limiter(factory: SharedLimiterFactory) -> None:
    """Make limits shared through Redis with ``factory`` (the workers extra registers one)."""
    global _shared_limiter
    _shared_limiter = factory


def identity(agent: Agent, provider: str, base_url: str, key: str | None) -> str:
    """A name for the limit a request counts against: the provider's endpoint, the key and the
    model. The key enters only through a one-way hash, so no part of it is in the name."""
    material = "\0".join([provider, base_url, key or "", agent.model or ""])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def has_limits(agent: Agent) -> bool:
    """True if the agent sets any rate limit (most do not: they pay nothing for limits)."""
    return bool(agent.rpm or agent.tpm or agent.max_in_flight)


def limiter_for(agent: Agent, provider: str, base_url: str, key: str | None) -> Limiter | None:
    """Return the limiter of an agent's requests on this loop, or None if it sets no limit.

    With ``TASKEXEC_LIMITER_URL`` or ``TASKEXEC_RESULTS_URL`` set, the limit is shared in Redis
    by every process that uses the same key and model; otherwise it holds in this process.
    Either way it is one limit per key and model: agents that disagree on its numbers share
    it, and the smallest of each number wins.
    """
    if not has_limits(agent):
        return None
    loop = asyncio.get_running_loop()
    # The numbers are not part of the name: agents (and processes) that disagree on them
    # share one limit all the same, as the provider counts their requests together.
    name = identity(agent, provider, base_url, key)
    limits = Limits.of(agent)
    limiters = _LIMITERS.setdefault(loop, {})
    found = limiters.get(name)
    if found is None:
        # Blank values count as unset, as for every other setting.
        url = (
            os.environ.get(LIMITER_ENV_VAR, "").strip()
            or os.environ.get("TASKEXEC_RESULTS_URL", "").strip()
        )
        if url:
            if _shared_limiter is None:
                # The shared limiter is part of the workers extra: it registers itself.
                load_plugin("workers", f"a limit shared through Redis ({LIMITER_ENV_VAR})")
            assert _shared_limiter is not None
            found = _shared_limiter(url, name, limits.rpm, limits.tpm, limits.max_in_flight)
            found.closer = close_with_loop(found.aclose)
        else:
            found = LocalLimiter(limits.rpm, limits.tpm, limits.max_in_flight)
            found.name = name
        limiters[name] = found
    found.join(agent.name, limits)
    return found


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    return deadline - time.monotonic() + asyncio.get_running_loop().time()


def waiting_now() -> int:
    """How many tasks of this loop wait for a rate limit now (the progress line's count)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return 0
    return sum(limiter.waiting for limiter in _LIMITERS.get(loop, {}).values())
