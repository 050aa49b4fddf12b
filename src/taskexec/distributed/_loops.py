"""Background loops that stop between steps, never in the middle of one.

Cancelling a coroutine in the middle of a Redis command can leave it waiting on a send that
never completes (seen with redis-py 8 under load: a cancelled poller kept a finished run from
exiting). So the loops here are told to stop with an event, finish the step they are in, and
return; whatever still runs after a bound is cancelled and left behind, not awaited forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ("repeat", "settle")

log = logging.getLogger("taskexec")


async def repeat(
    interval_s: float,
    stop: asyncio.Event,
    step: Callable[[], Awaitable[None]],
    what: str,
    redact: Callable[[str], str],
) -> None:
    """Run ``step`` every ``interval_s`` until ``stop`` is set; a failed step is logged, its
    error passed through ``redact`` (the cluster's passwords)."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
        try:
            await step()
        except Exception as exc:  # Redis away for a moment: the next step tries again
            log.warning("%s failed: %s", what, redact(str(exc) or type(exc).__name__))


async def settle(tasks: Iterable[asyncio.Task[Any] | None], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``tasks`` to end, then cancel those still running."""
    pending = {t for t in tasks if t is not None and not t.done()}
    if pending:
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
