"""Streaming (issue 20): every vendor and mode, through the async API, the sync API from a plain
thread, and the legacy engine; over real sockets against the mock server, asserting what the
server saw (requests, bytes, disconnects), never elapsed time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import threading
import time
from typing import Any, ClassVar, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskexec
import taskexec.sync
from taskexec import (
    Agent,
    AgentTask,
    ExecutionResult,
    ExecutionStatus,
    StreamNotFinishedError,
    SyncInAsyncContextError,
    flags,
)
from taskexec._engines.inprocess import AsyncEngine
from taskexec._sse import SSEDecoder
from taskexec._stream import render_deltas
from taskexec.providers import StreamErrorEvent
from taskexec.testing import MockServer, StreamRecord, mock_server_in_thread

from .conftest import AGENTS_DIR, FAST_RETRY, eventually, pid_alive, wait_until

#: Script agents are deprecated (and warned about); their streams are tested all the same.
pytestmark = pytest.mark.filterwarnings("ignore:agent .*script execution is deprecated")

#: The ways a stream is driven: the async API, the sync API from a plain thread, and the legacy
#: engine from both sides.
DRIVERS = ["async", "sync", "legacy-sync", "legacy-async"]
#: Words of a prompt long enough that a stream left early has much left to send.
LONG = " ".join(f"w{i}" for i in range(20))


class Boom(Exception):
    """Raised inside a stream's block by a test."""


def agents_for(server: MockServer) -> list[Agent]:
    return [
        Agent(name="openai", provider="openai", base_url=server.openai_base_url),
        Agent(name="anthropic", provider="anthropic", base_url=server.url),
        Agent(name="gemini", provider="gemini", base_url=server.url, model="gemini-mock"),
        Agent(name="api", mode="api", url=server.agent_url),
        Agent(name="offline"),
        Agent(
            name="script",
            mode="script",
            command=[sys.executable, str(AGENTS_DIR / "streamer.py"), "0.01"],
        ),
    ]


HTTP_AGENTS = ["openai", "anthropic", "gemini", "api"]


def _consume_sync(
    executor: Any, task: AgentTask, agent: str, stop_after: int | None, how: str
) -> tuple[list[str], ExecutionResult | None]:
    deltas: list[str] = []
    stream = executor.stream(task, agent=agent)
    if how == "drop":
        for delta in stream:
            deltas.append(delta)
            if len(deltas) >= (stop_after or 1):
                break
        del stream
        gc.collect()
        return deltas, None
    with contextlib.suppress(Boom), stream:
        for delta in stream:
            deltas.append(delta)
            if stop_after is not None and len(deltas) >= stop_after:
                if how == "break":
                    break
                if how == "raise":
                    raise Boom
                if how == "close":
                    stream.close()
    return deltas, stream.result


async def _consume_async(
    executor: Any, task: AgentTask, agent: str, stop_after: int | None, how: str
) -> tuple[list[str], ExecutionResult | None]:
    deltas: list[str] = []
    stream = executor.stream(task, agent=agent)
    if how == "drop":
        async for delta in stream:
            deltas.append(delta)
            if len(deltas) >= (stop_after or 1):
                break
        del stream
        gc.collect()
        return deltas, None
    with contextlib.suppress(Boom):
        async with stream:
            async for delta in stream:
                deltas.append(delta)
                if stop_after is not None and len(deltas) >= stop_after:
                    if how == "break":
                        break
                    if how == "raise":
                        raise Boom
                    if how == "close":
                        await stream.aclose()
    return deltas, stream.result


async def consume(
    driver: str,
    agents: list[Agent],
    task: AgentTask,
    agent: str,
    *,
    stop_after: int | None = None,
    how: str = "break",
    **options: Any,
) -> tuple[list[str], ExecutionResult | None]:
    """Stream ``task`` through ``driver``; stop after ``stop_after`` deltas by ``how``."""
    options.setdefault("retry_policy", FAST_RETRY)
    engine = "legacy" if driver.startswith("legacy") else "async"
    with flags.use_engine(engine):
        if driver in ("async", "legacy-async"):
            async with taskexec.TaskExecutor(agents, **options) as executor:
                return await _consume_async(executor, task, agent, stop_after, how)

        def in_thread() -> tuple[list[str], ExecutionResult | None]:
            with taskexec.sync.TaskExecutor(agents, **options) as executor:
                return _consume_sync(executor, task, agent, stop_after, how)

        # A plain thread (no asgiref, no loop): the sync stream takes the bridge's shared loop,
        # or runs in this thread on the legacy engine. to_thread carries the engine flag along.
        return await asyncio.to_thread(in_thread)


