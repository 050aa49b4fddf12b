"""``taskexec migrate``: the corpus of legacy programs, rewrite details, and random call graphs.

Every corpus program (tests/migrate_corpus/) runs as a real process before and after
``taskexec migrate --write``; both must print its ``expected.txt`` exactly.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskexec
from taskexec.cli import main as cli

from .conftest import ROOT

CORPUS = Path(__file__).parent / "migrate_corpus"
SRC = str(Path(taskexec.__file__).resolve().parents[1])


def program_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def run_program(folder: Path, **env: str) -> str:
    completed = subprocess.run(
        [sys.executable, "main.py"],
        cwd=folder,
        env=program_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def migrate(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``taskexec migrate ARGS`` in this process; exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli(["migrate", *args])
    finally:
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def sources(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.py"))}


@dataclass
class Case:
    """What the report must say, and what the migrated files must contain."""

    report: list[str]
    migrated: dict[str, list[str]] = field(default_factory=dict)
    changes: bool = True


CASES = {
    "stored_executor": Case(
        report=[
            "main.py:4: import     TaskExecutor from taskexec.sync -> from taskexec",
            "main.py:19: async def  Reviewer.review()",
            "main.py:25: await      self.review(d) in Reviewer.review_all()",
            "main.py:28: await      self.executor.close() (as await ...aclose())",
            "main.py:41: entry      runs under asyncio.run(): main()",
            "2 call site(s) of taskexec.sync in 1 file(s): 2 move to the async API, 0 stay sync",
        ],
        migrated={
            "main.py": [
                "from taskexec import TaskExecutor\n",
                "def make_executor() -> TaskExecutor:\n",
                "    async def review(self, draft: str) -> str:\n",
                "        result = await self.executor.execute(AgentTask(",
                "        return [await self.review(d) for d in drafts]\n",
                "        await self.executor.aclose()\n",
                "    asyncio.run(main())\n",
            ]
        },
    ),
    "two_modules": Case(
        report=[
            "client.py:6: async def  ask()",
            'pipeline.py:7: await      client.ask(executor, "outline", f"Outline {topic}")',
            "pipeline.py:11: await      outline(executor, topic) in run_pipeline()",
            'main.py:10: await      run_pipeline(executor, "the release notes") in main()',
            "main.py:16: entry      runs under asyncio.run(): main()",
        ],
        migrated={
            "client.py": [
                "    return (await executor.execute(AgentTask(id=task_id, prompt=prompt))).output\n"
            ],
            "pipeline.py": ["    steps = [await outline(executor, topic)]\n"],
            "main.py": [
                "import asyncio\n",
                "        await executor.aclose()\n",
                "asyncio.run(main())\n",
            ],
        },
    ),
    "thread_target": Case(
        report=[
            'main.py:15: sync       executor.execute(AgentTask(id="bg", prompt=prompt)) in '
            "background(): it is used in background(), which stays sync: it is a thread target "
            "(threading.Thread() at main.py:27)",
            "main.py:19: async def  foreground()",
            "main.py:20: async obj  TaskExecutor(...) -> taskexec.TaskExecutor(...)",
        ],
        migrated={
            "main.py": [
                "from taskexec.sync import TaskExecutor\n",
                "    executor = TaskExecutor(AGENTS)\n    results.append(executor.execute(",
                "    executor = taskexec.TaskExecutor(AGENTS)\n",
                '    print(await foreground("in the foreground"))\n',
            ]
        },
    ),
    "lambda_callback": Case(
        report=[
            'main.py:11: sync       executor.execute(AgentTask(id="l", prompt=p)) in shout(): '
            "it is called in a lambda at main.py:11",
            "main.py:15: async def  whisper()",
            'main.py:21: entry      runs under asyncio.run(): print(whisper("Hello"))',
        ],
        migrated={"main.py": ['print(shout("Hello"))\nprint(asyncio.run(whisper("Hello")))\n']},
    ),
    "decorator": Case(
        report=[
            'main.py:24: sync       executor.execute(AgentTask(id="s", prompt=f"Summarize {text}"))'
            " in summarize(): it is used in summarize(), which stays sync: it is decorated with "
            "@logged, which calls it without await",
            "main.py:28: async with with TaskExecutor(AGENTS) as executor in translate()",
        ],
        migrated={
            "main.py": [
                "@logged\ndef summarize(text):\n    with TaskExecutor(AGENTS) as executor:\n",
                "async def translate(text):\n"
                "    async with taskexec.TaskExecutor(AGENTS) as executor:",
                '    print(summarize("the meeting"))\n'
                '    print(asyncio.run(translate("the summary")))\n',
            ]
        },
    ),
    "nested": Case(
        report=[
            "main.py:10: async def  run.<locals>.one()",
            "main.py:16: await      one(t) in run()",
        ],
        migrated={
            "main.py": [
                "    async def one(topic):\n        def prompt_for(t):\n",
                "    outputs = [await one(t) for t in topics]\n",
                "    async def _main() -> None:\n        global output\n",
                "    asyncio.run(_main())\n",
            ]
        },
    ),
    "django_view": Case(
        report=[
            'views.py:9: sync       EXECUTOR.execute(AgentTask(id="q", prompt=request["q"])) in '
            "answer(): it is used in answer(), which stays sync: it is handed to framework.path() "
            "at main.py:7 as a callback, called without await",
            'main.py:12: async with with TaskExecutor([Agent(name="ops", provider="offline")])',
        ],
        migrated={
            "main.py": [
                "    print(asyncio.run(warm_up()))\n    for reply in framework.serve(",
            ],
            "views.py": ["from taskexec.sync import TaskExecutor\n"],
        },
    ),
    "with_close": Case(
        report=[
            "main.py:4: import     ProjectOrchestrator from taskexec.sync -> from taskexec",
            "main.py:20: await      orchestrator.execute_tasks(plan()) in run_all()",
            "main.py:27: async with with TaskExecutor(AGENTS) as executor, "
            "ProjectOrchestrator(executor) ...",
        ],
        migrated={
            "main.py": [
                "from taskexec import ProjectOrchestrator, TaskExecutor\n",
                "    results = await orchestrator.execute_tasks(plan())\n"
                "    await orchestrator.aclose()\n    await executor.aclose()\n",
                "    async with TaskExecutor(AGENTS) as executor, ProjectOrchestrator(executor) as",
                "        return (await orchestrator.execute_task(",
            ]
        },
    ),
    "expressions": Case(
        report=[
            "main.py:28: sync       own.execute(task(i)) in any_ok(): it is called in a generator "
            "expression that is consumed lazily",
            "9 call site(s) of taskexec.sync in 1 file(s): 8 move to the async API, 1 stay sync",
        ],
        migrated={
            "main.py": [
                "    outputs = [(await ex.execute(task(i))).output for i in range(n)]\n",
                '    print(f"first: {(await ex.execute(task(0))).output[:20]!r}")\n',
                "    size = sum([len((await ex.execute(task(i))).output) for i in range(n)])\n",
                '    label = "short" if short else (await ex.execute(task(9))).output\n',
                "    print(label, {i: (await ex.execute(task(i))).ok for i in range(n)})\n",
                "    return outputs[-1] if outputs else (await ex.execute(task(5))).output\n",
                "    return any(own.execute(task(i)).ok for i in range(n))\n",
                'asyncio.run(_main())\nprint("any ok", any_ok(3))\n',
            ]
        },
    ),
    "script": Case(
        report=["main.py:9: entry      runs under asyncio.run(): for i in range(3):"],
        migrated={
            "main.py": [
                "# Run each task in turn.\nasync def _main() -> None:\n    global i, result\n",
                "        result = await executor.execute(",
                "    await executor.aclose()\n\n\nasyncio.run(_main())\n",
            ]
        },
    ),
    "getattr_dispatch": Case(
        report=[
            'main.py:12: sync       self.executor.execute(AgentTask(id="g", '
            'prompt=f"Greet {name}")) in Commands.do_greet(): it is used in '
            "Commands.do_greet(), which stays sync: it is "
            "reached through getattr() at main.py:15",
            "main.py:18: async def  standalone()",
        ],
    ),
    "factory_table": Case(
        report=[
            "main.py:4: import     TaskExecutor from taskexec.sync -> from taskexec",
            'main.py:11: await      executor.execute(AgentTask(id="t", prompt="From a table"))',
        ],
        migrated={
            "main.py": [
                'FACTORIES = {"offline": TaskExecutor}\n',
                "    return (await executor.execute(",
            ]
        },
    ),
    "traced": Case(report=["0 call site(s) of taskexec.sync in 1 file(s)"], changes=False),
}


def test_the_corpus_is_complete() -> None:
    assert sorted(CASES) == sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_program(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    folder = tmp_path / name
    shutil.copytree(CORPUS / name, folder)
    expected = (folder / "expected.txt").read_text()
    assert run_program(folder) == expected
    before = sources(folder)

    code, report, _ = migrate(".", cwd=folder)
    assert code == 0
    assert sources(folder) == before, "the report changed a file"
    for line in case.report:
        assert line in report, f"{line!r} not in the report:\n{report}"

    code, _, _ = migrate(".", "--check", cwd=folder)
    assert code == (1 if case.changes else 0)
    code, diff, _ = migrate(".", "--diff", cwd=folder)
    assert code == 0
    assert sources(folder) == before

    code, _, _ = migrate(".", "--write", cwd=folder)
    assert code == 0
    after = sources(folder)
    assert (after != before) == case.changes
    want_diff = "".join(
        "".join(
            difflib.unified_diff(
                before[f].splitlines(keepends=True),
                after[f].splitlines(keepends=True),
                fromfile=f"a/{f}",
                tofile=f"b/{f}",
            )
        )
        for f in sorted(before)
    )
    assert diff == want_diff
    for file, text in after.items():
        ast.parse(text, file)  # every file still parses
        # Comments survive byte for byte.
        comments = [ln.strip() for ln in before[file].splitlines() if ln.strip().startswith("#")]
        assert all(c in text for c in comments)
    for file, snippets in case.migrated.items():
        for snippet in snippets:
            assert snippet in after[file], f"{snippet!r} not in {file}:\n{after[file]}"

    assert run_program(folder) == expected
    code, report, _ = migrate(".", "--write", "--check", cwd=folder)
    assert code == 0, report
    assert sources(folder) == after, "a second --write changed something"


def test_migrated_program_runs_on_both_engines(tmp_path: Path) -> None:
    """The rollback flag still works after a migration: the async API on the legacy engine."""
    folder = tmp_path / "p"
    shutil.copytree(CORPUS / "with_close", folder)
    assert migrate(".", "--write", cwd=folder)[0] == 0
    expected = (folder / "expected.txt").read_text()
    assert run_program(folder, TASKEXEC_ENGINE="legacy") == expected
    assert run_program(folder, TASKEXEC_ENGINE="async") == expected


def test_trace_adds_sites_static_analysis_misses(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    shutil.copytree(CORPUS / "traced", folder)
    trace = tmp_path / "trace.jsonl"
    run_program(folder, TASKEXEC_SYNC_TRACE=str(trace))
    run_program(folder, TASKEXEC_SYNC_TRACE=str(trace))  # appended, not rewritten
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [(Path(r["file"]).name, r["line"], r["shim"]) for r in records] == [
        ("main.py", 15, "taskexec.sync.TaskExecutor.execute")
    ] * 2
    code, report, _ = migrate("main.py", "--trace", str(trace), cwd=folder)
    assert code == 0
    assert (
        'main.py:15: sync       executor.execute(AgentTask(id="t", prompt="Traced")) in run(): '
        "recorded at run time (--trace), but no constructor of a taskexec.sync class in the given "
        "files reaches it [found at run time]"
    ) in report
    assert "1 call site(s)" in report
    # A site recorded in a file that was not given is counted, not guessed at.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"file": "/elsewhere/x.py", "line": 3, "shim": "s"}) + "\n\n")
    code, report, _ = migrate("main.py", "--trace", str(other), cwd=folder)
    assert "1 traced site(s) are outside the given files" in report


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the trace file"),
        ("not json\n", ":1: not a recorded call site"),
        ('{"file": 3, "line": "x"}\n', ":1: file must be a string and line an integer"),
    ],
)
def test_bad_trace_is_a_usage_error(tmp_path: Path, content: str | None, message: str) -> None:
    (tmp_path / "main.py").write_text("print(1)\n")
    trace = tmp_path / "trace.jsonl"
    if content is not None:
        trace.write_text(content)
    code, _, err = migrate(str(tmp_path), "--trace", str(trace))
    assert code == 2
    assert message in err


def test_missing_path_and_unparsable_file(tmp_path: Path) -> None:
    code, _, err = migrate(str(tmp_path / "nope"))
    assert (code, "no such file or directory" in err) == (2, True)
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "good.py").write_text(GOOD)
    code, out, err = migrate(str(tmp_path), "--write")
    assert code == 2
    assert "bad.py" in err
    assert "error: " in out
    assert "async def run" in (tmp_path / "good.py").read_text()  # the others still migrate


def test_without_libcst_the_command_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith(("libcst", "taskexec._migrate.")) and not name.endswith("command"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "libcst", None)
    code, _, err = migrate(".")
    assert code == 2
    assert "pip install 'taskexec[migrate]'" in err


def test_the_command_line_runs_it(tmp_path: Path) -> None:
    """The real entry point, in a process of its own."""
    (tmp_path / "main.py").write_text(GOOD)
    completed = subprocess.run(
        [sys.executable, "-m", "taskexec", "migrate", "--check", "main.py"],
        cwd=tmp_path,
        env=program_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    assert "main.py:6: async def  run()" in completed.stdout


GOOD = """\
from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor
executor = TaskExecutor([Agent(name="a", provider="offline")])


