"""The run summary's tokens and cost, per agent and in total."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from decimal import Decimal

from rich.console import Console

from taskexec import ExecutionResult, ExecutionStatus, Usage
from taskexec._spend import spend_table, summarize_spend

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def result(
    task_id: str, agent: str, usage: Usage, *, mode: str = "llm", attempts: int = 1
) -> ExecutionResult:
    return ExecutionResult(
        task_id=task_id,
        status=ExecutionStatus.SUCCESS if attempts else ExecutionStatus.SKIPPED,
        agent=agent,
        mode=mode,
        engine="async",
        attempts=attempts,
        started_at=NOW,
        finished_at=NOW,
        duration_s=0.0,
        usage=usage,
    )


RESULTS = [
    result(
        "a1", "writer", Usage(input_tokens=10, output_tokens=5, cache_read_tokens=4, cost_usd=0.1)
    ),
    result(
        "a2", "writer", Usage(input_tokens=20, output_tokens=5, cache_write_tokens=3, cost_usd=0.2)
    ),
    result("b1", "local", Usage(input_tokens=7, output_tokens=1)),  # price unknown
    result("c1", "script", Usage(), mode="script"),  # costs nothing, not "unpriced"
    result("d1", "writer", Usage(), attempts=0),  # never ran
]


def test_tokens_and_cost_per_agent_and_in_total() -> None:
    spend = summarize_spend(RESULTS)
    assert list(spend.agents) == ["local", "script", "writer"]
    writer = spend.agents["writer"]
    assert (writer.tasks, writer.input_tokens, writer.output_tokens) == (3, 30, 10)
    assert (writer.cache_read_tokens, writer.cache_write_tokens) == (4, 3)
    assert writer.cost_usd == Decimal("0.3")  # decimal sum: 0.1 + 0.2, not 0.30000000000000004
    assert writer.unpriced == 0
    assert spend.agents["local"].unpriced == 1
    assert spend.agents["script"].unpriced == 0
    assert spend.total.tasks == 5
    assert spend.total.input_tokens == 37
    assert spend.total.cost_usd == Decimal("0.3")
    assert spend.total.unpriced == 1


def test_json_form() -> None:
    data = json.loads(json.dumps(summarize_spend(RESULTS).to_dict()))
    assert data["total"]["cost_usd"] == 0.3
    assert data["total"]["unpriced_results"] == 1
    assert data["agents"]["writer"]["cache_read_tokens"] == 4


def test_table_shows_every_agent_the_total_and_the_unpriced() -> None:
    out = io.StringIO()
    Console(file=out, width=120).print(spend_table(summarize_spend(RESULTS)))
    text = out.getvalue()
    lines = [line for line in text.splitlines() if "│" in line]
    rows = {line.split("│")[1].strip(): line for line in lines}
    assert {"local", "script", "writer", "total"} <= set(rows)
    assert "0.300000" in rows["writer"]
    assert "1 unpriced" in rows["total"]
    assert "1 unpriced" in rows["local"]
