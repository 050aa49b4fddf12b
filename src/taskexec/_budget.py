"""A run's cost ceiling: reserve each task's worst case before it starts, settle it after.

The ceiling holds under concurrency by construction. A task takes its reservation before its
request is made, and :meth:`Ledger.reserve` checks and books in one step, with nothing in
between that could let another task in (no ``await``, and a lock for callers on other
threads). So the money booked, spent plus reserved, never passes the ceiling; the spend can
pass it only where a request's real cost is above its reservation, which the reservation
(every prompt byte as a token, the reply at ``max_tokens``, the dearest input rate) makes
as unlikely as the vendor's limits allow.

A task that does not fit now but would once the reservations in flight are settled (they
usually settle well below their worst case) waits for them; a task that would not fit even
with nothing in flight is ``skipped`` at once.

Every reservation ends exactly once: settled with the task's real cost, or released when the
task never got a reply (a failure, a cancellation, an exception). A run that has settled every
task has nothing reserved.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import ConfigurationError, InvalidValueError
from ._models import (
    Agent,
    AgentTask,
    EngineName,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._pricing import is_priced, load_table, to_decimal, worst_case_cost

if TYPE_CHECKING:
    from ._results import Progress

__all__ = (
    "LATER",
    "NEVER",
    "Ledger",
    "Refusal",
    "Reservation",
    "RunBudget",
    "check_ceiling",
    "unpriced_agents",
    "with_budget",
)


class Reservation:
    """Money set aside for one task until it is settled or released (at most once)."""

    __slots__ = ("amount", "open")

    def __init__(self, amount: Decimal) -> None:
        self.amount = amount
        self.open = True

    def __repr__(self) -> str:
        state = "open" if self.open else "closed"
        return f"Reservation({self.amount}, {state})"


class Refusal(enum.Enum):
    """Why :meth:`Ledger.reserve` booked nothing."""

    #: It fits once reservations in flight are settled or released.
    LATER = "later"
    #: It does not fit even with nothing in flight.
    NEVER = "never"


LATER = Refusal.LATER
NEVER = Refusal.NEVER


class Ledger:
    """A ceiling, what has been spent under it, and what is reserved for work in flight.

    Args:
        ceiling: The most the run may spend, in USD.
    """

    def __init__(self, ceiling: Decimal) -> None:
        self.ceiling = ceiling
        self.spent = Decimal(0)
        self.reserved = Decimal(0)
        # Every caller in taskexec is on one event loop, or is the legacy engine's one thread;
        # the lock keeps check-and-book atomic for any other caller too, at no cost here.
        self._lock = threading.Lock()
        #: Set (and replaced) at each settlement, for tasks waiting for room.
        self._settled: asyncio.Event | None = None

    @property
    def available(self) -> Decimal:
        """What a new reservation may take now."""
        return self.ceiling - self.spent - self.reserved

    def reserve(self, amount: Decimal) -> Reservation | Refusal:
        """Book ``amount`` if it fits under the ceiling; else book nothing and say why.

        Returns:
            The reservation; or :data:`LATER` when it would fit once the reservations in
            flight are settled or released; or :data:`NEVER` when it would not fit even then.
            A reservation of zero always fits: work that costs nothing is never refused.
        """
        with self._lock:
            if amount > 0 and self.spent + self.reserved + amount > self.ceiling:
                return NEVER if self.spent + amount > self.ceiling else LATER
            self.reserved += amount
            return Reservation(amount)

    async def reserve_waiting(self, amount: Decimal) -> Reservation | None:
        """Book ``amount``, waiting while it would fit only after work in flight settles;
        return None when it can never fit. For callers on one event loop."""
        while True:
            held = self.reserve(amount)
            if held is NEVER:
                return None
            if isinstance(held, Reservation):
                return held
            # Taken with no await since the check above: a settlement cannot slip between.
            if self._settled is None:
                self._settled = asyncio.Event()
            await self._settled.wait()

    def settle(self, reservation: Reservation, actual: Decimal | None) -> None:
        """Close a reservation with what the task really cost (None: unknown, so the amount
        reserved counts as spent). A closed reservation is left as it is."""
        with self._lock:
            if not reservation.open:
                return
            reservation.open = False
            self.reserved -= reservation.amount
            self.spent += reservation.amount if actual is None else actual
            settled, self._settled = self._settled, None
        if settled is not None:
            settled.set()  # wake the tasks waiting for room; each checks again

    def release(self, reservation: Reservation) -> None:
        """Close a reservation whose task got no reply: nothing was spent."""
        self.settle(reservation, Decimal(0))


@dataclass(frozen=True, slots=True)
class RunBudget:
    """The cost ceiling of one run, and how its tasks are held to it."""

    ledger: Ledger
    #: Agents without a known price run outside the ceiling (they reserve nothing).
    allow_unpriced: bool = False

    def worst_case(
        self, roster: Roster, task: AgentTask, outputs: Mapping[str, str | None] | None
    ) -> Decimal:
        """Return what the task must reserve: the worst case of its ``llm`` call (other modes,
        and agents allowed to run unpriced, reserve nothing)."""
        agent, mode = roster.resolve(task)
        if mode != "llm":
            return Decimal(0)
        return worst_case_cost(agent, task.render_prompt(outputs)) or Decimal(0)

    def exhausted(self, roster: Roster, task: AgentTask, amount: Decimal) -> ExecutionError:
        """Return the ``budget_exhausted`` error of a task whose reservation cannot fit."""
        agent, _ = roster.resolve_names(task)
        ledger = self.ledger
        message = (
            f"not started: its worst-case cost (${amount:.6f}: the prompt and max_tokens at "
            f"agent {agent!r}'s prices) does not fit in what is left of the run's "
            f"${ledger.ceiling} ceiling (${ledger.spent:.6f} spent)"
        )
        return ExecutionError(kind="budget_exhausted", message=message)

    def settle(self, reservation: Reservation, result: ExecutionResult) -> None:
        """Close the task's reservation with the cost its result reports."""
        cost = result.usage.cost_usd
        self.ledger.settle(reservation, None if cost is None else to_decimal(cost))

    def skipped(
        self, roster: Roster, task: AgentTask, error: ExecutionError, engine: EngineName
    ) -> ExecutionResult:
        """Return the ``skipped`` result of a task the ceiling kept from starting."""
        return roster.not_run_result(task, ExecutionStatus.SKIPPED, error, engine)

    def run_blocking(
        self,
        roster: Roster,
        task: AgentTask,
        outputs: Mapping[str, str | None] | None,
        run: Callable[[], ExecutionResult],
        engine: EngineName,
    ) -> ExecutionResult:
        """Run one task in this thread within the ceiling (the legacy engine's way: one task
        at a time, so nothing is in flight to wait for)."""
        amount = self.worst_case(roster, task, outputs)
        held = self.ledger.reserve(amount)
        if not isinstance(held, Reservation):
            return self.skipped(roster, task, self.exhausted(roster, task, amount), engine)
        try:
            result = run()
        except BaseException:
            self.ledger.release(held)
            raise
        self.settle(held, result)
        return result


