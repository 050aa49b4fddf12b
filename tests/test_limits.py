"""Provider rate limits: the schedule, the shared pause, header tightening, plan errors, and
the limit shared by two real processes through the real Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from taskexec import (
    Agent,
    AgentTask,
    ExecutionStatus,
    PlanError,
    ProjectOrchestrator,
    TaskExecutor,
    load_plan,
)
from taskexec._limits import (
    HEADROOM,
    Limits,
    LimitWaitTooLong,
    LocalLimiter,
    RateHeaders,
    estimate_tokens,
    identity,
    limiter_for,
)
from taskexec.testing import MockServer

from .cluster import RESULTS_URL, CuttableProxy, require_services
from .conftest import FAST_RETRY, ROOT, eventually


def limited_agent(server: MockServer, **fields: int) -> Agent:
    """An OpenAI-compatible agent of the mock server, with limits."""
    return Agent(
        name="a", provider="openai", base_url=server.openai_base_url, api_key="sk-t", **fields
    )


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_requests_are_spaced_evenly_not_sent_as_a_burst() -> None:
    clock = Clock()
    limiter = LocalLimiter(rpm=600, tpm=None, max_in_flight=None, clock=clock)
    waits = [(await limiter.reserve(1, 60))[0] for _ in range(5)]
    spacing = 60 / (600 * HEADROOM)
    assert waits == pytest.approx([0, spacing, 2 * spacing, 3 * spacing, 4 * spacing])
    # However many wait, no one-second window gets more than 600 / 60 of them.
    assert sum(1 for w in waits if w < 1.0) <= 10


async def test_tokens_are_charged_before_and_corrected_after() -> None:
    clock = Clock()
    limiter = LocalLimiter(rpm=None, tpm=6000, max_in_flight=None, clock=clock)
    per_token = 60 / (6000 * HEADROOM)
    assert (await limiter.reserve(100, 60))[0] == 0
    assert (await limiter.reserve(100, 60))[0] == pytest.approx(100 * per_token)
    # The first reply used 40 tokens, not 100: the schedule moves back by 60 tokens' time.
    await limiter.correct(estimated=100, actual=40)
    assert (await limiter.reserve(1, 60))[0] == pytest.approx(140 * per_token)


async def test_a_pause_holds_every_request_and_voids_the_slots_inside_it() -> None:
    clock = Clock()
    limiter = LocalLimiter(rpm=60, tpm=None, max_in_flight=None, clock=clock)
    slots = [(await limiter.reserve(1, 60))[1] for _ in range(8)]  # about 1 s apart
    await limiter.pause(5.0)
    until = await limiter.paused_until()
    # A task that slept on a slot inside the pause takes a new one; later slots stand.
    assert [s < until for s in slots] == [True] * 5 + [False] * 3
    wait, _ = await limiter.reserve(1, 60)
    assert wait >= 5.0
    # A shorter pause does not shorten a longer one.
    await limiter.pause(1.0)
    assert await limiter.paused_until() == until


async def test_a_slot_past_the_deadline_is_not_taken() -> None:
    clock = Clock()
    limiter = LocalLimiter(rpm=60, tpm=None, max_in_flight=None, clock=clock)
    await limiter.reserve(1, 60)
    with pytest.raises(LimitWaitTooLong):
        await limiter.reserve(1, 0.5)
    # Nothing was reserved by the refusal: the next caller gets the same slot.
    assert (await limiter.reserve(1, 60))[0] == pytest.approx(60 / (60 * HEADROOM))


async def test_provider_headers_tighten_the_schedule() -> None:
    clock = Clock()
    limiter = LocalLimiter(rpm=6000, tpm=None, max_in_flight=None, clock=clock)
    # The provider says 2 requests are left until its window resets in 10 s: 5 s apart.
    await limiter.tighten(RateHeaders(requests_left=2, requests_reset_s=10.0))
    assert (await limiter.reserve(1, 60))[0] == pytest.approx(5.0)
    # None left: pause until the reset.
    await limiter.tighten(RateHeaders(tokens_left=0, tokens_reset_s=30.0))
    assert (await limiter.reserve(1, 60))[0] >= 30.0


def test_rate_headers_of_openai_and_anthropic_are_read() -> None:
    openai = RateHeaders.parse(
        {
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert openai == RateHeaders(59, 1.0, 149000, 360.0)
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    anthropic = RateHeaders.parse(
        {
            "Anthropic-RateLimit-Requests-Remaining": "0",
            "anthropic-ratelimit-requests-reset": (now + timedelta(seconds=12)).isoformat(),
        },
        now=now,
    )
    assert anthropic.requests_left == 0
    assert anthropic.requests_reset_s == pytest.approx(12.0)
    assert RateHeaders.parse({"x-ratelimit-reset-requests": "soon"}) == RateHeaders()
    assert RateHeaders.parse({"x-ratelimit-reset-requests": "20ms"}).requests_reset_s == 0.02


def test_the_limit_is_named_by_a_hash_not_the_key() -> None:
    key = "sk-" + "K" * 40
    agent = Agent(name="a", provider="openai", model="m")
    name = identity(agent, "openai", "https://api.openai.com/v1", key)
    assert key not in name
    assert all(key[i : i + 6] not in name for i in range(len(key) - 6))
    assert name != identity(agent, "openai", "https://api.openai.com/v1", key + "x")
    assert name == identity(agent, "openai", "https://api.openai.com/v1", key)


def test_estimates_count_the_prompt_and_the_completion() -> None:
    agent = Agent(name="a", system_prompt="x" * 40, max_tokens=100)
    assert estimate_tokens(agent, "y" * 400) == 110 + 100
    assert estimate_tokens(Agent(name="b"), "") == 1024


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"rpm": 0}, "rpm"),
        ({"tpm": -5}, "tpm"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"tpm": 500, "max_tokens": 1024}, "tpm (500) is smaller than max_tokens (1024)"),
    ],
)
def test_bad_limits_are_plan_errors_that_name_the_field(
    tmp_path: Path, fields: dict[str, int], problem: str
) -> None:
    agent = {"name": "a", **fields}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"agents": [agent], "tasks": [{"id": "t", "prompt": "p"}]}))
    with pytest.raises(PlanError) as caught:
        load_plan(plan)
    assert problem in str(caught.value)
    assert "agents[0]" in str(caught.value)
    with pytest.raises(ValidationError):
        Agent(**agent)  # type: ignore[arg-type]


async def test_a_limited_agent_gets_no_429_from_a_limited_server() -> None:
    """Against a server that allows 10 requests in any second, rpm 480 sends each once.

    Below the server's own 600 by a margin: a request leaves at its slot but reaches the
    server a little later, by however long the loop and the HTTP client take, and on a loaded
    machine requests that arrive late then early bunch up inside the server's window (seen at
    rpm 600 with the limiter's 3% headroom: one 429 in a few runs)."""
    async with MockServer(rate_limit=10) as server:
        agent = limited_agent(server, rpm=480, max_retries=10)
        async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
            tasks = [AgentTask(id=f"t{i}", prompt=f"p{i}") for i in range(15)]
            results = await ProjectOrchestrator(executor).execute_tasks(tasks)
        assert all(r.ok for r in results)
        assert server.stats.rate_limited == 0
        assert server.stats.chat_requests == 15
        waited = [r.metadata["rate_limit_wait_s"] for r in results]
        assert sum(w > 0 for w in waited) >= 13  # all but the first slot or two waited


