"""Calls made together go out together (taskexec.distributed._batch), without Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from taskexec.distributed._batch import MOST, Batched


class Recorder:
    """A ``send`` that records each batch and answers each item doubled."""

    def __init__(self, fail: Exception | None = None, short: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail
        self.short = short
        self.release = asyncio.Event()
        self.release.set()
        self.called = asyncio.Event()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.called.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        answers = [2 * i for i in items]
        return answers[:-1] if self.short else answers


async def test_calls_of_one_iteration_are_one_batch_in_order() -> None:
    send = Recorder()
    batched = Batched(send)
    first = await asyncio.gather(*(batched(i) for i in range(5)))
    second = await batched(7)
    assert first == [0, 2, 4, 6, 8]
    assert second == 14
    assert send.batches == [[0, 1, 2, 3, 4], [7]]


async def test_a_large_batch_goes_in_chunks() -> None:
    send = Recorder()
    batched = Batched(send)
    answers = await asyncio.gather(*(batched(i) for i in range(MOST + 3)))
    assert answers == [2 * i for i in range(MOST + 3)]
    assert [len(b) for b in send.batches] == [MOST, 3]


async def test_a_failed_batch_fails_every_call_in_it() -> None:
    batched = Batched(Recorder(fail=ConnectionError("redis away")))
    outcomes = await asyncio.gather(batched(1), batched(2), return_exceptions=True)
    assert [type(o) for o in outcomes] == [ConnectionError, ConnectionError]


async def test_answers_that_do_not_match_the_calls_are_an_error() -> None:
    batched = Batched(Recorder(short=True))
    with pytest.raises(RuntimeError, match="1 answers to 2 calls"):
        await asyncio.gather(batched(1), batched(2))


async def test_a_cancelled_caller_leaves_its_batch_to_finish() -> None:
    send = Recorder()
    send.release.clear()
    batched = Batched(send)
    leaving = asyncio.create_task(batched(1))
    staying = asyncio.create_task(batched(2))
    await send.called.wait()
    leaving.cancel()
    send.release.set()
    assert await staying == 4
    assert leaving.cancelled()
    assert send.batches == [[1, 2]]
