"""The parts of distributed runs that need no server: URLs, settings, the wire format."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from taskexec import (
    AgentTask,
    ClusterUnavailableError,
    ConfigurationError,
    MessageBus,
    TaskExecutor,
)
from taskexec._engines.inprocess import AsyncEngine
from taskexec._engines.legacy import LegacyEngine
from taskexec._engines.registry import EngineSet, select_engine
from taskexec.distributed import (
    BROKER_ENV_VAR,
    NAMESPACE_ENV_VAR,
    RESULTS_ENV_VAR,
    Cluster,
    WorkersEngine,
    redact_url,
)
from taskexec.distributed._config import check_run_id
from taskexec.distributed._wire import (
    TASK_HEADER,
    TASK_VERSION,
    BadMessage,
    TaskMessage,
    addressee,
    decode_task,
    routing_key,
)
from taskexec.flags import use_engine

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
RESULTS = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://user:pa55word@host:5672/vh", "amqp://user:***@host:5672/vh"),
        ("redis://:pa55word@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://host:6379/0?password=pa55word&db=1", "redis://host:6379/0?password=***&db=1"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host/", "amqp://host/"),
        ("amqp://us%40er:p%3Ass@host/", "amqp://us%40er:***@host/"),
        ("amqp://[::1/", "<a URL that cannot be parsed>"),
    ],
)
def test_redact_url_hides_the_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def _renderings(password: str) -> list[str]:
    """Every text a cluster made with ``password`` shows: its repr, its redacted URLs, and
    what its redactor makes of a message and a URL that carry the password."""
    from urllib.parse import quote

    encoded = quote(password, safe="")
    cluster = Cluster(f"amqp://u:{encoded}@h:5672/", f"redis://:{encoded}@h:6379/0")
    redact = cluster.redactor()
    return [
        repr(cluster),
        redact_url(cluster.broker_url),
        redact_url(cluster.results_url),
        redact(f"login failed for {password}!"),
        redact(f"url amqp://u:{encoded}@h"),
    ]


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8))
def test_no_password_survives_redaction_or_repr(password: str) -> None:
    from urllib.parse import quote

    forms = {password, quote(password, safe="")}
    # A password that is part of the fixed text (the default namespace 'taskexec', a field name
    # such as 'delivery') shows there whatever the redaction does: such a password cannot be
    # told apart, so it is left out. The same renderings without it are the reference.
    reference = _renderings("0" * 8)
    assume(not any(form in text for form in forms for text in reference))
    for text in _renderings(password):
        for form in forms:
            assert form not in text


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"broker_url": "http://x/"}, "not a RabbitMQ URL"),
        ({"results_url": "postgres://x/"}, "not a Redis URL"),
        ({"namespace": "a b"}, "namespace"),
        ({"namespace": "ns\n"}, "namespace"),  # Python's "$" matches before a final newline
        ({"delivery_limit": 0}, "delivery_limit"),
        ({"no_worker_wait_s": 0}, "no_worker_wait_s"),
        ({"heartbeat_s": -1}, "heartbeat_s"),
        ({"result_ttl_s": 0}, "result_ttl_s"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_cluster_settings_name_the_setting(fields: dict[str, object], problem: str) -> None:
    values: dict[str, object] = {"broker_url": BROKER, "results_url": RESULTS, **fields}
    with pytest.raises(ConfigurationError, match=problem):
        Cluster(**values)  # type: ignore[arg-type]


def test_a_bad_url_in_an_error_is_redacted() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Cluster("http://u:topsecret99@h/", RESULTS)
    assert "topsecret99" not in str(caught.value)


def test_the_environment_names_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Cluster.from_env() is None
    monkeypatch.setenv(BROKER_ENV_VAR, BROKER)
    with pytest.raises(ConfigurationError, match=RESULTS_ENV_VAR):
        Cluster.from_env()
    monkeypatch.setenv(RESULTS_ENV_VAR, RESULTS)
    monkeypatch.setenv(NAMESPACE_ENV_VAR, "team-a")
    cluster = Cluster.from_env()
    assert cluster is not None
    assert (cluster.broker_url, cluster.results_url, cluster.namespace) == (
        BROKER,
        RESULTS,
        "team-a",
    )
    # Arguments win over the environment.
    other = Cluster.from_env("amqp://other/", None)
    assert other is not None
    assert other.broker_url == "amqp://other/"
    monkeypatch.delenv(BROKER_ENV_VAR)
    with pytest.raises(ConfigurationError, match=BROKER_ENV_VAR):
        Cluster.from_env()


def test_the_dispatch_point_picks_workers_only_when_a_cluster_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engines = EngineSet()
    assert isinstance(select_engine(engines), AsyncEngine)
    monkeypatch.setenv(BROKER_ENV_VAR, BROKER)
    monkeypatch.setenv(RESULTS_ENV_VAR, RESULTS)
    workers = select_engine(engines)
    assert isinstance(workers, WorkersEngine)
    assert select_engine(engines) is workers  # one engine (one connection) per executor
    with use_engine("legacy"):  # the rollback flag wins: in-process, whatever else is set
        assert isinstance(select_engine(engines), LegacyEngine)
    # The executor's own cluster wins over the environment's, and gets an engine of its own.
    own = EngineSet("amqp://own/", "redis://own/0")
    chosen = select_engine(own)
    assert isinstance(chosen, WorkersEngine)
    assert chosen.cluster.broker_url == "amqp://own/"
    # A worker's own executor never sends work to a cluster.
    assert isinstance(select_engine(EngineSet(in_process=True)), AsyncEngine)


def test_names_are_namespaced() -> None:
    cluster = Cluster(BROKER, RESULTS, namespace="ns")
    assert cluster.queue("writer") == "ns.agent.writer"
    assert cluster.dead_letter_queue == "ns.dead"
    assert cluster.events_exchange == "ns.events"
    assert cluster.key("run", "r", "result", "t") == "ns:run:r:result:t"
    assert routing_key("r", "t.1", "finished") == "run.r.task.t.1.finished"


@pytest.mark.parametrize("run_id", ["", "a b", "x" * 65, "../etc", "run:1", "run\n", "run\r\n"])
async def test_bad_run_ids_are_refused(run_id: str) -> None:
    with pytest.raises(ConfigurationError, match="run id"):
        check_run_id(run_id)
    batch = TaskExecutor().parts.batch(
        [], fail_fast=False, limit=1, bus=MessageBus(), run_id=run_id
    )
    with pytest.raises(ConfigurationError, match="run id"):
        await WorkersEngine(Cluster(BROKER, RESULTS)).execute_tasks(batch)


def test_a_task_message_round_trips() -> None:
    message = TaskMessage(
        run_id="r1",
        agent="writer",
        mode="llm",
        task=AgentTask(id="b", prompt="{{a}}", depends_on=["a"]),
        outputs={"a": "out"},
    )
    headers = {TASK_HEADER: TASK_VERSION}
    assert decode_task(message.encode(), headers, "application/json") == message


@pytest.mark.parametrize(
    ("body", "headers", "content_type", "problem"),
    [
        (b"{}", {}, "application/json", "header"),
        (b"{}", None, "application/json", "header"),
        (b"{}", {TASK_HEADER: TASK_VERSION}, "text/plain", "content type"),
        (b"[]", {TASK_HEADER: TASK_VERSION}, "application/json", "invalid task"),
        (
            b'{"run_id":"r","agent":"a","mode":"llm","task":{"id":"t","prompt":"p"},"cmd":"x"}',
            {TASK_HEADER: TASK_VERSION},
            "application/json",
            "invalid task",
        ),
        (
            b'{"run_id":"r","agent":"a","mode":"shell","task":{"id":"t","prompt":"p"}}',
            {TASK_HEADER: TASK_VERSION},
            "application/json",
            "invalid task",
        ),
    ],
    ids=["no-header", "no-headers", "content-type", "not-an-object", "extra-field", "bad-mode"],
)
def test_what_is_not_a_task_is_refused(
    body: bytes, headers: object, content_type: str, problem: str
) -> None:
    with pytest.raises(BadMessage, match=problem):
        decode_task(body, headers, content_type)


def test_another_protocol_version_is_named() -> None:
    with pytest.raises(BadMessage, match="protocol 'task/2'; this worker reads 'task/1'"):
        decode_task(b"{}", {TASK_HEADER: "task/2"}, "application/json")


_TASK = b'{"run_id": "r1", "agent": "a", "task": {"id": "t.1", "prompt": "p"}, "new": 1}'


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (_TASK, {TASK_HEADER: "task/2"}, ("r1", "t.1", "a")),
        (b'{"run_id": "r1", "task": {"id": "t"}}', {TASK_HEADER: TASK_VERSION}, ("r1", "t", "")),
        (_TASK, {}, None),  # not a taskexec message: no run to tell
        (_TASK, None, None),
        (b"{not json", {TASK_HEADER: TASK_VERSION}, None),
        (b'["r1", "t"]', {TASK_HEADER: TASK_VERSION}, None),
        (b'{"run_id": "r 1", "task": {"id": "t"}}', {TASK_HEADER: TASK_VERSION}, None),
        (b'{"run_id": "r1\\n", "task": {"id": "t"}}', {TASK_HEADER: TASK_VERSION}, None),
        (b'{"run_id": "r1", "task": {"id": "t\\n"}}', {TASK_HEADER: TASK_VERSION}, None),
        (b'{"run_id": "r1", "task": {"id": "../t"}}', {TASK_HEADER: TASK_VERSION}, None),
        (b'{"run_id": "r1", "task": "t"}', {TASK_HEADER: TASK_VERSION}, None),
    ],
    ids=[
        "newer",
        "no-agent",
        "no-header",
        "no-headers",
        "not-json",
        "not-object",
        "bad-run",
        "run-newline",
        "task-newline",
        "bad-task",
        "task-not-object",
    ],
)
def test_the_addressee_of_an_unreadable_task_message(
    body: bytes, headers: object, expected: tuple[str, str, str] | None
) -> None:
    assert addressee(body, headers) == expected


def test_an_oversized_message_is_refused() -> None:
    from taskexec.distributed._wire import MAX_MESSAGE_BYTES

    with pytest.raises(BadMessage, match="bytes"):
        decode_task(b" " * (MAX_MESSAGE_BYTES + 1), {TASK_HEADER: TASK_VERSION}, "application/json")


def test_cluster_unavailable_pickles() -> None:
    error = ClusterUnavailableError("cannot reach Redis at redis://:***@h:6379/0: refused")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_the_wait_for_a_worker_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_ENV_VAR, BROKER)
    monkeypatch.setenv(RESULTS_ENV_VAR, RESULTS)
    cluster = Cluster.from_env()
    assert cluster is not None
    assert cluster.no_worker_wait_s == 30.0
    monkeypatch.setenv("TASKEXEC_NO_WORKER_WAIT_S", "2.5")
    cluster = Cluster.from_env()
    assert cluster is not None
    assert cluster.no_worker_wait_s == 2.5
    for bad in ("0", "soon", "-1"):
        monkeypatch.setenv("TASKEXEC_NO_WORKER_WAIT_S", bad)
        with pytest.raises(ConfigurationError, match="TASKEXEC_NO_WORKER_WAIT_S"):
            Cluster.from_env()


def test_the_most_tasks_in_a_message_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_ENV_VAR, BROKER)
    monkeypatch.setenv(RESULTS_ENV_VAR, RESULTS)
    monkeypatch.setenv("TASKEXEC_NO_WORKER_WAIT_S", "2.5")
    cluster = Cluster.from_env()
    assert cluster is not None
    assert cluster.batch == 8
    monkeypatch.setenv("TASKEXEC_BATCH", "1")
    cluster = Cluster.from_env()
    assert cluster is not None
    assert (cluster.batch, cluster.no_worker_wait_s) == (1, 2.5)
    for bad in ("0", "-3", "many", "2.5"):
        monkeypatch.setenv("TASKEXEC_BATCH", bad)
        with pytest.raises(ConfigurationError, match="TASKEXEC_BATCH="):
            Cluster.from_env()


def test_execute_calls_share_a_run_until_a_task_id_comes_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskexec.distributed._engine import _CallRuns

    runs = _CallRuns()
    first, retired = runs.run_for("a")
    assert retired is None
    assert runs.run_for("b") == (first, None)  # distinct ids: one run, no new subscription
    again, retired = runs.run_for("a")  # the same id again must run again: a run of its own
    assert (again != first, retired) == (True, first)
    assert runs.run_for("b") == (again, None)
    monkeypatch.setattr(_CallRuns, "SIZE", 3)
    bounded = _CallRuns()
    ids = [bounded.run_for(str(i))[0] for i in range(7)]
    assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5] != ids[6]