async def test_a_429_pauses_every_task_of_the_agent() -> None:
    """One 429 with Retry-After: the other tasks wait it out instead of each hitting it."""
    async with MockServer(faults=["429:1"]) as server:
        agent = limited_agent(server, rpm=60_000, max_retries=3)
        async with TaskExecutor([agent]) as executor:
            first = asyncio.create_task(executor.execute(AgentTask(id="first", prompt="p")))
            await eventually(lambda: server.stats.faults_served == 1)
            rest = [AgentTask(id=f"t{i}", prompt=f"p{i}") for i in range(8)]
            results = await asyncio.gather(first, *(executor.execute(t) for t in rest))
        assert all(r.ok for r in results)
        # One 429 in all, and each of the others was sent once: none ran into the limit.
        assert server.stats.statuses[429] == 1
        assert server.stats.chat_requests == 1 + 1 + 8
        assert all(r.metadata["rate_limit_wait_s"] > 0 for r in results[1:])


_PROCESS = """
import asyncio, json, sys
from taskexec import Agent, AgentTask, ProjectOrchestrator, TaskExecutor
agent = Agent(name="a", provider="openai", base_url=sys.argv[1], api_key="sk-shared",
              rpm=int(sys.argv[2]), max_retries=0)
async def main():
    async with TaskExecutor([agent]) as executor:
        tasks = [AgentTask(id=f"{sys.argv[3]}{i}", prompt="p") for i in range(int(sys.argv[4]))]
        results = await ProjectOrchestrator(executor).execute_tasks(tasks)
    print(json.dumps([r.ok for r in results]))
asyncio.run(main())
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-in-redis", "per-process"])
async def test_two_processes_share_one_limit_through_redis(shared: bool) -> None:
    """Two processes, one key and model, a server allowing 8 requests in any second."""
    require_services()
    async with MockServer(rate_limit=8) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TASKEXEC_RESULTS_URL": ""}
        env["TASKEXEC_LIMITER_URL"] = RESULTS_URL if shared else ""
        # The limit is named by the server's endpoint (a fresh port), so no earlier run's
        # schedule is in the way. 6 a second each: shared, below the server's 8 with room for
        # the jitter of two processes' arrivals; each on its own, 12 together, over it.
        rpm = 6 * 60
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _PROCESS,
                server.openai_base_url,
                str(rpm),
                f"p{k}-",
                "12",
                env=env,
                stdout=subprocess.PIPE,
            )
            for k in range(2)
        ]
        outputs = [json.loads((await p.communicate())[0]) for p in processes]
    ok = sum(sum(o) for o in outputs)
    if shared:
        # One schedule for both: every request admitted, none refused.
        assert (ok, server.stats.rate_limited) == (24, 0)
    else:
        # Each process keeps its own 8 per second: together they send 16, half refused.
        assert server.stats.rate_limited > 0
        assert ok < 24


async def test_max_in_flight_bounds_the_requests_out_at_once() -> None:
    async with MockServer() as server:
        agent = limited_agent(server, max_in_flight=3)
        async with TaskExecutor([agent]) as executor:
            tasks = [AgentTask(id=f"t{i}", prompt=f"[[latency=0.05]] p{i}") for i in range(12)]
            results = await ProjectOrchestrator(executor).execute_tasks(tasks)
    assert all(r.ok for r in results)
    assert server.stats.max_in_flight == 3


async def test_a_wait_past_the_deadline_is_a_timeout_that_says_why() -> None:
    async with MockServer() as server:
        agent = limited_agent(server, rpm=1, timeout_s=5)
        async with TaskExecutor([agent]) as executor:
            first, second = await asyncio.gather(
                executor.execute(AgentTask(id="one", prompt="p")),
                executor.execute(AgentTask(id="two", prompt="p")),
            )
    assert first.ok
    assert second.error is not None
    assert second.error.kind == "timeout"
    assert "rate limit" in second.error.message
    assert server.stats.chat_requests == 1


async def test_the_redis_schedule_spaces_pauses_and_tightens() -> None:
    """The same schedule as in-process, kept by Redis's scripts on Redis's clock."""
    require_services()
    from taskexec.distributed._limits import RedisLimiter

    limiter = RedisLimiter(RESULTS_URL, f"test-{os.getpid()}-{id(object())}", 600, 60_000, None)
    try:
        spacing = 60 / (600 * HEADROOM)
        first = await limiter.reserve(1, 60)
        second = await limiter.reserve(1, 60)
        assert second[1] - first[1] == pytest.approx(spacing * 1000, abs=1)  # slots, in ms
        with pytest.raises(LimitWaitTooLong):
            await limiter.reserve(1, -1)
        await limiter.pause(3.0)
        assert await limiter.paused_until() > second[1]
        wait, _ = await limiter.reserve(1, 60)
        assert wait > 2.0
        await limiter.correct(estimated=100, actual=10)
        await limiter.tighten(RateHeaders(requests_left=1, requests_reset_s=20.0))
        assert (await limiter.reserve(1, 60))[0] > 15.0
        await limiter.tighten(RateHeaders(tokens_left=0, tokens_reset_s=40.0))
        assert await limiter.paused_until() - second[1] > 35_000
    finally:
        await limiter.aclose()


async def test_blank_limiter_urls_keep_the_limit_in_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskexec._limits import LocalLimiter, limiter_for

    monkeypatch.setenv("TASKEXEC_LIMITER_URL", " ")
    monkeypatch.setenv("TASKEXEC_RESULTS_URL", "")
    agent = Agent(name="a", provider="openai", rpm=60)
    limiter = limiter_for(agent, "openai", f"http://blank/{os.getpid()}", "k")
    assert isinstance(limiter, LocalLimiter)


def test_a_redis_limiter_is_closed_with_its_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    require_services()
    from taskexec._limits import limiter_for
    from taskexec.distributed._limits import RedisLimiter

    monkeypatch.setenv("TASKEXEC_LIMITER_URL", RESULTS_URL)
    agent = Agent(name="a", provider="openai", rpm=60_000)
    seen: list[RedisLimiter] = []

    async def use() -> None:
        limiter = limiter_for(agent, "openai", f"http://x/{os.getpid()}", "k")
        assert isinstance(limiter, RedisLimiter)
        assert limiter_for(agent, "openai", f"http://x/{os.getpid()}", "k") is limiter
        await limiter.acquire(1, 1e12)
        seen.append(limiter)

    asyncio.run(use())  # a test's own top-level loop, to see the limiter closed at its end
    (limiter,) = seen
    assert limiter.closer is None


_IN_FLIGHT = """
import asyncio, sys
from taskexec import Agent, AgentTask, ProjectOrchestrator, TaskExecutor
agent = Agent(name="a", provider="openai", base_url=sys.argv[1], api_key="sk-places",
              max_in_flight=int(sys.argv[2]))
