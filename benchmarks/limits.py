"""Section 8: provider rate limits, against the mock server's provider-style limits.

The mock server answers a request beyond its limit in any one-second window with a 429 and
``Retry-After: 1``, as real providers quantise per-minute limits. Each scenario runs with the
limiter and, beside it, without.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from taskexec import Agent, AgentTask, ProjectOrchestrator, TaskExecutor
from taskexec._limits import LocalLimiter
from taskexec.distributed._limits import RedisLimiter

from ._server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def _agent(server: ServerProcess, **limits: Any) -> Agent:
    return Agent(
        name="limited",
        provider="openai",
        base_url=server.openai_base_url,
        api_key="sk-bench",
        max_retries=10,
        **limits,
    )


async def _run(agent: Agent, tasks: list[AgentTask]) -> tuple[float, int]:
    async with TaskExecutor([agent]) as executor:
        orchestrator = ProjectOrchestrator(executor, max_concurrency=len(tasks))
        start = time.perf_counter()
        results = await orchestrator.execute_tasks(tasks)
        elapsed = time.perf_counter() - start
    return elapsed, sum(r.ok for r in results)


def _measure(server: ServerProcess, agent: Agent, tasks: list[AgentTask]) -> dict[str, Any]:
    """Run the tasks against a freshly reset server; wall time, successes, requests, 429s."""
    server.reset()
    # The benchmark's own entry point: one fresh top-level loop per measurement.
    elapsed, ok = asyncio.run(_run(agent, tasks))
    stats = server.stats()
    return {
        "wall s": elapsed,
        "succeeded": ok,
        "requests": stats["chat_requests"],
        "429s": stats.get("rate_limited", 0),
    }


def _tasks(n: int, prefix: str, words: int = 1) -> list[AgentTask]:
    body = " ".join(["tok"] * words)
    return [AgentTask(id=f"{prefix}{i}", prompt=f"{body} {i}") for i in range(n)]


def requests_per_second(n: int, limit: int) -> dict[str, Any]:
    """``n`` tasks against a server that allows ``limit`` requests in any second."""
    out: dict[str, Any] = {"tasks": n, "server limit per s": limit, "ideal s": n / limit}
    with ServerProcess(rate_limit=limit) as server:
        for name, limits in (("with rpm", {"rpm": limit * 60}), ("without", {})):
            out[name] = _measure(server, _agent(server, **limits), _tasks(n, name[:2]))
    return out


_PROCESS = """
import asyncio, json, sys
sys.path.insert(0, {root!r})
from benchmarks.limits import _agent_for, _run, _tasks
agent = _agent_for({url!r}, {rpm})
print(json.dumps(asyncio.run(_run(agent, _tasks({n}, {prefix!r})))))
"""


def _agent_for(url: str, rpm: int) -> Agent:
    return Agent(
        name="limited", provider="openai", base_url=url, api_key="sk-bench", max_retries=10, rpm=rpm
    )


def shared_across_processes(n: int, limit: int, results_url: str) -> dict[str, Any]:
    """Two processes with ``n / 2`` tasks each, one agent, the limit shared through Redis."""
    out: dict[str, Any] = {
        "tasks": n,
        "processes": 2,
        "server limit per s": limit,
        "ideal s": n / limit,
    }
    with ServerProcess(rate_limit=limit) as server:
        for name, env_url in (("shared in Redis", results_url), ("per process", "")):
            server.reset()
            env = {**os.environ, "TASKEXEC_LIMITER_URL": env_url, "TASKEXEC_RESULTS_URL": ""}
            start = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _PROCESS.format(
                            root=str(ROOT),
                            url=server.openai_base_url,
                            rpm=limit * 60,
                            n=n // 2,
                            prefix=f"p{k}-",
                        ),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for k in range(2)
            ]
            outputs = [p.communicate(timeout=600)[0] for p in procs]
            elapsed = time.perf_counter() - start
            stats = server.stats()
            import json

            out[name] = {
                "wall s": elapsed,
                "succeeded": sum(json.loads(o)[1] for o in outputs),
                "requests": stats["chat_requests"],
                "429s": stats.get("rate_limited", 0),
            }
    return out


def tokens_per_second(n: int, token_limit: int, words: int) -> dict[str, Any]:
    """Tasks of known size against a server token limit: 429s, and throughput against it."""
    per_task = 2 * (words + 1) + 3  # the mock's count: prompt words plus reply words
    out: dict[str, Any] = {
        "tasks": n,
        "server tokens per s": token_limit,
        "tokens per task": per_task,
        "ideal s": n * per_task / token_limit,
    }
    with ServerProcess(token_limit=token_limit) as server:
        for name, limits in (
            ("with tpm", {"tpm": token_limit * 60, "max_tokens": words + 4}),
            ("without", {"max_tokens": words + 4}),
        ):
            row = _measure(server, _agent(server, **limits), _tasks(n, name[:2], words))
            out[name] = {**row, "tokens/s": row["succeeded"] * per_task / row["wall s"]}
    return out


async def _acquisitions(limiter: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await limiter.acquire(1, time.monotonic() + 60)
        samples.append(time.perf_counter() - start)
    return samples


def acquisition_cost(n: int, results_url: str | None) -> dict[str, Any]:
    """The limiter's own cost per acquisition, with a limit high enough never to wait."""
    out: dict[str, Any] = {"acquisitions": n}
    contenders: dict[str, Any] = {"in-process": LocalLimiter(10**9, 10**12, None)}
    if results_url:
        contenders["Redis"] = RedisLimiter(results_url, f"bench-{os.getpid()}", 10**9, 10**12, None)
    for name, limiter in contenders.items():
        samples = sorted(asyncio.run(_acquisitions(limiter, n)))
        out[name] = {
            "p50 us": statistics.median(samples) * 1e6,
            "p99 us": samples[int(len(samples) * 0.99) - 1] * 1e6,
        }
    return out


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's runs as one: the median of each figure of each row, on its own (so the
    medians of two figures may come from different runs); ``runs`` says how many."""
    merged: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            merged[key] = {
                field: statistics.median(run[key][field] for run in runs) for field in value
            }
        else:
            merged[key] = value
    return {**merged, "runs": len(runs)}


def run_all(quick: bool, results_url: str | None, repeats: int) -> dict[str, Any]:
    """Every rate-limit scenario, ``repeats`` times (medians)."""
    results: dict[str, Any] = {}
    n = 30 if quick else 300  # quick: the smoke test's run, half a minute less
    results["rpm"] = median_runs([requests_per_second(n, 20) for _ in range(repeats)])
    print(f"limits rpm: {results['rpm']}", file=sys.stderr)
    if results_url:
        results["shared"] = median_runs(
            [shared_across_processes(n, 20, results_url) for _ in range(repeats)]
        )
        print(f"limits shared: {results['shared']}", file=sys.stderr)
    # 45-token tasks against 2000 tokens/s: the server's window holds 44 of them, so the limit
    # is not quantised away (at 400 tokens/s it would hold 8, only 90% of the limit).
    results["tpm"] = median_runs(
        [tokens_per_second(30 if quick else 300, 2000, 20) for _ in range(repeats)]
    )
    print(f"limits tpm: {results['tpm']}", file=sys.stderr)
    results["cost"] = acquisition_cost(200 if quick else 2000, results_url)
    print(f"limits cost: {results['cost']}", file=sys.stderr)
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run_all("--quick" in sys.argv, "redis://127.0.0.1:6379/0", 1), indent=2))
