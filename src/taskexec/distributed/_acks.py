"""A worker's acknowledgements, sent together.

One ``basic.ack`` per task is one frame and one socket write each (the profile of the peers
benchmark: a fifth of a worker's samples in socket writes once its Redis calls went out
together). The tasks that end in one iteration of the event loop are acknowledged together:
RabbitMQ's ``multiple`` flag acknowledges every delivery up to a tag, so the longest run of
finished deliveries that no unfinished one precedes costs one frame; a finished delivery that
an unfinished one precedes (a long task ahead of it) is acknowledged on its own, at once, so that
it does not hold a prefetch slot. Rejections and hand-backs are settled one by one, as before.

Delivery tags count per channel, so the bookkeeping is per channel; a channel that closed
(a reconnect) took its deliveries back to the queue, and its acknowledgements are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

__all__ = ("Acknowledgements", "channel_closed", "settle_one")

log = logging.getLogger("taskexec.worker")


@dataclass(slots=True)
class _Channel:
    #: Delivered and neither acknowledged nor rejected yet.
    unsettled: set[int] = field(default_factory=set)
    #: Finished, to be acknowledged at the next flush.
    finished: dict[int, AbstractIncomingMessage] = field(default_factory=dict)


class Acknowledgements:
    """Tracks a worker's deliveries and acknowledges the finished ones together."""

    def __init__(self) -> None:
        self._channels: dict[object, _Channel] = {}
        #: Acknowledgements go out in the order they were decided, by one task: an individual
        #: one sent after a ``multiple`` one that covered its tag would be an unknown delivery
        #: tag to RabbitMQ, which closes the channel for it.
        self._due: deque[Awaitable[None]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._flush_soon = False

    def _state(self, message: AbstractIncomingMessage) -> _Channel:
        return self._channels.setdefault(message.channel, _Channel())

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """A delivery this worker will settle (before anything else may settle it)."""
        if message.delivery_tag is not None:
            self._state(message).unsettled.add(message.delivery_tag)

    def ack(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge a delivery at the end of this iteration of the loop."""
        tag = message.delivery_tag
        if tag is None:
            return
        self._state(message).finished[tag] = message
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def settle(self, message: AbstractIncomingMessage, step: Awaitable[None]) -> None:
        """Settle a delivery on its own (a rejection, a hand-back's acknowledgement)."""
        state = self._channels.get(message.channel)
        if state is not None and message.delivery_tag is not None:
            state.unsettled.discard(message.delivery_tag)
        sent = asyncio.get_running_loop().create_future()

        async def then_tell() -> None:
            try:
                await step
            finally:
                if not sent.done():
                    sent.set_result(None)

        self._due.append(then_tell())
        self._start()
        await asyncio.shield(sent)

    def _flush(self) -> None:
        self._flush_soon = False
        sends: list[Awaitable[None]] = []
        for channel, state in list(self._channels.items()):
            if _closed(channel):
                del self._channels[channel]  # RabbitMQ requeued its deliveries
                continue
            if not state.finished:
                continue
            running = state.unsettled.difference(state.finished)
            floor = min(running) if running else None
            before = [t for t in state.finished if floor is None or t < floor]
            if before:
                sends.append(state.finished[max(before)].ack(multiple=True))
            sends += [
                state.finished[t].ack() for t in state.finished if floor is not None and t > floor
            ]
            state.unsettled.difference_update(state.finished)
            state.finished.clear()
            if not state.unsettled:
                del self._channels[channel]
        self._due.extend(sends)
        self._start()

    def _start(self) -> None:
        if self._due and self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._due:
                await settle_one(self._due.popleft())
        finally:
            self._sender = None

    async def drain(self) -> None:
        """Send every acknowledgement due now, and wait until they are written."""
        if self._flush_soon:
            self._flush()
        if self._sender is not None:
            await asyncio.wait({self._sender})


async def settle_one(step: Awaitable[None]) -> None:
    """Acknowledge or reject a message, tolerating a channel that reconnected meanwhile.

    After a reconnect the delivery tag belongs to a channel that is gone, and RabbitMQ has
    already requeued the message (its result, if any, is stored, so the next delivery is
    acknowledged without running). aio-pika raises here; a worker that let this escape would stop
    taking tasks (taskiq-aio-pika issue #46).
    """
    try:
        await step
    except Exception as exc:
        log.info("could not settle a delivery (the channel reconnected?): %s", exc)


def channel_closed(message: AbstractIncomingMessage) -> bool:
    """True if the channel a message was delivered on is gone (RabbitMQ requeued it)."""
    return _closed(_channel_of(message))


def _channel_of(message: AbstractIncomingMessage) -> object:
    try:
        return message.channel
    except Exception:  # aio-pika raises for a channel that is gone
        return None


def _closed(channel: object) -> bool:
    if channel is None:
        return True
    try:
        return bool(getattr(channel, "is_closed", False))
    except Exception:
        return True