async def main():
    async with TaskExecutor([agent]) as executor:
        tasks = [AgentTask(id=f"t{i}", prompt="[[latency=0.1]] p") for i in range(8)]
        results = await ProjectOrchestrator(executor).execute_tasks(tasks)
    assert all(r.ok for r in results), results
asyncio.run(main())
"""


async def test_two_processes_share_max_in_flight_through_redis() -> None:
    require_services()
    async with MockServer() as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TASKEXEC_LIMITER_URL": RESULTS_URL}
        places = 3  # the limit is named by the server's fresh port: no earlier leases apply
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _IN_FLIGHT, server.openai_base_url, str(places), env=env
            )
            for _ in range(2)
        ]
        codes = [await p.wait() for p in processes]
    assert codes == [0, 0]
    assert server.stats.chat_requests == 16
    assert server.stats.max_in_flight == places


async def test_a_request_larger_than_tpm_fails_at_once_naming_both_numbers() -> None:
    """It could never fit the agent's minute: it is not sent, not retried, and the next
    request does not wait behind it."""
    async with MockServer() as server:
        agent = limited_agent(server, tpm=500, max_tokens=400)
        async with TaskExecutor([agent]) as executor:
            large = await executor.execute(AgentTask(id="large", prompt="word " * 200))
            small = await executor.execute(AgentTask(id="small", prompt="hi"))
            async with executor.stream(AgentTask(id="streamed", prompt="word " * 200)) as stream:
                pieces = [piece async for piece in stream]
    assert large.error is not None
    assert large.error.kind == "configuration"
    assert "tpm of 500" in large.error.message
    assert "about " in large.error.message
    assert large.attempts == 1
    assert small.ok
    assert pieces == []
    assert stream.result.error is not None
    assert stream.result.error.kind == "configuration"
    assert server.stats.chat_requests == 1  # only the small one was sent


# -- one limit per key and model ------------------------------------------------------------------


async def test_agents_that_disagree_on_rpm_share_one_limit_the_smallest_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two agents of one process, one key and model, rpm 600 and 60: one limiter, at rpm 60."""
    fast = Agent(name="fast", provider="openai", model="m", rpm=600)
    slow = Agent(name="slow", provider="openai", model="m", rpm=60, max_in_flight=4)
    endpoint = f"http://disagree/{uuid.uuid4().hex}"
    with caplog.at_level(logging.WARNING, logger="taskexec"):
        limiter = limiter_for(fast, "openai", endpoint, "k")
        assert limiter is not None
        assert limiter.in_force == Limits(rpm=600)
        for _ in range(3):
            assert limiter_for(slow, "openai", endpoint, "k") is limiter
            assert limiter_for(fast, "openai", endpoint, "k") is limiter
    assert limiter.in_force == Limits(rpm=60, max_in_flight=4)
    assert limiter.request_interval_s == pytest.approx(60 / (60 * HEADROOM))
    # Once per setting that differs, not per call: fast's rpm, and fast's unset max_in_flight.
    warnings = [r.getMessage() for r in caplog.records if r.name == "taskexec"]
    assert len(warnings) == 2, warnings
    assert "agent 'fast' sets rpm 600, but rpm 60 is in force" in warnings[0]
    assert "agent 'fast' sets no max_in_flight, but max_in_flight 4 is in force" in warnings[1]
    # A different key is a different limit.
    assert limiter_for(fast, "openai", endpoint, "other key") is not limiter


