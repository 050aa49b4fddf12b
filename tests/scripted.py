"""A provider whose outcome is written in the prompt, for orchestrator and equivalence tests.

Prompt form: ``<id>:<outcome>`` where outcome is ``success``, ``fail``, ``hang`` (waits until
cancelled or timed out) or ``failwhen=<path>`` (fails once the file at path holds two
lines). The provider records what runs at once and in which order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

from taskexec import Agent, ExecutionError, Usage
from taskexec.providers import AttemptFailed, ChatReply, ClientPool, Provider


class ScriptedProvider(Provider):
    """Outcome from the prompt; counts concurrency and records starts and ends."""

    name: ClassVar[str] = "scripted"

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.events: list[tuple[str, str]] = []

    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        task_id, _, rest = prompt.partition(":")
        outcome = rest.split()[0] if rest.split() else "success"
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.events.append(("start", task_id))
        try:
            await asyncio.sleep(0)  # let siblings start: concurrency is observable
            await asyncio.sleep(0)
            if outcome == "hang":
                await asyncio.Event().wait()
            if outcome.startswith("failwhen="):
                path = Path(outcome.removeprefix("failwhen="))
                while not (path.exists() and len(path.read_text().split()) == 2):  # noqa: ASYNC110,ASYNC240
                    await asyncio.sleep(0.005)
                outcome = "fail"
            if outcome == "fail":
                raise AttemptFailed(
                    ExecutionError(kind="http_status", message="scripted failure", status_code=400)
                )
            self.events.append(("end", task_id))
            return ChatReply(f"out-{task_id}", Usage())
        finally:
            self.active -= 1
