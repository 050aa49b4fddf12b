"""Section 7: beyond one process, on the machine's real RabbitMQ and Redis.

Workers are real ``taskexec worker`` processes and are killed with real SIGKILLs. Each scenario
uses a cluster namespace of its own and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import yaml

from taskexec import Agent, AgentTask, ProjectOrchestrator, TaskExecutor, load_agents
from taskexec.distributed import Cluster
from taskexec.distributed import _engine as engine_module
from taskexec.distributed._dispatch import Dispatcher
from tests.cluster import (
    WorkerProcess,
    cluster_env,
    drop_cluster,
    new_cluster,
    require_services,
    store_of,
)

from ._server import ServerProcess

AGENT = "bench"


def _agents_file(folder: Path, base_url: str | None, name: str = "agents.yaml") -> Path:
    agent: dict[str, Any] = {"name": AGENT, "max_retries": 0}
    if base_url is not None:
        agent |= {"provider": "openai", "base_url": base_url, "api_key": "sk-bench"}
    path = folder / name
    path.write_text(yaml.safe_dump({"agents": [agent]}))
    return path


@contextmanager
def _environment(cluster: Cluster | None) -> Iterator[None]:
    """Point this process's entry points at the cluster (or at none: in-process)."""
    names = ("TASKEXEC_BROKER_URL", "TASKEXEC_RESULTS_URL", "TASKEXEC_NAMESPACE")
    saved = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ.pop(n, None)
    if cluster is not None:
        os.environ.update({n: v for n, v in cluster_env(cluster).items() if n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@contextmanager
def _cluster() -> Iterator[Cluster]:
    cluster = new_cluster()
    try:
        yield cluster
    finally:
        asyncio.run(drop_cluster(cluster, [AGENT]))


def _start(
    folder: Path, agents: Path, cluster: Cluster, names: list[str], concurrency: int
) -> list[WorkerProcess]:
    started = [
        WorkerProcess(agents, cluster, n, concurrency=concurrency, log_dir=folder) for n in names
    ]
    for w in started:
        asyncio.run(w.registered())
    return started


async def _orchestrate(
    agent: Agent, tasks: list[AgentTask], concurrency: int
) -> tuple[float, list[Any]]:
    async with TaskExecutor([agent]) as executor:
        orchestrator = ProjectOrchestrator(executor, max_concurrency=concurrency)
        start = time.perf_counter()
        results = await orchestrator.execute_tasks(tasks)
        return time.perf_counter() - start, results


async def _gathered(agent: Agent, tasks: list[AgentTask]) -> tuple[float, list[Any]]:
    """The same tasks as separate execute() calls, gathered, on one executor (defaults)."""
    async with TaskExecutor([agent]) as executor:
        start = time.perf_counter()
        results = await asyncio.gather(*(executor.execute(t) for t in tasks))
        return time.perf_counter() - start, results


def _check(results: list[Any], tasks: list[AgentTask]) -> None:
    assert [r.task_id for r in results] == [t.id for t in tasks]
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed[:3]


# -- 7.1 throughput: in-process against two workers ---------------------------------------------


def workers_against_in_process(server: ServerProcess, n: int, repeats: int) -> dict[str, Any]:
    """``n`` llm tasks at 200 ms: in-process, and on 2 workers of concurrency 500."""
    tasks = [AgentTask(id=f"t{i}", prompt=f"task {i} [[latency=0.2]]") for i in range(n)]
    agent = Agent(
        name=AGENT,
        provider="openai",
        base_url=server.openai_base_url,
        api_key="sk-bench",
        max_retries=0,
    )
    # The orchestrator's bound is the workers' total capacity in both cases, so that both may
    # have the same number of tasks out at once.
    concurrency = 1000
    samples: dict[str, list[float]] = {"in-process": [], "2 workers": []}
    cpu: dict[str, list[float]] = {}
    cpu_in_process: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, _cluster() as cluster:
        folder = Path(tmp)
        agents = _agents_file(folder, server.openai_base_url)
        workers = _start(folder, agents, cluster, ["a", "b"], 500)
        processes = {
            "RabbitMQ": _pids("beam.smp"),
            "Redis": _pids("redis-server"),
            "workers": [w.pid for w in workers],
            "mock server": [server.process.pid],
            "orchestrator": [os.getpid()],
        }
        try:
            local = {k: processes[k] for k in ("mock server", "orchestrator")}
            for _ in range(repeats):
                before = {k: _cpu_s(v) for k, v in local.items()}
                with _environment(None):
                    elapsed, results = asyncio.run(_orchestrate(agent, tasks, concurrency))
                _check(results, tasks)
                samples["in-process"].append(elapsed)
                for k, v in local.items():
                    cpu_in_process.setdefault(k, []).append(_cpu_s(v) - before[k])
                before = {k: _cpu_s(v) for k, v in processes.items()}
                with _environment(cluster):
                    elapsed, results = asyncio.run(_orchestrate(agent, tasks, concurrency))
                _check(results, tasks)
                samples["2 workers"].append(elapsed)
                for k, v in processes.items():
                    cpu.setdefault(k, []).append(_cpu_s(v) - before[k])
        finally:
            for w in workers:
                w.stop()
    return {
        "tasks": n,
        "concurrency": concurrency,
        "samples": samples,
        "cpu_s": cpu,
        "cpu_in_process_s": cpu_in_process,
    }


def _pids(name: str) -> list[int]:
    """The processes whose command line names ``name`` (Linux /proc; none elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if name in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# -- 7.2 dispatch overhead ----------------------------------------------------------------------


class _TimedDispatcher(Dispatcher):
    """Records, per task, the time from dispatch to the orchestrator holding its result."""

    latencies: ClassVar[list[float]] = []

    async def run(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await super().run(*args, **kwargs)
        finally:
            _TimedDispatcher.latencies.append(time.perf_counter() - start)


def dispatch_overhead(n: int, sequential: int, single_runs: int, repeats: int) -> dict[str, Any]:
    """Offline tasks (no I/O of their own) through the queue, on 2 workers."""
    agent = Agent(name=AGENT, max_retries=0)
    out: dict[str, list[float]] = {
        "sequential p50 ms": [],
        "sequential p99 ms": [],
        "one-task run p50 ms": [],
        "loaded p50 ms": [],
        "loaded p99 ms": [],
        "tasks/s": [],
        "300 gathered execute() s": [],
        "300 in one execute_tasks() s": [],
    }
    with tempfile.TemporaryDirectory() as tmp, _cluster() as cluster:
        folder = Path(tmp)
        workers = _start(folder, _agents_file(folder, None), cluster, ["a", "b"], 100)
        engine_module.Dispatcher = _TimedDispatcher  # type: ignore[misc]
        try:
            with _environment(cluster):
                for r in range(repeats):
                    # One at a time, in one run (bound 1): the cost of the round trip itself.
                    _TimedDispatcher.latencies = []
                    one = [AgentTask(id=f"s{r}-{i}", prompt=f"q {i}") for i in range(sequential)]
                    elapsed, results = asyncio.run(_orchestrate(agent, one, 1))
                    _check(results, one)
                    q = statistics.quantiles(_TimedDispatcher.latencies, n=100)
                    out["sequential p50 ms"].append(
                        statistics.median(_TimedDispatcher.latencies) * 1e3
                    )
                    out["sequential p99 ms"].append(q[98] * 1e3)
                    # A run of a single task: its connections, its queue declaration, the
                    # task, and closing, all in the figure.
                    whole = []
                    for i in range(single_runs):
                        task = AgentTask(id=f"o{r}-{i}", prompt=f"q {i}")
                        elapsed, results = asyncio.run(_orchestrate(agent, [task], 1))
                        _check(results, [task])
                        whole.append(elapsed)
                    out["one-task run p50 ms"].append(statistics.median(whole) * 1e3)
                    # Many at once, at the orchestrator's default bound (64).
                    _TimedDispatcher.latencies = []
                    many = [AgentTask(id=f"m{r}-{i}", prompt=f"q {i}") for i in range(n)]
                    elapsed, results = asyncio.run(_orchestrate(agent, many, 64))
                    _check(results, many)
                    q = statistics.quantiles(_TimedDispatcher.latencies, n=100)
                    out["loaded p50 ms"].append(statistics.median(_TimedDispatcher.latencies) * 1e3)
                    out["loaded p99 ms"].append(q[98] * 1e3)
                    out["tasks/s"].append(n / elapsed)
                    # 300 library calls gathered on one executor (one cluster connection, a
                    # run per call) against the same 300 tasks as one run; defaults for both.
                    calls = [AgentTask(id=f"g{r}-{i}", prompt=f"q {i}") for i in range(300)]
                    elapsed, results = asyncio.run(_gathered(agent, calls))
                    _check(results, calls)
                    out["300 gathered execute() s"].append(elapsed)
                    batch = [AgentTask(id=f"b{r}-{i}", prompt=f"q {i}") for i in range(300)]
                    elapsed, results = asyncio.run(_orchestrate(agent, batch, 64))
                    _check(results, batch)
                    out["300 in one execute_tasks() s"].append(elapsed)
        finally:
            engine_module.Dispatcher = Dispatcher  # type: ignore[misc]
            for w in workers:
                w.stop()
    return {"tasks": n, "sequential": sequential, "samples": out}


# -- 7.3 recovery after SIGKILL -----------------------------------------------------------------


def _counters(cluster: Cluster, run_id: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with store_of(cluster) as store:
            return await store.counters(run_id)

    return asyncio.run(read())


async def _until(predicate: Any) -> None:
    """Wait for another process's counter (read over HTTP) to reach a value."""
    while not predicate():  # noqa: ASYNC110 - the state is in another process
        await asyncio.sleep(0.01)


async def _kill_and_recover(
    cluster: Cluster,
    folder: Path,
    fast: ServerProcess,
    slow: ServerProcess,
    victim: WorkerProcess,
    rescuer_name: str,
    tasks: list[AgentTask],
) -> tuple[float, list[Any]]:
    agent = Agent(name=AGENT, max_retries=0)
    fast_file = _agents_file(folder, fast.openai_base_url, "fast.yaml")
    with _environment(cluster):
        run = asyncio.create_task(_orchestrate(agent, tasks, len(tasks)))
        await _until(lambda: slow.stats()["chat_requests"] >= len(tasks))
        (rescuer,) = await asyncio.to_thread(
            _start, folder, fast_file, cluster, [rescuer_name], len(tasks)
        )
        try:
            killed = time.perf_counter()
            victim.kill()
            await _until(lambda: fast.stats()["chat_requests"] >= len(tasks))
            recovered = time.perf_counter() - killed
            _, results = await run
        finally:
            rescuer.stop()
    return recovered, results


def recovery(
    fast: ServerProcess, slow: ServerProcess, in_flight: int, repeats: int
) -> dict[str, Any]:
    """Kill a worker holding ``in_flight`` tasks; time until another worker runs all of them."""
    out: dict[str, list[float]] = {
        "recovery s": [],
        "lost": [],
        "duplicated in plan": [],
        "duplicate executions": [],
    }
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp, _cluster() as cluster:
            folder = Path(tmp)
            slow_file = _agents_file(folder, slow.openai_base_url, "slow.yaml")
            # No latency directive: the slow server is slow by itself, the fast one answers at once.
            tasks = [AgentTask(id=f"r{i}", prompt=f"task {i}") for i in range(in_flight)]
            (victim,) = _start(folder, slow_file, cluster, [f"victim{r}"], in_flight)
            fast.reset()
            slow.reset()
            try:
                recovered, results = asyncio.run(
                    _kill_and_recover(cluster, folder, fast, slow, victim, f"rescuer{r}", tasks)
                )
            finally:
                victim.stop()
            counted = _counters(cluster, results[0].metadata["run_id"])
            out["recovery s"].append(recovered)
            out["lost"].append(in_flight - len({x.task_id for x in results if x.ok}))
            out["duplicated in plan"].append(len(results) - len({x.task_id for x in results}))
            out["duplicate executions"].append(counted["executions"] - in_flight)
    return {"in_flight": in_flight, "samples": out}


# -- 7.4 chaos ----------------------------------------------------------------------------------


def chaos(server: ServerProcess, n: int, every_s: float) -> dict[str, Any]:
    """``n`` tasks at 200 ms on 3 workers; one worker SIGKILLed every ``every_s`` and restarted."""
    tasks = [AgentTask(id=f"c{i}", prompt=f"task {i} [[latency=0.2]]") for i in range(n)]
    agent = Agent(name=AGENT, max_retries=0)
    with tempfile.TemporaryDirectory() as tmp, _cluster() as cluster:
        folder = Path(tmp)
        agents = _agents_file(folder, server.openai_base_url)
        workers = _start(folder, agents, cluster, ["w0", "w1", "w2"], 100)
        kills = 0

        async def scenario() -> tuple[float, list[Any]]:
            nonlocal kills
            with _environment(cluster):
                run = asyncio.create_task(_orchestrate(agent, tasks, 64))
                while not run.done():
                    done, _ = await asyncio.wait({run}, timeout=every_s)
                    if done:
                        break
                    index = kills % len(workers)
                    workers[index].kill()
                    kills += 1
                    replacement = WorkerProcess(
                        agents, cluster, f"w{index}-{kills}", concurrency=100, log_dir=folder
                    )
                    workers[index] = replacement
                return await asyncio.wait_for(run, 300)

        try:
            elapsed, results = asyncio.run(scenario())
        finally:
            for w in workers:
                w.stop()
        counted = _counters(cluster, results[0].metadata["run_id"])
    ids = [r.task_id for r in results]
    return {
        "tasks": n,
        "kills": kills,
        "wall s": elapsed,
        "results": len(results),
        "distinct": len(set(ids)),
        "success": sum(r.ok for r in results),
        "lost": n - len({r.task_id for r in results if r.ok}),
        "executions": counted["executions"],
        "duplicate results dropped": counted["duplicates"],
    }


# -- 7.5 streams through workers ------------------------------------------------------------------


async def _first_deltas(agents: Path, n: int) -> list[float]:
    """Seconds from opening each of ``n`` streams (one after another) to its first delta."""
    firsts: list[float] = []
    async with TaskExecutor(load_agents(agents)) as executor:
        for i in range(n):
            task = AgentTask(id=f"s{i}", prompt=f"stream {i} a b c d e f g h")
            started = time.perf_counter()
            async with executor.stream(task) as stream:
                async for _ in stream:
                    if len(firsts) == i:
                        firsts.append(time.perf_counter() - started)
            assert stream.result.ok, stream.result.error
    return firsts


def stream_first_delta(server: ServerProcess, n: int, repeats: int) -> dict[str, Any]:
    """Time to first delta of a stream in-process against through one worker (same server)."""
    out: dict[str, list[float]] = {"in-process p50 ms": [], "workers p50 ms": []}
    with tempfile.TemporaryDirectory() as tmp, _cluster() as cluster:
        folder = Path(tmp)
        agents = _agents_file(folder, server.openai_base_url)
        workers = _start(folder, agents, cluster, ["s"], 100)
        try:
            for _ in range(repeats):
                with _environment(None):
                    local = asyncio.run(_first_deltas(agents, n))
                with _environment(cluster):
                    remote = asyncio.run(_first_deltas(agents, n))
                out["in-process p50 ms"].append(statistics.median(local) * 1e3)
                out["workers p50 ms"].append(statistics.median(remote) * 1e3)
        finally:
            for w in workers:
                w.stop()
    return {"streams": n, "samples": out}


def run_all(quick: bool, repeats: int) -> dict[str, Any]:
    """Every distributed scenario; skipped (with the reason) where RabbitMQ or Redis is absent."""
    try:
        require_services()
    except BaseException as exc:  # pytest's Skipped outside pytest
        return {"skipped": str(exc)}
    n = 200 if quick else 2000
    results: dict[str, Any] = {}
    with ServerProcess() as server:
        results["throughput"] = workers_against_in_process(server, n, repeats)
        print(f"distributed throughput: {results['throughput']}", file=sys.stderr)
        results["dispatch"] = dispatch_overhead(
            500 if quick else 5000, 50 if quick else 300, 10 if quick else 50, repeats
        )
        print(f"distributed dispatch: {results['dispatch']}", file=sys.stderr)
        with ServerProcess(latency_s=600.0) as slow:
            results["recovery"] = recovery(server, slow, 100, 1 if quick else repeats)
        print(f"distributed recovery: {results['recovery']}", file=sys.stderr)
        results["chaos"] = chaos(server, n, 2.0)
        print(f"distributed chaos: {results['chaos']}", file=sys.stderr)
        results["streams"] = stream_first_delta(server, 20 if quick else 200, repeats)
        print(f"distributed streams: {results['streams']}", file=sys.stderr)
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run_all("--quick" in sys.argv, 1 if "--quick" in sys.argv else 3), indent=2))