def run():
    return executor.execute(AgentTask(id="t", prompt="x")).output
"""


# -- rewrite details, in-process -------------------------------------------------------------


def migrate_files(tmp_path: Path, files: dict[str, str]) -> tuple[str, dict[str, str]]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    code, report, _ = migrate(str(tmp_path), "--write")
    assert code == 0, report
    out = {name: (tmp_path / name).read_text() for name in files}
    for name, text in out.items():
        ast.parse(text, name)
    # Idempotent.
    assert migrate(str(tmp_path), "--check")[0] == 0
    return report, out


HEADER = "from taskexec import Agent, AgentTask\n"


def test_import_forms_and_partial_moves(tmp_path: Path) -> None:
    report, out = migrate_files(
        tmp_path,
        {
            "a.py": HEADER + "from taskexec.sync import ProjectOrchestrator, TaskExecutor\n"
            "import threading\n\n"
            "def go():\n"
            "    ex = TaskExecutor([Agent(name='a', provider='offline')])\n"
            "    return ex.execute(AgentTask(id='t', prompt='x'))\n\n"
            "def bg():\n"
            "    ProjectOrchestrator().execute_tasks([])\n\n"
            "threading.Thread(target=bg)\n",
            "b.py": "import taskexec.sync\nfrom taskexec import sync\n\n"
            "def one():\n"
            "    return taskexec.sync.TaskExecutor().close()\n\n"
            "def two():\n"
            "    return sync.TaskExecutor().close()\n",
        },
    )
    a, b = out["a.py"], out["b.py"]
    assert "from taskexec.sync import ProjectOrchestrator\nfrom taskexec import TaskExecutor\n" in a
    assert "async def go():" in a
    assert "    return await ex.execute(" in a
    assert "def bg():\n    ProjectOrchestrator().execute_tasks([])" in a
    assert "    return await taskexec.TaskExecutor().aclose()" in b
    # `import taskexec.sync` binds `taskexec` already: no import is added.
    assert b.startswith("import taskexec.sync\nfrom taskexec import sync\n\nasync def one():")
    assert "    return await taskexec.TaskExecutor().aclose()\n" in b.split("def two")[1]
    assert "in bg(): it is used in bg(), which stays sync: it is a thread target" in report


def test_package_with_relative_imports(tmp_path: Path) -> None:
    _, out = migrate_files(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core.py": "def ask(ex, t):\n    return ex.execute(t)\n",
            "pkg/app.py": HEADER + "from taskexec.sync import TaskExecutor\n"
            "from .core import ask\nfrom . import core\n\n"
            "def main():\n"
            "    ex = TaskExecutor([Agent(name='a', provider='offline')])\n"
            "    ask(ex, AgentTask(id='t', prompt='x'))\n"
            "    core.ask(ex, AgentTask(id='u', prompt='y'))\n",
        },
    )
    assert "async def ask(ex, t):\n    return await ex.execute(t)" in out["pkg/core.py"]
    assert "    await ask(ex, " in out["pkg/app.py"]
    assert "    await core.ask(ex, " in out["pkg/app.py"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            "class H(BaseHandler):\n    def handle(self):\n        return EX.execute(T)\n",
            "it is a method of H, a subclass of BaseHandler from outside the given files",
        ),
        (
            "def gen():\n    yield EX.execute(T)\n",
            "it is a generator: it would become an async generator",
        ),
        (
            "class C:\n    def __call__(self):\n        return EX.execute(T)\n",
            "__call__ is a special method, which Python calls without await",
        ),
        (
            "def s():\n    for d in EX.stream(T):\n        print(d)\n    return EX.execute(T)\n",
            "is iterated synchronously (move it to `async with`/`async for` by hand)",
        ),
        (
            "def w():\n    with EX, open('f') as f:\n        return EX.execute(T)\n",
            "also enters a context manager that is not a taskexec.sync object",
        ),
        (
            "import pool\ndef p():\n    pool.use(EX)\n    return EX.execute(T)\n",
            "it is passed to pool.use() at",
        ),
        (
            "def f():\n    return EX.execute(T)\nHANDLERS = {'f': f}\n",
            "it is used as a value at",
        ),
        (
            "def m(pool):\n    return pool.map(EX.execute, [T])\n"
            "def n():\n    return EX.execute(T)\n",
            "its execute method is passed as a value at",
        ),
        (
            "def f(ex: TaskExecutor):\n    return ex.execute(T)\n",
            "no constructor of a taskexec.sync class in the given files reaches it",
        ),
        (
            "def f():\n    return EX.execute(T)\nclass K:\n    value = f()\n",
            "it is called in a class body at",
        ),
        (
            "def f():\n    return EX.execute(T)\ndef g():\n    return EX.execute(T)\n"
            "def h():\n    return (lambda: g())()\n",
            "it is called in a lambda at",
        ),
    ],
)
def test_left_sync_with_a_reason(tmp_path: Path, body: str, reason: str) -> None:
    source = (
        HEADER
        + "from taskexec.sync import TaskExecutor\n"
        + "EX = TaskExecutor([Agent(name='a', provider='offline')])\n"
        + "T = AgentTask(id='t', prompt='x')\n"
        + body
    )
    report, _ = migrate_files(tmp_path, {"m.py": source})
    assert reason in report, report
    assert " sync " in report


def test_already_async_code_is_left_alone_and_a_blocking_call_in_it_is_fixed(
    tmp_path: Path,
) -> None:
    source = (
        HEADER
        + "import asyncio\nfrom taskexec import TaskExecutor as Async\n"
        + "from taskexec.sync import TaskExecutor\n\n"
        + "async def done():\n    async with Async() as ex:\n        return await ex.execute(T)\n\n"
        + "async def broken(ex: TaskExecutor):\n    return ex.execute(T).output\n\n"
        + "def main():\n    broken(TaskExecutor())\n"
    )
    _, out = migrate_files(tmp_path, {"m.py": source})
    text = out["m.py"]
    assert (
        "async def done():\n    async with Async() as ex:\n        return await ex.execute(T)"
        in text
    )
    assert "    return (await ex.execute(T)).output" in text
    assert text.count("import asyncio") == 1


def test_nothing_to_do(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("print('hello')\n")
    code, report, _ = migrate(str(tmp_path / "x.py"), "--check")
    assert code == 0
    assert "0 call site(s) of taskexec.sync in 1 file(s)" in report


# -- random call graphs ----------------------------------------------------------------------


@st.composite
def call_graphs(draw: st.DrawFn) -> dict[str, str]:
    """A program of functions over one shim, in two modules: ``lib.py`` (the shared executor, a
    class that stores it, the lower functions) and ``main.py`` (the rest, which reach ``lib``
    through ``import lib``). Each function may run a task on the shared executor or on one of
    its own, and call lower functions: directly, in a comprehension, an f-string, a conditional,
    an eager or a lazy generator expression, a nested function, or in a thread."""
    n = draw(st.integers(1, 6))
    split = draw(st.integers(0, n))
    lib = [
        "import threading",
        "from taskexec import Agent, AgentTask",
        "from taskexec.sync import TaskExecutor",
        "EX = TaskExecutor([Agent(name='g', provider='offline')])",
        "OUT = []",
        "class Box:",
        "    def __init__(self, ex):",
        "        self.ex = ex",
        "    def ask(self, p):",
        "        return self.ex.execute(AgentTask(id='b', prompt=p)).output[-8:]",
        "BOX = Box(EX)",
    ]
    main = [
        "import threading",
        "from taskexec import Agent, AgentTask",
        "from taskexec.sync import TaskExecutor",
        "import lib",
        "OUT = lib.OUT",
    ]
    for i in range(n):
        here = "" if i < split else "lib."

        def ref(j: int, here: str = here) -> str:
            return f"f{j}" if (j < split) == (here == "") else f"lib.f{j}"

        body = [f"def f{i}(x):", f"    acc = [str(x), 'f{i}']"]
        # A function's own executor can stay sync on its own; the shared one moves as one.
        own = draw(st.booleans())
        ex = "own" if own else f"{here}EX"
        if own:
            body.append("    own = TaskExecutor([Agent(name='o', provider='offline')])")
        if draw(st.booleans()):
            body.append(
                f"    acc.append({ex}.execute(AgentTask(id='t{i}', prompt=str(x))).output[-6:])"
            )
        if draw(st.booleans()):
            body.append(f"    acc.append({here}BOX.ask('b{i}'))")
        for j in draw(st.lists(st.integers(0, max(i - 1, 0)), max_size=3)) if i else []:
            f = ref(j)
            shape = draw(
                st.sampled_from(
                    ["plain", "comp", "fstring", "cond", "eager", "lazy", "nested", "thread"]
                )
            )
            if shape == "plain":
                body.append(f"    acc.append({f}(x + 1))")
            elif shape == "comp":
                body.append(f"    acc += [{f}(k) for k in range(2)]")
            elif shape == "fstring":
                body.append(f"    acc.append(f'<{{{f}(x)}}>')")
            elif shape == "cond":
                body.append(f"    acc.append({f}(x) if x % 2 else 'even')")
            elif shape == "eager":
                body.append(f"    acc.append(str(sum(len({f}(k)) for k in range(2))))")
            elif shape == "lazy":
                body.append(f"    acc.append(str(any({f}(k) for k in range(2))))")
            elif shape == "nested":
                body.append(
                    f"    def inner(y):\n        return {f}(y) + '!'\n    acc.append(inner(x))"
                )
            else:
                body.append(
                    f"    th = threading.Thread(target=lambda: OUT.append({f}(x)))\n"
                    "    th.start()\n    th.join()"
                )
        if own:
            body.append("    own.close()")
        body.append("    return '|'.join(acc)")
        (lib if i < split else main).extend(body)
    entry = f"f{n - 1}" if n - 1 >= split else f"lib.f{n - 1}"
    main += ["if __name__ == '__main__':", f"    print({entry}(1))", "    print(OUT)"]
    return {"lib.py": "\n".join(lib) + "\n", "main.py": "\n".join(main) + "\n"}


def run_in_process(source: str, path: Path) -> str:
    """Run a program as __main__ in this process (a subprocess per example would be slow);
    ``lib`` is imported afresh from the program's folder."""
    out = io.StringIO()
    code = compile(source, str(path), "exec")
    sys.modules.pop("lib", None)
    sys.path.insert(0, str(path.parent))
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__main__", "__file__": str(path)})
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("lib", None)
    return out.getvalue()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=call_graphs())
