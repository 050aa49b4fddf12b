"""A run's cost ceiling: the reservation arithmetic, and the ceiling held under concurrency."""

from __future__ import annotations

import asyncio
import pickle
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskexec import (
    Agent,
    AgentTask,
    ExecutionResult,
    ExecutionStatus,
    InvalidValueError,
    Plan,
    PlanError,
    Price,
    ProjectOrchestrator,
    TaskExecutor,
    UnpricedAgentError,
)
from taskexec import sync as taskexec_sync
from taskexec._budget import (
    LATER,
    NEVER,
    Ledger,
    Reservation,
    RunBudget,
    check_ceiling,
)
from taskexec._calls import budget_settings
from taskexec._engines.inprocess import AsyncEngine
from taskexec._pricing import to_decimal, worst_case_cost
from taskexec.flags import use_engine
from taskexec.testing import MockServer

from .conftest import FAST_RETRY, openai_agent

PRICE = Price(input_per_mtok=1000, output_per_mtok=2000)  # dear, so a few tasks matter


def spent(results: list) -> Decimal:  # type: ignore[type-arg]
    return sum((to_decimal(r.usage.cost_usd or 0.0) for r in results), Decimal(0))


# -- the arithmetic -----------------------------------------------------------------------------

money = st.decimals(min_value=0, max_value=100, places=6, allow_nan=False, allow_infinity=False)


@settings(max_examples=300)
@given(
    ceiling=st.decimals(min_value="0.000001", max_value=100, places=6),
    tasks=st.lists(st.tuples(money, money), min_size=1, max_size=40),
    schedule=st.lists(st.integers(0, 1000), max_size=200),
    in_flight=st.integers(1, 10),
)
def test_reservations_hold_the_ceiling(
    ceiling: Decimal,
    tasks: list[tuple[Decimal, Decimal]],
    schedule: list[int],
    in_flight: int,
) -> None:
    """Tasks (estimate, actual) start and finish in a random order, ``in_flight`` at most at
    once; some finish with a failure (released). At every step the money booked stays under
    the ceiling; in the end nothing is reserved and the spend is over the ceiling by no more
    than what the tasks' actual costs exceeded their estimates."""
    ledger = Ledger(ceiling)
    waiting = list(range(len(tasks)))
    running: list[tuple[int, Reservation]] = []
    overrun = Decimal(0)
    picks = iter(schedule)
    while waiting or running:
        pick = next(picks, 0)
        start = waiting and len(running) < in_flight and (not running or pick % 2 == 0)
        if start:
            estimate, _ = tasks[waiting[0]]
            before = (ledger.spent, ledger.reserved)
            held = ledger.reserve(estimate)
            if isinstance(held, Reservation):
                running.append((waiting.pop(0), held))
                assert ledger.spent + ledger.reserved <= ceiling + overrun
                continue
            assert (ledger.spent, ledger.reserved) == before  # a refusal books nothing
            if held is NEVER:
                assert ledger.spent + estimate > ceiling
                waiting.pop(0)  # skipped
                continue
            assert held is LATER
            assert running  # only work in flight can make room...
            assert ledger.spent + estimate <= ceiling  # ...and it would fit without it
        # Finish one task in flight: settled with its actual cost, or released (no reply).
        index, held = running.pop(pick % len(running))
        estimate, actual = tasks[index]
        if pick % 5 == 4:
            ledger.release(held)
        else:
            ledger.settle(held, actual)
            overrun += max(Decimal(0), actual - estimate)
        ledger.settle(held, actual)  # a second settlement changes nothing
    assert ledger.reserved == 0
    assert ledger.spent <= ceiling + overrun
    if overrun == 0:
        assert ledger.spent <= ceiling


def test_unknown_cost_counts_the_whole_reservation() -> None:
    ledger = Ledger(Decimal(10))
    held = ledger.reserve(Decimal(4))
    assert isinstance(held, Reservation)
    ledger.settle(held, None)
    assert (ledger.spent, ledger.reserved, ledger.available) == (4, 0, 6)
    assert ledger.reserve(Decimal(0)) is not NEVER  # free work always fits
    assert "closed" in repr(held)


