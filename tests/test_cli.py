"""The command line, driven as a real subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskexec import ExecutionResult, ExecutionStatus
from taskexec.testing import MockServer

from .conftest import AGENTS_DIR, ROOT, pid_alive, wait_until

EXAMPLE = ROOT / "examples" / "project.yaml"


def taskexec(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskexec", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def lines(path: Path) -> list[ExecutionResult]:
    return [ExecutionResult.model_validate_json(line) for line in path.read_text().splitlines()]


def write_plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def test_blank_cluster_variables_run_in_process() -> None:
    """``TASKEXEC_BROKER_URL=`` (or blanks) is unset, as everywhere else: no distributed run."""
    blank = {"TASKEXEC_BROKER_URL": " ", "TASKEXEC_RESULTS_URL": ""}
    completed = taskexec("run", str(EXAMPLE), env=blank)
    assert completed.returncode == 0, completed.stderr
    assert "run id" not in completed.stderr
    assert "4 tasks: 4 success" in completed.stdout


def test_example_plan_runs_offline(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    completed = taskexec("run", str(EXAMPLE), "--output", str(out))
    assert completed.returncode == 0, completed.stderr
    results = lines(out)
    assert sorted(r.task_id for r in results) == [
        "design",
        "implement-api",
        "implement-storage",
        "review",
    ]
    assert all(r.ok for r in results)
    assert results[-1].task_id == "review"  # it waits for both implementations
    assert "4 tasks: 4 success" in completed.stdout
    # Not a terminal: one plain progress line per task on stderr.
    assert completed.stderr.count("success") == 4


def test_json_output_and_legacy_engine() -> None:
    completed = taskexec("run", str(EXAMPLE), "--json", "--engine", "legacy", "--concurrency", "2")
    assert completed.returncode == 0, completed.stderr
    results = [ExecutionResult.model_validate(r) for r in json.loads(completed.stdout)["results"]]
    assert [r.engine for r in results] == ["legacy"] * 4


def test_failure_exits_1_and_skips_dependents(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        f"""
agents:
  - {{name: broken, mode: script, command: ["{sys.executable}", "{AGENTS_DIR / "fail.py"}"]}}
  - {{name: fine}}
tasks:
  - {{id: a, prompt: x, agent: broken}}
  - {{id: b, prompt: y, agent: fine, depends_on: [a]}}
""",
    )
    out = tmp_path / "r.jsonl"
    completed = taskexec("run", str(plan), "--output", str(out), env={"PYTHONWARNINGS": "ignore"})
    assert completed.returncode == 1
    assert [(r.task_id, r.status) for r in lines(out)] == [
        ("a", ExecutionStatus.FAILED),
        ("b", ExecutionStatus.SKIPPED),
    ]
    assert "something went wrong in the agent" in completed.stderr


def test_bad_plan_exits_2_with_the_field_path_and_no_traceback(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path, "agents: [{name: a}]\ntasks:\n  - {id: t, prompt: p, timeout_s: -1}\n"
    )
    for command in ("run", "validate"):
        completed = taskexec(command, str(plan))
        assert completed.returncode == 2
        assert str(plan) in completed.stderr
        assert "tasks[0] (id 't').timeout_s: Input should be greater than 0" in completed.stderr
        assert "Traceback" not in completed.stderr


def test_unknown_provider_is_a_plan_error(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path, "agents: [{name: a, provider: nope}]\ntasks: [{id: t, prompt: p}]\n"
    )
    completed = taskexec("validate", str(plan))
    assert completed.returncode == 2
    assert "agents[0] (name 'a').provider: unknown provider 'nope'" in completed.stderr


def test_validate_and_version() -> None:
    completed = taskexec("validate", str(EXAMPLE))
    assert (completed.returncode, completed.stdout.strip()) == (
        0,
        f"{EXAMPLE}: ok (4 tasks, 3 agents)",
    )
    version = taskexec("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("taskexec 0.")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert taskexec("run", str(EXAMPLE), "--resume").returncode == 2
    assert taskexec("run", str(EXAMPLE), "--concurrency", "0").returncode == 2
    plan = write_plan(tmp_path, "agents: [{name: a}]\ntasks: [{id: t, prompt: p}]\n")
    bad_env = taskexec("run", str(plan), env={"TASKEXEC_MAX_CONCURRENCY": "lots"})
    assert bad_env.returncode == 2
    assert "TASKEXEC_MAX_CONCURRENCY" in bad_env.stderr
    assert "Traceback" not in bad_env.stderr


def _llm_plan(
    tmp_path: Path, server: MockServer, ids: list[str], base_url: str | None = None
) -> Path:
    base = base_url or server.openai_base_url
    tasks = "\n".join(f"  - {{id: {i}, prompt: 'task {i}'}}" for i in ids)
    return write_plan(
        tmp_path,
        f"agents: [{{name: gpt, provider: openai, base_url: '{base}', max_retries: 0}}]\n"
        f"tasks:\n{tasks}\n",
    )


def test_resume_runs_only_what_did_not_succeed(tmp_path: Path, mock_server: MockServer) -> None:
    plan = _llm_plan(tmp_path, mock_server, ["a", "b", "c", "d"])
    out = tmp_path / "r.jsonl"
    mock_server.set_faults(["400"])  # the first request fails
    first = taskexec("run", str(plan), "--output", str(out), "--concurrency", "1")
    assert first.returncode == 1
    assert [r.status for r in lines(out)].count(ExecutionStatus.SUCCESS) == 3
    assert mock_server.stats.chat_requests == 4
    second = taskexec("run", str(plan), "--output", str(out), "--resume")
    assert second.returncode == 0, second.stderr
    assert mock_server.stats.chat_requests == 5  # only the failed task ran again
    results = lines(out)
    assert len(results) == 5  # appended, not rewritten
    latest = {r.task_id: r.status for r in results}
    assert set(latest.values()) == {ExecutionStatus.SUCCESS}
    assert "4 tasks: 4 success" in second.stdout


def test_resume_fills_placeholders_of_finished_dependencies(
    tmp_path: Path, mock_server: MockServer
) -> None:
    plan = write_plan(
        tmp_path,
        f"""
