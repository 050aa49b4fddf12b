"""The mock server in a process of its own, so it never competes with the code measured."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from typing import Any

_COMMAND = (sys.executable, "-m", "taskexec", "mock-server", "--port", "0")


class ServerProcess:
    """``taskexec mock-server`` on a free port, in a child process."""

    def __init__(
        self,
        latency_s: float = 0.0,
        rate_limit: int | None = None,
        token_limit: int | None = None,
    ) -> None:
        limits = [] if rate_limit is None else ["--rate-limit", str(rate_limit)]
        limits += [] if token_limit is None else ["--token-limit", str(token_limit)]
        self.process = subprocess.Popen(
            [*_COMMAND, "--latency", str(latency_s), *limits],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.url = line.rsplit(" ", 1)[1].strip()

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats") as reply:
            return dict(json.load(reply))

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/_reset", method="POST", data=b"")
        urllib.request.urlopen(request).close()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
