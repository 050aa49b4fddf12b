"""Real RabbitMQ and Redis for the distributed tests and benchmarks: a cluster per test, worker
processes, and a TCP proxy whose connections a test can cut.

The services are the machine's own (127.0.0.1:5672 guest/guest and 127.0.0.1:6379, or
``TASKEXEC_TEST_BROKER_URL`` / ``TASKEXEC_TEST_RESULTS_URL``). Where they are absent the tests
skip with the reason; with ``TASKEXEC_REQUIRE_SERVICES=1`` (set by ``.ci/run``) such a skip is a
failure instead, so CI always runs them for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest
import redis.asyncio as aioredis

from taskexec.distributed import Cluster
from taskexec.distributed._store import ResultStore

BROKER_URL = os.environ.get("TASKEXEC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
RESULTS_URL = os.environ.get("TASKEXEC_TEST_RESULTS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_ENV_VAR = "TASKEXEC_REQUIRE_SERVICES"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _missing() -> list[str]:
    return [
        f"{name} at {url.split('@')[-1]}"
        for name, url, port in (("RabbitMQ", BROKER_URL, 5672), ("Redis", RESULTS_URL, 6379))
        if not _reachable(url, port)
    ]


def services_up() -> bool:
    """True if RabbitMQ and Redis answer."""
    return not _missing()


def require_services() -> None:
    """Skip (or, under ``TASKEXEC_REQUIRE_SERVICES=1``, fail) unless RabbitMQ and Redis answer."""
    missing = _missing()
    if not missing:
        return
    reason = f"needs {' and '.join(missing)} (start them: see docs/DISTRIBUTED.md)"
    if os.environ.get(REQUIRE_ENV_VAR) == "1":
        pytest.fail(f"{REQUIRE_ENV_VAR}=1 but the test {reason}")
    pytest.skip(reason)


def new_cluster(**settings: float | int) -> Cluster:
    """A cluster in a namespace of its own, so that tests never see each other's tasks."""
    return Cluster(BROKER_URL, RESULTS_URL, namespace=f"t{uuid.uuid4().hex[:12]}", **settings)  # type: ignore[arg-type]


async def drop_cluster(cluster: Cluster, agents: Sequence[str]) -> None:
    """Delete a test cluster's queues, exchange and keys."""
    connection = await aio_pika.connect(cluster.broker_url)
    try:
        for name in [*(cluster.queue(a) for a in agents), cluster.dead_letter_queue]:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for exchange in (cluster.events_exchange, f"{cluster.namespace}.bus"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()
    client = aioredis.from_url(cluster.results_url)
    try:
        keys = [k async for k in client.scan_iter(match=cluster.key("*"))]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def store_of(cluster: Cluster) -> AsyncIterator[ResultStore]:
    """The cluster's Redis store, for assertions on results, counters and the registry."""
    client = aioredis.from_url(cluster.results_url)
    try:
        yield ResultStore(client, cluster)
    finally:
        await client.aclose()


async def queue_depth(cluster: Cluster, name: str) -> int:
    """How many messages wait in a queue of the cluster (0 if it does not exist)."""
    connection = await aio_pika.connect(cluster.broker_url)
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


def cluster_env(cluster: Cluster, broker_url: str | None = None) -> dict[str, str]:
    """The environment that points ``taskexec`` commands at the cluster."""
    return {
        **os.environ,
        "TASKEXEC_BROKER_URL": broker_url or cluster.broker_url,
        "TASKEXEC_RESULTS_URL": cluster.results_url,
        "TASKEXEC_NAMESPACE": cluster.namespace,
    }


class WorkerProcess:
    """``taskexec worker`` in a real subprocess."""

    def __init__(
        self,
        agents_file: Path,
        cluster: Cluster,
        name: str,
        *,
        concurrency: int = 20,
        grace_s: float = 10.0,
        broker_url: str | None = None,
        log_dir: Path | None = None,
        events: bool = False,
    ) -> None:
        self.name = name
        self.cluster = cluster
        self.log = (log_dir or agents_file.parent) / f"worker-{name}.log"
        command = [
            sys.executable,
            "-m",
            "taskexec",
            "worker",
            str(agents_file),
            "--name",
            name,
            "--concurrency",
            str(concurrency),
            "--grace",
            str(grace_s),
            *(["--events"] if events else []),
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=cluster_env(cluster, broker_url), stdout=log, stderr=log
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def registered(self, timeout_s: float = 30.0) -> None:
        """Wait until the worker is in the registry (it consumes from its queues by then)."""
        deadline = time.monotonic() + timeout_s
        async with store_of(self.cluster) as store:
            while time.monotonic() < deadline:
                if any(w.name == self.name for w in await store.workers()):
                    return
                if self.process.poll() is not None:
                    raise AssertionError(f"worker {self.name} exited: {self.log.read_text()}")
                await asyncio.sleep(0.05)
        raise AssertionError(f"worker {self.name} did not register: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a machine that loses power."""
        self.process.kill()
        self.process.wait(10)

    def terminate(self, signum: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """SIGTERM (or ``signum``), and the exit code."""
        self.process.send_signal(signum)
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        """Stop as an operator would (SIGTERM), so the worker's coverage data is written too."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def workers(processes: Sequence[WorkerProcess]) -> Iterator[Sequence[WorkerProcess]]:
    """Kill every worker on the way out, whatever the test did."""
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


class CuttableProxy:
    """A TCP proxy (to RabbitMQ or Redis) on a free 127.0.0.1 port, whose connections a test
    can cut."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._down = False
        #: Every connection the proxy ever accepted (what the server would have seen).
        self.accepted = 0

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self._drop()
        await self._server.wait_closed()

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    @property
    def connections(self) -> int:
        return len(self._writers) // 2

    def cut(self) -> None:
        """Drop every connection through the proxy at once (both directions)."""
        self._drop()

    def down(self) -> None:
        """Drop every connection and refuse new ones until :meth:`up`: a server that is gone."""
        self._down = True
        self._drop()

    def up(self) -> None:
        """Accept connections again after :meth:`down`."""
        self._down = False

    def freeze(self) -> None:
        """Stop relaying, connections left open: a server that no longer answers."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Relay again what was held back."""
        self._flowing.set()

    def _drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        self._writers -= {writer, up_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
