"""Run the benchmark suite: ``python -m benchmarks`` (``--quick`` for a smoke run).

Writes RESULTS.md, results.json and scale.png into ``--out`` (default: this folder for a full
run, a temporary folder for ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import distributed, limits, migrate, scenarios, streaming, tracing
from ._server import ServerProcess

HERE = Path(__file__).resolve().parent
RESULTS_URL = os.environ.get("TASKEXEC_TEST_RESULTS_URL", "redis://127.0.0.1:6379/0")


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
    }


def run_scale(
    server: ServerProcess, sizes: list[int], repeats: int, latency: float
) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for n in sizes:
        samples: dict[str, list[float]] = {name: [] for name in scenarios.SCALE_CONTENDERS}
        for _ in range(repeats):
            # Interleave the contenders inside each repeat, so drift hits them all alike.
            for name, contender in scenarios.SCALE_CONTENDERS.items():
                # The benchmark's own entry point: one fresh top-level loop per measurement.
                samples[name].append(asyncio.run(contender(server.openai_base_url, n, latency)))
        table[str(n)] = {name: summary(s) for name, s in samples.items()}
        print(
            f"scale N={n}: "
            + ", ".join(f"{k} {v['median']:.3f}s" for k, v in table[str(n)].items()),
            file=sys.stderr,
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small N, one repeat")
    parser.add_argument(
        "--out", type=Path, help="where to write RESULTS.md, results.json, scale.png"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quick = args.quick
    repeats = 1 if quick else args.repeats
    out = args.out or (Path(tempfile.mkdtemp(prefix="taskexec-bench-")) if quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "command": "python -m benchmarks" + (" --quick" if quick else ""),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "repeats": repeats,
    }
    with ServerProcess() as server:
        sizes = [10, 100] if quick else [10, 100, 1000]
        results["scale"] = run_scale(server, sizes, repeats, latency=0.2)

        seed_latency = 0.2 if quick else 2.0
        seeds = [
            scenarios.seed_case(server.openai_base_url, seed_latency)
            for _ in range(1 if quick else 3)
        ]
        results["seed"] = {
            "latency_s": seed_latency,
            "async": summary([s["async"] for s in seeds]),
            "legacy": summary([s["legacy"] for s in seeds]),
        }
        print(f"seed: {results['seed']}", file=sys.stderr)

        calls, script_calls = (50, 5) if quick else (500, 30)
        single = [
            asyncio.run(
                scenarios.single_task_overhead(
                    server.openai_base_url, f"{server.url}/agent", calls, script_calls
                )
            )
            for _ in range(repeats)
        ]
        results["single"] = {k: summary([s[k] for s in single]) for k in single[0]}
        print(f"single: {results['single']}", file=sys.stderr)

        n_offline = 1000 if quick else 10_000
        frameworks = [asyncio.run(scenarios.framework_overhead(n_offline)) for _ in range(repeats)]
        results["framework"] = {
            "tasks": n_offline,
            **{k: summary([f[k] for f in frameworks]) for k in frameworks[0]},
        }
        print(f"framework: {results['framework']}", file=sys.stderr)

        sync_calls = 50 if quick else 300
        syncs = [
            scenarios.sync_path(server.openai_base_url, server, sync_calls) for _ in range(repeats)
        ]
        results["sync"] = {
            "calls": sync_calls,
            **{k: summary([s[k] for s in syncs]) for k in syncs[0]},
        }
        print(f"sync: {results['sync']}", file=sys.stderr)
    n_cli = 2000 if quick else 20_000
    with tempfile.TemporaryDirectory(prefix="taskexec-cli-") as folder:
        clis = [scenarios.cli_scale(n_cli, Path(folder)) for _ in range(1 if quick else 3)]
    results["cli"] = {"tasks": n_cli, **{k: summary([c[k] for c in clis]) for k in clis[0]}}
    print(f"cli: {results['cli']}", file=sys.stderr)
    results["distributed"] = distributed.run_all(quick, repeats)
    services = "skipped" not in results["distributed"]
    # Each rate-limit run takes seconds by design (it waits on the limit): three are enough.
    results["limits"] = limits.run_all(quick, RESULTS_URL if services else None, min(repeats, 3))
    results["streaming"] = streaming.run_all(quick, repeats)
    results["tracing"] = tracing.run_all(quick, min(repeats, 3))
    results["migrate"] = migrate.run_all(quick, repeats)
    print(f"migrate: {results['migrate']['median files/s']:.0f} files/s", file=sys.stderr)
    results["elapsed_s"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / "scale.png")
    (out / "RESULTS.md").write_text(render(results))
    print(f"wrote {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results["scale"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in next(iter(results["scale"].values())):
        ax.plot(
            sizes, [results["scale"][str(n)][name]["median"] for n in sizes], marker="o", label=name
        )
    ax.axhline(0.2, color="grey", linestyle=":", label="server latency (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks sent at once (N)")
    ax.set_ylabel("wall time, s (median)")
    ax.set_title("N chat requests at 200 ms server latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHIM_GAP = """
