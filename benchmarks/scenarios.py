"""The measured scenarios. Each returns plain numbers; __main__ repeats them and writes RESULTS.md.

Every contender of a scenario talks to the same mock server process with the same requests, in
the same run, so ratios are comparable even though absolute times drift on shared machines.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from taskexec import (
    Agent,
    AgentTask,
    ProjectOrchestrator,
    TaskExecutor,
    Usage,
    flags,
)
from taskexec.sync import TaskExecutor as SyncTaskExecutor

ROOT = Path(__file__).resolve().parent.parent


def _chat_body(i: int, latency: float) -> bytes:
    return json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": f"task {i} [[latency={latency}]]"}],
        }
    ).encode()


def _tasks(n: int, latency: float) -> list[AgentTask]:
    return [AgentTask(id=f"t{i}", prompt=f"task {i} [[latency={latency}]]") for i in range(n)]


# -- 1. scale -----------------------------------------------------------------------------------


async def scale_taskexec(base_url: str, n: int, latency: float) -> float:
    agent = Agent(name="bench", provider="openai", base_url=base_url, max_retries=0)
    async with TaskExecutor([agent]) as executor:  # the defaults a user would have
        orchestrator = ProjectOrchestrator(executor, max_concurrency=n)
        start = time.perf_counter()
        results = await orchestrator.execute_tasks(_tasks(n, latency))
        elapsed = time.perf_counter() - start
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return elapsed


async def scale_aiohttp(base_url: str, n: int, latency: float) -> float:
    connector = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> str:
            async with session.post(
                f"{base_url}/chat/completions",
                data=_chat_body(i, latency),
                headers={"content-type": "application/json"},
            ) as response:
                data = await response.json()
                return str(data["choices"][0]["message"]["content"])

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start


async def scale_httpx(base_url: str, n: int, latency: float) -> float:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(i: int) -> str:
            response = await client.post(
                f"{base_url}/chat/completions",
                content=_chat_body(i, latency),
                headers={"content-type": "application/json"},
            )
            return str(response.json()["choices"][0]["message"]["content"])

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start


async def scale_openai_sdk(base_url: str, n: int, latency: float) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120)
    try:

        async def one(i: int) -> str | None:
            reply = await client.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": f"task {i} [[latency={latency}]]"}],
            )
            return reply.choices[0].message.content

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start
    finally:
        await client.close()


SCALE_CONTENDERS = {
    "taskexec": scale_taskexec,
    "raw aiohttp": scale_aiohttp,
    "raw httpx": scale_httpx,
    "openai SDK (AsyncOpenAI)": scale_openai_sdk,
}


# -- 2. the seed's parallel case --------------------------------------------------------------


async def _orchestrate(base_url: str, tasks: list[AgentTask]) -> float:
    agent = Agent(name="bench", provider="openai", base_url=base_url, max_retries=0)
    async with TaskExecutor([agent]) as executor:
        start = time.perf_counter()
        results = await ProjectOrchestrator(executor).execute_tasks(tasks)
        elapsed = time.perf_counter() - start
    assert all(r.ok for r in results)
    return elapsed


def seed_case(base_url: str, latency: float) -> dict[str, float]:
    tasks = _tasks(3, latency)
    # The benchmark's own entry point: each engine measured from a fresh top-level loop.
    concurrent = asyncio.run(_orchestrate(base_url, tasks))
    with flags.use_engine("legacy"):
        sequential = asyncio.run(_orchestrate(base_url, tasks))
    return {"async": concurrent, "legacy": sequential}


# -- 3. single-task overhead ------------------------------------------------------------------


def _p50(samples: list[float]) -> float:
    return statistics.median(samples)


async def single_task_overhead(
    base_url: str, agent_url: str, calls: int, script_calls: int
) -> dict[str, float]:
    """p50 seconds per task, sequential, at zero server latency, per mode and for raw aiohttp."""
    agents = [
        Agent(name="llm", provider="openai", base_url=base_url, max_retries=0),
        Agent(name="api", mode="api", url=agent_url, max_retries=0),
        Agent(
            name="script",
            mode="script",
            command=[sys.executable, str(ROOT / "examples" / "agents" / "echo_agent.py")],
        ),
    ]
    out: dict[str, float] = {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        async with TaskExecutor(agents) as executor:
            for name, count in (("llm", calls), ("api", calls), ("script", script_calls)):
                await executor.execute(AgentTask(id="warm", prompt="w"), agent=name)
                samples = []
                for i in range(count):
                    start = time.perf_counter()
                    result = await executor.execute(AgentTask(id=f"t{i}", prompt="x"), agent=name)
                    samples.append(time.perf_counter() - start)
                    assert result.ok, result.error
                out[name] = _p50(samples)
    async with aiohttp.ClientSession() as session:
        samples = []
        for i in range(calls + 1):
            start = time.perf_counter()
            async with session.post(
                f"{base_url}/chat/completions",
                data=_chat_body(i, 0),
                headers={"content-type": "application/json"},
            ) as response:
                await response.json()
            if i:
                samples.append(time.perf_counter() - start)
        out["raw aiohttp"] = _p50(samples)
    return out


# -- 4. framework overhead ----------------------------------------------------------------------


async def framework_overhead(n: int) -> dict[str, float]:
    """Microseconds per offline task through execute_tasks, against a raw gather floor."""
    now = time.time

    async def floor_task(i: int) -> Usage:
        return Usage(input_tokens=i, output_tokens=int(now()) % 2)

    start = time.perf_counter()
    await asyncio.gather(*(floor_task(i) for i in range(n)))
    floor = time.perf_counter() - start

    tasks = [AgentTask(id=f"t{i}", prompt=f"task {i}") for i in range(n)]
    async with TaskExecutor([Agent(name="offline")]) as executor:
        orchestrator = ProjectOrchestrator(executor)  # the defaults a user gets (bound 64)
        gc.collect()
        start = time.perf_counter()
        results = await orchestrator.execute_tasks(tasks)
        elapsed = time.perf_counter() - start
        assert len(results) == n
        assert all(r.ok for r in results)
        del results
        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        traced = await orchestrator.execute_tasks(tasks)
        _, peak = tracemalloc.get_traced_memory()
        assert len(traced) == n
        tracemalloc.stop()
    return {
        "taskexec_us": elapsed / n * 1e6,
        "floor_us": floor / n * 1e6,
        "peak_bytes_per_task": (peak - base) / n,
    }


# -- 5. the sync path ---------------------------------------------------------------------------


def sync_path(base_url: str, server: Any, calls: int) -> dict[str, float]:
    import openai
    from asgiref.sync import async_to_sync

    out: dict[str, float] = {}
    agent = Agent(name="llm", provider="openai", base_url=base_url, max_retries=0)
    with SyncTaskExecutor([agent]) as executor:
        executor.execute(AgentTask(id="warm", prompt="w"))
        server.reset()
        start = time.perf_counter()
        for i in range(calls):
            assert executor.execute(AgentTask(id=f"t{i}", prompt="x")).ok
        out["taskexec.sync llm us/call"] = (time.perf_counter() - start) / calls * 1e6
        out["taskexec.sync connections opened"] = server.stats()["connections_opened"]

    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    client.chat.completions.create(model="bench", messages=[{"role": "user", "content": "w"}])
    start = time.perf_counter()
    for _ in range(calls):
        client.chat.completions.create(model="bench", messages=[{"role": "user", "content": "x"}])
    out["openai SDK sync us/call"] = (time.perf_counter() - start) / calls * 1e6
    client.close()

    # Shim overhead with the offline provider: what the bridge adds to a call.
    offline = [Agent(name="off")]
    task = AgentTask(id="t", prompt="x")
    async_executor = TaskExecutor(offline)

    async def direct() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await async_executor.execute(task)
        return (time.perf_counter() - start) / calls * 1e6

    # The benchmark's own entry point measuring awaits from one top-level loop.
    out["direct await us/call"] = asyncio.run(direct())
    with SyncTaskExecutor(offline) as shim:
        shim.execute(task)
        start = time.perf_counter()
        for _ in range(calls):
            shim.execute(task)
        out["taskexec.sync offline us/call"] = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for _ in range(calls):
        asyncio.run(async_executor.execute(task))  # the seed's pattern: a loop per call
    out["asyncio.run per call us/call"] = (time.perf_counter() - start) / calls * 1e6
    blocking = async_to_sync(async_executor.execute)
    start = time.perf_counter()
    for _ in range(calls):
        blocking(task)
    out["raw async_to_sync us/call"] = (time.perf_counter() - start) / calls * 1e6
    out.update(_handoff_floors(calls))
    return out


def _handoff_floors(calls: int) -> dict[str, float]:
    """What the two bridge designs cost before any taskexec code runs.

    A portal (one loop thread per process, taskexec's choice) pays a thread hand-off per call:
    the caller wakes the loop thread, which runs a task and wakes the caller. A loop kept by the
    calling thread pays a re-entry per call instead.
    """
    import threading

    async def noop() -> int:
        return 1

    loop = asyncio.new_event_loop()  # the portal design's loop, measured bare
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def handoff() -> None:
        latch = threading.Lock()
        latch.acquire()

        async def run() -> None:
            try:
                await noop()
            finally:
                latch.release()

        loop.call_soon_threadsafe(lambda: loop.create_task(run()))
        latch.acquire()

    handoff()
    start = time.perf_counter()
    for _ in range(calls):
        handoff()
    portal = (time.perf_counter() - start) / calls * 1e6
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()

    own = asyncio.new_event_loop()  # the per-thread design's loop, measured bare
    start = time.perf_counter()
    for _ in range(calls):
        own.run_until_complete(noop())
    reentry = (time.perf_counter() - start) / calls * 1e6
    own.close()
    return {
        "bare portal hand-off us/call": portal,
        "bare re-entry of a thread's own loop us/call": reentry,
    }


# -- 6. the command line at scale ---------------------------------------------------------------

#: Runs a command and prints its wall time and peak resident memory (KB), each measured for that
#: one child (a fresh wrapper per command, since RUSAGE_CHILDREN keeps the maximum of all).
_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
elapsed = time.perf_counter() - start
print(code, elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _measure(command: list[str]) -> tuple[float, float]:
    """Return (wall seconds, peak RSS in KB) of one run of ``command``, which must succeed."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "0", f"{command} exited {out[0]}"
    return float(out[1]), float(out[2])


def cli_scale(n: int, folder: Path) -> dict[str, float]:
    """``taskexec run`` on an n-task offline plan, against the library call doing the same."""
    plan = folder / f"plan-{n}.json"
    tasks = [{"id": f"t{i}", "prompt": f"task {i}"} for i in range(n)]
    plan.write_text(json.dumps({"agents": [{"name": "a"}], "tasks": tasks}))
    tiny = folder / "plan-1.json"
    tiny.write_text(json.dumps({"agents": [{"name": "a"}], "tasks": tasks[:1]}))

    library = (
        "import asyncio, sys\n"
        "from taskexec import ProjectOrchestrator, load_plan\n"
        "results = asyncio.run(ProjectOrchestrator().run(load_plan(sys.argv[1])))\n"
        "assert all(r.ok for r in results)\n"
    )
    cli = [sys.executable, "-m", "taskexec", "run"]
    out = folder / "results.jsonl"
    figures: dict[str, float] = {}
    for name, command in {
        "library": [sys.executable, "-c", library, str(plan)],
        "cli table": [*cli, str(plan)],
        "cli table + --output": [*cli, str(plan), "--output", str(out)],
        "cli --json": [*cli, str(plan), "--json"],
        "cli, 1 task": [*cli, str(tiny)],
    }.items():
        out.unlink(missing_ok=True)
        seconds, rss_kb = _measure(command)
        figures[f"{name} s"] = seconds
        figures[f"{name} peak KB"] = rss_kb
    base = figures["cli, 1 task peak KB"]
    figures["cli KB per task"] = (figures["cli table + --output peak KB"] - base) / n
    return figures