def test_random_call_graphs_keep_their_output(
    program: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("graph")
    for name, text in program.items():
        (folder / name).write_text(text)
    main = folder / "main.py"
    before = run_in_process(program["main.py"], main)
    assert migrate(str(folder), "--write")[0] == 0
    migrated = {name: (folder / name).read_text() for name in program}
    for name, text in migrated.items():
        ast.parse(text, name)
    assert run_in_process(migrated["main.py"], main) == before
    assert migrate(str(folder), "--check")[0] == 0
    assert {name: (folder / name).read_text() for name in program} == migrated


def test_the_benchmark_codebase_migrates_and_still_runs(tmp_path: Path) -> None:
    """The synthetic codebase of benchmarks/migrate.py is migrated for real, not just timed."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.migrate import write_codebase

    write_codebase(tmp_path, 6)
    before = run_program(tmp_path)
    code, report, _ = migrate(".", "--write", cwd=tmp_path)
    assert code == 0
    assert "6 file(s) would change" in report
    text = (tmp_path / "mod_2.py").read_text()
    # The sync class stays imported for the thread's executor; the annotations of the values
    # that moved name the async class.
    assert "from taskexec.sync import TaskExecutor\n" in text
    assert "async def chain(executor: taskexec.TaskExecutor, prompt: str) -> str:" in text
    assert "    own = TaskExecutor(agents)\n" in text
    assert run_program(tmp_path) == before
    assert migrate(".", "--check", cwd=tmp_path)[0] == 0


def test_the_guide_shows_what_the_codemod_writes(tmp_path: Path) -> None:
    """docs/MIGRATION.md step 3: the program before, and the text shown after --write."""
    guide = (ROOT / "docs" / "MIGRATION.md").read_text()
    step = guide.split("## 3. Let the codemod move the call sites", 1)[1].split("\n## 4.", 1)[0]
    before = step.split("cat > reviewer.py <<'PY'\n", 1)[1].split("\nPY\n", 1)[0] + "\n"
    after = step.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "reviewer.py").write_text(before)
    assert migrate("reviewer.py", "--write", cwd=tmp_path)[0] == 0
    assert (tmp_path / "reviewer.py").read_text() == after


def migrate_and_compare(tmp_path: Path, source: str) -> tuple[str, str]:
    """Migrate a one-file program and check it prints what it printed; report and new text."""
    path = tmp_path / "prog.py"
    path.write_text(source)
    before = run_in_process(source, path)
    report, out = migrate_files(tmp_path, {"prog.py": source})
    assert run_in_process(out["prog.py"], path) == before
    return report, out["prog.py"]


PROGRAM_HEAD = '''\
"""A program."""

from __future__ import annotations

from taskexec import Agent, AgentTask
from taskexec.sync import TaskExecutor

T = AgentTask(id="t", prompt="x")
EX = TaskExecutor([Agent(name="a", provider="offline")])
'''


def test_a_module_level_script_runs_under_one_asyncio_run(tmp_path: Path) -> None:
    _, text = migrate_and_compare(
        tmp_path,
        PROGRAM_HEAD
        + """log = []
try:
    first = EX.execute(AgentTask(id="a", prompt="one"))
except ValueError as err:
    log.append(err)
import json


class Holder:
    value = 1


def helper():
    return "h"


with open(__file__) as fh:
    size = len(fh.read()) > 0
count = 0
count += 1
out = [EX.execute(AgentTask(id=f"c{i}", prompt=str(i))).output[-4:] for i in range(2)]
results = {"r": EX.execute(AgentTask(id="d", prompt="d"))}
print(results["r"].output[-5:], first.output[-5:], out, size, count, helper(), Holder.value)
print(json.dumps(log))
""",
    )
    assert "    global Holder, count, err, fh, first, helper, json, out, results, size\n" in text
    assert text.startswith(
        '"""A program."""\n\nfrom __future__ import annotations\n\nimport asyncio\n'
    )
    assert '\n\nasyncio.run(_main())\nprint(results["r"].output[-5:], ' in text


def test_a_blocking_statement_inside_the_run_keeps_the_module_sync(tmp_path: Path) -> None:
    report, text = migrate_and_compare(
        tmp_path,
        PROGRAM_HEAD
        + """import threading

OWN = TaskExecutor([Agent(name="o", provider="offline")])


def blocking():
    return OWN.execute(T).output[-6:]


threading.Thread(target=blocking).start()
print(EX.execute(T).output[-6:])
print(blocking())
print(EX.execute(T).output[-6:])
""",
    )
    assert (
        "prog.py, which would run under asyncio.run(): line 21 calls blocking(), which blocks on "
        "the sync API"
    ) in report
    assert "asyncio" not in text


def test_values_are_followed_through_containers_methods_and_expressions(tmp_path: Path) -> None:
    report, text = migrate_and_compare(
        tmp_path,
        PROGRAM_HEAD
        + """

class Base:
    def run_one(self, t):
        return self.ex.execute(t).output[-4:]


class Child(Base):
    def __init__(self, ex):
        self.ex = ex

    @staticmethod
    def make(ex):
        return Child(ex=ex)


def use(flag):
    pool = [EX]
    table = {"a": pool[0]}
    for ex in pool:
        print(ex.execute(T).output[-3:])
    print(table.get("a").execute(T).ok, table["a"].execute(T).ok)
    chosen = pool[0] if flag else None
    other = chosen or pool[0]
    if (named := other) is not None:
        print(named.execute(T).status.value)
    first, second = pool[0], pool[0]
    print(first.execute(T).ok, second.execute(T).ok)
    print(Child.make(ex=EX).run_one(T))


use(True)
""",
    )
    assert "async def run_one(self, t):" in text
    assert (
        '    print((await table.get("a").execute(T)).ok, (await table["a"].execute(T)).ok)' in text
    )
    assert "        print((await named.execute(T)).status.value)" in text
    assert "    print(await Child.make(ex=EX).run_one(T))" in text
    assert "0 stay sync" in report


def test_partial_imports_in_parentheses_and_in_functions(tmp_path: Path) -> None:
    _, text = migrate_and_compare(
        tmp_path,
        """import threading

from taskexec import Agent, AgentTask
from taskexec.sync import (
    ProjectOrchestrator,
    TaskExecutor,
)


def go():
    from taskexec.sync import TaskExecutor as TE, ProjectOrchestrator as PO
    ex = TE([Agent(name="a", provider="offline")])
    print(ex.execute(AgentTask(id="t", prompt="x")).output)
    threading.Thread(target=lambda: PO().execute_tasks([])).start()


def bg():
    ProjectOrchestrator().execute_tasks([])


def run():
    ex = TaskExecutor([Agent(name="a", provider="offline")])
    print(ex.execute(AgentTask(id="t", prompt="y")).output)


threading.Thread(target=bg).start()
go()
run()
""",
    )
    assert (
        "from taskexec.sync import (\n    ProjectOrchestrator,\n)\nfrom taskexec import Task"
        in text
    )
    assert "    from taskexec.sync import ProjectOrchestrator as PO; from taskexec import " in text
    assert (
        "threading.Thread(target=bg).start()\n\n\nasync def _main() -> None:\n    await go()\n"
        "    await run()\n\n\nasyncio.run(_main())\n"
    ) in text


def test_a_file_named_twice_is_one_module(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(GOOD)
    code, report, _ = migrate(str(tmp_path), str(tmp_path / "main.py"), "--write")
    assert code == 0
    assert "in 1 file(s)" in report
    text = (tmp_path / "main.py").read_text()
    assert text.count("async def run") == 1
    assert "await await" not in text


def test_a_site_is_recorded_once_per_file_and_process(tmp_path: Path) -> None:
    from taskexec._callsite import CallSite, record_sync_call

    trace = tmp_path / "sites.jsonl"
    site = CallSite(str(tmp_path / "app.py"), 7, {})
    for _ in range(3):
        record_sync_call(str(trace), "taskexec.sync.TaskExecutor.execute", site)
    record_sync_call(str(trace), "taskexec.sync.TaskExecutor.close", site._replace(lineno=8))
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [(r["line"], r["shim"]) for r in lines] == [
        (7, "taskexec.sync.TaskExecutor.execute"),
        (8, "taskexec.sync.TaskExecutor.close"),
    ]


def test_an_import_cycle_is_not_followed_forever(tmp_path: Path) -> None:
    report, out = migrate_files(
        tmp_path,
        {
            "a.py": "from b import helper\n\ndef go():\n    return helper()\n",
            "b.py": "from a import helper\n",
            "main.py": GOOD,
        },
    )
    assert "async def run" in out["main.py"]
    assert "in 3 file(s)" in report


def test_tests_move_only_where_pytest_runs_async_tests(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        HEADER
        + "from taskexec.sync import TaskExecutor\n\n\n"
        + "def test_one():\n"
        + "    with TaskExecutor([Agent(name='a', provider='offline')]) as ex:\n"
        + "        assert ex.execute(AgentTask(id='t', prompt='x')).ok\n"
    )
    code, report, _ = migrate(str(tmp_path), "--check")
    assert code == 0
    assert "in test_one(): it is used in test_one(), which stays sync: it is a test" in report
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\nasyncio_mode = "auto"\n')
    assert migrate(str(tmp_path / "test_x.py"), "--write")[0] == 0
    text = (tmp_path / "test_x.py").read_text()
    assert "async def test_one():\n    async with TaskExecutor(" in text
    assert "        assert (await ex.execute(" in text


def test_line_numbers_match_libcsts_position_provider() -> None:
    import libcst as cst
    from libcst.metadata import MetadataWrapper, PositionProvider

    from taskexec._migrate.discover import line_numbers

    files = [
        *CORPUS.rglob("*.py"),
        Path(__file__),
        ROOT / "src" / "taskexec" / "_migrate" / "flow.py",
    ]
    for file in files:
        if not file.is_file():
            continue
        tree = cst.parse_module(file.read_text().replace("\n", "\r\n", 3))
        want = MetadataWrapper(tree, unsafe_skip_copy=True).resolve(PositionProvider)
        got = line_numbers(tree)
        assert {n: r.start.line for n, r in want.items()} == got, file