**Shim overhead (target <= 100 us over a direct await): {shim:.0f} us in this run.** A call that
finds another thread running the shared loop pays a thread hand-off: it wakes the loop's thread,
which runs the task and wakes the caller. That
hand-off alone, with no taskexec code ("bare portal hand-off" above), took {handoff:.0f} us in this
run; the remaining {rest:.0f} us are the shim's own work (contextvars copied in and back, the engine
flag, the running-loop check) and the executor's call itself running slower on the portal thread
than in the caller's: measured by hand, the same `execute()` through the bridge costs about 60 us
more than a no-op coroutine does, against about 18 us for the call awaited directly. That is
consistent with the call running on the other core with cold caches, but no profile has
confirmed it yet; it is the next thing to look at. The alternative design, a loop kept
by each calling thread ("bare re-entry", {reentry:.0f} us), would be cheaper per call, but gives a
connection pool per thread whose idle connections are only serviced while that thread is inside
a call, and a `close()` that has to reach loops other threads may be running. We chose the
portal for correctness (one pool shared by every thread; `close()` and interpreter exit reach
it; asgiref's application-loop semantics) and state the price here. Against the official OpenAI
sync client on the same server the shim is inside its target (section 5).
"""

FRAMEWORK_GAP = """
**Framework overhead (target within 3x of the raw gather floor, <= 40 us per task): {us:.1f} us
per task, {ratio:.2f}x the floor, in this run.** Profiled with cProfile on 10,000 offline tasks,
and the parts timed with `timeit`: building and validating the `ExecutionResult` is about 4 us
per task (pydantic; `model_construct` measured slower, not faster), resolving agent and mode and
rendering the prompt about 2 us, the offline provider's own hashing about 3 us, and the
orchestrator's task and bookkeeping most of the rest. The floor (a coroutine returning a pydantic
model, gathered) does none of that. The deadline timer, once about 4 us per task, is now only
armed for a mode that actually suspends. The floor itself moves a lot between runs on these
machines (7-15 us per task), so the ratio does too; memory per task in flight is well inside its
target.
"""


def _fmt(s: dict[str, float], scale: float = 1.0, unit: str = "s", digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} {unit} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{r['command']}` (from the repository root). Machine: {m['cores']} cores, "
        f"Python {m['python']}, {m['platform']}. Each figure is the median of {r['repeats']} "
        "run(s), with (min-max); every baseline was measured in the same run against the same mock "
        "server process (`taskexec mock-server`), so compare ratios, not absolute times.",
        "",
        *render_targets(targets(r)),
        "## 1. Scale: N chat requests at once, 200 ms server latency",
        "",
        "| N | " + " | ".join(next(iter(r["scale"].values()))) + " | taskexec / raw aiohttp |",
        "|---|" + "---|" * (len(next(iter(r["scale"].values()))) + 1),
    ]
    for n, row in r["scale"].items():
        ratio = row["taskexec"]["median"] / row["raw aiohttp"]["median"]
        lines.append(f"| {n} | " + " | ".join(_fmt(v) for v in row.values()) + f" | {ratio:.2f}x |")
    lines += ["", "![wall time against N](scale.png)", ""]
    biggest = max(r["scale"], key=int)
    row = r["scale"][biggest]
    lines += [
        "### Transport decision",
        "",
        "taskexec's async HTTP goes through one module, `src/taskexec/_http.py`, which keeps one "
        "client per event loop. The default transport is an aiohttp `ClientSession` with a "
        "connector limit sized to the orchestrator's concurrency; `httpx` stays the declared "
        "dependency for the legacy engine's blocking client and for callers who pass their own "
        "`httpx.AsyncClient` (`httpx.MockTransport` in unit tests). Measured in this run at "
        f"N = {biggest}: raw httpx took {row['raw httpx']['median'] / row['raw aiohttp']['median']:.1f}x "
        f"the time of raw aiohttp, the OpenAI SDK {row['openai SDK (AsyncOpenAI)']['median'] / row['raw aiohttp']['median']:.1f}x, "
        f"and taskexec over aiohttp {row['taskexec']['median'] / row['raw aiohttp']['median']:.2f}x "
        "(with prompt rendering, retries, deadlines, results and the orchestrator included). "
        "The profile of httpx at this N is dominated by its connection pool "
        "(`AsyncConnectionPool._assign_requests_to_connections`, quadratic in connections).",
        "",
    ]
    seed = r["seed"]
    ratio = seed["legacy"]["median"] / seed["async"]["median"]
    lines += [
        f"## 2. The seed's case: three tasks at {seed['latency_s']:g} s latency",
        "",
        "| engine | wall time |",
        "|---|---|",
        f"| async (ProjectOrchestrator) | {_fmt(seed['async'])} |",
        f"| legacy (TASKEXEC_ENGINE=legacy) | {_fmt(seed['legacy'])} |",
        "",
        f"Speed-up: **{ratio:.2f}x**.",
        "",
        "## 3. Single-task overhead (sequential, zero server latency)",
        "",
        "| path | p50 per task |",
        "|---|---|",
    ]
    single = r["single"]
    for name, s in single.items():
        lines.append(f"| {name} | {_fmt(s, 1e3, 'ms')} |")
    overhead = (single["llm"]["median"] - single["raw aiohttp"]["median"]) * 1e3
    lines += [
        "",
        f"llm-mode overhead over a raw aiohttp request: **{overhead:.3f} ms** p50 (target <= 1 ms).",
        "",
        f"## 4. Framework overhead: {r['framework']['tasks']} offline tasks through execute_tasks",
        "",
        "| measure | value |",
        "|---|---|",
        f"| taskexec, us per task | {_fmt(r['framework']['taskexec_us'], unit='us', digits=1)} |",
        f"| raw asyncio.gather floor, us per task | {_fmt(r['framework']['floor_us'], unit='us', digits=1)} |",
        f"| ratio | {r['framework']['taskexec_us']['median'] / r['framework']['floor_us']['median']:.2f}x |",
        f"| peak memory growth per task in flight | {r['framework']['peak_bytes_per_task']['median'] / 1024:.2f} KB |",
        "",
        f"## 5. The sync path: {r['sync']['calls']} sequential calls",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for name, s in r["sync"].items():
        if name == "calls":
            continue
        unit = "" if "connections" in name else "us"
        lines.append(f"| {name} | {_fmt(s, unit=unit, digits=0 if not unit else 1)} |")
    sync = r["sync"]
    half = sync["taskexec.sync llm us/call"]["median"] / sync["openai SDK sync us/call"]["median"]
    shim = sync["taskexec.sync offline us/call"]["median"] - sync["direct await us/call"]["median"]
    lines += [
        "",
        f"taskexec.sync against the official OpenAI sync client: **{half:.2f}x** its time per call "
        f"(target <= 0.5x). Shim overhead over a direct await: **{shim:.1f} us** (target <= 100 us).",
        "",
    ]
    handoff = sync["bare portal hand-off us/call"]["median"]
    reentry = sync["bare re-entry of a thread's own loop us/call"]["median"]
    lines += [
        "### Bridge design",
        "",
        "The sync shims run calls on one event loop per process, driven by the calling threads "
        "themselves (see `src/taskexec/_bridge.py`). The two simpler designs, measured bare in "
        f"this run: a loop in a thread of its own costs a thread hand-off per call ({handoff:.0f} us "
        "here, before any work, and the call then runs on another core), and a loop kept by each "
        f"calling thread costs a re-entry ({reentry:.0f} us) but a pool per thread and a `close()` "
        "that must reach every thread's loop. The shared, caller-driven loop pays a re-entry when "
        "one thread calls and a hand-off only when another thread is already running the loop, "
        "with one pool for all.",
        "",
    ]
    cli = r["cli"]
    library = cli["library s"]["median"]
    lines += [
        f"## 6. The command line at scale: {cli['tasks']} offline tasks",
        "",
        "Each row is one process, interpreter start-up included; the library row runs "
        "`asyncio.run(ProjectOrchestrator().run(load_plan(path)))` on the same plan.",
        "",
        "| command | wall time | / library | peak memory |",
        "|---|---|---|---|",
    ]
    for name in ("library", "cli table", "cli table + --output", "cli --json", "cli, 1 task"):
        seconds = cli[f"{name} s"]
        lines.append(
            f"| {name} | {_fmt(seconds)} | {seconds['median'] / library:.2f}x | "
            f"{cli[f'{name} peak KB']['median'] / 1024:.0f} MB |"
        )
    lines += [
        "",
        f"Memory per task of the run (peak of the table + `--output` run less the 1-task run): "
        f"**{cli['cli KB per task']['median']:.1f} KB** (target < 5 KB). Above "
        "50 tasks the summary lists the slowest and the failed tasks (`--full-table` for all); "
        "`--output` flushes each line and fsyncs only with `--fsync`.",
        "",
    ]
    lines += render_distributed(r["distributed"])
    lines += render_limits(r["limits"])
    lines += streaming.render(r["streaming"])
    lines += tracing.render(r["tracing"])
    if "migrate" in r:
        lines += migrate.render(r["migrate"])
    lines += render_peers()
    fw = r["framework"]
    fw_ratio = fw["taskexec_us"]["median"] / fw["floor_us"]["median"]
    gaps = []
    if shim > 100:
        gaps.append(
            SHIM_GAP.format(
                shim=shim,
                handoff=sync["bare portal hand-off us/call"]["median"],
                rest=shim - sync["bare portal hand-off us/call"]["median"],
                reentry=sync["bare re-entry of a thread's own loop us/call"]["median"],
            )
        )
    if fw_ratio > 3 or fw["taskexec_us"]["median"] > 40:
        gaps.append(FRAMEWORK_GAP.format(us=fw["taskexec_us"]["median"], ratio=fw_ratio))
    gap = distributed_gap(r["distributed"], r["machine"]["cores"])
    if gap:
        gaps.append(gap)
    # Misses that no paragraph above explains are named all the same.
    explained = {"4"} if fw_ratio > 3 or fw["taskexec_us"]["median"] > 40 else set()
    explained |= {"5"} if shim > 100 else set()
    explained |= {"7.1"} if gap else set()
    explained |= {"9", "10"}  # sections 9 and 10 say why, under their tables, when they miss
    for section, target, value, met in targets(r):
        if not met and section not in explained:
            gaps.append(
                f"\n**Section {section}, {target}: {value} in this run.** No cause has been "
                "worked out for this figure yet; it is listed so that it is not missed.\n"
            )
    if gaps:
        lines += ["## Where a target is not met in this run, and why", *"".join(gaps).splitlines()]
    return "\n".join(lines) + "\n"


DISTRIBUTED_GAP = """
**Two workers against in-process (target <= 1.5x): {ratio:.2f}x in this run.** Both runs send
the same {n} tasks with the same bound on tasks out at once ({bound}, the two workers' total
concurrency). In-process, the run mostly waits on the server's 200 ms. Distributed, every
process of the run shares this machine's {cores} cores, and the run is CPU-bound: per-process CPU
time, measured in this run, was {cpu} ({total:.1f} s in all for {n} tasks, so at least
{floor:.2f} s of wall time on {cores} cores), against {local} in-process ({local_total:.1f} s:
the distributed path costs {extra_ms:.2f} ms of CPU more per task, spread over five
processes). Profiles (pyinstrument, cProfile, py-spy) found and removed, over three rounds: a
keyspace SCAN per registry read, a queue declaration per first publish, redis-py's pool raising
past 100 connections, a "started" event per task, redis-py's Python reply parser (hiredis is a
dependency), the `finished` event per task on the RabbitMQ topic exchange (results are announced
on Redis now; the exchange's events are opt-in), one Redis script call per task and step (the
calls made together are one), one acknowledgement frame per task (the deliveries that finish
together are one frame), and aiormq's pass over every unconfirmed publish per confirmation
(publishes are windowed). Section 12 has the profile of what is left: asyncio's own
scheduling, aio-pika's frame handling and socket writes, a result's JSON both ways, spread
with no single hot spot. Where the workers run on machines of their own, their CPU and the
broker's are not taken from the orchestrator's; a 2-core machine cannot show that.
"""


def render_distributed(d: dict[str, Any]) -> list[str]:
    lines = ["## 7. Beyond one process: workers on RabbitMQ and Redis", ""]
    if "skipped" in d:
        return [*lines, f"Not run: {d['skipped']}", ""]
    t = d["throughput"]
    inproc = summary(t["samples"]["in-process"])
    workers = summary(t["samples"]["2 workers"])
    ratio = workers["median"] / inproc["median"]
    lines += [
        f"### 7.1 {t['tasks']} llm tasks at 200 ms: in-process against 2 workers (concurrency 500 each)",
        "",
        "| run | wall time |",
        "|---|---|",
        f"| in-process (ProjectOrchestrator, max_concurrency {t['concurrency']}) | {_fmt(inproc)} |",
        f"| 2 `taskexec worker` processes, same orchestrator bound | {_fmt(workers)} |",
        "",
        f"Ratio: **{ratio:.2f}x** in-process (target <= 1.5x).",
        "",
    ]
    x = {k: summary(v) for k, v in d["dispatch"]["samples"].items()}
    lines += [
        "### 7.2 Dispatch overhead: offline tasks through the queue, 2 workers",
        "",
        "From the orchestrator sending a task to it holding the task's result (publish with "
        "confirm, delivery, the worker's two Redis round trips, the result event). The first "
        "task of a run also waits for its agent's queue to be declared; the one-task row is what "
        "a whole run of a single task costs.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| one task at a time ({d['dispatch']['sequential']} tasks in one run, bound 1): p50 | {_fmt(x['sequential p50 ms'], unit='ms', digits=2)} |",
        f"| one task at a time: p99 | {_fmt(x['sequential p99 ms'], unit='ms', digits=2)} |",
        f"| a run of one task, end to end (connections, queue declaration, the task, closing): p50 | {_fmt(x['one-task run p50 ms'], unit='ms', digits=1)} |",
        f"| {d['dispatch']['tasks']} tasks, default bound (64 out at once): tasks/s | {_fmt(x['tasks/s'], unit='', digits=0)} |",
        f"| same: p50 per task (queueing included) | {_fmt(x['loaded p50 ms'], unit='ms', digits=1)} |",
        f"| same: p99 per task | {_fmt(x['loaded p99 ms'], unit='ms', digits=1)} |",
        f"| 300 execute() calls gathered on one executor (one connection) | {_fmt(x['300 gathered execute() s'])} |",
        f"| the same 300 tasks in one execute_tasks() (default bound 64) | {_fmt(x['300 in one execute_tasks() s'])} |",
        "",
        f"Targets: p50 <= 5 ms (**{x['sequential p50 ms']['median']:.2f} ms**), >= 500 tasks/s "
        f"(**{x['tasks/s']['median']:.0f}**).",
        "",
    ]
    rec = {k: summary(v) for k, v in d["recovery"]["samples"].items()}
    lines += [
        f"### 7.3 Recovery: SIGKILL a worker holding {d['recovery']['in_flight']} tasks in flight",
        "",
        "A second worker is running when the first is killed; recovery is the time from the kill "
        "until the second worker has sent all of them to its server.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| time until all run elsewhere | {_fmt(rec['recovery s'])} (target p50 <= 2 s) |",
        f"| results lost | {rec['lost']['max']:.0f} |",
        f"| results duplicated in the plan | {rec['duplicated in plan']['max']:.0f} |",
        f"| duplicate executions (the killed worker's, counted by Redis) | {_fmt(rec['duplicate executions'], unit='', digits=0)} |",
        "",
    ]
    c = d["chaos"]
    lines += [
        f"### 7.4 Chaos: {c['tasks']} tasks, 3 workers, one SIGKILLed every 2 s and replaced",
        "",
        "| measure | value |",
        "|---|---|",
        f"| workers killed | {c['kills']} |",
        f"| wall time | {c['wall s']:.2f} s |",
        f"| results / distinct tasks / success | {c['results']} / {c['distinct']} / {c['success']} |",
        f"| lost | {c['lost']} |",
        f"| executions (tasks run more than once after a kill: {c['executions'] - c['tasks']}) | {c['executions']} |",
        f"| duplicate results dropped (first result won) | {c['duplicate results dropped']} |",
        "",
    ]
    if "streams" in d:
        x = {k: summary(v) for k, v in d["streams"]["samples"].items()}
        over = x["workers p50 ms"]["median"] - x["in-process p50 ms"]["median"]
        lines += [
            f"### 7.5 Streams through a worker: time to first delta ({d['streams']['streams']} "
            "streams one after another, OpenAI-compatible mock server)",
            "",
            "| run | p50 time to first delta |",
            "|---|---|",
            f"| in-process | {_fmt(x['in-process p50 ms'], unit='ms', digits=2)} |",
            f"| through one worker | {_fmt(x['workers p50 ms'], unit='ms', digits=2)} |",
            "",
            f"Through a worker costs **{over:.2f} ms** more to the first delta (target <= 5 ms): "
            "the task message, the worker's claim in Redis, and the piece back on the events "
            "exchange.",
            "",
        ]
    return lines


def _limit_rows(name: str, row: dict[str, Any], ideal: float) -> str:
    share = row["429s"] / max(row["requests"], 1)
    return (
        f"| {name} | {row['wall s']:.2f} s ({row['wall s'] / ideal:.2f}x ideal) | "
        f"{row['requests']:g} | {row['429s']:g} ({share:.1%}) | {row['succeeded']:g} |"
    )


def render_limits(d: dict[str, Any]) -> list[str]:
    header = ["| run | wall time | requests | 429s | succeeded |", "|---|---|---|---|---|"]
    rpm = d["rpm"]
    lines = [
        "## 8. Provider rate limits",
        "",
        "The mock server answers a request beyond its limit in any one-second window with a 429 "
        "and `Retry-After: 1`; every task may retry 10 times. Each figure is the median of "
        f"{rpm.get('runs', 1)} run(s), on its own.",
        "",
        f"### 8.1 {rpm['tasks']} tasks, server limit {rpm['server limit per s']} requests/s, "
        f"agent `rpm: {rpm['server limit per s'] * 60}`",
        "",
        *header,
        _limit_rows("with the limiter", rpm["with rpm"], rpm["ideal s"]),
        _limit_rows("without (no rpm)", rpm["without"], rpm["ideal s"]),
        "",
        f"Targets: 429s <= 1% of requests, wall time <= 1.1x the ideal ({rpm['ideal s']:.1f} s).",
        "",
    ]
    if "shared" in d:
        sh = d["shared"]
        lines += [
            f"### 8.2 Two processes, {sh['tasks'] // 2} tasks each, one agent, the same limit",
            "",
            "Each process is started afresh (interpreter start-up is in the wall time).",
            "",
            *header,
            _limit_rows("shared through Redis", sh["shared in Redis"], sh["ideal s"]),
            _limit_rows("each process on its own", sh["per process"], sh["ideal s"]),
            "",
        ]
    tpm = d["tpm"]
    with_tpm, without = tpm["with tpm"], tpm["without"]
    limit = tpm["server tokens per s"]
    lines += [
        f"### 8.3 Tokens: {tpm['tasks']} tasks of {tpm['tokens per task']} tokens, server limit "
        f"{limit} tokens/s, agent `tpm: {limit * 60}`",
        "",
        "| run | wall time | requests | 429s | throughput |",
        "|---|---|---|---|---|",
        f"| with the limiter | {with_tpm['wall s']:.2f} s | {with_tpm['requests']:g} | "
        f"{with_tpm['429s']:g} ({with_tpm['429s'] / max(with_tpm['requests'], 1):.1%}) | "
        f"{with_tpm['tokens/s']:.0f} tokens/s ({with_tpm['tokens/s'] / limit:.0%} of the limit) |",
        f"| without (no tpm) | {without['wall s']:.2f} s | {without['requests']:g} | "
        f"{without['429s']:g} ({without['429s'] / max(without['requests'], 1):.1%}) | "
        f"{without['tokens/s']:.0f} tokens/s ({without['tokens/s'] / limit:.0%}) |",
        "",
        "Targets: 429s <= 1%, throughput >= 90% of the limit.",
        "",
        f"### 8.4 The limiter's own cost per acquisition ({d['cost']['acquisitions']} "
        "acquisitions that never wait)",
        "",
        "| limiter | p50 | p99 |",
        "|---|---|---|",
    ]
    for name in ("in-process", "Redis"):
        if name in d["cost"]:
            c = d["cost"][name]
            lines.append(f"| {name} | {c['p50 us']:.1f} us | {c['p99 us']:.1f} us |")
    return [*lines, ""]


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Every target the suite measures: (section, target, this run's figure, met)."""
    found: list[tuple[str, str, str, bool]] = []

    def add(section: str, target: str, value: float, shown: str, met: bool) -> None:
        found.append((section, target, shown.format(value), met))

    seed = r["seed"]
    add(
        "2",
        f"3 tasks at {seed['latency_s']:g} s take <= 1.1x one",
        seed["async"]["median"] / seed["latency_s"],
        "{:.2f}x",
        seed["async"]["median"] <= 1.1 * seed["latency_s"],
    )
    single = r["single"]
    overhead = (single["llm"]["median"] - single["raw aiohttp"]["median"]) * 1e3
    add("3", "llm mode over raw aiohttp <= 1 ms", overhead, "{:.3f} ms", overhead <= 1)
    fw = r["framework"]
    fw_us, fw_ratio = (
        fw["taskexec_us"]["median"],
        fw["taskexec_us"]["median"] / fw["floor_us"]["median"],
    )
    add("4", "framework <= 40 us per task", fw_us, "{:.1f} us", fw_us <= 40)
    add("4", "framework <= 3x the gather floor", fw_ratio, "{:.2f}x", fw_ratio <= 3)
    sync = r["sync"]
    half = sync["taskexec.sync llm us/call"]["median"] / sync["openai SDK sync us/call"]["median"]
    shim = sync["taskexec.sync offline us/call"]["median"] - sync["direct await us/call"]["median"]
    add("5", "sync llm call <= 0.5x the OpenAI sync client", half, "{:.2f}x", half <= 0.5)
    add("5", "shim over a direct await <= 100 us", shim, "{:.1f} us", shim <= 100)
    kb = r["cli"]["cli KB per task"]["median"]
    add("6", "command line memory < 5 KB per task", kb, "{:.1f} KB", kb < 5)
    d = r["distributed"]
    if "skipped" not in d:
        t = d["throughput"]["samples"]
        ratio = statistics.median(t["2 workers"]) / statistics.median(t["in-process"])
        add("7.1", "2 workers <= 1.5x in-process", ratio, "{:.2f}x", ratio <= 1.5)
        x = d["dispatch"]["samples"]
        p50, rate = statistics.median(x["sequential p50 ms"]), statistics.median(x["tasks/s"])
        add("7.2", "dispatch p50 <= 5 ms", p50, "{:.2f} ms", p50 <= 5)
        gathered = statistics.median(x["300 gathered execute() s"]) / statistics.median(
            x["300 in one execute_tasks() s"]
        )
        add(
            "7.2",
            "300 gathered execute() <= 1x one execute_tasks()",
            gathered,
            "{:.2f}x",
            gathered <= 1,
        )
        add("7.2", ">= 500 tasks/s on 2 workers", rate, "{:.0f}", rate >= 500)
        rec = d["recovery"]["samples"]
        seconds = statistics.median(rec["recovery s"])
        add(
            "7.3",
            "a killed worker's tasks run elsewhere, p50 <= 2 s",
            seconds,
            "{:.3f} s",
            seconds <= 2,
        )
        lost = max(rec["lost"]) + max(rec["duplicated in plan"])
        add("7.3", "0 results lost or duplicated", lost, "{:.0f}", lost == 0)
        c = d["chaos"]
        exact = c["results"] == c["distinct"] == c["tasks"] == c["success"] and c["lost"] == 0
        add("7.4", "chaos: 0 lost, one result per task", c["lost"], "{:.0f} lost", exact)
        if "streams" in d:
            st = d["streams"]["samples"]
            over = statistics.median(st["workers p50 ms"]) - statistics.median(
                st["in-process p50 ms"]
            )
            add(
                "7.5",
                "stream through workers: first delta <= 5 ms over in-process",
                over,
                "{:.2f} ms",
                over <= 5,
            )
    lim = r["limits"]
    for key, section, row in (("rpm", "8.1", "with rpm"), ("shared", "8.2", "shared in Redis")):
        if key not in lim:
            continue
        got = lim[key][row]
        share = got["429s"] / max(got["requests"], 1)
        speed = got["wall s"] / lim[key]["ideal s"]
        add(section, "429s <= 1% of requests", share, "{:.1%}", share <= 0.01)
        add(section, "wall time <= 1.1x the ideal", speed, "{:.2f}x", speed <= 1.1)
    tpm = lim["tpm"]["with tpm"]
    share = tpm["429s"] / max(tpm["requests"], 1)
    used = tpm["tokens/s"] / lim["tpm"]["server tokens per s"]
    add("8.3", "429s <= 1% of requests", share, "{:.1%}", share <= 0.01)
    add("8.3", "throughput >= 90% of the token limit", used, "{:.0%}", used >= 0.9)
    for section, target, value, shown, met in streaming.targets(r["streaming"]):
        add(section, target, value, shown, met)
    for key, shown in (("offline", "offline"), ("http", "mock server")):
        ratio = r["tracing"][key]["on / off"]
        add("10", f"tracing on <= 1.05x off ({shown})", ratio, "{:.2f}x", ratio <= 1.05)
    if "migrate" in r:
        rate = r["migrate"]["median files/s"]
        add("11", "taskexec migrate >= 50 files/s", rate, "{:.0f} files/s", rate >= 50)
    return found