agents: [{{name: gpt, provider: openai, base_url: '{mock_server.openai_base_url}', max_retries: 0}}]
tasks:
  - {{id: design, prompt: 'design it'}}
  - {{id: build, prompt: 'build from <{{{{design}}}}>', depends_on: [design]}}
""",
    )
    out = tmp_path / "r.jsonl"
    first = taskexec("run", str(plan), "--output", str(out))
    assert first.returncode == 0
    # Pretend the build failed: append a failed line for it, then resume.
    failed = lines(out)[1].model_copy(update={"status": ExecutionStatus.FAILED})
    with out.open("a") as f:
        f.write(failed.model_dump_json() + "\n")
    mock_server.reset()
    second = taskexec("run", str(plan), "--output", str(out), "--resume")
    assert second.returncode == 0, second.stderr
    (request,) = mock_server.recorded
    design_output = lines(out)[0].output
    assert request.json()["messages"][-1]["content"] == f"build from <{design_output}>"


def test_missing_key_is_a_configuration_failure_naming_the_variable(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path, "agents: [{name: gpt, provider: openai}]\ntasks: [{id: t, prompt: p}]\n"
    )
    out = tmp_path / "r.jsonl"
    completed = taskexec("run", str(plan), "--output", str(out))
    assert completed.returncode == 1
    (result,) = lines(out)
    assert result.error is not None
    assert result.error.kind == "configuration"
    assert "OPENAI_API_KEY" in result.error.message
    assert result.output is None


def test_the_key_appears_nowhere(tmp_path: Path, mock_server: MockServer) -> None:
    secret = "sk-cli-SECRET-9c1e5b"
    tasks = "\n".join(f"  - {{id: {i}, prompt: 'task {i}'}}" for i in "ab")
    # The operator points the vendor's endpoint at the server: the key may go there.
    plan = write_plan(
        tmp_path, f"agents: [{{name: gpt, provider: openai, max_retries: 0}}]\ntasks:\n{tasks}\n"
    )
    out = tmp_path / "r.jsonl"
    mock_server.set_faults(["401"])  # echoes the key back in its body
    env = {"OPENAI_API_KEY": secret, "OPENAI_BASE_URL": mock_server.openai_base_url}
    completed = taskexec("run", str(plan), "--output", str(out), "--concurrency", "1", env=env)
    assert completed.returncode == 1
    assert mock_server.recorded[0].headers["authorization"] == f"Bearer {secret}"
    assert "Incorrect API key provided: ***" in out.read_text()
    for text in (completed.stdout, completed.stderr, out.read_text()):
        assert secret not in text


def test_a_plan_cannot_send_the_operators_key_to_its_own_host(
    tmp_path: Path, mock_server: MockServer
) -> None:
    secret = "sk-cli-SECRET-9c1e5b"
    plan = _llm_plan(tmp_path, mock_server, ["a"])  # base_url: the plan's own choice of host
    completed = taskexec("run", str(plan), env={"OPENAI_API_KEY": secret})
    assert completed.returncode == 0, completed.stderr
    assert "authorization" not in mock_server.recorded[0].headers


#: The signals a run cancels cleanly on, their exit codes and the names results give them.
INTERRUPTS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


@pytest.mark.parametrize(("signum", "code"), INTERRUPTS)
def test_ctrl_c_and_sigterm_cancel_cleanly(tmp_path: Path, signum: int, code: int) -> None:
    pidfiles = [tmp_path / f"pids{i}" for i in range(3)]
    agents = "\n".join(
        f"  - {{name: s{i}, mode: script, "
        f'command: ["{sys.executable}", "{AGENTS_DIR / "sleepy.py"}", "{p}"]}}'
        for i, p in enumerate(pidfiles)
    )
    tasks = "\n".join(f"  - {{id: t{i}, prompt: x, agent: s{i}}}" for i in range(3))
    tasks += "\n  - {id: after, prompt: y, agent: s0, depends_on: [t0]}"
    plan = write_plan(tmp_path, f"agents:\n{agents}\ntasks:\n{tasks}\n")
    out = tmp_path / "r.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-m",
            "taskexec",
            "run",
            str(plan),
            "--output",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: all(p.exists() and len(p.read_text().split()) == 2 for p in pidfiles),
            "the scripts started",
        )
        pids = [int(pid) for p in pidfiles for pid in p.read_text().split()]
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert not any(pid_alive(pid) for pid in pids)
    results = {r.task_id: r for r in lines(out)}
    assert sorted(results) == ["after", "t0", "t1", "t2"]
    assert {r.status for r in results.values()} == {ExecutionStatus.CANCELLED}
    # The three that were running report what ran; the one that never started, nothing.
    for ran in ("t0", "t1", "t2"):
        assert results[ran].attempts == 1
        assert results[ran].duration_s > 0
        assert results[ran].error is not None
        assert results[ran].error.message == "cancelled while running"
    assert (results["after"].attempts, results["after"].duration_s) == (0, 0)
    name = SIGNAL_NAMES[signum]
    assert results["after"].error is not None
    assert results["after"].error.message == f"cancelled: the run was interrupted ({name})"
    assert "4 cancelled" in stdout


def test_mock_server_command_serves_until_interrupted() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "taskexec", "mock-server", "--port", "0", "--latency", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("taskexec mock server listening on http://127.0.0.1:")
        url = first.rsplit(" ", 1)[1].strip()
        import httpx

        reply = httpx.post(f"{url}/agent", json={"prompt": "hi"}, timeout=10)
        assert reply.json() == {"output": "mock reply to: hi"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.communicate()


def test_mock_server_rejects_unknown_faults() -> None:
    completed = taskexec("mock-server", "--port", "0", "--faults", "boom")
    assert completed.returncode == 2
    assert "unknown fault 'boom'" in completed.stderr


@pytest.mark.parametrize("argv", [["validate", str(EXAMPLE)], ["validate", "missing.yaml"]])
def test_main_runs_in_process_and_leaves_its_callers_objects_collectable(
    argv: list[str],
) -> None:
    """The command keeps what existed before it out of the collector's passes while it runs
    (gc.freeze), and hands it back when it returns, however it returns."""
    import gc

    from taskexec import cli

    seen: list[int] = []
    real_handler = cli.validate.validate

    def spying(args: object) -> int:
        seen.append(gc.get_freeze_count())
        return real_handler(args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.validate, "validate", spying)
        code = cli.main(argv)
    assert code == (0 if argv[1] != "missing.yaml" else 2)
    assert len(seen) == 1
    assert seen[0] > 0
    assert gc.get_freeze_count() == 0


def test_main_leaves_what_its_caller_froze_frozen() -> None:
    import gc

    from taskexec import cli

    gc.freeze()
    try:
        assert cli.main(["validate", str(EXAMPLE)]) == 0
        # Still frozen (an unfreeze empties it; a frozen object freed meanwhile leaves it).
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, stderr gets a live progress bar instead of one line per task."""
    import pty

    out = tmp_path / "r.jsonl"
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs the CLI
        os.environ["COLUMNS"] = "120"
        os.execv(
            sys.executable,
            [sys.executable, "-m", "taskexec", "run", str(EXAMPLE), "--output", str(out)],
        )
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0
    assert "tasks" in screen
    assert "4/4" in screen
    assert "running" in screen
    assert "[1/4]" not in screen  # the plain format is for pipes only
    assert len(lines(out)) == 4


