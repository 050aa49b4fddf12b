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


# -- every check run makes, validate makes ------------------------------------------------------


def test_agents_that_cannot_serve_their_mode_are_plan_problems(tmp_path: Path) -> None:
    text = """
agents:
  - {name: remote, mode: api}
  - {name: scripted, mode: script}
  - {name: chat, provider: no-such-provider}
  - {name: fine}
settings: {default_agent: fine}
tasks:
  - {id: a, prompt: p, agent: fine, mode: api}
  - {id: b, prompt: p, mode: script}
  - {id: c, prompt: p, agent: fine, mode: llm}
"""
    problems = problems_of(write(tmp_path, text))
    assert problems[:3] == [
        "agents[0] (name 'remote').url: api mode needs a url; set url: 'http://...' or use "
        "another mode",
        "agents[1] (name 'scripted').command: script mode needs a command; set command: "
        "['python', 'agent.py'] or use another mode",
        "agents[2] (name 'chat').provider: unknown provider 'no-such-provider'; known providers: "
        "anthropic, gemini, offline, openai. Register others with "
        "taskexec.providers.register_provider() or the 'taskexec.providers' entry point group",
    ]
    assert problems[3:] == [
        "tasks[0] (id 'a').mode: agent 'fine' cannot serve: api mode needs a url; set url: "
        "'http://...' or use another mode",
        "tasks[1] (id 'b').mode: agent 'fine' cannot serve: script mode needs a command; set "
        "command: ['python', 'agent.py'] or use another mode",
    ]


# -- hostile and damaged files ------------------------------------------------------------------

BOMB = """
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.parametrize(
    "where",
    [
        "agents: [{name: a}]\ntasks: [{id: t, prompt: p, metadata: {bomb: *i}}]\n",
        "agents: [{name: a, system_prompt: *i}]\ntasks: [{id: t, prompt: p}]\n",
        "agents: [{name: a}]\ntasks: *i\n",
    ],
)
def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path: Path, where: str) -> None:
    (problem,) = problems_of(write(tmp_path, "bombs:" + BOMB.replace("\n", "\n  ") + "\n" + where))
    assert "expands to more than 2,000,000 nodes through anchors and aliases" in problem
    assert problem.startswith("line ")


def test_an_alias_that_refers_to_itself_is_refused(tmp_path: Path) -> None:
    text = "loop: &l [1, *l]\nagents: [{name: a}]\ntasks: [{id: t, prompt: p}]\n"
    assert problems_of(write(tmp_path, text)) == ["line 1: invalid YAML: an alias refers to itself"]


def test_aliases_within_the_bound_still_work(tmp_path: Path) -> None:
    text = (
        "agents: [{<<: &d {provider: offline, max_retries: 1}, name: a}, {<<: *d, name: b}]\n"
        "settings: {default_agent: a}\n"
        "tasks: [{id: t, prompt: p}]\n"
    )
    plan = load_plan(write(tmp_path, text))
    assert [(a.name, a.max_retries) for a in plan.agents] == [("a", 1), ("b", 1)]


@pytest.mark.parametrize(
    ("data", "byte"),
    [
        (b"agents: []\ntasks: [{id: t, prompt: \xff}]\n", 0xFF),
        ("tasks: [{id: t, prompt: é}]\n".encode("latin-1"), 0xE9),
        ("tasks: []\n".encode("utf-16"), 0xFF),
        (b"tasks: [{id: t, prompt: \xe2\x82}]\n", 0xE2),  # a cut multi-byte character
    ],
)
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_plan_that_is_not_utf8_names_the_byte_offset(
    tmp_path: Path, data: bytes, byte: int, suffix: str
) -> None:
    path = tmp_path / f"plan{suffix}"
    path.write_bytes(data)
    offset = data.index(bytes([byte]))
    assert problems_of(path) == [
        f"byte offset {offset}: not UTF-8 text (byte 0x{byte:02x}); save the plan as UTF-8"
    ]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_bytes(b"\xef\xbb\xbfagents: [{name: a}]\ntasks: [{id: t, prompt: caf\xc3\xa9}]\n")
    assert load_plan(path).tasks[0].prompt == "café"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_plan_nested_thousands_deep_is_a_plan_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * 50_000 + "]" * 50_000)  # deeper than any recursion limit in use
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert caught.value.problems == [
        "(top level): nested too deeply to be a plan (brackets or mappings thousands deep)"
    ]
    assert caught.value.source == str(path)