#: The peers harness's own report (../shared/peers_dist, run by hand: it starts Celery, taskiq,
#: dramatiq and arq workers, which this suite does not install), kept in the repository and
#: shown in this report as section 12.
PEERS_REPORT = Path(__file__).resolve().parent / "PEERS.md"


def render_peers() -> list[str]:
    if not PEERS_REPORT.exists():
        return []
    return [PEERS_REPORT.read_text().rstrip(), ""]


def render_targets(found: list[tuple[str, str, str, bool]]) -> list[str]:
    missed = sum(not met for *_, met in found)
    lines = [
        "## Targets in this run",
        "",
        f"{len(found) - missed} of {len(found)} met"
        + (" (the misses are discussed at the end)." if missed else "."),
        "",
        "| section | target | this run | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {t} | {v} | {'yes' if met else '**no**'} |" for s, t, v, met in found]
    return [*lines, ""]


def distributed_gap(d: dict[str, Any], cores: int) -> str:
    """Why the throughput target is missed in this run, with this run's CPU figures; or ""."""
    if "skipped" in d:
        return ""
    t = d["throughput"]
    samples = t["samples"]
    ratio = statistics.median(samples["2 workers"]) / statistics.median(samples["in-process"])
    if ratio <= 1.5:
        return ""
    cpu = {k: statistics.median(v) for k, v in t["cpu_s"].items()}
    total = sum(cpu.values())
    local = {k: statistics.median(v) for k, v in t.get("cpu_in_process_s", {}).items()}
    local_total = sum(local.values())
    return DISTRIBUTED_GAP.format(
        local=", ".join(f"{k} {v:.2f} s" for k, v in local.items()) or "not measured",
        local_total=local_total,
        extra_ms=(total - local_total) / t["tasks"] * 1000,
        ratio=ratio,
        n=t["tasks"],
        bound=t["concurrency"],
        cores=cores,
        total=total,
        floor=total / cores,
        cpu=", ".join(f"{k} {v:.2f} s" for k, v in cpu.items()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
