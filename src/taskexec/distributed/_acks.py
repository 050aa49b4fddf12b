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

A message that carries a batch of tasks is delivered as one :class:`Part` per task, each
settled on its own as a lone task's message would be (acknowledged, handed back, dead-lettered);
the message is acknowledged once every part of it is settled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aio_pika.abc import AbstractIncomingMessage

__all__ = ("Acknowledgements", "Delivery", "Part", "channel_closed", "settle_one")

log = logging.getLogger("taskexec.worker")


class Part:
    """One task of a delivered batch, settled on its own.

    It stands in for a message where a worker handles a task: its body and headers are those
    of the task's own message (as a lone message of it would have); acknowledging it settles
    this part only, and rejecting it moves its task's message to the dead-letter queue
    through ``dead_letter`` (a batch cannot be rejected in part).
    """

    __slots__ = ("_dead_letter", "batch", "body", "headers", "message_id", "settled")

    def __init__(
        self,
        batch: AbstractIncomingMessage,
        body: bytes,
        headers: dict[str, Any],
        message_id: str | None,
        dead_letter: Callable[[Part], Awaitable[None]],
    ) -> None:
        self.batch = batch
        self.body = body
        self.headers = headers
        self.message_id = message_id
        self._dead_letter = dead_letter
        #: Counted towards its batch's acknowledgement (once, however often it is settled).
        self.settled = False

    @property
    def content_type(self) -> str | None:
        return self.batch.content_type

    @property
    def channel(self) -> object:
        return _channel_of(self.batch)

    @property
    def delivery_tag(self) -> int | None:
        return self.batch.delivery_tag

    async def ack(self) -> None:
        """Nothing to send: :class:`Acknowledgements` counts the part as settled."""

    def reject(self, requeue: bool = False) -> Awaitable[None]:
        """Move this task's message to the dead-letter queue (never requeued)."""
        assert not requeue, "a part of a batch is handed back by publishing it again"
        return self._dead_letter(self)


#: What a worker settles: a delivered message, or one task of a delivered batch.
Delivery: TypeAlias = AbstractIncomingMessage | Part


@dataclass(slots=True)
class _Channel:
    #: Delivered and neither acknowledged nor rejected yet.
    unsettled: set[int] = field(default_factory=set)
    #: Finished, to be acknowledged at the next flush.
    finished: dict[int, AbstractIncomingMessage] = field(default_factory=dict)
    #: Batches delivered: how many of their parts are not settled yet, by delivery tag.
    parts_left: dict[int, int] = field(default_factory=dict)


class Acknowledgements:
    """Tracks a worker's deliveries and acknowledges the finished ones together."""

    def __init__(self) -> None:
        self._channels: dict[object, _Channel] = {}
        #: Acknowledgements go out in the order they were decided, by one task: an individual
        #: one sent after a ``multiple`` one that covered its tag would be an unknown delivery
        #: tag to RabbitMQ, which closes the channel for it.
        self._due: deque[Awaitable[None]] = deque()
        self._sender: asyncio.Task[None] | None = None
        #: Parts of batches being settled (held here: the loop keeps only weak references).
        self._settling: set[asyncio.Future[None]] = set()
        self._flush_soon = False

    def _state(self, message: Delivery) -> _Channel | None:
        channel = _channel_of(message)
        if _closed(channel):
            return None  # RabbitMQ requeued what was delivered on it
        return self._channels.setdefault(channel, _Channel())

    def delivered(self, message: AbstractIncomingMessage, parts: int = 0) -> None:
        """A delivery this worker will settle (before anything else may settle it); a batch
        of ``parts`` tasks is acknowledged once as many parts were settled."""
        state = self._state(message)
        if state is not None and message.delivery_tag is not None:
            state.unsettled.add(message.delivery_tag)
            if parts:
                state.parts_left[message.delivery_tag] = parts

    def ack(self, message: Delivery) -> None:
        """Acknowledge a delivery at the end of this iteration of the loop."""
        tag = message.delivery_tag
        if tag is None:
            return
        if isinstance(message, Part):
            self._part_settled(message)
            return
        state = self._state(message)
        if state is None:
            return
        state.finished[tag] = message
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _part_settled(self, part: Part) -> None:
        if part.settled:
            return
        part.settled = True
        state = self._channels.get(part.channel)
        tag = part.delivery_tag
        if state is None or tag is None or tag not in state.parts_left:
            return  # its channel closed: RabbitMQ requeued the whole batch
        state.parts_left[tag] -= 1
        if not state.parts_left[tag]:
            del state.parts_left[tag]
            self.ack(part.batch)

    async def settle(self, message: Delivery, step: Awaitable[None]) -> None:
        """Settle a delivery on its own (a rejection, a hand-back's acknowledgement); a part
        of a batch counts as settled once ``step`` succeeded."""
        if isinstance(message, Part):
            # Not an acknowledgement frame: nothing to keep in order with the others, and a
            # slow step (a publish tried again) must not hold them up. Shielded, as the
            # others are: a caller cancelled meanwhile does not cut it short.
            settling = asyncio.ensure_future(self._settle_part(message, step))
            self._settling.add(settling)
            settling.add_done_callback(self._settling.discard)
            await asyncio.shield(settling)
            return
        state = self._channels.get(_channel_of(message))
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

    async def _settle_part(self, part: Part, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            # Left unsettled: its batch stays unacknowledged until its channel closes.
            log.warning("could not settle a task of a batch: %s", exc)
            return
        self._part_settled(part)

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
        if self._settling:
            await asyncio.wait(set(self._settling))  # parts whose batches they may complete
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


def channel_closed(message: Delivery) -> bool:
    """True if the channel a message was delivered on is gone (RabbitMQ requeued it)."""
    return _closed(_channel_of(message))


def _channel_of(message: Delivery) -> object:
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