def expected_text(agent: Agent, prompt: str) -> str:
    if agent.name == "offline":
        from taskexec.providers.offline import offline_reply

        return offline_reply(agent.name, agent.model, prompt)
    return f"mock reply to: {prompt}"


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- every vendor, every mode --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini", "api", "offline"])
async def test_joined_deltas_are_the_output(
    driver: str, name: str, mock_server: MockServer
) -> None:
    agents = agents_for(mock_server)
    task = AgentTask(id="t1", prompt="one two three four")
    deltas, result = await consume(driver, agents, task, name)
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert len(deltas) > 1  # streamed in pieces, not one block
    (chosen,) = [a for a in agents if a.name == name]
    assert "".join(deltas) == result.output == expected_text(chosen, task.prompt)
    assert result.engine == ("legacy" if driver.startswith("legacy") else "async")
    assert result.attempts == 1
    assert result.metadata["streamed"] is True
    if name in HTTP_AGENTS:
        assert mock_server.stats.chat_requests == 1
        (record,) = mock_server.streams
        # The server marks it complete once its last write returned, which may be just after
        # the client read it.
        await eventually(lambda: record.completed)
    if name != "api":  # usage comes from the stream itself
        assert result.usage.input_tokens == 4
        assert result.usage.output_tokens == 7


async def test_script_streams_stdout_as_written(driver: str) -> None:
    agent = Agent(
        name="script",
        mode="script",
        command=[sys.executable, str(AGENTS_DIR / "streamer.py"), "0.01"],
    )
    deltas, result = await consume(driver, [agent], AgentTask(id="s", prompt="a b c"), "script")
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS
    assert "".join(deltas) == result.output
    assert result.output is not None
    assert result.output.endswith(" a b c")
    assert len(deltas) >= 2  # written in four flushes, not read at exit


async def test_script_failing_after_text_keeps_it(driver: str) -> None:
    command = [sys.executable, str(AGENTS_DIR / "streamer.py"), "0.0", "3"]
    agent = Agent(name="script", mode="script", command=command)
    deltas, result = await consume(driver, [agent], AgentTask(id="s", prompt="a b"), "script")
    assert result is not None
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "script_exit"
    assert "".join(deltas) == result.output


async def test_script_json_output_is_one_delta(driver: str) -> None:
    agent = Agent(name="echo", mode="script", command=[sys.executable, str(AGENTS_DIR / "echo.py")])
    deltas, result = await consume(driver, [agent], AgentTask(id="j", prompt="hello"), "echo")
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS
    assert deltas == [result.output]


