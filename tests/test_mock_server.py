"""The mock server against the official SDKs, and its control endpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from taskexec.testing import MockServer


def test_official_openai_sdk_accepts_the_mock(mock_server: MockServer) -> None:
    client = openai.OpenAI(base_url=mock_server.openai_base_url, api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "ping"}]
    )
    assert reply.choices[0].message.content == "mock reply to: ping"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 1
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "ping pong"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "mock reply to: ping pong"
    client.close()


def test_official_anthropic_sdk_accepts_the_mock(mock_server: MockServer) -> None:
    client = anthropic.Anthropic(base_url=mock_server.url, api_key="sk-ant-test", max_retries=0)
    message = client.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "ping"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "mock reply to: ping"
    assert message.usage.output_tokens == 4
    client.close()


def test_control_endpoints(mock_server: MockServer) -> None:
    with httpx.Client(base_url=mock_server.url) as client:
        assert client.post("/_faults", json=["503", "reset"]).json() == {"faults": ["503", "reset"]}
        assert client.post("/_faults", json=["teapot"]).status_code == 400
        assert client.post("/agent", content=b"not json").status_code == 400
        assert client.get("/agent").status_code == 405
        assert client.get("/nowhere").status_code == 404
        assert client.post("/agent", json={"prompt": "p"}).status_code == 503
        stats = client.get("/_stats").json()
        assert stats["statuses"] == {"200": 1, "400": 2, "405": 1, "404": 1, "503": 1}
        assert stats["faults_served"] == 1
        assert client.post("/_reset").json() == {"ok": True}
        assert client.get("/_stats").json()["requests"] == 1
    assert list(mock_server.faults) == []


def test_prompt_directives_pick_fault_and_latency(mock_server: MockServer) -> None:
    with httpx.Client(base_url=mock_server.url) as client:
        reply = client.post("/agent", json={"prompt": "x [[fault=409]] [[latency=0.01]]"})
        assert reply.status_code == 409
        reply = client.post(
            "/v1beta/models/g:generateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        )
        assert reply.json()["candidates"][0]["content"]["parts"][0]["text"] == "mock reply to: hi"
        chunked = client.post(
            "/agent",
            content=iter([b'{"prompt": ', b'"chunky"}']),
            headers={"content-type": "application/json"},
        )
        assert chunked.json() == {"output": "mock reply to: chunky"}
    assert json.loads(mock_server.recorded[0].body)["prompt"].startswith("x ")


def test_unknown_fault_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fault 'boom'"):
        MockServer(faults=["boom"])


def test_official_google_genai_sdk_accepts_the_mock(mock_server: MockServer) -> None:
    from google import genai
    from google.genai import types

    client = genai.Client(
        api_key="g-test", http_options=types.HttpOptions(base_url=mock_server.url)
    )
    reply = client.models.generate_content(
        model="gemini-test",
        contents="ping",
        config=types.GenerateContentConfig(system_instruction="be terse"),
    )
    assert reply.text == "mock reply to: ping"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata.prompt_token_count == 1
    (request,) = mock_server.recorded
    assert request.headers["x-goog-api-key"] == "g-test"
    assert request.json()["systemInstruction"]["parts"][0]["text"] == "be terse"


def test_a_port_in_use_is_reported_cleanly(mock_server: MockServer) -> None:
    from taskexec.testing import mock_server_in_thread

    with (
        pytest.raises(OSError, match="address already in use"),
        mock_server_in_thread(port=mock_server.port),
    ):
        pass


def test_the_pytest_plugin_serves_other_projects(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["taskexec.pytest_plugin"]\n')
    (tmp_path / "test_theirs.py").write_text(
        """
import asyncio

from taskexec import Agent, AgentTask, TaskExecutor


def test_against_the_mock(taskexec_mock_server):
    taskexec_mock_server.set_faults(["503"])
    agent = Agent(name="a", provider="openai", base_url=taskexec_mock_server.openai_base_url)

    async def main():
        async with TaskExecutor([agent]) as executor:
            return await executor.execute(AgentTask(id="t", prompt="hi"))

    result = asyncio.run(main())
    assert result.output == "mock reply to: hi"
    assert result.attempts == 2
    assert taskexec_mock_server.stats.faults_served == 1


def test_each_test_starts_clean(taskexec_mock_server):
    assert taskexec_mock_server.stats.chat_requests == 0
"""
    )
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "2 passed" in completed.stdout
