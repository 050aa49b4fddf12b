"""Resources tied to an event loop that close when the loop shuts down."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

__all__ = ("close_with_loop",)


def close_with_loop(aclose: Callable[[], Awaitable[object]]) -> AsyncGenerator[None, None]:
    """Arrange for ``aclose()`` to run when the running loop shuts down; keep what is returned.

    ``asyncio.run()`` (and pytest-asyncio, and asgiref's ``async_to_sync``) end by closing every
    async generator the loop has started, while the loop still runs: a generator suspended here
    runs ``aclose()`` in its ``finally``. So a resource its owner never closed is released when
    its loop ends, instead of being left to the garbage collector on a dead loop. The loop holds
    its generators weakly: the caller keeps the returned generator alive (an attribute of the
    resource), and drops it once it closed the resource itself.
    """

    async def closer() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await aclose()

    generator = closer()
    # Start it up to its yield, on the running loop: its first step registers it with the
    # loop's async-generator hooks, which is what shutdown_asyncgens() closes.
    with contextlib.suppress(StopIteration):
        generator.asend(None).send(None)
    return generator
