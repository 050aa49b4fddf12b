"""Calls made together go to Redis together.

A worker takes tasks as RabbitMQ delivers them, in bursts (one socket read holds many
deliveries), and stores their results as they end; an orchestrator marks tasks sent as they
become ready. One script call per task costs a round trip, a socket write and redis-py's
per-command work each (the profile of the peers benchmark: 42% of a worker's samples in
redis-py and socket writes). So the calls that arrive in one iteration of the event loop are
sent as one script call over all of them, in chunks of at most :data:`MOST`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ("MOST", "Batched")

_In = TypeVar("_In")
_Out = TypeVar("_Out")
#: The most calls in one request (a script's keys and arguments grow with it).
MOST = 256


class Batched(Generic[_In, _Out]):
    """Gathers the calls of one loop iteration into one call of ``send``.

    ``send`` gets the items in call order and returns one answer per item, in that order; an
    error it raises is every caller's. A caller that is cancelled while its batch is out
    leaves the batch to finish (the script runs for it all the same, as a lone call whose
    answer was lost would).
    """

    def __init__(self, send: Callable[[Sequence[_In]], Awaitable[Sequence[_Out]]]) -> None:
        self._send = send
        self._items: list[tuple[_In, asyncio.Future[_Out]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def __call__(self, item: _In) -> _Out:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Out] = loop.create_future()
        if not self._items:
            # After the callbacks of this iteration, which may add to the batch.
            loop.call_soon(self._flush)
        self._items.append((item, future))
        return await future

    def _flush(self) -> None:
        items, self._items = self._items, []
        for start in range(0, len(items), MOST):
            task = asyncio.get_running_loop().create_task(
                self._deliver(items[start : start + MOST])
            )
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _deliver(self, items: list[tuple[_In, asyncio.Future[_Out]]]) -> None:
        try:
            answers = await self._send([item for item, _ in items])
            if len(answers) != len(items):
                raise RuntimeError(f"{len(answers)} answers to {len(items)} calls")
        except asyncio.CancelledError:
            for _, future in items:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(items, answers, strict=True):
            if not future.done():
                future.set_result(answer)
