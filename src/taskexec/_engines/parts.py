"""What an executor is made of, as the engine seam sees it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .._calls import CallSettings, Roster
from .._models import Agent, AgentTask, Mode
from ..bus import Bus
from .base import Batch, Job, OnResult
from .registry import EngineSet

__all__ = ("ExecutorParts",)


@dataclass(frozen=True, slots=True)
class ExecutorParts:
    """An executor's agents, call settings and engines: everything work is built from.

    The command line, the orchestrator and a worker build their work from these, never from
    the executor's private fields.
    """

    roster: Roster
    settings: CallSettings
    engines: EngineSet

    def job(
        self,
        task: AgentTask,
        agent: str | Agent | None = None,
        mode: Mode | None = None,
        outputs: Mapping[str, str | None] | None = None,
    ) -> Job:
        """Describe one task's call."""
        return Job(self.roster, self.settings, task, agent, mode, outputs)

    def batch(
        self,
        tasks: Iterable[AgentTask],
        *,
        fail_fast: bool,
        limit: int,
        bus: Bus,
        on_result: OnResult | None = None,
        run_id: str | None = None,
        settings: CallSettings | None = None,
    ) -> Batch:
        """Describe a run of many tasks (with ``settings`` instead of the executor's: a run's
        own, such as one held to a cost ceiling)."""
        return Batch(
            self.roster,
            settings or self.settings,
            list(tasks),
            fail_fast,
            limit,
            bus,
            on_result,
            run_id,
        )

    def with_agents(
        self, extra: Iterable[Agent], default_agent: str | None = None
    ) -> ExecutorParts:
        """The same parts with more agents (and perhaps another default)."""
        return replace(self, roster=self.roster.extended(extra, default_agent))

    def in_process(self) -> ExecutorParts:
        """The same parts with engines that never send work to a cluster (a worker's own)."""
        return replace(self, engines=EngineSet(in_process=True))