async def test_processes_that_disagree_on_rpm_share_one_limit_in_redis(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two processes' limiters of one key and model (rpm 600 and rpm 60) follow one schedule,
    at the smaller rpm once both have used it; the one whose number is not in force warns once."""
    require_services()
    from taskexec.distributed._limits import RedisLimiter

    name = f"test-{uuid.uuid4().hex}"
    fast = RedisLimiter(RESULTS_URL, name, 600, None, None)
    slow = RedisLimiter(RESULTS_URL, name, 60, None, None)
    try:
        with caplog.at_level(logging.WARNING, logger="taskexec"):
            slots = [(await fast.reserve(1, 600))[1]]  # alone: rpm 600 is in force
            slots.append((await slow.reserve(1, 600))[1])
            slots += [(await fast.reserve(1, 600))[1] for _ in range(3)]
    finally:
        await fast.aclose()
        await slow.aclose()
    gaps = [later - earlier for earlier, later in itertools.pairwise(slots)]  # ms, Redis's clock
    fast_gap, slow_gap = 60_000 / (600 * HEADROOM), 60_000 / (60 * HEADROOM)
    assert gaps == pytest.approx([fast_gap, slow_gap, slow_gap, slow_gap], abs=1)
    assert fast.in_force.rpm == slow.in_force.rpm == 60
    warnings = [r.getMessage() for r in caplog.records if r.name == "taskexec"]
    assert len(warnings) == 1, warnings
    assert "this process sets rpm 600, but rpm 60 is in force" in warnings[0]


# -- places in flight are leases -----------------------------------------------------------------

_HOLDER = """
import asyncio, sys
from taskexec import Agent, AgentTask, TaskExecutor
agent = Agent(name="a", provider="openai", base_url=sys.argv[1], api_key=sys.argv[2],
              max_in_flight=2)
async def main():
    async with TaskExecutor([agent]) as executor:
        # Both places, held as long as the server takes: up to the default deadline, 600 s.
        tasks = [AgentTask(id=f"t{i}", prompt="[[latency=600]] p") for i in range(2)]
        await asyncio.gather(*(executor.execute(t) for t in tasks))
asyncio.run(main())
"""


async def test_a_dead_holders_places_come_back_within_a_lease_not_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process holding both places of max_in_flight 2 is SIGKILLed: its leases lapse, and
    this process's tasks (deadline 30 s; the dead one's was 600 s) get the places."""
    require_services()
    import redis.asyncio as aioredis

    from taskexec._modes.llm import _endpoint
    from taskexec.providers import get_provider

    key = f"sk-{uuid.uuid4().hex}"
    async with MockServer() as server:
        agent = Agent(
            name="a", provider="openai", base_url=server.openai_base_url, api_key=key,
            max_in_flight=2, timeout_s=30,
        )  # fmt: skip
        name = identity(agent, "openai", _endpoint(get_provider("openai"), agent), key)
        places = f"taskexec:limit:{name}:in-flight"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TASKEXEC_LIMITER_URL": RESULTS_URL}
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLDER, server.openai_base_url, key, env=env
        )
        client = aioredis.from_url(RESULTS_URL)
        try:
            await eventually(lambda: server.stats.in_flight == 2, timeout_s=30)
            # While the holder lives, it renews its leases (their ends move on).
            first = dict(await client.zrange(places, 0, -1, withscores=True))
            assert len(first) == 2

            async def renewed() -> bool:
                now = dict(await client.zrange(places, 0, -1, withscores=True))
                return now.keys() == first.keys() and all(now[h] > first[h] for h in now)

            await _eventually_async(renewed)
        finally:
            holder.kill()
            await holder.wait()
            await client.aclose()
        await eventually(lambda: server.stats.in_flight == 0)
        monkeypatch.setenv("TASKEXEC_LIMITER_URL", RESULTS_URL)
        async with TaskExecutor([agent]) as executor:
            tasks = [AgentTask(id=f"after{i}", prompt="[[latency=0.05]] p") for i in range(2)]
            results = await asyncio.gather(*(executor.execute(t) for t in tasks))
    assert [r.error for r in results] == [None, None]
    assert server.stats.chat_requests == 4
    assert server.stats.max_in_flight == 2


