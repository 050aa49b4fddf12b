"""Every code block in the README and the guides runs, so the docs stay true.

Python blocks run as scripts, bash blocks through bash, each file's blocks in order in one
scratch directory that has the project's ``examples/``. Three things are adapted, no more:
``python -m pip install ... &&`` prefixes are dropped (the package is already installed here),
``taskexec mock-server`` lines are not started, because this module serves a mock server for the
whole module, and the port the docs use (8765) is replaced by that server's free port, so the
suite never binds a port a user may be using.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskexec.testing import mock_server_in_thread

from .cluster import drop_cluster, new_cluster, require_services
from .conftest import ROOT

DOCS = [
    "README.md",
    "docs/MIGRATION.md",
    "docs/ROLLBACK.md",
    "docs/PROVIDERS.md",
    "docs/TESTING.md",
    "docs/DISTRIBUTED.md",
    "docs/RATE_LIMITS.md",
    "docs/COST.md",
    "docs/TRACING.md",
]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(name: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall((ROOT / name).read_text())]


#: The port the docs tell users to serve the mock server on. The tests never bind it (a user
#: following the README may be using it right now): each block gets a free port instead.
DOCS_PORT = "8765"


@pytest.fixture(scope="module")
def docs_server() -> Iterator[str]:
    with mock_server_in_thread(port=0, latency_s=0.01) as server:
        yield str(server.port)


def adapt_bash(body: str) -> str:
    lines = []
    for line in body.splitlines():
        if line.startswith("taskexec mock-server"):
            continue
        lines.append(re.sub(r"^python -m pip install [^&]*&& ", "", line))
    return "\n".join(lines)


@pytest.mark.parametrize("name", DOCS)
def test_every_block_runs(name: str, tmp_path: Path, docs_server: str) -> None:
    found = blocks(name)
    assert found, f"{name} has no code blocks"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    cluster = None
    if name == "docs/DISTRIBUTED.md":
        # The real RabbitMQ and Redis, in a namespace of this test's own, dropped afterwards.
        require_services()
        cluster = new_cluster()
        env["TASKEXEC_NAMESPACE"] = cluster.namespace
    try:
        _run_blocks(name, found, tmp_path, env, docs_server)
    finally:
        if cluster is not None:
            asyncio.run(drop_cluster(cluster, DOCS_AGENTS))


#: The agents the blocks of docs/DISTRIBUTED.md serve on workers.
DOCS_AGENTS = ("architect", "developer", "reviewer", "writer")


def _run_blocks(
    name: str, found: list[tuple[str, str]], tmp_path: Path, env: dict[str, str], docs_server: str
) -> None:
    for index, (lang, body) in enumerate(found):
        body = body.replace(f":{DOCS_PORT}", f":{docs_server}")
        if lang == "python":
            command = [sys.executable, "-c", body]
        elif lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", adapt_bash(body)]
        else:
            continue
        if "python -m pytest" in body:
            continue  # the README's test command: this is it, running now
        # In a session of its own, so that whatever a block left running (a worker it started
        # in the background, if the block failed before stopping it) is ended with it.
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.returncode == 0, (
            f"{name} block {index} ({lang}) failed:\n{body}\n--- stdout\n{stdout}"
            f"\n--- stderr\n{stderr}"
        )


def test_readme_quickstart_has_the_two_commands() -> None:
    bash = [body.strip() for lang, body in blocks("README.md") if lang == "bash"]
    assert bash[0] == "python -m pip install -e . && taskexec run examples/project.yaml"
    assert bash[1] == "python -m pip install -e '.[dev]' && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert bash[1] in ci