async def test_a_waiting_reservation_is_booked_when_room_is_made() -> None:
    ledger = Ledger(Decimal(10))
    first = ledger.reserve(Decimal(8))
    assert isinstance(first, Reservation)
    waiter = asyncio.ensure_future(ledger.reserve_waiting(Decimal(5)))
    await asyncio.sleep(0)
    assert not waiter.done()  # 8 + 5 > 10, but 5 alone fits: it waits
    ledger.settle(first, Decimal(3))
    second = await waiter
    assert second is not None
    assert (ledger.spent, ledger.reserved) == (3, 5)
    assert await ledger.reserve_waiting(Decimal(8)) is None  # 3 spent + 8 > 10: never fits


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_the_ceiling_must_be_positive(bad: float) -> None:
    with pytest.raises(InvalidValueError, match="max_cost_usd"):
        ProjectOrchestrator(max_cost_usd=bad)


# -- runs ---------------------------------------------------------------------------------------


def tasks_of(count: int, prefix: str = "t") -> list[AgentTask]:
    return [AgentTask(id=f"{prefix}{i}", prompt=f"task number {i}") for i in range(count)]


def ceiling_for(agent: Agent, tasks: list[AgentTask], fits: int) -> float:
    """A ceiling that holds the worst case of exactly ``fits`` tasks run one at a time with
    their real cost settled (every task's worst case is the same here)."""
    worst = worst_case_cost(agent, tasks[0].prompt)
    assert worst is not None
    return float(worst * fits + worst / 2)


@pytest.mark.parametrize("engine", ["async", "legacy"])
async def test_tasks_that_do_not_fit_are_skipped(engine: str) -> None:
    agent = Agent(name="paid", price=PRICE, max_tokens=20)
    tasks = tasks_of(10)
    worst = worst_case_cost(agent, tasks[0].prompt)
    assert worst is not None
    # Real costs are far below the worst case, so after n tasks there is room for about
    # (ceiling - real spend) / worst more: the ceiling is two worst cases and a half.
    ceiling = float(worst * 2 + worst / 2)
    with use_engine(engine):  # type: ignore[arg-type]
        async with ProjectOrchestrator(
            TaskExecutor([agent]), max_concurrency=1, max_cost_usd=ceiling
        ) as orchestrator:
            results = await orchestrator.execute_tasks(tasks)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    ran = [r for r in results if r.ok]
    skipped = [r for r in results if r.status is ExecutionStatus.SKIPPED]
    assert len(ran) + len(skipped) == len(tasks)
    assert ran
    assert skipped
    for result in skipped:
        assert result.error is not None
        assert result.error.kind == "budget_exhausted"
        assert result.attempts == 0
        assert result.agent == "paid"
        assert result.engine == engine
    assert spent(results) <= to_decimal(ceiling)
    # Greedy in order: a task is skipped only when the spend so far leaves no room for it.
    total = Decimal(0)
    for result in results:
        if result.ok:
            assert total + worst <= to_decimal(ceiling)
            total += to_decimal(result.usage.cost_usd or 0.0)
        else:
            assert total + worst > to_decimal(ceiling)


async def test_dependents_of_a_task_the_ceiling_skipped_are_skipped() -> None:
    agent = Agent(name="paid", price=PRICE, max_tokens=20)
    first = AgentTask(id="a", prompt="x")
    second = AgentTask(id="b", prompt="y", depends_on=["a"])
    worst = worst_case_cost(agent, "x")
    assert worst is not None
    async with ProjectOrchestrator(
        TaskExecutor([agent]), max_cost_usd=float(worst / 2)
    ) as orchestrator:
        a, b = await orchestrator.execute_tasks([first, second])
    assert a.error is not None
    assert a.error.kind == "budget_exhausted"
    assert b.error is not None
    assert b.error.kind == "dependency_failed"