@pytest.mark.parametrize("engine", ["async", "legacy"])
@pytest.mark.parametrize(
    ("first", "second", "code"),
    [
        (signal.SIGINT, signal.SIGINT, 130),
        (signal.SIGTERM, signal.SIGTERM, 143),
        (signal.SIGINT, signal.SIGTERM, 130),
        (signal.SIGHUP, signal.SIGHUP, 129),
    ],
)
def test_a_second_signal_exits_at_once_and_leaves_no_child(
    tmp_path: Path, engine: str, first: int, second: int, code: int
) -> None:
    pidfile = tmp_path / "pid"
    agent = AGENTS_DIR / "stubborn.py"  # ignores SIGTERM: the first signal's cleanup must wait
    plan = write_plan(
        tmp_path,
        f"agents: [{{name: s, mode: script, "
        f'command: ["{sys.executable}", "{agent}", "{pidfile}"]}}]\n'
        "tasks: [{id: t, prompt: x}]\n",
    )
    process = subprocess.Popen(
        [
            *(sys.executable, "-W", "ignore::DeprecationWarning", "-m", "taskexec", "run"),
            *(str(plan), "--engine", engine),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the script started")
        script = int(pidfile.read_text())
        process.send_signal(first)
        wait_until(lambda: pid_alive(script), "the script survived SIGTERM")  # it ignores it
        # Two signals sent back to back can merge into one pending signal in the kernel; a
        # pause keeps them two. Nothing here measures time.
        time.sleep(0.2)
        process.send_signal(second)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert process.returncode == code
    assert "cancelling" in stderr
    assert "1 tasks:" not in stdout  # left at once: no summary, unlike a clean first signal
    # Killed before the command exited: SIGKILL lands at once, reaping may take a moment.
    wait_until(lambda: not pid_alive(script), "the script is gone", timeout_s=5)


@pytest.mark.parametrize(("signum", "code"), INTERRUPTS)
def test_ctrl_c_and_sigterm_on_the_legacy_engine(tmp_path: Path, signum: int, code: int) -> None:
    pidfile = tmp_path / "pids"
    plan = write_plan(
        tmp_path,
        f"agents: [{{name: s, mode: script, "
        f'command: ["{sys.executable}", "{AGENTS_DIR / "sleepy.py"}", "{pidfile}"]}}]\n'
        "tasks: [{id: a, prompt: x}, {id: b, prompt: y}]\n",
    )
    out = tmp_path / "r.jsonl"
    process = subprocess.Popen(
        [
            *(sys.executable, "-W", "ignore::DeprecationWarning", "-m", "taskexec", "run"),
            *(str(plan), "--engine", "legacy", "--output", str(out)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, "a started")
        pids = [int(p) for p in pidfile.read_text().split()]
        process.send_signal(signum)
        stdout, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == code
    assert not any(pid_alive(p) for p in pids)
    results = {r.task_id: r for r in lines(out)}
    assert sorted(results) == ["a", "b"]
    assert {(r.status, r.engine) for r in results.values()} == {
        (ExecutionStatus.CANCELLED, "legacy")
    }
    assert (results["a"].attempts, results["b"].attempts) == (1, 0)
    assert results["a"].duration_s > 0
    assert "2 cancelled" in stdout


def test_under_nohup_a_hangup_leaves_the_run_going(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    plan = write_plan(
        tmp_path,
        f"agents: [{{name: s, mode: script, "
        f'command: ["{sys.executable}", "{AGENTS_DIR / "gated.py"}", "{gate}"]}}]\n'
        "tasks: [{id: t, prompt: x}]\n",
    )
    out = tmp_path / "r.jsonl"
    # As nohup starts it: SIGHUP ignored from the start.
    starter = (
        "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        "from taskexec.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    process = subprocess.Popen(
        [
            *(sys.executable, "-W", "ignore::DeprecationWarning", "-c", starter),
            *("run", str(plan), "--output", str(out)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _children(process.pid), "the script started")
        process.send_signal(signal.SIGHUP)  # ignored: the kernel discards it at once
        gate.touch()
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert [(r.task_id, r.status, r.output) for r in lines(out)] == [
        ("t", ExecutionStatus.SUCCESS, "done")
    ]


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("closed", ["stdout", "stderr", "both"])
def test_a_closed_stdout_or_stderr_loses_no_result(tmp_path: Path, closed: str) -> None:
    """A reader that went away (``| head``, a terminal that hung up) ends neither the run nor
    its results: every task still gets its line, and the exit code is the run's."""
    tasks = "\n".join(f"  - {{id: t{i}, prompt: task {i}}}" for i in range(30))
    plan = write_plan(tmp_path, f"agents: [{{name: a}}]\ntasks:\n{tasks}\n")
    out = tmp_path / "r.jsonl"
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to this pipe fails with EPIPE, from the first one on
    try:
        streams = {
            "stdout": write_end if closed in ("stdout", "both") else subprocess.PIPE,
            "stderr": write_end if closed in ("stderr", "both") else subprocess.PIPE,
        }
        completed = subprocess.run(
            [sys.executable, "-m", "taskexec", "run", str(plan), "--output", str(out)],
            **streams,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert completed.returncode == 0, completed.stderr
    assert sorted(r.task_id for r in lines(out)) == sorted(f"t{i}" for i in range(30))
    if closed == "stdout":
        assert "[30/30] success" in completed.stderr  # the stream that is open still works
    if closed == "stderr":
        assert "30 tasks: 30 success" in completed.stdout


def test_a_best_effort_stream_drops_what_its_reader_cannot_take() -> None:
    """The stream wrapper itself: a pipe whose reader is gone is pointed at /dev/null after the
    first failed write, so what is still buffered cannot fail again at exit."""
    from taskexec.cli._output import BestEffortStream

    missing = BestEffortStream(None)  # ``2>&-``: Python has no stream at all
    assert (missing.write("x"), missing.isatty(), missing.encoding) == (1, False, "utf-8")
    with pytest.raises(io.UnsupportedOperation):
        missing.fileno()
    read_end, write_end = os.pipe()
    os.close(read_end)
    raw = open(write_end, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
    try:
        stream = BestEffortStream(raw)
        assert stream.encoding == "utf-8"
        assert stream.write("lost\n") == 5
        assert stream.lost
        assert not stream.isatty()
        assert os.readlink(f"/proc/self/fd/{write_end}") == os.devnull
        raw.write("buffered\n")
        raw.flush()  # lands in /dev/null: no error
        assert stream.write("more\n") == 5
        stream.flush()
    finally:
        raw.close()


@pytest.mark.parametrize("closing", ["2>&-", ">&-", ">&- 2>&-", "<&- >&- 2>&-"])
def test_descriptors_closed_before_the_start_lose_no_result(tmp_path: Path, closing: str) -> None:
    """``2>&-`` leaves Python no stream at all (``sys.stderr is None``): the run still runs and
    records every task."""
    out = tmp_path / "r.jsonl"
    command = " ".join(
        shlex.quote(a)
        for a in (sys.executable, "-m", "taskexec", "run", str(EXAMPLE), "--output", str(out))
    )
    completed = subprocess.run(
        ["sh", "-c", f"{command} {closing}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert len(lines(out)) == 4
    assert all(r.ok for r in lines(out))
    if closing == "2>&-":
        assert "4 tasks: 4 success" in completed.stdout


@pytest.mark.parametrize("engine", ["async", "legacy"])
def test_a_results_file_that_cannot_be_written_stops_the_run(tmp_path: Path, engine: str) -> None:
    """A full disk (``/dev/full`` fails every write with ENOSPC): the run stops at the first
    line it cannot record, every task still gets its result (on stdout with ``--json``), and
    the message names the file and the cause."""
    tasks = "\n".join(f"  - {{id: t{i}, prompt: p{i}}}" for i in range(6))
    plan = write_plan(
        tmp_path,
        f"agents: [{{name: e, mode: script, "
        f'command: ["{sys.executable}", "{AGENTS_DIR / "echo.py"}"]}}]\ntasks:\n{tasks}\n',
    )
    completed = subprocess.run(
        [
            *(sys.executable, "-W", "ignore::DeprecationWarning", "-m", "taskexec", "run"),
            *(str(plan), "--engine", engine, "--concurrency", "1"),
            *("--output", "/dev/full", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    assert "cannot write to /dev/full: No space left on device; the run was stopped" in (
        completed.stderr
    )
    assert "Traceback" not in completed.stderr
    results = [ExecutionResult.model_validate(r) for r in json.loads(completed.stdout)["results"]]
    assert [r.task_id for r in results] == [f"t{i}" for i in range(6)]
    assert results[0].status is ExecutionStatus.SUCCESS  # its line was the one that failed
    assert results[-1].status is ExecutionStatus.CANCELLED  # the run stopped long before it
    for r in results:
        if r.status is not ExecutionStatus.SUCCESS:
            assert r.status is ExecutionStatus.CANCELLED
            assert r.error is not None
            assert "its --output file could not be written" in r.error.message


# -- files and settings that are not what they should be ---------------------------------------


def test_validate_rejects_what_run_would_reject(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        "agents: [{name: remote, mode: api}, {name: s, mode: script}]\n"
        "tasks: [{id: t, prompt: x, agent: remote}, {id: u, prompt: x, agent: s}]\n",
    )
    for command in ("validate", "run"):
        completed = taskexec(command, str(plan))
        assert completed.returncode == 2, completed.stderr
        assert f"taskexec: invalid plan {plan}: 2 problems found" in completed.stderr
        assert "agents[0] (name 'remote').url: api mode needs a url" in completed.stderr
        assert "agents[1] (name 's').command: script mode needs a command" in completed.stderr
        assert "Traceback" not in completed.stderr


def test_an_alias_bomb_exits_2_at_once(tmp_path: Path) -> None:
    levels = [f"l0: &l0 [{', '.join(['x'] * 10)}]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 12)]
    body = "\n".join(f"  {line}" for line in levels)
    plan = write_plan(
        tmp_path, f"x:\n{body}\nagents: [{{name: a}}]\ntasks: [{{id: t, prompt: p}}]\n"
    )
    for command in ("validate", "run"):
        completed = taskexec(command, str(plan), timeout=30)
        assert completed.returncode == 2
        assert "expands to more than 2,000,000 nodes" in completed.stderr
        assert str(plan) in completed.stderr


def test_a_plan_that_is_not_utf8_exits_2_naming_file_and_offset(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(b"agents: [{name: a}]\ntasks: [{id: t, prompt: caf\xe9}]\n")
    completed = taskexec("run", str(plan))
    assert completed.returncode == 2
    assert f"{plan}: 1 problem found" in completed.stderr
    assert "byte offset 47: not UTF-8 text (byte 0xe9)" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_resume_skips_damaged_lines_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    assert taskexec("run", str(EXAMPLE), "--output", str(out)).returncode == 0
    good = out.read_bytes().splitlines(keepends=True)
    # design: a non-UTF-8 line after it; review: its line cut short by a "crash" mid-write.
    damaged = good[0] + b'{"task_id": "x\xff\xfe"}\n' + b"".join(good[1:-1]) + good[-1][:40]
    out.write_bytes(damaged)
    resumed = taskexec("run", str(EXAMPLE), "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{out}:2: skipping a line that is not UTF-8 (byte offset " in resumed.stderr
    assert f"{out}:{len(good) + 1}: skipping a line that is not a result (cut short)" in (
        resumed.stderr
    )
    assert "resuming, 3 task(s) already succeeded" in resumed.stderr
    # The new line starts on a line of its own: the file's last result is readable again.
    last = out.read_bytes().splitlines()[-1]
    assert ExecutionResult.model_validate_json(last).task_id == "review"
    again = taskexec("run", str(EXAMPLE), "--output", str(out), "--resume")
    assert "resuming, 4 task(s) already succeeded" in again.stderr
    assert "skipping a line that is not a result (cut short)" not in again.stderr


@pytest.mark.parametrize("value", ["LEGACY", " legacy ", "Legacy"])
def test_the_engine_variable_is_read_like_the_library_reads_it(value: str) -> None:
    completed = taskexec("run", str(EXAMPLE), "--json", env={"TASKEXEC_ENGINE": value})
    assert completed.returncode == 0, completed.stderr
    assert {r["engine"] for r in json.loads(completed.stdout)["results"]} == {"legacy"}


def test_a_blank_engine_variable_means_the_default() -> None:
    completed = taskexec("run", str(EXAMPLE), "--json", env={"TASKEXEC_ENGINE": " "})
    assert completed.returncode == 0, completed.stderr
    assert {r["engine"] for r in json.loads(completed.stdout)["results"]} == {"async"}


def test_flags_win_over_a_bad_environment() -> None:
    env = {"TASKEXEC_ENGINE": "turbo", "TASKEXEC_MAX_CONCURRENCY": "lots"}
    bad = taskexec("run", str(EXAMPLE), "--json", env=env)
    assert bad.returncode == 2
    assert "TASKEXEC_ENGINE='turbo' is not an engine" in bad.stderr
    fixed = taskexec(
        "run", str(EXAMPLE), "--json", "--engine", "ASYNC", "--concurrency", "2", env=env
    )
    assert fixed.returncode == 0, fixed.stderr
    assert {r["engine"] for r in json.loads(fixed.stdout)["results"]} == {"async"}
    wrong_flag = taskexec("run", str(EXAMPLE), "--engine", "turbo")
    assert wrong_flag.returncode == 2
    assert "--engine='turbo' is not an engine" in wrong_flag.stderr


def test_mock_server_on_a_taken_port_exits_2(mock_server: MockServer) -> None:
    completed = taskexec("mock-server", "--port", str(mock_server.port))
    assert completed.returncode == 2
    assert f"cannot listen on 127.0.0.1:{mock_server.port}: the port is taken" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_mock_server_in_thread_exits_quietly_with_connections_open() -> None:
    program = """
import socket
import time
import httpx
from taskexec.testing import mock_server_in_thread

with mock_server_in_thread() as server:
    client = httpx.Client()  # a keep-alive connection, left open
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post(server.openai_base_url + "/chat/completions", json=body).is_success
    half = socket.create_connection(("127.0.0.1", server.port))  # a request cut in the middle
    half.sendall(
        b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: mock\\r\\nContent-Length: 10\\r\\n\\r\\nab"
    )
    slow = socket.create_connection(("127.0.0.1", server.port))  # a reply not sent yet
    request = b'{"model": "m", "messages": [{"role": "user", "content": "[[latency=60]]"}]}'
    slow.sendall(
        b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: mock\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
        % (len(request), request)
    )
    while server.stats.in_flight < 1:
        time.sleep(0.01)
for sock in (client, half, slow):  # the client side of the test, closed after the server
    sock.close()
print("done")
"""
    completed = subprocess.run(
        # -W default shows any ResourceWarning (an unclosed socket or transport); -X dev would
        # also flag slow callbacks, which a loaded machine produces without any defect.
        [sys.executable, "-W", "default", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "done\n"
    assert completed.stderr == ""


def test_control_characters_never_reach_the_terminal(tmp_path: Path) -> None:
    nasty = "A\x1b[2J\x07B\x00C\u202eD\x9bE\r\nF"
    code = (
        "import json, sys; sys.stdin.read(); "
        f"print(json.dumps({{'output': {nasty!r}}})); "
        f"sys.stderr.write({nasty!r})"
    )
    plan = write_plan(
        tmp_path,
        "agents:\n"
        f"  - {{name: ok, mode: script, command: {json.dumps([sys.executable, '-c', code])}}}\n"
        "  - name: bad\n"
        "    mode: script\n"
        f"    command: {json.dumps([sys.executable, '-c', code + '; sys.exit(1)'])}\n"
        "tasks: [{id: good, prompt: x, agent: ok}, {id: broken, prompt: x, agent: bad}]\n",
    )
    out = tmp_path / "r.jsonl"
    completed = taskexec("run", str(plan), "--output", str(out))
    assert completed.returncode == 1
    for stream in (completed.stdout, completed.stderr):
        assert not {"\x1b", "\x07", "\x00", "\u202e", "\x9b", "\r"} & set(stream)
    assert "A\\x1b[2J\\x07B\\x00C\\u202eD\\x9bE F" in completed.stdout
    assert "\\x1b[2J" in completed.stderr  # the failed task's message, in its progress line
    by_id = {r.task_id: r for r in lines(out)}
    assert by_id["good"].output == nasty.strip()  # the JSONL keeps the exact text


def _task_row(line: str) -> bool:
    """A row of the summary's task table (not of the tokens-and-cost table's ``total``)."""
    return line.startswith("│ t") and line.split()[1][1:].isdigit()


def test_a_large_run_summarises_instead_of_listing_every_task(tmp_path: Path) -> None:
    tasks = "\n".join(f"  - {{id: t{i:02d}, prompt: 'task {i}'}}" for i in range(60))
    tasks += "\n  - {id: broken, prompt: x, agent: none}"
    plan = write_plan(
        tmp_path,
        "agents: [{name: a}, {name: none, provider: openai, base_url: 'http://127.0.0.1:9/v1',"
        " max_retries: 0}]\n"
        f"settings: {{default_agent: a}}\ntasks:\n{tasks}\n",
    )
    out = tmp_path / "r.jsonl"
    short = taskexec("run", str(plan), "--output", str(out), "--fsync")
    assert short.returncode == 1
    assert "the 10 slowest tasks" in short.stdout
    assert "tasks that did not succeed (1)" in short.stdout
    assert "61 tasks: 1 failed, 60 success" in short.stdout
    listed = {line.split()[1] for line in short.stdout.splitlines() if _task_row(line)}
    assert len(listed) in (9, 10)  # the ten slowest; "broken" may be one of them
    assert len(lines(out)) == 61
    full = taskexec("run", str(plan), "--full-table")
    full_listed = {line.split()[1] for line in full.stdout.splitlines() if _task_row(line)}
    assert full_listed == {f"t{i:02d}" for i in range(60)}
    assert "slowest" not in full.stdout


def test_json_output_is_the_results_and_their_usage(tmp_path: Path) -> None:
    completed = taskexec("run", str(EXAMPLE), "--json")
    assert completed.returncode == 0
    data = json.loads(completed.stdout)
    parsed = [ExecutionResult.model_validate(r) for r in data["results"]]
    assert [r.task_id for r in parsed] == ["design", "implement-api", "implement-storage", "review"]
    total = data["usage"]["total"]
    assert total["tasks"] == 4
    assert total["output_tokens"] == sum(r.usage.output_tokens for r in parsed) > 0
    assert total["cost_usd"] == 0  # the offline provider is free


def _priced_plan(tmp_path: Path, server: MockServer, tasks: int, *, priced: bool = True) -> Path:
    price = "    price: {input_per_mtok: 1000000, output_per_mtok: 1000000}\n" if priced else ""
    body = "".join(f"  - {{id: t{i}, prompt: 'part {i}'}}\n" for i in range(tasks))
    return write_plan(
        tmp_path,
        "agents:\n"
        f"  - name: paid\n    provider: openai\n    base_url: {server.openai_base_url}\n"
        "    api_key: sk-test-not-real\n    model: priced-model\n    max_tokens: 10\n"
        f"{price}tasks:\n{body}",
    )


def test_run_max_cost_holds_the_ceiling_and_reports_spend(
    tmp_path: Path, mock_server: MockServer
) -> None:
    """At $1 a token, each task's worst case is its prompt bytes, framing and max_tokens: a
    ceiling of $40 fits a few tasks, the rest are skipped with budget_exhausted, and the
    server saw exactly the requests of the tasks that ran."""
    plan = _priced_plan(tmp_path, mock_server, 8)
    done = taskexec("run", str(plan), "--max-cost", "40", "--json", "--concurrency", "1")
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    results = [ExecutionResult.model_validate(r) for r in data["results"]]
    ran = [r for r in results if r.ok]
    skipped = [r for r in results if r.status is ExecutionStatus.SKIPPED]
    assert ran
    assert skipped
    assert len(ran) + len(skipped) == 8
    assert all(r.error is not None and r.error.kind == "budget_exhausted" for r in skipped)
    assert mock_server.stats.chat_requests == len(ran)
    spent = sum(r.usage.cost_usd or 0.0 for r in ran)
    assert 0 < spent <= 40
    total = data["usage"]["total"]
    assert total["cost_usd"] == pytest.approx(spent)
    assert total["input_tokens"] == sum(r.usage.input_tokens for r in results)
    assert data["usage"]["agents"]["paid"]["tasks"] == 8


def test_run_with_a_ceiling_refuses_agents_without_a_price(
    tmp_path: Path, mock_server: MockServer
) -> None:
    plan = _priced_plan(tmp_path, mock_server, 2, priced=False)
    refused = taskexec("run", str(plan), "--max-cost", "1")
    assert refused.returncode == 2
    assert "paid" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert mock_server.stats.chat_requests == 0
    allowed = taskexec("run", str(plan), "--max-cost", "1", "--allow-unpriced")
    assert allowed.returncode == 0, allowed.stderr
    assert "2 result(s) have no known price" in allowed.stdout
    bad = taskexec("run", str(plan), "--max-cost", "-3")
    assert bad.returncode == 2
    assert "--max-cost" in bad.stderr


def test_run_stream_prints_each_tasks_text_as_it_arrives(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        "agents: [{name: w}]\n"
        "tasks:\n"
        "  - {id: first, prompt: 'alpha beta'}\n"
        "  - {id: second, prompt: 'then {{first}}', depends_on: [first]}\n",
    )
    out = tmp_path / "out.jsonl"
    for engine in ("async", "legacy"):
        done = taskexec("run", str(plan), "--stream", "--engine", engine, "--output", str(out))
        assert done.returncode == 0, done.stderr
        results = {r.task_id: r for r in lines(out)[-2:]}
        streamed = done.stdout
        for task_id, result in results.items():
            assert result.output is not None
            # Several tasks may run at once: each line names its task.
            for line in result.output.splitlines():
                assert f"[{task_id}] {line}" in streamed
        assert results["second"].engine == engine
    one = taskexec("run", str(plan), "--stream", "--concurrency", "1")
    assert one.returncode == 0, one.stderr
    assert "[first]" not in one.stdout  # one task at a time: the text as it comes


def test_run_stream_refuses_json(tmp_path: Path) -> None:
    both = taskexec("run", str(EXAMPLE), "--stream", "--json")
    assert both.returncode == 2
    assert "--stream" in both.stderr