async def test_api_json_reply_is_one_delta(driver: str) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        document = await request.json()
        return web.json_response({"output": f"json reply to {document['prompt']}"})

    app = web.Application()
    app.router.add_post("/agent", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        agent = Agent(name="api", mode="api", url=f"http://127.0.0.1:{port}/agent")
        deltas, result = await consume(driver, [agent], AgentTask(id="j", prompt="hi"), "api")
    finally:
        await runner.cleanup()
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS
    assert deltas == ["json reply to hi"] == [result.output]


async def test_a_stream_longer_than_the_read_ahead_is_read_whole(
    driver: str, mock_server: MockServer
) -> None:
    # Far more deltas than a sync stream reads ahead (64), arriving at once: the caller empties
    # the buffer from its own thread and must still get the pump reading again.
    prompt = " ".join(f"x{i}" for i in range(300))
    deltas, result = await consume(
        driver, agents_for(mock_server), AgentTask(id="long", prompt=prompt), "openai"
    )
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS
    assert len(deltas) == 303
    assert "".join(deltas) == result.output == f"mock reply to: {prompt}"


# -- leaving early -----------------------------------------------------------------------------


def _last_stream(server: MockServer) -> StreamRecord:
    return server.streams[-1]


@pytest.mark.parametrize("how", ["break", "raise", "close", "drop"])
@pytest.mark.parametrize("name", HTTP_AGENTS)
async def test_leaving_early_closes_the_request(
    driver: str, name: str, how: str, mock_server: MockServer
) -> None:
    # A piece every 50 ms: 20 words would take a second; the test leaves after two pieces.
    task = AgentTask(id="early", prompt=f"[[chunk_delay=0.05]] {LONG}")
    deltas, result = await consume(
        driver, agents_for(mock_server), task, name, stop_after=2, how=how
    )
    assert len(deltas) == 2
    await eventually(lambda: _last_stream(mock_server).disconnected_at is not None)
    record = _last_stream(mock_server)
    assert not record.completed
    assert record.pieces_sent < 23  # the server stopped writing: nothing read after leaving
    assert mock_server.stats.chat_requests == 1
    if result is not None:  # a dropped stream's result has nobody to read it
        assert result.status is ExecutionStatus.CANCELLED
        assert result.error is not None
        assert result.error.kind == "cancelled"
        assert result.output == "".join(deltas)


@pytest.mark.parametrize("how", ["break", "close", "drop"])
async def test_leaving_early_kills_the_script(driver: str, how: str) -> None:
    command = [sys.executable, str(AGENTS_DIR / "streamer.py"), "0.2"]
    agent = Agent(name="script", mode="script", command=command)
    deltas, result = await consume(
        driver, [agent], AgentTask(id="k", prompt=LONG), "script", stop_after=1, how=how
    )
    pid = int(deltas[0].removeprefix("pid="))
    await eventually(lambda: not pid_alive(pid))
    if result is not None:
        assert result.status is ExecutionStatus.CANCELLED
        assert result.output == "".join(deltas)


async def test_unread_stream_sends_nothing(driver: str, mock_server: MockServer) -> None:
    engine = "legacy" if driver.startswith("legacy") else "async"
    task = AgentTask(id="u", prompt="x")
    with flags.use_engine(engine):
        if driver.endswith("async"):
            executor = taskexec.TaskExecutor(agents_for(mock_server))
            stream = executor.stream(task, agent="openai")
            with pytest.raises(StreamNotFinishedError, match="has not ended"):
                _ = stream.result
            async with stream:
                pass
            result = stream.result
            await executor.aclose()
        else:

            def unread() -> ExecutionResult:
                with taskexec.sync.TaskExecutor(agents_for(mock_server)) as executor:
                    stream = executor.stream(task, agent="openai")
                    with stream, pytest.raises(StreamNotFinishedError):
                        _ = stream.result
                    return stream.result

            result = await asyncio.to_thread(unread)
    assert result.status is ExecutionStatus.CANCELLED
    assert result.output == ""
    assert mock_server.stats.chat_requests == 0  # nothing was sent


# -- retries and failures ----------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "429", "reset", "cut:0"])
@pytest.mark.parametrize("name", HTTP_AGENTS)
async def test_retries_only_before_the_first_delta(
    driver: str, name: str, fault: str, mock_server: MockServer
) -> None:
    mock_server.set_faults([fault])
    task = AgentTask(id="r", prompt="one two three")
    deltas, result = await consume(driver, agents_for(mock_server), task, name)
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS, result.error
    assert mock_server.stats.chat_requests == 2
    assert result.attempts == 2
    assert "".join(deltas) == result.output == f"mock reply to: {task.prompt}"


@pytest.mark.parametrize("name", HTTP_AGENTS)
async def test_failure_after_text_is_not_retried(
    driver: str, name: str, mock_server: MockServer
) -> None:
    task = AgentTask(id="f", prompt=LONG)
    # Learn how long the stream is, then cut the next one half-way through its body.
    await consume(driver, agents_for(mock_server), task, name)
    await eventually(lambda: _last_stream(mock_server).completed)
    whole = _last_stream(mock_server).bytes_sent
    mock_server.reset()
    mock_server.set_faults([f"cut:{whole // 2}"])
    deltas, result = await consume(driver, agents_for(mock_server), task, name)
    assert result is not None
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "connection"
    assert mock_server.stats.chat_requests == 1
    assert deltas
    assert result.output == "".join(deltas)
    assert f"mock reply to: {LONG}".startswith(result.output)


async def test_deadline_covers_the_whole_stream(driver: str, mock_server: MockServer) -> None:
    # 20 pieces 0.1 s apart take 2 s; the task has 0.4 s in all.
    task = AgentTask(id="d", prompt=f"[[chunk_delay=0.1]] {LONG}", timeout_s=0.4)
    deltas, result = await consume(driver, agents_for(mock_server), task, "openai")
    assert result is not None
    assert result.status is ExecutionStatus.TIMEOUT
    assert deltas
    assert result.output == "".join(deltas)
    await eventually(lambda: _last_stream(mock_server).disconnected_at is not None)
    assert not _last_stream(mock_server).completed


async def test_bad_status_is_not_retried(driver: str, mock_server: MockServer) -> None:
    mock_server.set_faults(["400"])
    deltas, result = await consume(
        driver, agents_for(mock_server), AgentTask(id="b", prompt="x"), "anthropic"
    )
    assert result is not None
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.status_code == 400
    assert deltas == []
    assert result.output is None
    assert mock_server.stats.chat_requests == 1


# -- caller cancellation, Ctrl-C -----------------------------------------------------------------


async def test_cancelling_the_caller_closes_then_propagates(mock_server: MockServer) -> None:
    task = AgentTask(id="c", prompt=f"[[chunk_delay=0.05]] {LONG}")
    got_one = asyncio.Event()
    streams: list[taskexec.TaskStream] = []

    async def reader() -> None:
        executor = taskexec.TaskExecutor(agents_for(mock_server))
        try:
            async with executor.stream(task, agent="openai") as stream:
                streams.append(stream)
                async for _ in stream:
                    got_one.set()
        finally:
            await executor.aclose()

    running = asyncio.ensure_future(reader())
    await got_one.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    (stream,) = streams
    assert stream.result.status is ExecutionStatus.CANCELLED
    await eventually(lambda: _last_stream(mock_server).disconnected_at is not None)


@pytest.mark.parametrize("engine", ["async", "legacy"])
def test_ctrl_c_in_a_sync_stream_closes_the_request_first(
    engine: str, mock_server: MockServer
) -> None:
    assert threading.current_thread() is threading.main_thread()
    task = AgentTask(id="i", prompt=f"[[chunk_delay=0.2]] {LONG}")
    main = threading.get_ident()

    def interrupt_once_streaming() -> None:
        wait_until(lambda: mock_server.streams and mock_server.streams[-1].pieces_sent, "a piece")
        signal.pthread_kill(main, signal.SIGINT)

    with flags.use_engine(engine), taskexec.sync.TaskExecutor(agents_for(mock_server)) as executor:
        stream = executor.stream(task, agent="openai")
        sender = threading.Thread(target=interrupt_once_streaming)
        sender.start()
        with pytest.raises(KeyboardInterrupt), stream:
            for _ in stream:
                pass
        sender.join()
        # The interrupt reached us after the stream was closed: its result is already known.
        assert stream.result.status is ExecutionStatus.CANCELLED
        wait_until(lambda: mock_server.streams[-1].disconnected_at is not None, "disconnect")
        assert not mock_server.streams[-1].completed


async def test_a_sync_stream_refuses_a_running_loop(mock_server: MockServer) -> None:
    executor = taskexec.sync.TaskExecutor(agents_for(mock_server))
    stream = executor.stream(AgentTask(id="l", prompt="x"), agent="openai")
    with pytest.raises(SyncInAsyncContextError, match="async for"):
        next(iter(stream))
    assert mock_server.stats.chat_requests == 0


# -- what outlives a stream --------------------------------------------------------------------


def test_abandoned_sync_streams_leave_no_thread_task_or_connection(mock_server: MockServer) -> None:
    before = {t.ident for t in threading.enumerate()}
    executor = taskexec.sync.TaskExecutor(agents_for(mock_server))

    def abandon(i: int) -> None:
        stream = executor.stream(
            AgentTask(id=f"a{i}", prompt=f"[[chunk_delay=0.05]] {LONG}"), agent="openai"
        )
        for _ in stream:
            break  # no close(), no with: the stream is dropped here

    threads = [threading.Thread(target=abandon, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()
    wait_until(lambda: mock_server.stats.stream_disconnects == 20, "20 disconnects")
    assert all(not r.completed for r in mock_server.streams)
    executor.close()
    wait_until(
        lambda: mock_server.stats.connections_closed == mock_server.stats.connections_opened,
        "every connection closed",
    )
    from taskexec._bridge import _shared

    loop = _shared.loop()
    assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
    # A stream dropped while another thread held the shared loop is closed by a short-lived
    # thread of its own; it ends with the close.
    wait_until(lambda: {t.ident for t in threading.enumerate()} <= before, "no thread left")


# -- the connection cut at every byte ----------------------------------------------------------


@pytest.mark.parametrize("name", HTTP_AGENTS)
def test_cut_at_every_byte_offset_gives_one_result_never_repeated_text(name: str) -> None:
    prompt = "alpha beta gamma"
    full = f"mock reply to: {prompt}"
    with (
        mock_server_in_thread() as server,
        taskexec.sync.TaskExecutor(agents_for(server), retry_policy=FAST_RETRY) as executor,
    ):
        task = AgentTask(id="cut", prompt=prompt, max_retries=1)
        with executor.stream(task, agent=name) as stream:
            assert "".join(stream) == full
        wait_until(lambda: server.streams[-1].completed, "the whole stream written")
        whole = server.streams[-1].bytes_sent

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(offset=st.integers(min_value=0, max_value=whole))
        def check(offset: int) -> None:
            server.reset()
            server.set_faults([f"cut:{offset}"])
            deltas: list[str] = []
            with executor.stream(task, agent=name) as stream:
                deltas.extend(stream)
            result = stream.result
            text = "".join(deltas)
            assert full.startswith(text)  # never a piece twice, never out of order
            if result.status is ExecutionStatus.SUCCESS:
                assert text == full == result.output
            else:
                assert result.status is ExecutionStatus.FAILED
                assert result.output == (text if deltas else None)
                assert server.stats.chat_requests == 1  # text had arrived: no retry
            if server.stats.chat_requests == 2:
                assert result.status is ExecutionStatus.SUCCESS

        check()
        # And exhaustively for one vendor, every offset in turn.
        if name == "openai":
            for offset in range(whole + 1):
                check.hypothesis.inner_test(offset)  # type: ignore[attr-defined]


# -- rate limits -------------------------------------------------------------------------------


async def test_an_open_stream_holds_its_in_flight_place(mock_server: MockServer) -> None:
    agent = Agent(
        name="limited", provider="openai", base_url=mock_server.openai_base_url, max_in_flight=1
    )
    first = AgentTask(id="first", prompt=f"[[chunk_delay=0.05]] {LONG}")
    second = AgentTask(id="second", prompt="after the first")
    async with taskexec.TaskExecutor([agent]) as executor:
        async with executor.stream(first) as stream:
            await stream.__anext__()
            waiting = asyncio.ensure_future(executor.execute(second))
            await asyncio.sleep(0)
            assert mock_server.stats.chat_requests == 1
        closed_at = mock_server.streams[0]
        result = await waiting
    assert result.status is ExecutionStatus.SUCCESS
    assert mock_server.stats.chat_requests == 2
    await eventually(lambda: closed_at.disconnected_at is not None)
    # The second request reached the server only after the first stream was closed.
    assert mock_server.recorded[-1].json()["messages"][-1]["content"] == "after the first"


async def test_tpm_is_settled_from_streamed_usage(mock_server: MockServer) -> None:
    from taskexec._limits import LocalLimiter, limiter_for

    agent = Agent(name="tpm", provider="openai", base_url=mock_server.openai_base_url, tpm=600_000)
    async with taskexec.TaskExecutor([agent]) as executor:
        async with executor.stream(AgentTask(id="t", prompt="a b c")) as stream:
            text = "".join([d async for d in stream])
        limiter = limiter_for(agent, "openai", mock_server.openai_base_url, None)
        assert isinstance(limiter, LocalLimiter)
        # Charged the estimate first, then moved back to what the stream reported (3 + 6).
        interval = limiter.token_interval_s
        assert limiter._next_tokens <= time.monotonic() + 9 * interval + 1e-3
    assert stream.result.usage.input_tokens == 3
    assert text


# -- pieces --------------------------------------------------------------------------------------


def test_sse_decoder_handles_split_lines_crlf_comments_and_multiline_data() -> None:
    decoder = SSEDecoder()
    stream = (
        b": comment\r\nevent: a\r\ndata: one\r\ndata: two\r\n\r\ndata:x\n\ndata: caf\xc3\xa9\n\n"
    )
    events = [e for i in range(len(stream)) for e in decoder.feed(stream[i : i + 1])]
    assert events == [("a", "one\ntwo"), ("message", "x"), ("message", "café")]


@pytest.mark.parametrize(
    ("provider", "event", "data", "kind"),
    [
        (
            "anthropic",
            "error",
            '{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}',
            "http_status",
        ),
        ("openai", "message", '{"error": {"message": "boom"}}', "http_status"),
        ("gemini", "message", '{"error": {"code": 503, "message": "busy"}}', "http_status"),
        ("openai", "message", "not json", "bad_response"),
    ],
)
def test_error_events_are_failures(provider: str, event: str, data: str, kind: str) -> None:
    from taskexec.providers import HttpProvider, get_provider

    chosen = get_provider(provider)
    assert isinstance(chosen, HttpProvider)
    decoder = chosen.stream_decoder()
    agent = Agent(name="x", provider=provider, base_url="http://127.0.0.1:9")
    with pytest.raises((StreamErrorEvent, ValueError)) as caught:
        decoder.event(event, data)
    failure = chosen.stream_event_failure(agent, caught.value)
    assert failure.error.kind == kind


def test_render_deltas_prefixes_task_ids_and_strips_escapes() -> None:
    out: list[str] = []
    render_deltas(iter([("a", "hel"), ("a", "lo\n"), ("b", "\x1b[2Jhi"), ("a", "x")]), out.append)
    assert "".join(out) == "hello\n[b] hi\n[a] x\n"
    out.clear()
    render_deltas(iter([("only", "one\x07 two")]), out.append)
    assert "".join(out) == "one two\n"


def test_render_deltas_can_always_prefix() -> None:
    out: list[str] = []
    render_deltas(iter([("a", "one\ntwo"), ("a", " more")]), out.append, prefix=True)
    assert "".join(out) == "[a] one\n[a] two more\n"


@pytest.mark.parametrize("engine", ["async", "legacy"])
async def test_stream_task_fills_dependencies_and_reports_progress(
    engine: str, mock_server: MockServer
) -> None:
    from taskexec._engines.registry import select_engine
    from taskexec._results import Progress
    from taskexec._stream import stream_task

    executor = taskexec.TaskExecutor(agents_for(mock_server))
    task = AgentTask(id="child", prompt="expand {{parent}}", depends_on=["parent"])
    seen: list[tuple[str, str]] = []
    progress = Progress()
    with flags.use_engine(engine):
        result = await stream_task(
            executor.parts.job(task, "openai"),
            select_engine(executor.parts.engines),
            lambda task_id, delta: seen.append((task_id, delta)),
            {"parent": "the outline"},
            progress,
        )
    await executor.aclose()
    assert result.status is ExecutionStatus.SUCCESS
    assert result.output == "mock reply to: expand the outline"
    assert "".join(d for _, d in seen) == result.output
    assert {t for t, _ in seen} == {"child"}
    assert progress.call is not None


def test_an_engine_that_cannot_stream_says_so(mock_server: MockServer) -> None:
    from taskexec._engines.registry import EngineSpec, register_engine

    class NoStreams(AsyncEngine):
        name: ClassVar[str] = "no-streams"
        stream_path: ClassVar[Literal["loop", "blocking", "engine"] | None] = None

    register_engine(EngineSpec("no-streams", lambda s: s.flag == "async", lambda s: NoStreams(), 1))
    try:
        executor = taskexec.TaskExecutor(agents_for(mock_server))
        with pytest.raises(taskexec.ConfigurationError, match="not available on the no-streams"):
            executor.stream(AgentTask(id="w", prompt="x"), agent="openai")
    finally:
        register_engine(EngineSpec("no-streams", lambda s: False, lambda s: NoStreams(), 1))


def test_an_unknown_agent_raises_when_the_stream_is_made(mock_server: MockServer) -> None:
    executor = taskexec.TaskExecutor(agents_for(mock_server))
    with pytest.raises(taskexec.UnknownAgentError):
        executor.stream(AgentTask(id="x", prompt="x"), agent="nobody")
    assert mock_server.stats.chat_requests == 0


async def test_a_provider_without_a_key_falls_back_to_its_script_stream(driver: str) -> None:
    command = [sys.executable, str(AGENTS_DIR / "streamer.py"), "0.0"]
    agent = Agent(name="fallback", provider="openai", command=command)  # no key anywhere
    deltas, result = await consume(driver, [agent], AgentTask(id="fb", prompt="a b"), "fallback")
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS
    assert result.metadata["execution_mode"] == "script_fallback"
    assert result.metadata["fallback_reason"] == "missing_api_key"
    assert "".join(deltas) == result.output


async def test_a_provider_without_a_key_or_script_is_a_configuration_failure(driver: str) -> None:
    agent = Agent(name="nokey", provider="anthropic")
    deltas, result = await consume(driver, [agent], AgentTask(id="nk", prompt="a"), "nokey")
    assert result is not None
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "configuration"
    assert deltas == []


async def test_a_custom_provider_streams_in_one_piece(driver: str) -> None:
    from taskexec.providers import ChatReply, ClientPool, Provider, register_provider

    class Whole(Provider):
        name = "whole-test"

        async def complete(
            self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
        ) -> ChatReply:
            return ChatReply(f"whole: {prompt}", taskexec.Usage(input_tokens=1, output_tokens=2))

    register_provider(Whole())
    agent = Agent(name="w", provider="whole-test")  # type: ignore[arg-type]
    deltas, result = await consume(driver, [agent], AgentTask(id="cp", prompt="p"), "w")
    assert result is not None
    assert deltas == ["whole: p"] == [result.output]
    assert result.usage.output_tokens == 2


@pytest.mark.parametrize("how", ["whole", "break"])
async def test_streams_over_a_callers_httpx_client(how: str, mock_server: MockServer) -> None:
    import httpx

    task = AgentTask(id="hx", prompt=f"[[chunk_delay=0.02]] {LONG}" if how == "break" else "a b")
    async with httpx.AsyncClient() as client:
        executor = taskexec.TaskExecutor(agents_for(mock_server), http_client=client)
        deltas, result = await _consume_async(
            executor, task, "anthropic", 1 if how == "break" else None, "break"
        )
        await executor.aclose()
    assert result is not None
    if how == "whole":
        assert result.status is ExecutionStatus.SUCCESS
        assert "".join(deltas) == result.output == "mock reply to: a b"
    else:
        assert result.status is ExecutionStatus.CANCELLED
        await eventually(lambda: _last_stream(mock_server).disconnected_at is not None)


async def test_a_refused_connection_is_retried_then_reported(driver: str) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = Agent(name="gone", provider="openai", base_url=f"http://127.0.0.1:{port}/v1")
    deltas, result = await consume(
        driver, [agent], AgentTask(id="g", prompt="x", max_retries=1), "gone"
    )
    assert result is not None
    assert result.status is ExecutionStatus.FAILED
    assert result.error is not None
    assert result.error.kind == "connection"
    assert result.attempts == 2
    assert deltas == []


async def test_a_streamed_reply_is_priced_like_an_executed_one(
    driver: str, mock_server: MockServer
) -> None:
    """Usage and cost come from the stream, on every driver, and match execute()'s."""
    price = taskexec.Price(input_per_mtok=2.0, output_per_mtok=8.0)
    agent = Agent(
        name="openai", provider="openai", base_url=mock_server.openai_base_url, price=price
    )
    task = AgentTask(id="priced", prompt="three words here")
    _, result = await consume(driver, [agent], task, "openai")
    assert result is not None
    assert result.status is ExecutionStatus.SUCCESS
    async with taskexec.TaskExecutor([agent]) as executor:
        executed = await executor.execute(task)
    assert result.usage.input_tokens == executed.usage.input_tokens > 0
    assert result.usage.output_tokens == executed.usage.output_tokens > 0
    assert result.usage.cost_usd is not None
    assert result.usage.cost_usd == executed.usage.cost_usd


@pytest.mark.parametrize("fault", ["401", "401:10", "malformed", "cut:30"])
async def test_a_failed_stream_never_shows_the_key(
    driver: str, fault: str, mock_server: MockServer
) -> None:
    """The mock's 401 echoes the caller's key in its body (in part with ``401:10``): the
    stream's result, its text and its repr carry none of it, on every driver."""
    key = "sk-stream-" + "Q" * 30
    agent = Agent(
        name="openai",
        provider="openai",
        base_url=mock_server.openai_base_url,
        api_key=key,
        max_retries=0,
    )
    task = AgentTask(id="leak", prompt=f"hi [[fault={fault}]]")
    deltas, result = await consume(driver, [agent], task, "openai")
    assert result is not None
    assert result.status is ExecutionStatus.FAILED
    shown = result.model_dump_json() + "".join(deltas)
    for piece in (key, key[:12], "Q" * 8):
        assert piece not in shown