async def test_unpriced_agents_refuse_the_run_and_are_named(mock_server: MockServer) -> None:
    agents = [
        openai_agent(mock_server, "llama", model="llama3.1:8b"),
        openai_agent(mock_server, "qwen", model="qwen2.5"),
        openai_agent(mock_server, "known", model="gpt-4o-mini"),
        Agent(name="script", mode="script", command=["true"]),
    ]
    tasks = [AgentTask(id=a.name, prompt="hi", agent=a.name) for a in agents]
    async with ProjectOrchestrator(TaskExecutor(agents), max_cost_usd=1.0) as orchestrator:
        with pytest.raises(UnpricedAgentError) as caught:
            await orchestrator.execute_tasks(tasks)
    assert caught.value.agents == ["llama", "qwen"]
    assert "'llama', 'qwen'" in str(caught.value)
    assert "allow_unpriced" in str(caught.value)
    assert mock_server.stats.chat_requests == 0  # refused before anything ran
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.agents, str(copy)) == (caught.value.agents, str(caught.value))

    llm_tasks = tasks[:3]
    async with ProjectOrchestrator(
        TaskExecutor(agents, retry_policy=FAST_RETRY), max_cost_usd=1.0, allow_unpriced=True
    ) as orchestrator:
        results = await orchestrator.execute_tasks(llm_tasks)
    assert all(r.ok for r in results)
    assert [r.usage.cost_usd is None for r in results] == [True, True, False]
    assert mock_server.stats.chat_requests == 3


async def test_a_plan_carries_its_ceiling_and_the_orchestrator_wins() -> None:
    agent = Agent(name="paid", price=PRICE, max_tokens=20)
    tasks = tasks_of(6)
    worst = worst_case_cost(agent, tasks[0].prompt)
    assert worst is not None
    plan = Plan.model_validate(
        {
            "agents": [agent.model_dump()],
            "tasks": [t.model_dump() for t in tasks],
            "settings": {"max_cost_usd": float(worst / 2), "max_concurrency": 1},
        }
    )
    async with ProjectOrchestrator() as orchestrator:
        results = await orchestrator.run(plan)
    assert {r.status for r in results} == {ExecutionStatus.SKIPPED}
    async with ProjectOrchestrator(max_cost_usd=100.0) as orchestrator:
        results = await orchestrator.run(plan)
    assert all(r.ok for r in results)


def test_the_sync_shim_holds_the_ceiling() -> None:
    agent = Agent(name="paid", price=PRICE, max_tokens=20)
    worst = worst_case_cost(agent, "task number 0")
    assert worst is not None
    with taskexec_sync.ProjectOrchestrator(
        taskexec_sync.TaskExecutor([agent]), max_concurrency=1, max_cost_usd=float(worst * 3 / 2)
    ) as orchestrator:
        results = orchestrator.execute_tasks(tasks_of(5))
    statuses = [r.status for r in results]
    assert ExecutionStatus.SUCCESS in statuses
    assert ExecutionStatus.SKIPPED in statuses
    assert spent(results) <= worst * 3 / 2


async def test_a_thousand_tasks_at_once_over_http_stay_under_the_ceiling(
    mock_server: MockServer,
) -> None:
    """1,000 tasks, all in flight at once, against the real mock server on 127.0.0.1."""
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini", max_tokens=64, price=PRICE)
    tasks = tasks_of(1000)
    ceiling = ceiling_for(agent, tasks, 40)
    executor = TaskExecutor([agent], retry_policy=FAST_RETRY)
    orchestrator = ProjectOrchestrator(executor, max_concurrency=1000, max_cost_usd=ceiling)
    # The batch the orchestrator would run, so that the test can look into its ledger.
    batch = orchestrator._batch(tasks)
    budget = batch.settings.budget
    assert isinstance(budget, RunBudget)
    async with orchestrator:
        results = await AsyncEngine().execute_tasks(batch)
    assert [r.task_id for r in results] == [t.id for t in tasks]  # one result per task
    ok = [r for r in results if r.ok]
    skipped = [r for r in results if r.status is ExecutionStatus.SKIPPED]
    assert len(ok) + len(skipped) == 1000
    assert all(r.error is not None and r.error.kind == "budget_exhausted" for r in skipped)
    # Each request reached the server once; a skipped task sent nothing.
    assert mock_server.stats.chat_requests == len(ok)
    assert mock_server.stats.statuses[200] == len(ok)
    # Real costs settle below the worst case, so waiting tasks got in: more than 40 ran.
    assert len(ok) > 40
    assert skipped
    total = spent(results)
    assert total <= to_decimal(ceiling)
    assert budget.ledger.reserved == 0  # nothing leaked
    assert budget.ledger.spent == total