class Roster(Protocol):
    """What the ceiling needs of a run's agents (:class:`taskexec._calls.Roster` is one)."""

    def resolve(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[Agent, Mode]: ...

    def resolve_names(
        self, task: AgentTask, agent: str | Agent | None = None, mode: Mode | None = None
    ) -> tuple[str, str]: ...

    def not_run_result(
        self, task: AgentTask, status: ExecutionStatus, error: ExecutionError, engine: EngineName
    ) -> ExecutionResult: ...


RunOne = Callable[
    [AgentTask, Mapping[str, str | None] | None, "Progress"],
    Coroutine[Any, Any, ExecutionResult],
]


def with_budget(run_one: RunOne, budget: RunBudget, roster: Roster) -> RunOne:
    """Wrap a batch's way of running one task so that each task runs within the ceiling.

    The reservation is taken when the task's coroutine begins, before its request (waiting
    while only work in flight keeps it from fitting); it is settled with the result, or
    released if the task is cancelled or raises.
    """

    async def run(
        task: AgentTask, outputs: Mapping[str, str | None] | None, progress: Progress
    ) -> ExecutionResult:
        await load_table()  # once per process, in a thread: the loop never waits on it
        amount = budget.worst_case(roster, task, outputs)
        held = await budget.ledger.reserve_waiting(amount)
        if held is None:
            return budget.skipped(roster, task, budget.exhausted(roster, task, amount), "async")
        try:
            result = await run_one(task, outputs, progress)
        except BaseException:
            budget.ledger.release(held)
            raise
        budget.settle(held, result)
        return result

    return run


def unpriced_agents(roster: Roster, tasks: Iterable[AgentTask]) -> list[str]:
    """Return the names of the agents that would make ``llm`` calls for ``tasks`` with no
    known price, sorted. Tasks that cannot be resolved are left to the batch's own check."""
    names: dict[str, bool] = {}
    for task in tasks:
        try:
            agent, mode = roster.resolve(task)
        except ConfigurationError:  # reported by Batch.check, with every other problem
            continue
        if mode == "llm" and agent.name not in names:
            names[agent.name] = is_priced(agent)
    return sorted(name for name, known in names.items() if not known)


def check_ceiling(value: float) -> Decimal:
    """Return a cost ceiling as a decimal.

    Raises:
        InvalidValueError: It is not a positive finite number.
    """
    try:
        ceiling = to_decimal(float(value))
    except (TypeError, ValueError):
        ceiling = Decimal("NaN")
    if not ceiling.is_finite() or ceiling <= 0:
        raise InvalidValueError(f"max_cost_usd must be a positive number of USD, not {value!r}")
    return ceiling
