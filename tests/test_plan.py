"""Plan files: every kind of error names the file, the field path and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskexec import PlanError, load_plan
from taskexec._graph import find_cycles, topological_order
from taskexec._models import AgentTask

from .conftest import ROOT


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert str(path) in str(info.value)
    return info.value.problems


def test_example_plan_loads() -> None:
    plan = load_plan(ROOT / "examples" / "project.yaml")
    assert [t.id for t in plan.tasks] == ["design", "implement-api", "implement-storage", "review"]
    assert plan.settings.default_agent == "developer"


def test_json_plans_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"agents": [{"name": "a"}], "tasks": [{"id": "t", "prompt": "p"}]}',
        "plan.json",
    )
    assert load_plan(path).tasks[0].id == "t"


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert "cannot read the file" in problem


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "tasks:\n  - id: a\n    prompt: [unclosed\n"))
    assert problem.startswith("line ")
    assert "invalid YAML" in problem


def test_json_syntax_error_names_the_line(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, '{"tasks": [\n}', "plan.json"))
    assert problem.startswith("line 2: invalid JSON")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, "- just\n- a list\n")) == [
        "(top level): expected a mapping with 'agents' and 'tasks'"
    ]


def test_field_errors_name_the_path_and_task(tmp_path: Path) -> None:
    text = """
agents:
  - name: a
    provider: openai
    max_retries: -1
tasks:
  - id: good
    prompt: fine
  - id: bad
    prompt: p
    timeout_s: 0
  - prompt: no id
settings:
  max_concurrency: 0
"""
    problems = problems_of(write(tmp_path, text))
    assert (
        "agents[0] (name 'a').max_retries: Input should be greater than or equal to 0" in problems
    )
    assert "tasks[1] (id 'bad').timeout_s: Input should be greater than 0" in problems
    assert "tasks[2].id: Field required" in problems
    assert "settings.max_concurrency: Input should be greater than or equal to 1" in problems


def test_graph_and_agent_problems_are_all_listed(tmp_path: Path) -> None:
    text = """
agents: [{name: a}, {name: b}, {name: b}]
settings: {default_agent: ghost}
tasks:
  - {id: x, prompt: p, depends_on: [y]}
  - {id: y, prompt: p, depends_on: [x]}
  - {id: z, prompt: p, depends_on: [missing], agent: nobody}
  - {id: z, prompt: p}
"""
    problems = problems_of(write(tmp_path, text))
    assert problems == [
        "tasks[2] (id 'z').id: duplicate task id 'z' (2 tasks use it); task ids must be unique",
        "tasks[2] (id 'z').depends_on: unknown task 'missing'; "
        "depend only on tasks in the same plan",
        "tasks: dependency cycle x -> y -> x; break one of these edges",
        "agents: duplicate agent name 'b'; agent names must be unique",
        "settings.default_agent: unknown agent 'ghost'",
        "tasks[2] (id 'z').agent: unknown agent 'nobody'; agents in this plan: a, b",
    ]


def test_task_without_agent_needs_a_default(tmp_path: Path) -> None:
    text = "agents: [{name: a}, {name: b}]\ntasks: [{id: t, prompt: p}]\n"
    assert problems_of(write(tmp_path, text)) == [
        "tasks[0] (id 't').agent: no agent named and no settings.default_agent to fall back on"
    ]


def test_placeholder_that_is_not_a_dependency(tmp_path: Path) -> None:
    text = "agents: [{name: a}]\ntasks: [{id: t, prompt: 'use {{other}}'}]\n"
    (problem,) = problems_of(write(tmp_path, text))
    assert problem.startswith("tasks[0] (id 't'): Value error, prompt uses {{other}}")


def test_plan_error_message_lists_every_problem() -> None:
    error = PlanError(["one", "two"], source="p.yaml")
    assert str(error) == "p.yaml: 2 problems found\n  - one\n  - two"
    assert str(PlanError(["only"])) == "1 problem found\n  - only"


def test_cycles_and_order() -> None:
    tasks = [
        AgentTask(id="d", prompt="p", depends_on=["b", "c"]),
        AgentTask(id="b", prompt="p", depends_on=["a"]),
        AgentTask(id="a", prompt="p"),
        AgentTask(id="c", prompt="p", depends_on=["a"]),
    ]
    assert [t.id for t in topological_order(tasks)] == ["a", "b", "c", "d"]
    assert find_cycles(tasks) == []
    loop = [AgentTask(id="s", prompt="p", depends_on=["s"])]
    assert find_cycles(loop) == [["s", "s"]]
    # A long chain does not hit the recursion limit.
    chain = [AgentTask(id=f"n{i}", prompt="p", depends_on=[f"n{i + 1}"]) for i in range(5000)]
    chain.append(AgentTask(id="n5000", prompt="p"))
    assert topological_order(chain)[0].id == "n5000"
