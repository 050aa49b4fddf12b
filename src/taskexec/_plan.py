"""Plan files: agents, tasks and settings in YAML or JSON, with errors that name file and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import PlanError, ProviderNotFoundError
from ._graph import graph_problems
from ._models import Agent, AgentTask
from .providers import get_provider

__all__ = (
    "MAX_YAML_NODES",
    "Plan",
    "PlanSettings",
    "load_agents",
    "load_plan",
    "mode_problem",
    "plan_problems",
)

#: The most nodes a YAML plan may expand to, aliases followed. A plan of 20,000 tasks is about
#: 200,000 nodes; a "billion laughs" document of a few lines is billions, refused before it is
#: built.
MAX_YAML_NODES = 2_000_000


class PlanSettings(BaseModel):
    """Run settings a plan may carry; command-line flags override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_agent: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    fail_fast: bool = False
    engine: Literal["async", "legacy"] | None = None
    #: The run's cost ceiling in USD (``ProjectOrchestrator(max_cost_usd=...)``).
    max_cost_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class Plan(BaseModel):
    """A project plan: the agents and the tasks they run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    description: str | None = None
    agents: list[Agent] = Field(default_factory=list)
    tasks: list[AgentTask]
    settings: PlanSettings = Field(default_factory=PlanSettings)


def mode_problem(agent: Agent, mode: str) -> tuple[str, str] | None:
    """Return why ``agent`` cannot serve ``mode``, as ``(field, problem)``, or None if it can.

    The one check behind both ``load_plan``/``taskexec validate`` and
    :meth:`TaskExecutor.execute`, so that a plan that validates does not fail when it runs.
    """
    if mode == "api" and not agent.url:
        return "url", "api mode needs a url; set url: 'http://...' or use another mode"
    if mode == "script" and not agent.command:
        return "command", (
            "script mode needs a command; set command: ['python', 'agent.py'] or use another mode"
        )
    if mode == "llm":
        try:
            get_provider(agent.provider)
        except ProviderNotFoundError as exc:
            return "provider", str(exc)
    return None


def plan_problems(plan: Plan) -> list[str]:
    """Return every problem with a structurally valid plan.

    Graph errors, unknown or duplicate agents, and agents that cannot serve the mode they or
    their tasks ask for (an ``api`` agent without a ``url``, a ``script`` agent without a
    ``command``, an unknown provider).
    """
    problems = graph_problems(plan.tasks)
    names = [a.name for a in plan.agents]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"agents: duplicate agent name {name!r}; agent names must be unique")
    by_name = {a.name: a for a in plan.agents}
    for index, agent in enumerate(plan.agents):
        found = mode_problem(agent, agent.mode)
        if found is not None:
            problems.append(f"agents[{index}] (name {agent.name!r}).{found[0]}: {found[1]}")
    default = plan.settings.default_agent
    if default is not None and default not in by_name:
        problems.append(f"settings.default_agent: unknown agent {default!r}")
    fallback = default or (names[0] if len(by_name) == 1 else None)
    for index, task in enumerate(plan.tasks):
        where = f"tasks[{index}] (id {task.id!r})"
        if task.agent is not None and task.agent not in by_name:
            problems.append(
                f"{where}.agent: unknown agent {task.agent!r}; "
                f"agents in this plan: {', '.join(sorted(by_name)) or '(none)'}"
            )
            continue
        if task.agent is None and default is None and len(by_name) != 1:
            problems.append(
                f"{where}.agent: no agent named and no settings.default_agent to fall back on"
            )
            continue
        runs_on = by_name.get(task.agent or fallback or "")
        if runs_on is not None and task.mode is not None and task.mode != runs_on.mode:
            found = mode_problem(runs_on, task.mode)
            if found is not None:
                problems.append(f"{where}.mode: agent {runs_on.name!r} cannot serve: {found[1]}")
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


def _load_yaml(text: str) -> Any:
    """Parse one YAML document safely, refusing one that aliases expand beyond a bound."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Raise PlanError if ``root`` expands to more than MAX_YAML_NODES nodes, or into itself.

    Sizes are counted over the composed graph, one visit per node (aliases share nodes), so a
    document built to expand exponentially is measured in time linear in its length.
    """
    size: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack[-1]
        key = id(node)
        children = _children(node)
        if key not in entered:
            entered.add(key)
            for child in children:
                if id(child) in entered and id(child) not in size:
                    line = child.start_mark.line + 1
                    raise PlanError([f"line {line}: invalid YAML: an alias refers to itself"])
                if id(child) not in size:
                    stack.append(child)
            continue
        stack.pop()
        if key not in size:
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                line = node.start_mark.line + 1
                raise PlanError(
                    [
                        f"line {line}: the YAML expands to more than {MAX_YAML_NODES:,} nodes "
                        "through anchors and aliases (&name / *name); refusing to load it"
                    ]
                )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


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
    return _check(_read(path), source)


def load_agents(path: str | Path) -> list[Agent]:
    """Read the agents of a plan file, or of a file with only ``agents:`` (a worker's file).

    Raises:
        PlanError: As :func:`load_plan`, and when the file defines no agent.
    """
    source = str(path)
    data = _read(path)
    if "tasks" not in data:
        data = {**data, "tasks": []}
    plan = _check(data, source)
    if not plan.agents:
        raise PlanError(["agents: the file defines no agent"], source=source)
    return plan.agents


def _read(path: str | Path) -> dict[str, Any]:
    """Return the top-level mapping of a YAML or JSON file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PlanError([f"cannot read the file: {exc.strerror or exc}"], source=source) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = (
            f"byte offset {exc.start}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
            "save the plan as UTF-8"
        )
        raise PlanError([problem], source=source) from None
    try:
        data = json.loads(text) if source.endswith(".json") else _load_yaml(text)
    except PlanError as exc:
        raise PlanError(exc.problems, source=source) from None
    except json.JSONDecodeError as exc:
        raise PlanError([f"line {exc.lineno}: invalid JSON: {exc.msg}"], source=source) from None
    except RecursionError:
        # Thousands of nested brackets: the parsers recurse per level. No plan nests that deep.
        raise PlanError(
            ["(top level): nested too deeply to be a plan (brackets or mappings thousands deep)"],
            source=source,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlanError([f"{where}invalid YAML: {problem}"], source=source) from None
    if not isinstance(data, dict):
        raise PlanError(
            ["(top level): expected a mapping with 'agents' and 'tasks'"], source=source
        )
    return data


def _check(data: dict[str, Any], source: str) -> Plan:
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_loc(e['loc'], data)}: {e['msg']}" for e in exc.errors()]
        raise PlanError(problems, source=source) from None
    problems = plan_problems(plan)
    if problems:
        raise PlanError(problems, source=source)
    return plan
