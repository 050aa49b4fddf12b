"""Units for the HTTP seam and retry decisions, with httpx.MockTransport where that is clearer."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from taskexec import Agent, AgentTask, ExecutionStatus, RetryPolicy, TaskExecutor
from taskexec._http import ClientPool
from taskexec._retry import retry_after_s

from .conftest import FAST_RETRY


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "-3"}) == 0.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after-ms": "soon", "retry-after": "9"}) == 9.0
    date = format_datetime(now + timedelta(seconds=12), usegmt=True)
    assert retry_after_s({"retry-after": date}, now=now) == 12.0
    naive = (now + timedelta(seconds=5)).strftime("%a, %d %b %Y %H:%M:%S")
    assert retry_after_s({"retry-after": naive}, now=now) == 5.0
    assert retry_after_s({"retry-after": "whenever"}) is None
    assert retry_after_s({}) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(base_delay_s=1, max_delay_s=4, jitter=0)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [1, 2, 4, 4, 4]
    jittered = RetryPolicy(base_delay_s=1, max_delay_s=4, jitter=0.5)
    assert all(0.5 <= jittered.backoff_s(1) <= 1 for _ in range(50))


def _chat(content: object = "hello") -> dict[str, object]:
    return {
        "choices": [{"message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1},
    }


async def test_a_callers_httpx_client_is_used_and_left_open() -> None:
    seen: list[httpx.Request] = []
    replies = iter(
        [
            httpx.Response(503),
            httpx.Response(200, json=_chat()),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(replies)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    agent = Agent(name="a", provider="openai", base_url="http://llm.test/v1")
    async with TaskExecutor([agent], http_client=client, retry_policy=FAST_RETRY) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="hi"))
    assert (result.status, result.output, result.attempts) == (ExecutionStatus.SUCCESS, "hello", 2)
    assert str(seen[0].url) == "http://llm.test/v1/chat/completions"
    assert json.loads(seen[0].content)["messages"] == [{"role": "user", "content": "hi"}]
    assert not client.is_closed
    await client.aclose()


@pytest.mark.parametrize(
    ("exc", "kind"),
    [(httpx.ConnectError("refused"), "connection"), (httpx.ReadTimeout("slow"), "timeout")],
)
async def test_httpx_transport_errors_map_to_kinds(exc: Exception, kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        agent = Agent(name="a", provider="openai", base_url="http://llm.test/v1", max_retries=0)
        executor = TaskExecutor([agent], http_client=client)
        result = await executor.execute(AgentTask(id="t", prompt="hi"))
    assert result.error is not None
    assert (result.error.kind, result.error.retryable) == (kind, True)


@pytest.mark.parametrize(
    "body",
    [
        {"choices": []},
        {"choices": [{"message": {"content": None}}]},
        ["not", "an", "object"],
    ],
)
async def test_2xx_that_is_not_a_chat_reply_is_bad_response(body: object) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    async with httpx.AsyncClient(transport=transport) as client:
        agent = Agent(name="a", provider="openai", base_url="http://llm.test/v1")
        result = await TaskExecutor([agent], http_client=client).execute(
            AgentTask(id="t", prompt="x")
        )
    assert result.error is not None
    assert (result.error.kind, result.error.retryable, result.attempts) == (
        "bad_response",
        False,
        1,
    )


async def test_anthropic_and_gemini_parse_text_blocks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/messages":
            assert json.loads(request.content)["max_tokens"] == 1024
            return httpx.Response(
                200,
                json={
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "tool_use", "id": "x"},
                        {"type": "text", "text": "b"},
                    ],
                    "usage": {"input_tokens": 4, "output_tokens": None},
                },
            )
        return httpx.Response(
            200, json={"candidates": [{"content": {"parts": [{"text": "g1"}, {"text": "g2"}]}}]}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        agents = [
            Agent(name="c", provider="anthropic", base_url="http://x.test"),
            Agent(name="g", provider="gemini", base_url="http://x.test"),
        ]
        executor = TaskExecutor(agents, http_client=client)
        claude = await executor.execute(AgentTask(id="t", prompt="x"), agent="c")
        gemini = await executor.execute(AgentTask(id="t", prompt="x"), agent="g")
    assert (claude.output, claude.usage.input_tokens, claude.usage.output_tokens) == ("ab", 4, 0)
    assert (gemini.output, gemini.usage.input_tokens) == ("g1g2", 0)


async def test_pool_keeps_one_client_per_loop_and_closes_them_all() -> None:
    pool = ClientPool()
    here = pool.get()
    assert pool.get() is here
    other_loop = asyncio.new_event_loop()
    other_ready = asyncio.Event()
    clients: list[object] = []

    def in_other_thread() -> None:
        async def grab() -> None:
            clients.append(pool.get())

        other_loop.run_until_complete(grab())
        other_loop.close()

    await asyncio.to_thread(in_other_thread)
    other_ready.set()
    assert len(clients) == 1
    assert clients[0] is not here
    assert pool.clients_created == 2
    await pool.aclose()
    assert here._session.closed  # type: ignore[attr-defined]
    assert clients[0]._session.closed  # type: ignore[attr-defined]
    assert pool.get() is not here  # a closed pool makes fresh clients on demand
    await pool.aclose()


@pytest.mark.parametrize(
    ("error", "kind"),
    [(httpx.ConnectError("refused here"), "connection"), (httpx.ReadTimeout("slow"), "timeout")],
)
async def test_httpx_streams_turn_httpx_errors_into_transport_errors(
    error: Exception, kind: str
) -> None:
    """A caller's httpx client (async) and the legacy engine's (blocking) stream the same way:
    httpx's errors become the transport errors the retry loop knows; a body streams through."""
    from taskexec._http_stream import BlockingStream, HttpxStream
    from taskexec._transport import TransportError

    def failing(request: httpx.Request) -> httpx.Response:
        raise error

    def body(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(b"streamed"))

    timeout = httpx.Timeout(1)
    async with httpx.AsyncClient(transport=httpx.MockTransport(failing)) as client:
        with pytest.raises(TransportError) as caught:
            async with HttpxStream(client, "http://x/", b"", {}, timeout):
                pass
    assert caught.value.kind == kind
    blocking = httpx.Client(transport=httpx.MockTransport(failing))
    with (
        blocking,
        pytest.raises(TransportError) as caught,
        BlockingStream(blocking, "http://x/", b"", {}, timeout),
    ):
        pass
    assert caught.value.kind == kind
    client = httpx.AsyncClient(transport=httpx.MockTransport(body))
    async with client, HttpxStream(client, "http://x/", b"", {}, timeout) as stream:
        assert b"".join([chunk async for chunk in stream]) == b"streamed"
    blocking = httpx.Client(transport=httpx.MockTransport(body))
    with blocking, BlockingStream(blocking, "http://x/", b"", {}, timeout) as sync_stream:
        assert b"".join(sync_stream) == b"streamed"
