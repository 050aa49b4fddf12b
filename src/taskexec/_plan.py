"""Plan files: agents, tasks and settings in YAML or JSON, with errors that name file and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import PlanError
from ._graph import graph_problems
from ._models import Agent, AgentTask

__all__ = ("Plan", "PlanSettings", "load_plan", "plan_problems")


class PlanSettings(BaseModel):
    """Run settings a plan may carry; command-line flags override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_agent: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    fail_fast: bool = False
    engine: Literal["async", "legacy"] | None = None


class Plan(BaseModel):
    """A project plan: the agents and the tasks they run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    description: str | None = None
    agents: list[Agent] = Field(default_factory=list)
    tasks: list[AgentTask]
    settings: PlanSettings = Field(default_factory=PlanSettings)


def plan_problems(plan: Plan) -> list[str]:
    """Return every problem with a structurally valid plan: graph errors and unknown agents."""
    problems = graph_problems(plan.tasks)
    names = [a.name for a in plan.agents]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"agents: duplicate agent name {name!r}; agent names must be unique")
    known = set(names)
    default = plan.settings.default_agent
    if default is not None and default not in known:
        problems.append(f"settings.default_agent: unknown agent {default!r}")
    for index, task in enumerate(plan.tasks):
        if task.agent is not None and task.agent not in known:
            problems.append(
                f"tasks[{index}] (id {task.id!r}).agent: unknown agent {task.agent!r}; "
                f"agents in this plan: {', '.join(sorted(known)) or '(none)'}"
            )
        elif task.agent is None and default is None and len(known) != 1:
            problems.append(
                f"tasks[{index}] (id {task.id!r}).agent: no agent named and no "
                "settings.default_agent to fall back on"
            )
    return problems


def _loc(loc: tuple[int | str, ...], data: Any) -> str:
    """Render a pydantic error location as ``tasks[2] (id 'review').timeout_s``."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("id") or node.get("name"), str):
                label = "id" if "id" in node else "name"
                out += f" ({label} {node[label]!r})"
        else:
            out += f".{part}" if out else part
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def load_plan(path: str | Path) -> Plan:
    """Read a plan from a YAML or JSON file and check it completely.

    Args:
        path: A ``.yaml``/``.yml`` or ``.json`` file.

    Returns:
        The plan.

    Raises:
        PlanError: The file cannot be read or parsed, or the plan is invalid; ``problems`` lists
            each problem with its field path, and the message names the file.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError([f"cannot read the file: {exc.strerror or exc}"], source=source) from None
    try:
        data = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise PlanError([f"line {exc.lineno}: invalid JSON: {exc.msg}"], source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlanError([f"{where}invalid YAML: {problem}"], source=source) from None
    if not isinstance(data, dict):
        raise PlanError(
            ["(top level): expected a mapping with 'agents' and 'tasks'"], source=source
        )
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_loc(e['loc'], data)}: {e['msg']}" for e in exc.errors()]
        raise PlanError(problems, source=source) from None
    problems = plan_problems(plan)
    if problems:
        raise PlanError(problems, source=source)
    return plan
