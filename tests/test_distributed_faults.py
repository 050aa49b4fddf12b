"""Random short outages of RabbitMQ or Redis under a distributed run (issue 18's property).

Each example is one run on two in-process workers, with the fault proxy in front of one service
for everyone (the workers and the orchestrator): the service is cut (every connection dropped,
new ones refused) or frozen (connections open, nothing relayed) once the servers have seen
``start`` requests, for ``length`` seconds. Whatever the schedule, every task ends with exactly
one result, the run does not hang, the LLM servers see each task once (no worker dies here, so
the bound "N plus the tasks whose worker died" is N), and no worker runs more than its
concurrency at once (each worker has a mock server of its own, which counts the most requests
it held at once).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from taskexec import AgentTask, ExecutionResult, ProjectOrchestrator, TaskExecutor
from taskexec.distributed import Cluster, Worker
from taskexec.testing import MockServer, mock_server_in_thread

from .cluster import (
    CuttableProxy,
    drop_cluster,
    new_cluster,
    queue_depth,
    require_services,
    store_of,
)
from .conftest import eventually, openai_agent

#: Each worker's concurrency (its own limit, checked at its own server).
CONCURRENCY = 3
#: How long one task takes at the server: tens of milliseconds, so that a run is short.
LATENCY_S = 0.05
#: The bound that tells a hang from a slow recovery: far beyond a 2.5 s outage plus the
#: clients' reconnects (1 s apart) and the orchestrator's Redis poll (1 s).
HANG_S = 60.0
PORTS = {"RabbitMQ": 5672, "Redis": 6379}


@dataclass(frozen=True)
class Outage:
    """One fault of one service during a run of ``tasks`` tasks."""

    tasks: int
    service: str  # "RabbitMQ" or "Redis"
    kind: str  # "cut" (dropped and refused) or "freeze" (open, silent)
    start: int  # requests the servers have seen when it begins
    length_s: float


@st.composite
def outages(draw: st.DrawFn) -> Outage:
    tasks = draw(st.integers(5, 40))
    return Outage(
        tasks=tasks,
        service=draw(st.sampled_from(sorted(PORTS))),
        kind=draw(st.sampled_from(["cut", "freeze"])),
        start=draw(st.integers(1, tasks)),
        length_s=draw(st.integers(1, 25)) / 10,
    )


# Few examples, always the same ones (derandomized, no example database), and no shrinking:
# each example is a real run of a few seconds, and the suite's time is budgeted. A failure
# reports its Outage as drawn; run it again as an @example to study it.
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
# Whatever is drawn, the longest outages in the middle of the largest run: Redis silent for longer
# than a lease lives (1.5 s), and RabbitMQ gone (every unacknowledged task requeued).
@example(Outage(tasks=40, service="Redis", kind="freeze", start=12, length_s=2.5))
@example(Outage(tasks=40, service="RabbitMQ", kind="cut", start=12, length_s=2.5))
@given(outage=outages())
def test_a_short_outage_hangs_nothing_and_runs_each_task_once(outage: Outage) -> None:
    require_services()
    # One loop per example: whatever an example leaves behind dies with it.
    asyncio.run(_run_through(outage))


async def _run_through(outage: Outage) -> None:
    cluster = new_cluster()
    tasks = [
        AgentTask(id=f"f{i}", prompt=f"[[latency={LATENCY_S}]] p{i}") for i in range(outage.tasks)
    ]
    try:
        with mock_server_in_thread() as first, mock_server_in_thread() as second:
            servers = (first, second)
            async with CuttableProxy("127.0.0.1", PORTS[outage.service]) as proxy:
                via_proxy = Cluster(
                    proxy.url(cluster.broker_url)
                    if outage.service == "RabbitMQ"
                    else cluster.broker_url,
                    proxy.url(cluster.results_url)
                    if outage.service == "Redis"
                    else cluster.results_url,
                    namespace=cluster.namespace,
                )
                results = await _run_on_workers(outage, via_proxy, proxy, servers, tasks)
            requests = sum(s.stats.chat_requests for s in servers)
            most_at_once = [s.stats.max_in_flight for s in servers]
        async with store_of(cluster) as store:
            run_id = results[0].metadata["run_id"]
            stored = await store.get_many(run_id, [t.id for t in tasks])
            counted = await store.counters(run_id)
        dead_lettered = await queue_depth(cluster, cluster.dead_letter_queue)
    finally:
        await drop_cluster(cluster, ("writer",))
    assert [r.task_id for r in results] == [t.id for t in tasks]
    assert all(r.ok for r in results), [(r.task_id, r.error) for r in results if not r.ok]
    # Exactly one result per task, and it is the one in the store.
    assert {t: r.output for t, r in stored.items()} == {r.task_id: r.output for r in results}
    assert counted == {"executions": outage.tasks, "duplicates": 0}
    assert dead_lettered == 0
    # N plus the tasks whose worker died; no worker died (checked in _run_on_workers).
    assert requests == outage.tasks
    assert all(most <= CONCURRENCY for most in most_at_once), most_at_once


async def _run_on_workers(
    outage: Outage,
    cluster: Cluster,
    proxy: CuttableProxy,
    servers: tuple[MockServer, ...],
    tasks: list[AgentTask],
) -> list[ExecutionResult]:
    """Run ``tasks`` on two workers of ``cluster`` (each with its own server), the outage
    happening during the run; return the results."""
    ws = [
        Worker(
            [openai_agent(server, "writer", api_key="sk-test", max_retries=0)],
            cluster,
            concurrency=CONCURRENCY,
            name=f"w{i}",
        )
        for i, server in enumerate(servers)
    ]

    def requests() -> int:
        return sum(s.stats.chat_requests for s in servers)

    stop = asyncio.Event()
    serving = [asyncio.create_task(w.serve(stop)) for w in ws]
    begin, end = (proxy.down, proxy.up) if outage.kind == "cut" else (proxy.freeze, proxy.thaw)
    try:
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in ws)), 30)
        # The orchestrator's cluster is named in code; the namespace comes from the environment.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TASKEXEC_NAMESPACE", cluster.namespace)
            async with TaskExecutor(
                [openai_agent(servers[0], "writer", api_key="sk-test", max_retries=0)],
                broker_url=cluster.broker_url,
                results_url=cluster.results_url,
            ) as executor:
                run = asyncio.create_task(ProjectOrchestrator(executor).execute_tasks(tasks))
                await eventually(lambda: run.done() or requests() >= outage.start, timeout_s=30)
                begin()
                try:
                    await asyncio.sleep(outage.length_s)  # the outage's length: an input
                finally:
                    end()
                try:
                    results = await asyncio.wait_for(run, HANG_S)
                except TimeoutError:
                    raise AssertionError(
                        f"the run hung: no end {HANG_S} s after the outage {outage}"
                    ) from None
        assert not [t for t in serving if t.done()], "a worker stopped serving during the run"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 30)
    return results
