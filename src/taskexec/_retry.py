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
from typing import TYPE_CHECKING, TypeVar

from ._http import HttpResponse, TransportError
from ._models import ExecutionError

if TYPE_CHECKING:
    from ._modes import Call

__all__ = (
    "AttemptFailed",
    "RetryPolicy",
    "classify_response",
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
    response: HttpResponse, redact: Callable[[str], str], *, where: str
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
    snippet = redact(response.body[:500].decode("utf-8", "replace")).strip()
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


def transport_failure(
    exc: TransportError, redact: Callable[[str], str], *, where: str
) -> AttemptFailed:
    """Turn a transport error into a retryable attempt failure."""
    message = f"{exc.kind} error talking to {where}: {redact(str(exc))}"
    return AttemptFailed(ExecutionError(kind=exc.kind, message=message, retryable=True))


async def run_attempts(
    call: Call, attempt: Callable[[float | None], Awaitable[T]]
) -> tuple[T | None, ExecutionError | None]:
    """Call ``attempt`` until it succeeds, the budget is spent, or the deadline would pass.

    ``call.attempts`` counts every try as it starts, so a task cut off by its deadline still
    reports how many tries it made.

    Args:
        call: The task's call record (deadline, retry budget, policy, per-attempt timeout).
        attempt: One try; gets the time it may take and raises :class:`AttemptFailed`.

    Returns:
        ``(value, None)`` on success, else ``(None, last_error)``.
    """
    loop = asyncio.get_running_loop()
    policy = call.policy
    while True:
        call.attempts += 1
        # The task's deadline is enforced once, by the executor; an attempt gets a timeout of
        # its own only when attempt_timeout_s makes it shorter than the time left.
        timeout = call.attempt_timeout_s
        if timeout is not None and timeout >= call.deadline - loop.time():
            timeout = None
        try:
            return await attempt(timeout), None
        except AttemptFailed as failed:
            error = failed.error
            log.debug("task %s: attempt %d failed: %s", call.task.id, call.attempts, error.message)
            if not error.retryable or call.attempts > call.max_retries:
                return None, error
            if failed.retry_after_s is not None:
                wait = min(failed.retry_after_s, policy.max_retry_after_s)
            else:
                wait = policy.backoff_s(call.attempts)
            if loop.time() + wait >= call.deadline:
                # The next try could not start before the deadline: stop now with the real error
                # instead of sleeping into a timeout.
                return None, error
            await asyncio.sleep(wait)
