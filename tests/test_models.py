from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from taskexec import (
    Agent,
    AgentTask,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Usage,
)

ids = st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
metadata = st.dictionaries(st.text(max_size=8), json_values, max_size=3)
aware = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def tasks(draw: st.DrawFn) -> AgentTask:
    deps = draw(st.lists(ids, max_size=3, unique=True))
    placeholders = (
        "".join(f" {{{{{d}}}}}" for d in draw(st.lists(st.sampled_from(deps), max_size=2)) if deps)
        if deps
        else ""
    )
    return AgentTask(
        id=draw(ids),
        prompt=draw(st.text(max_size=40).filter(lambda s: "{{" not in s)) + placeholders,
        title=draw(st.none() | st.text(max_size=10)),
        deliverables=draw(st.lists(st.text(max_size=10), max_size=3)),
        success_criteria=draw(st.lists(st.text(max_size=10), max_size=3)),
        agent=draw(st.none() | ids),
        mode=draw(st.sampled_from([None, "llm", "api", "script"])),
        depends_on=deps,
        timeout_s=draw(st.none() | st.floats(0.001, 1e6)),
        max_retries=draw(st.none() | st.integers(0, 10)),
        metadata=draw(metadata),
    )


@st.composite
def results(draw: st.DrawFn) -> ExecutionResult:
    started = draw(aware)
    duration = draw(st.floats(0, 1e5))
    error = draw(
        st.none()
        | st.builds(
            ExecutionError,
            kind=st.sampled_from(["http_status", "timeout", "script_exit", "connection"]),
            message=st.text(max_size=30),
            status_code=st.none() | st.integers(100, 599),
            retryable=st.booleans(),
        )
    )
    return ExecutionResult(
        task_id=draw(ids),
        status=draw(st.sampled_from(list(ExecutionStatus))),
        output=draw(st.none() | st.text(max_size=40)),
        error=error,
        agent=draw(st.text(max_size=8)),
        mode=draw(st.sampled_from(["llm", "api", "script", ""])),
        engine=draw(st.sampled_from(["async", "legacy"])),
        attempts=draw(st.integers(0, 20)),
        started_at=started,
        finished_at=started + timedelta(seconds=duration),
        duration_s=duration,
        usage=Usage(
            input_tokens=draw(st.integers(0, 10**6)), output_tokens=draw(st.integers(0, 10**6))
        ),
        metadata=draw(metadata),
    )


@given(tasks())
def test_task_json_round_trip_is_exact(task: AgentTask) -> None:
    assert AgentTask.model_validate_json(task.model_dump_json()) == task


@given(results())
def test_result_json_round_trip_is_exact(result: ExecutionResult) -> None:
    again = ExecutionResult.model_validate_json(result.model_dump_json())
    assert again == result
    assert again.started_at.tzinfo is not None


def test_status_values_match_the_contract() -> None:
    assert [s.value for s in ExecutionStatus] == [
        "success",
        "failed",
        "timeout",
        "cancelled",
        "skipped",
    ]
    assert ExecutionStatus("timeout") is ExecutionStatus.TIMEOUT


@pytest.mark.parametrize(
    ("fields", "where", "why"),
    [
        ({"id": "", "prompt": "x"}, "id", "at least 1 character"),
        ({"id": "has space", "prompt": "x"}, "id", "pattern"),
        ({"id": "a", "prompt": "x", "timeout_s": 0}, "timeout_s", "greater than 0"),
        (
            {"id": "a", "prompt": "x", "max_retries": -1},
            "max_retries",
            "greater than or equal to 0",
        ),
        ({"id": "a", "prompt": "x", "mode": "grpc"}, "mode", "'llm', 'api' or 'script'"),
        ({"id": "a", "prompt": "use {{design}}"}, "", "depends_on does not list design"),
        ({"id": "a", "prompt": "x", "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_task_validation_names_field_and_reason(
    fields: dict[str, object], where: str, why: str
) -> None:
    with pytest.raises(ValidationError) as info:
        AgentTask.model_validate(fields)
    error = info.value.errors()[0]
    assert ".".join(str(p) for p in error["loc"]) == where
    assert why in error["msg"]


def test_agent_validation() -> None:
    with pytest.raises(ValidationError, match="must start with http"):
        Agent(name="a", base_url="localhost:8000")
    with pytest.raises(ValidationError, match="must name a program"):
        Agent(name="a", command=[])
    assert Agent(name="a", url="http://h/agent/").url == "http://h/agent"
    assert Agent(name="a").provider == "offline"
    assert Agent(name="a").max_retries == 2


def test_api_key_is_secret_in_repr_and_json() -> None:
    agent = Agent(name="a", provider="openai", api_key="sk-very-secret-123")  # type: ignore[arg-type]
    assert "sk-very-secret-123" not in repr(agent)
    assert "sk-very-secret-123" not in agent.model_dump_json()
    assert "sk-very-secret-123" not in str(agent.model_dump())
    assert agent.api_key is not None
    assert agent.api_key.get_secret_value() == "sk-very-secret-123"


def test_bare_prompt_renders_as_itself() -> None:
    assert AgentTask(id="t", prompt="Write it.").render_prompt() == "Write it."


def test_render_fills_placeholders_and_appends_lists() -> None:
    task = AgentTask(
        id="impl",
        prompt="Build from {{design}} and {{ spec }}; keep {{other}}",
        depends_on=["design", "spec", "other"],
        deliverables=["code", "tests"],
        success_criteria=["tests pass"],
    )
    rendered = task.render_prompt({"design": "D1", "spec": "S1"})
    assert rendered == (
        "Build from D1 and S1; keep {{other}}\n\n"
        "Expected deliverables:\n- code\n- tests\n\n"
        "Success criteria:\n- tests pass"
    )
    assert task.placeholders() == ["design", "spec", "other"]


def test_without_done_fills_and_drops_finished_dependencies() -> None:
    task = AgentTask(id="c", prompt="{{a}} then {{b}} then {{a}}", depends_on=["a", "b"])
    resumed = task.without_done({"a": "A-out", "x": "unrelated"})
    assert (resumed.prompt, resumed.depends_on) == ("A-out then {{b}} then A-out", ["b"])
    assert task.without_done({}) is task
    # A dependency that succeeded with no output fills in as empty text, never as a dangling
    # placeholder that names a dependency the task no longer has.
    assert task.without_done({"a": None, "b": "B"}).prompt == " then B then "
    assert AgentTask.model_validate(resumed.model_dump()) == resumed
