"""Retry decisions and the wait between attempts, shared by the ``llm`` and ``api`` modes.

One budget per task: ``max_retries`` more tries after the first, all inside the task's deadline.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from ._http import HttpResponse, TransportError
from ._models import ExecutionError
from ._secrets import Redactor
from ._tracing import add_event, error_type


class Budget(Protocol):
    """What retrying needs to know of a task: its tries so far, its budget and its deadline.

    The modes' call record satisfies it; retrying needs nothing else of it, so this module
    depends on no other part of taskexec but the models and the transport's types.
    """

    @property
    def task_id(self) -> str:
        """The task's id, for log lines."""
        ...

    attempts: int
    max_retries: int
    deadline: float  # loop.time() (time.monotonic()) by which the task must be over
    policy: RetryPolicy
    attempt_timeout_s: float | None


__all__ = (
    "AttemptFailed",
    "Budget",
    "RetryPolicy",
    "attempt_timeout",
    "body_snippet",
    "classify_response",
    "next_wait",
    "retry_after_s",
    "run_attempts",
    "transport_failure",
)

T = TypeVar("T")
log = logging.getLogger("taskexec")

_RETRYABLE_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait between attempts.

    Attributes:
        base_delay_s: Wait before the first retry; doubles for each later one.
        max_delay_s: Cap on the exponential wait.
        max_retry_after_s: Cap on a wait the server asks for with ``Retry-After``.
        jitter: Fraction of each exponential wait that is randomised (0 for none).
    """

    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0
    jitter: float = 0.5

    def backoff_s(self, retry_number: int) -> float:
        """Return the wait before retry number ``retry_number`` (1-based), jitter applied."""
        wait = min(self.max_delay_s, self.base_delay_s * 2.0 ** (retry_number - 1))
        return wait * (1 - self.jitter * random.random())


class AttemptFailed(Exception):
    """One attempt ended without a usable reply."""

    def __init__(self, error: ExecutionError, *, retry_after_s: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_attempt_failed, (self.error, self.retry_after_s))


def _rebuild_attempt_failed(error: ExecutionError, retry_after_s: float | None) -> AttemptFailed:
    return AttemptFailed(error, retry_after_s=retry_after_s)


def retry_after_s(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Return the wait a response asks for (``retry-after-ms``, then ``Retry-After``), or None."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _quota_exhausted(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return b"insufficient_quota" in body
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return "insufficient_quota" in (str(error.get("code")), str(error.get("type")))
    return False


def classify_response(
    response: HttpResponse, redact: Redactor, *, where: str
) -> AttemptFailed | None:
    """Return the failure a non-2xx response stands for, or None for a 2xx.

    Args:
        response: The response.
        redact: Removes secrets from text that came from the server.
        where: Names the endpoint in the message (no secrets).
    """
    status = response.status
    if 200 <= status < 300:
        return None
    snippet = body_snippet(redact, response.body).strip()
    retryable = status in _RETRYABLE_STATUSES or status >= 500
    if status == 429 and _quota_exhausted(response.body):
        retryable = False
    message = f"HTTP {status} from {where}" + (f": {snippet}" if snippet else "")
    error = ExecutionError(
        kind="http_status", message=message, status_code=status, retryable=retryable
    )
    return AttemptFailed(
        error, retry_after_s=retry_after_s(response.headers) if retryable else None
    )


#: How much of an error body goes into a result's message.
_ERROR_SNIPPET = 500
#: How much of a body is decoded and redacted before it is cut to a snippet.
_DECODE_LIMIT = 64 * 1024


def body_snippet(redact: Redactor, body: bytes, limit: int = _ERROR_SNIPPET) -> str:
    """Return the start of a response body for a message: redacted first, then cut."""
    return redact.cut(body[:_DECODE_LIMIT].decode("utf-8", "replace"), limit)


def transport_failure(exc: TransportError, redact: Redactor, *, where: str) -> AttemptFailed:
    """Turn a transport error into a retryable attempt failure."""
    message = f"{exc.kind} error talking to {where}: {redact(str(exc))}"
    return AttemptFailed(ExecutionError(kind=exc.kind, message=message, retryable=True))


def next_wait(call: Budget, failed: AttemptFailed, now: float) -> float | None:
    """Return how long to wait before the next try, or None when there should be none.

    No retry for a permanent error, a spent budget, or a wait that would end past the deadline
    (then the real error is reported at once instead of sleeping into a timeout).
    """
    error = failed.error
    log.debug("task %s: attempt %d failed: %s", call.task_id, call.attempts, error.message)
    if not error.retryable or call.attempts > call.max_retries:
        return None
    if failed.retry_after_s is not None:
        wait = min(failed.retry_after_s, call.policy.max_retry_after_s)
    else:
        wait = call.policy.backoff_s(call.attempts)
    return None if now + wait >= call.deadline else wait


def attempt_timeout(call: Budget, now: float) -> float | None:
    """Return the timeout of the next attempt: ``attempt_timeout_s`` if shorter than the time left.

    Otherwise None: the task's deadline is enforced once, by the engine, not again per attempt.
    """
    timeout = call.attempt_timeout_s
    return None if timeout is None or timeout >= call.deadline - now else timeout


async def run_attempts(
    call: Budget, attempt: Callable[[float | None], Awaitable[T]]
) -> tuple[T | None, ExecutionError | None]:
    """Call ``attempt`` until it succeeds, the budget is spent, or the deadline would pass.

    ``call.attempts`` counts every try as it starts, so a task cut off by its deadline still
    reports how many tries it made.

    Args:
        call: The task's budget (deadline, retries, policy, per-attempt timeout).
        attempt: One try; gets its timeout (None: until the deadline) and raises
            :class:`AttemptFailed`.

    Returns:
        ``(value, None)`` on success, else ``(None, last_error)``.
    """
    loop = asyncio.get_running_loop()
    while True:
        call.attempts += 1
        try:
            return await attempt(attempt_timeout(call, loop.time())), None
        except AttemptFailed as failed:
            wait = next_wait(call, failed, loop.time())
            if wait is None:
                return None, failed.error
            event = {"taskexec.wait_s": wait, "taskexec.attempt": call.attempts}
            add_event("taskexec.retry.backoff", {**event, "error.type": error_type(failed.error)})
            await asyncio.sleep(wait)
