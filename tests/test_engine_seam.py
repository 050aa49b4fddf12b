"""The engine seam: one function chooses, the core imports no optional part, no import cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

import taskexec
import taskexec._engines.selection
import taskexec.sync
from taskexec import Agent, AgentTask, MissingExtraError, TaskExecutor, flags
from taskexec._engines.base import Batch, Engine, Job
from taskexec._engines.inprocess import AsyncEngine
from taskexec._engines.registry import EngineSet, EngineSpec, register_engine, select_engine
from taskexec._models import EngineName, ExecutionResult

SRC = Path(taskexec.__file__).resolve().parent
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "project.yaml"


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every taskexec module ``name`` imports, anywhere in it: top level, inside functions and
    under ``TYPE_CHECKING`` alike (a type-only cycle is still a cycle for a reader)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from . import x` imports the submodule x (the package is already importing).
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # Import statements only, as import-linter and pylint count them: a submodule is not
        # said to import its package (which is importing already when the submodule runs).
        graph[name] = {target for target, _ in _imports(name, path, known)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)  # other tests rely on the default (deep-plan errors)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_taskexec_is_in_an_import_cycle() -> None:
    graph = _graph()
    assert "taskexec._engines.registry" in graph["taskexec._engines.entry"]  # the graph is real
    assert _cycles(graph) == []


def test_the_core_never_imports_the_distributed_part() -> None:
    graph = _graph()
    importers = sorted(
        name
        for name, edges in graph.items()
        if not name.startswith("taskexec.distributed")
        and any(e.startswith("taskexec.distributed") for e in edges)
    )
    assert importers == []


def test_the_engine_is_chosen_in_one_function() -> None:
    """The rollback flag is read, for choosing an engine, only by select_engine: no other
    module calls get_engine() or environment_engine(), nor reads TASKEXEC_ENGINE."""
    readers = []
    for name, path in _modules().items():
        if name == "taskexec.flags":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            called = isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1]
            if called in ("get_engine", "environment_engine"):
                readers.append((name, node.lineno))
            if isinstance(node, ast.Constant) and node.value == flags.ENV_VAR:
                readers.append((name, node.lineno))
    assert [name for name, _ in readers] == ["taskexec._engines.registry"]
    for name, path in _modules().items():
        source = path.read_text()
        for stale in ("__taskexec_work__", "current_engine", "work_of("):
            assert stale not in source, f"{name} still uses {stale}"


def _python(code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


OPTIONAL = (
    "sorted(m for m in sys.modules if m.split('.')[0] in ('aio_pika', 'redis') "
    "or m.startswith('aiohttp.web'))"
)


def test_importing_taskexec_loads_no_optional_part() -> None:
    done = _python(f"import sys, taskexec, taskexec.sync, taskexec.cli; print({OPTIONAL})")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_taskexec_run_loads_no_optional_part_and_no_mock_server(tmp_path: Path) -> None:
    code = (
        "import sys; from taskexec.cli import main; "
        f"code = main(['run', {str(EXAMPLE)!r}, '--json']); "
        f"print('MODULES', {OPTIONAL}, code, file=sys.stderr)"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "MODULES [] 0" in done.stderr


BLOCK_WORKERS_EXTRA = (
    "import sys\n"
    "for name in ('aio_pika', 'aiormq', 'redis', 'hiredis'):\n"
    "    sys.modules[name] = None  # as if the workers extra were not installed\n"
)


def test_commands_that_need_the_workers_extra_exit_2_naming_it() -> None:
    cases = {
        "worker": ["worker", str(EXAMPLE), "--broker", "amqp://h/", "--results", "redis://h/"],
        "workers": ["workers", "--broker", "amqp://h/", "--results", "redis://h/"],
        "run": ["run", str(EXAMPLE), "--broker", "amqp://h/", "--results", "redis://h/"],
    }
    code = (
        BLOCK_WORKERS_EXTRA
        + "import json\nfrom taskexec.cli import main\n"
        + f"print(json.dumps({{k: main(v) for k, v in {cases!r}.items()}}))\n"
    )
    done = _python(code)
    assert json.loads(done.stdout) == {"worker": 2, "workers": 2, "run": 2}, done.stderr
    assert done.stderr.count("pip install 'taskexec[workers]'") == 3
    assert "Traceback" not in done.stderr


def test_the_worker_command_arguments_that_need_the_extra_are_usage_errors() -> None:
    code = (
        BLOCK_WORKERS_EXTRA
        + "from taskexec.cli import main\n"
        + f"main(['worker', {str(EXAMPLE)!r}, '--concurrency', '5'])\n"
    )
    done = _python(code)
    assert done.returncode == 2
    assert "taskexec[workers]" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_library_call_with_a_cluster_but_no_extra_names_the_extra() -> None:
    code = (
        BLOCK_WORKERS_EXTRA
        + "import os\n"
        + "os.environ['TASKEXEC_BROKER_URL'] = 'amqp://h/'\n"
        + "os.environ['TASKEXEC_RESULTS_URL'] = 'redis://h/'\n"
        + "from taskexec import Agent, AgentTask, MissingExtraError, flags\n"
        + "from taskexec.sync import TaskExecutor\n"
        + "executor = TaskExecutor([Agent(name='a')])\n"
        + "try:\n"
        + "    executor.execute(AgentTask(id='t', prompt='p'))\n"
        + "except MissingExtraError as exc:\n"
        + "    print('MISSING', exc)\n"
        + "with flags.use_engine('legacy'):  # the rollback engine runs in-process: no extra\n"
        + "    print('LEGACY', executor.execute(AgentTask(id='t', prompt='p')).status.value)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert (
        "MISSING a cluster (TASKEXEC_BROKER_URL / --broker) needs the optional part" in done.stdout
    )
    assert "pip install 'taskexec[workers]'" in done.stdout
    assert "LEGACY success" in done.stdout


class _RecordingEngine(Engine):
    """An engine added by registration only: it records what reached it."""

    name: ClassVar[str] = "recording"
    result_engine: ClassVar[EngineName] = "async"
    jobs: ClassVar[list[str]] = []
    closed: ClassVar[int] = 0

    async def execute(self, job: Job) -> ExecutionResult:
        type(self).jobs.append(job.task.id)
        return await AsyncEngine().execute(job)

    async def execute_tasks(self, batch: Batch) -> list[ExecutionResult]:
        type(self).jobs.extend(t.id for t in batch.tasks)
        return await AsyncEngine().execute_tasks(batch)

    async def aclose(self) -> None:
        type(self).closed += 1


@pytest.fixture
def recording_engine() -> Iterator[type[_RecordingEngine]]:
    """A registered engine that applies to calls made with the metadata flag below."""
    _RecordingEngine.jobs, _RecordingEngine.closed = [], 0
    register_engine(
        EngineSpec("recording", lambda s: s.flag == "async", lambda s: _RecordingEngine(), rank=1)
    )
    try:
        yield _RecordingEngine
    finally:
        register_engine(EngineSpec("recording", lambda s: False, lambda s: _RecordingEngine(), 1))


async def test_a_new_engine_is_a_registration_and_every_entry_reaches_it(
    recording_engine: type[_RecordingEngine],
) -> None:
    async with TaskExecutor([Agent(name="a")]) as executor:
        await executor.execute(AgentTask(id="execute", prompt="p"))
        orchestrator = taskexec.ProjectOrchestrator(executor)
        await orchestrator.execute_task(AgentTask(id="execute_task", prompt="p"))
        await orchestrator.execute_tasks([AgentTask(id="execute_tasks", prompt="p")])
        async for _ in orchestrator.stream([AgentTask(id="stream", prompt="p")]):
            pass
        with flags.use_engine("legacy"):  # the rollback flag still wins
            legacy = await executor.execute(AgentTask(id="legacy", prompt="p"))
        assert legacy.engine == "legacy"
    assert recording_engine.jobs == ["execute", "execute_task", "execute_tasks", "stream"]
    assert recording_engine.closed == 1  # opened once by the executor, closed with it


def test_sync_shims_reach_the_registered_engine_too(
    recording_engine: type[_RecordingEngine],
) -> None:
    with taskexec.sync.TaskExecutor([Agent(name="a")]) as executor:
        executor.execute(AgentTask(id="sync", prompt="p"))
        taskexec.sync.ProjectOrchestrator(executor).execute_tasks([AgentTask(id="b", prompt="p")])
    assert recording_engine.jobs == ["sync", "b"]
    assert recording_engine.closed == 1


def test_the_rollback_engine_runs_in_the_callers_thread_without_a_loop() -> None:
    """A blocking caller on the legacy engine never starts the bridge's loop: the entry's
    coroutine finishes in the probe, in this thread."""
    from taskexec import _bridge

    seen: list[str] = []
    original = _bridge._SharedLoop.run

    def spy(self: object, coro: object, context: object) -> object:
        seen.append("loop")
        return original(self, coro, context)  # type: ignore[arg-type]

    _bridge._SharedLoop.run = spy  # type: ignore[method-assign]
    try:
        with flags.use_engine("legacy"):
            executor = taskexec.sync.TaskExecutor([Agent(name="a")])
            result = executor.execute(AgentTask(id="t", prompt="p"))
            results = taskexec.sync.ProjectOrchestrator(executor).run(
                taskexec.Plan(
                    agents=[Agent(name="b")], tasks=[AgentTask(id="u", prompt="q", agent="b")]
                )
            )
            assert seen == []  # execute() and run(): no loop
            executor.close()  # close() is not an entry: it runs on the bridge's loop
        modern = taskexec.sync.TaskExecutor([Agent(name="a")])
        modern.execute(AgentTask(id="t", prompt="p"))
        modern.close()
        assert seen == ["loop", "loop", "loop"]  # the legacy close, then execute and close
    finally:
        _bridge._SharedLoop.run = original  # type: ignore[method-assign]
    assert (result.engine, results[0].engine) == ("legacy", "legacy")


def test_an_engine_set_makes_each_engine_once_and_closes_it() -> None:
    engines = EngineSet()
    first = select_engine(engines)
    assert select_engine(engines) is first
    assert isinstance(first, AsyncEngine)


async def test_a_missing_extra_error_is_a_configuration_error() -> None:
    assert issubclass(MissingExtraError, taskexec.ConfigurationError)
    from taskexec import _plugins

    broken = _plugins.Plugin(
        "taskexec_no_such_module", "nothing", ("taskexec_no_such_module",), lambda s: False
    )
    _plugins.PLUGINS["broken"] = broken
    try:
        with pytest.raises(MissingExtraError, match=r"pip install 'taskexec\[nothing\]'"):
            _plugins.load_plugin("broken", "this test")
    finally:
        del _plugins.PLUGINS["broken"]


def test_the_old_flag_names_still_work_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match="flags.EngineName"):
        assert flags.Engine is flags.EngineName  # type: ignore[attr-defined]
    with pytest.warns(DeprecationWarning, match="flags.ENGINE_NAMES"):
        assert flags.ENGINES == ("async", "legacy")  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        flags.nothing  # type: ignore[attr-defined]  # noqa: B018


async def test_a_bad_run_id_is_refused_in_process_too() -> None:
    orchestrator = taskexec.ProjectOrchestrator(TaskExecutor([Agent(name="a")]))
    with pytest.raises(taskexec.ConfigurationError, match="run id"):
        await orchestrator.execute_tasks([AgentTask(id="t", prompt="p")], run_id="bad!")
    (result,) = await orchestrator.execute_tasks([AgentTask(id="t", prompt="p")], run_id="ok-1")
    assert result.ok


def test_selections_never_show_a_cluster_password() -> None:
    engines = EngineSet("amqp://user:BROKERPW@h/", "redis://:REDISPW@h/0")
    cluster = engines.cluster()
    assert cluster is not None
    shown = repr(cluster) + repr(taskexec._engines.selection.Selection("async", cluster))
    assert "BROKERPW" not in shown
    assert "REDISPW" not in shown


def test_an_installed_extra_that_fails_to_import_is_not_called_missing() -> None:
    """Only a package that cannot be found is a missing extra; one that is installed but
    fails to import raises its own error."""
    code = (
        "import sys, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'redis.asyncio':\n"
        "            raise ImportError('broken build', name='redis.asyncio')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "from taskexec import MissingExtraError\n"
        "from taskexec._plugins import load_plugin\n"
        "try:\n"
        "    load_plugin('workers')\n"
        "except MissingExtraError as exc:\n"
        "    print('MISSING', exc)\n"
        "except ImportError as exc:\n"
        "    print('IMPORT', exc)\n"
    )
    done = _python(code)
    assert "IMPORT broken build" in done.stdout, done.stdout + done.stderr


def test_taskexec_run_with_its_own_engine_flag_announces_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "taskexec", "run", str(EXAMPLE), "--engine", "legacy", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "switched" not in done.stderr
    assert json.loads(done.stdout)["results"][0]["engine"] == "legacy"


def test_the_quickstart_runs_with_no_extra_installed() -> None:
    """`pip install taskexec` alone runs the example plan: no extra's module is needed."""
    code = (
        "import sys\n"
        "for name in ('aio_pika', 'aiormq', 'redis', 'hiredis', 'libcst', 'opentelemetry'):\n"
        "    sys.modules[name] = None  # as if no extra were installed\n"
        "from taskexec.cli import main\n"
        f"sys.exit(main(['run', {str(EXAMPLE)!r}, '--json']))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads(done.stdout)["results"]] == ["success"] * 4
