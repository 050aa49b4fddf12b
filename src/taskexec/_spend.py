"""Tokens and cost of a run, per agent and in total: for the command line's summary and ``--json``.

Pure functions of the results, so that any front end (the CLI, a notebook, a dashboard) shows
the same figures. Costs are summed as decimals, the way the ledger sums them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from rich.markup import escape
from rich.table import Table

from ._models import ExecutionResult
from ._pricing import to_decimal

__all__ = ("AgentSpend", "RunSpend", "spend_table", "summarize_spend")


@dataclass(slots=True)
class AgentSpend:
    """Tokens and cost of one agent's results (or of all of them, for the total)."""

    tasks: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    #: The cost of the results whose price is known.
    cost_usd: Decimal = Decimal(0)
    #: ``llm`` results that made a request but whose cost is unknown (not in ``cost_usd``).
    unpriced: int = 0

    def add(self, result: ExecutionResult) -> None:
        """Count one result in."""
        usage = result.usage
        self.tasks += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_read_tokens += usage.cache_read_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        if usage.cost_usd is not None:
            self.cost_usd += to_decimal(usage.cost_usd)
        elif result.mode == "llm" and result.attempts > 0:
            self.unpriced += 1

    def to_dict(self) -> dict[str, Any]:
        """Return the figures for JSON (the cost as a float, rounded to a nano-dollar)."""
        return {
            "tasks": self.tasks,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cost_usd": float(round(self.cost_usd, 9)),
            "unpriced_results": self.unpriced,
        }


@dataclass(slots=True)
class RunSpend:
    """A run's tokens and cost per agent (sorted by name) and in total."""

    agents: dict[str, AgentSpend] = field(default_factory=dict)
    total: AgentSpend = field(default_factory=AgentSpend)

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"agents": {name: figures}, "total": figures}`` for ``--json``."""
        return {
            "agents": {name: spend.to_dict() for name, spend in self.agents.items()},
            "total": self.total.to_dict(),
        }


def summarize_spend(results: Iterable[ExecutionResult]) -> RunSpend:
    """Return the tokens and cost of ``results`` per agent and in total.

    ``unpriced`` counts the ``llm`` results that ran but have no ``cost_usd``: their cost is
    not in the totals, and a summary should say so.
    """
    by_agent: dict[str, AgentSpend] = {}
    total = AgentSpend()
    for result in results:
        by_agent.setdefault(result.agent, AgentSpend()).add(result)
        total.add(result)
    return RunSpend(dict(sorted(by_agent.items())), total)


def spend_table(spend: RunSpend, title: str = "tokens and cost") -> Table:
    """Return a rich table of ``spend``: a row per agent, then the total."""
    table = Table(title=title, title_justify="left")
    table.add_column("agent")
    for column in ("tasks", "input", "cached", "output", "cost (USD)"):
        table.add_column(column, justify="right")
    rows = [*spend.agents.items(), ("total", spend.total)]
    for index, (name, figures) in enumerate(rows):
        cost = f"{figures.cost_usd:.6f}"
        if figures.unpriced:
            cost += f" + {figures.unpriced} unpriced"
        cached = figures.cache_read_tokens + figures.cache_write_tokens
        table.add_row(
            f"[bold]{name}[/]" if index == len(rows) - 1 else escape(name),
            str(figures.tasks),
            f"{figures.input_tokens:,}",
            f"{cached:,}",
            f"{figures.output_tokens:,}",
            cost,
            end_section=index == len(rows) - 2,
        )
    return table
