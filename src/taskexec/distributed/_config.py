"""Where a distributed run's broker and results store are, and how long it waits for things."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .._engines.base import RUN_ID_PATTERN, check_run_id
from .._engines.selection import BROKER_ENV_VAR, RESULTS_ENV_VAR
from .._errors import ConfigurationError
from .._secrets import Redactor

__all__ = (
    "BATCH_ENV_VAR",
    "BROKER_ENV_VAR",
    "NAMESPACE_ENV_VAR",
    "NO_WORKER_WAIT_ENV_VAR",
    "RESULTS_ENV_VAR",
    "RUN_ID_PATTERN",
    "Cluster",
    "check_run_id",
    "redact_url",
    "url_redactor",
)

#: Prefix of every queue, exchange and Redis key, so that several deployments (or test runs)
#: can share one RabbitMQ and one Redis without seeing each other's tasks.
NAMESPACE_ENV_VAR = "TASKEXEC_NAMESPACE"
#: How long a task waits for a live worker of its agent (seconds; default 30).
NO_WORKER_WAIT_ENV_VAR = "TASKEXEC_NO_WORKER_WAIT_S"
#: The most tasks an orchestrator puts in one message (default 8; 1: each task alone).
BATCH_ENV_VAR = "TASKEXEC_BATCH"
_NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "pwd", "token"})


def redact_url(url: str) -> str:
    """Return ``url`` with its password (in the authority or the query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if colon else f"{userinfo}@{host}"
        query = urlencode(
            [
                (k, "***" if k.lower() in _SECRET_QUERY_KEYS else v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<a URL that cannot be parsed>"


def url_redactor(*urls: str) -> Redactor:
    """Return a redactor of the URLs' passwords, for messages that may quote them."""
    return Redactor([secret for url in urls for secret in _url_secrets(url)])


def _url_secrets(url: str) -> list[str]:
    """The secrets a URL carries: its password, in the authority or the query."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        return [url]
    found += [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_QUERY_KEYS and v]
    # Both the raw (percent-encoded) and the decoded form can appear in a library's message.
    found += [unquote(s) for s in found]
    return found


@dataclass(frozen=True, slots=True)
class Cluster:
    """A RabbitMQ broker and a Redis results store shared by the workers and orchestrators of
    a deployment, with the settings of the protocol between them.

    Args:
        broker_url: RabbitMQ, ``amqp://user:password@host:5672/vhost`` (or ``amqps://``).
        results_url: Redis, ``redis://[:password@]host:6379/0`` (or ``rediss://``).
        namespace: Prefix of every queue, exchange and key (``TASKEXEC_NAMESPACE``).
        delivery_limit: How many workers may take a task under a lease and die with it (or
            lose Redis for longer than the lease) before it is dead-lettered and comes back
            ``failed`` (kind ``dead_lettered``); hand-backs do not count.
        no_worker_wait_s: How long a task waits for a live worker that serves its agent before
            it comes back ``failed`` (kind ``no_worker``).
        heartbeat_s: How often workers renew their registration; a worker that misses three
            renewals is no longer counted as live.
        result_ttl_s: How long results stay in Redis (for ``--run-id`` re-runs).
        poll_s: How often an orchestrator reads Redis for results whose event it may have
            missed (a broker reconnect), and checks that its tasks' agents still have workers.
        lease_s: How long a worker's lease on a task lives unrenewed (renewed three times as
            often): after a worker's crash, how long its tasks wait before another worker
            runs them.
        orphan_after_s: How long a task an orchestrator waits on may go without a live lease
            (without a message queued for its agent, and without a worker that holds tasks
            of its agent waiting for a slot) before it is sent again: its message was lost
            (dead-lettered by RabbitMQ's own limit, or never published by an orchestrator
            that crashed). A copy sent in vain is acknowledged unrun.
        batch: The most tasks an orchestrator puts in one message (``TASKEXEC_BATCH``). It
            batches only while more tasks of an agent wait than its live workers have slots,
            and then no more than each slot would run in turn anyway; a worker holds up to its
            concurrency times this many tasks. 1 sends each task alone. Streamed tasks, and
            the tasks of agents served by a worker of an earlier version, always go alone.
        events: Workers also publish each task's end on the events exchange (for a dashboard
            that binds a queue there; ``taskexec worker --events``). Off by default: an
            orchestrator learns of results from Redis, and an event costs a publish per task.
    """

    broker_url: str = field(repr=False)
    results_url: str = field(repr=False)
    namespace: str = "taskexec"
    delivery_limit: int = 3
    no_worker_wait_s: float = 30.0
    heartbeat_s: float = 2.0
    result_ttl_s: int = 7 * 24 * 3600
    poll_s: float = 1.0
    orphan_after_s: float = 30.0
    lease_s: float = 1.5
    batch: int = 8
    events: bool = False

    def __post_init__(self) -> None:
        if not self.broker_url.startswith(("amqp://", "amqps://")):
            raise ConfigurationError(
                f"broker URL {redact_url(self.broker_url)!r} is not a RabbitMQ URL; "
                "use amqp://user:password@host:5672/"
            )
        if not self.results_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                f"results URL {redact_url(self.results_url)!r} is not a Redis URL; "
                "use redis://host:6379/0"
            )
        if not _NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ConfigurationError(
                f"namespace {self.namespace!r} is not valid: use 1-64 letters, digits, '_' or '-'"
            )
        if self.delivery_limit < 1:
            raise ConfigurationError("delivery_limit must be >= 1")
        for name in ("no_worker_wait_s", "heartbeat_s", "poll_s", "orphan_after_s", "lease_s"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0")
        if self.result_ttl_s < 1:
            raise ConfigurationError("result_ttl_s must be >= 1")
        if self.batch < 1:
            raise ConfigurationError("batch must be >= 1")

    def __repr__(self) -> str:
        return (
            f"Cluster(broker_url={redact_url(self.broker_url)!r}, "
            f"results_url={redact_url(self.results_url)!r}, namespace={self.namespace!r})"
        )

    @classmethod
    def from_env(
        cls, broker_url: str | None = None, results_url: str | None = None
    ) -> Cluster | None:
        """Return the cluster the arguments, else the environment, name; None if neither does.

        Arguments win over ``TASKEXEC_BROKER_URL`` and ``TASKEXEC_RESULTS_URL``.

        Raises:
            ConfigurationError: Only one of the two is set, or one is not a URL of its kind.
        """
        broker = broker_url or os.environ.get(BROKER_ENV_VAR, "").strip() or None
        results = results_url or os.environ.get(RESULTS_ENV_VAR, "").strip() or None
        if broker is None and results is None:
            return None
        if broker is None or results is None:
            missing = (
                "--broker / " + BROKER_ENV_VAR
                if broker is None
                else ("--results / " + RESULTS_ENV_VAR)
            )
            raise ConfigurationError(
                f"a distributed run needs both a broker and a results store; {missing} is not "
                "set (unset both to run in-process)"
            )
        namespace = os.environ.get(NAMESPACE_ENV_VAR, "").strip() or "taskexec"
        settings: dict[str, Any] = {}
        raw_wait = os.environ.get(NO_WORKER_WAIT_ENV_VAR, "").strip()
        if raw_wait:
            try:
                wait = float(raw_wait)
            except ValueError:
                wait = 0.0
            if not wait > 0:
                raise ConfigurationError(
                    f"{NO_WORKER_WAIT_ENV_VAR}={raw_wait!r} is not a number of seconds > 0"
                )
            settings["no_worker_wait_s"] = wait
        raw_batch = os.environ.get(BATCH_ENV_VAR, "").strip()
        if raw_batch:
            if not (raw_batch.isdigit() and int(raw_batch) >= 1):
                raise ConfigurationError(
                    f"{BATCH_ENV_VAR}={raw_batch!r} is not a whole number of tasks >= 1"
                )
            settings["batch"] = int(raw_batch)
        return cls(broker, results, namespace=namespace, **settings)

    def redactor(self) -> Redactor:
        """Return a redactor of both URLs' passwords, for messages that may quote them."""
        return url_redactor(self.broker_url, self.results_url)

    # Names of everything the cluster uses, in one place.

    def queue(self, agent: str) -> str:
        """The quorum queue of the tasks of ``agent``."""
        return f"{self.namespace}.agent.{agent}"

    @property
    def dead_letter_queue(self) -> str:
        """Where rejected and dead-lettered task messages end up, for an operator to read."""
        return f"{self.namespace}.dead"

    @property
    def events_exchange(self) -> str:
        """The topic exchange of task events (``run.<run>.task.<task>.<state>``)."""
        return f"{self.namespace}.events"

    def key(self, *parts: str) -> str:
        """A Redis key in the namespace."""
        return ":".join((self.namespace, *parts))
