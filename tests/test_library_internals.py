"""The private parts of other libraries that taskexec relies on, where they have no public API.

Each is used in one place, with the reason at the line; these tests fail loudly, naming the
attribute, the day a new version of the library renames or removes it.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import asgiref.sync


async def test_aiohttp_connector_fields_the_pool_reads() -> None:
    """taskexec._http: raising a connector's limit (no setter) and dropping the sockets of a
    session whose loop is gone (close() would await on that loop)."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=5))
    try:
        connector = session.connector
        assert connector is not None
        assert session._connector is connector
        assert connector._limit == 5
        connector._limit = 7
        assert connector.limit == 7  # the public reader sees the private field we set
        assert isinstance(connector._conns, dict)
        assert isinstance(connector._acquired, set)
        assert connector._loop is asyncio.get_running_loop()
        assert callable(connector._close)
    finally:
        await session.close()


async def test_asgiref_thread_local_the_bridge_reads() -> None:
    """taskexec._bridge._inside_asgiref: the same test asgiref's async_to_sync makes, to know
    that a sync call runs in a sync_to_async thread under a running application loop."""
    seen: dict[str, object] = {}

    def inside() -> None:
        local = asgiref.sync.SyncToAsync.threadlocal
        seen["local"] = isinstance(local, threading.local)
        seen["loop"] = getattr(local, "main_event_loop", None)
        seen["pid"] = getattr(local, "main_event_loop_pid", None)

    await asgiref.sync.sync_to_async(inside)()
    assert seen["local"] is True
    assert seen["loop"] is asyncio.get_running_loop()
    assert isinstance(seen["pid"], int)