async def _eventually_async(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 10
) -> None:
    """Wait until the async ``condition()`` holds (the bound only keeps a broken test from
    hanging)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not await condition():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


# -- the limiter's Redis away ----------------------------------------------------------------------


def _redis_address() -> tuple[str, int]:
    parts = urlsplit(RESULTS_URL)
    return parts.hostname or "127.0.0.1", parts.port or 6379


async def test_a_short_limiter_redis_outage_is_waited_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_services()
    async with CuttableProxy(*_redis_address()) as proxy, MockServer() as server:
        monkeypatch.setenv("TASKEXEC_LIMITER_URL", proxy.url(RESULTS_URL))
        agent = Agent(
            name="a", provider="openai", base_url=server.openai_base_url,
            api_key=f"sk-{uuid.uuid4().hex}", rpm=60_000, max_in_flight=4, timeout_s=60,
        )  # fmt: skip
        async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
            proxy.down()
            running = asyncio.create_task(executor.execute(AgentTask(id="t", prompt="p")))
            # The limiter asks Redis again while it is away; the task waits, it does not fail.
            await eventually(lambda: proxy.accepted >= 3)
            assert not running.done()
            assert server.stats.chat_requests == 0
            proxy.up()
            result = await running
    assert result.error is None
    assert result.attempts == 1
    assert server.stats.chat_requests == 1


async def test_a_limiter_redis_outage_past_the_deadline_fails_as_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis away for longer than the tasks' deadline: each task gets one result, kind
    ``connection``, naming the URL with its password redacted; nothing is sent."""
    require_services()
    password = "limiter-" + uuid.uuid4().hex
    async with CuttableProxy(*_redis_address()) as proxy, MockServer() as server:
        url = proxy.url(f"redis://:{password}@127.0.0.1:6379/0")
        monkeypatch.setenv("TASKEXEC_LIMITER_URL", url)
        agent = Agent(
            name="a", provider="openai", base_url=server.openai_base_url,
            api_key=f"sk-{uuid.uuid4().hex}", rpm=60_000, timeout_s=2,
        )  # fmt: skip
        proxy.down()
        async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
            tasks = [AgentTask(id=f"t{i}", prompt="p") for i in range(3)]
            results = await ProjectOrchestrator(executor).execute_tasks(tasks)
    assert [r.task_id for r in results] == ["t0", "t1", "t2"]
    for result in results:
        assert result.status is ExecutionStatus.FAILED
        assert result.error is not None
        assert result.error.kind == "connection", result.error
        assert "rate limit's Redis at redis://:***@127.0.0.1:" in result.error.message
        assert password not in result.error.message
        assert result.attempts == 1
    assert proxy.accepted > len(tasks)  # asked again, not given up at the first refusal
    assert server.stats.chat_requests == 0