async def test_work_that_costs_nothing_is_never_refused(mock_server: MockServer) -> None:
    api = Agent(name="api", mode="api", url=mock_server.agent_url)
    paid = Agent(name="paid", price=PRICE, max_tokens=20)
    worst = worst_case_cost(paid, "x")
    assert worst is not None
    tasks = [AgentTask(id="api", prompt="x", agent="api"), AgentTask(id="paid", prompt="x")]
    async with ProjectOrchestrator(
        TaskExecutor([api, paid], default_agent="paid"), max_cost_usd=float(worst / 2)
    ) as orchestrator:
        api_result, paid_result = await orchestrator.execute_tasks(tasks)
    assert api_result.ok
    assert paid_result.status is ExecutionStatus.SKIPPED
    assert mock_server.stats.requests == 1


async def test_cancelled_tasks_release_their_reservations(mock_server: MockServer) -> None:
    agent = openai_agent(mock_server, "gpt", model="gpt-4o-mini", max_tokens=64, max_retries=0)
    slow = [AgentTask(id=f"slow{i}", prompt=f"wait [[latency=30]] {i}") for i in range(5)]
    failing = AgentTask(id="bad", prompt="[[barrier=6]] [[fault=400]]")
    held = [AgentTask(id=f"held{i}", prompt=f"[[barrier=6]] {i}") for i in range(5)]
    orchestrator = ProjectOrchestrator(TaskExecutor([agent]), max_cost_usd=10.0)
    batch = orchestrator._batch([*held, failing, *slow], fail_fast=True)
    budget = batch.settings.budget
    assert budget is not None
    async with orchestrator:
        results = await AsyncEngine().execute_tasks(batch)
    by_id = {r.task_id: r for r in results}
    assert by_id["bad"].status is ExecutionStatus.FAILED
    assert {by_id[t.id].status for t in slow} == {ExecutionStatus.CANCELLED}
    assert budget.ledger.reserved == 0
    assert budget.ledger.spent == spent(results)


def test_a_failing_blocking_run_releases_its_reservation() -> None:
    agent = Agent(name="paid", price=PRICE)
    orchestrator = ProjectOrchestrator(TaskExecutor([agent]), max_cost_usd=10.0)
    task = AgentTask(id="t", prompt="x")
    batch = orchestrator._batch([task])
    budget = batch.settings.budget
    assert budget is not None

    def interrupted() -> ExecutionResult:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        budget.run_blocking(batch.roster, task, None, interrupted, "legacy")
    assert (budget.ledger.reserved, budget.ledger.spent) == (0, 0)


async def test_an_invalid_batch_is_reported_as_such_with_a_ceiling() -> None:
    async with ProjectOrchestrator(
        TaskExecutor([Agent(name="a")]), max_cost_usd=1.0
    ) as orchestrator:
        with pytest.raises(PlanError, match="unknown agent 'nobody'"):
            await orchestrator.execute_tasks([AgentTask(id="t", prompt="x", agent="nobody")])


def test_a_ceiling_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(InvalidValueError, match="'lots'"):
        check_ceiling("lots")  # type: ignore[arg-type]


async def test_what_an_earlier_run_spent_counts_against_the_ceiling() -> None:
    agent = Agent(name="paid", price=PRICE, max_tokens=20)
    executor = TaskExecutor([agent])
    tasks = tasks_of(3)
    worst = worst_case_cost(agent, tasks[0].prompt)
    assert worst is not None
    ceiling = float(worst * 10)
    settings = budget_settings(
        executor.parts.settings,
        executor.parts.roster,
        tasks,
        ceiling,
        spent_usd=float(worst * 19 / 2),
    )
    assert settings.budget is not None
    assert settings.budget.ledger.available == to_decimal(ceiling) - to_decimal(
        float(worst * 19 / 2)
    )
    assert (
        budget_settings(executor.parts.settings, executor.parts.roster, tasks, None)
        is executor.parts.settings
    )
    await executor.aclose()
