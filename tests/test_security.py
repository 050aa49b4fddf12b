"""Keys: where they are sent, and that no piece of one reaches a result, a log or a message."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from taskexec import (
    Agent,
    AgentTask,
    ExecutionStatus,
    ProjectOrchestrator,
    TaskExecutor,
    flags,
    load_plan,
)
from taskexec import providers as providers_module
from taskexec._models import BASE_SCRIPT_ENV, ScriptEnv
from taskexec._secrets import MIN_PARTIAL, Redactor
from taskexec.testing import MockServer

from .conftest import AGENTS_DIR, FAST_RETRY

Make = Any

SECRET = "sk-DISTINCTIVE-4f9a2c77e1b3"


class Vendor(NamedTuple):
    provider: str
    key_var: str  # where the operator's key is
    url_var: str  # the base URL the operator may name
    header: str  # the header that carries the key


VENDORS = [
    Vendor("openai", "OPENAI_API_KEY", "OPENAI_BASE_URL", "authorization"),
    Vendor("anthropic", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "x-api-key"),
    Vendor("gemini", "GOOGLE_API_KEY", "GEMINI_BASE_URL", "x-goog-api-key"),
    Vendor("gemini", "GEMINI_API_KEY", "GEMINI_BASE_URL", "x-goog-api-key"),
]
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")


def base_url_for(server: MockServer, provider: str) -> str:
    return server.openai_base_url if provider == "openai" else server.url


def pieces(secret: str) -> list[str]:
    """Every head and tail of ``secret`` of MIN_PARTIAL characters or more."""
    sizes = range(MIN_PARTIAL, len(secret) + 1)
    return [secret[:n] for n in sizes] + [secret[-n:] for n in sizes]


def assert_no_piece(text: str, secret: str = SECRET) -> None:
    leaked = [p for p in pieces(secret) if p in text]
    assert not leaked, f"pieces of the key leaked: {leaked}"


# -- where an environment key goes ------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS, ids=lambda v: v.key_var)
@pytest.mark.parametrize("engine", ["async", "legacy"])
async def test_environment_key_never_goes_to_a_base_url_the_plan_set(
    mock_server: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    make_executor: Make,
    vendor: Vendor,
    engine: str,
) -> None:
    monkeypatch.setenv(vendor.key_var, SECRET)
    base = base_url_for(mock_server, vendor.provider)
    agent = Agent(name="a", provider=vendor.provider, base_url=base)
    async with make_executor(agent) as executor:
        with flags.use_engine(engine):
            result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.ok  # the custom endpoint needs no key, and gets none
    (request,) = mock_server.recorded
    assert not set(KEY_HEADERS) & set(request.headers)
    assert SECRET not in repr(request)


@pytest.mark.parametrize("vendor", VENDORS, ids=lambda v: v.key_var)
async def test_environment_key_goes_to_the_base_url_the_environment_names(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch, make_executor: Make, vendor: Vendor
) -> None:
    base = base_url_for(mock_server, vendor.provider)
    monkeypatch.setenv(vendor.key_var, SECRET)
    monkeypatch.setenv(vendor.url_var, base + "/")
    same_url = Agent(name="same", provider=vendor.provider, base_url=base)
    no_url = Agent(name="none", provider=vendor.provider)
    async with make_executor([same_url, no_url]) as executor:
        for name in ("same", "none"):
            assert (await executor.execute(AgentTask(id="t", prompt="x"), agent=name)).ok
    assert [r.headers[vendor.header].removeprefix("Bearer ") for r in mock_server.recorded] == [
        SECRET,
        SECRET,
    ]


async def test_api_key_env_sends_the_named_variable_to_a_custom_base_url(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch, make_executor: Make
) -> None:
    monkeypatch.setenv("LOCAL_LLM_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-operators-openai-key")
    base = mock_server.openai_base_url
    agent = Agent(name="a", provider="openai", base_url=base, api_key_env="LOCAL_LLM_KEY")
    async with make_executor(agent) as executor:
        assert (await executor.execute(AgentTask(id="t", prompt="x"))).ok
    assert mock_server.recorded[0].headers["authorization"] == f"Bearer {SECRET}"


async def test_api_key_env_that_is_not_set_is_a_missing_key(
    mock_server: MockServer, make_executor: Make
) -> None:
    agent = Agent(
        name="a", provider="openai", base_url=mock_server.openai_base_url, api_key_env="NOT_SET_1"
    )
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert (result.status, result.error.kind) == (ExecutionStatus.FAILED, "configuration")
    assert "set NOT_SET_1" in result.error.message
    assert not mock_server.recorded


async def test_a_withheld_key_is_explained_when_the_server_wants_one(
    mock_server: MockServer, monkeypatch: pytest.MonkeyPatch, make_executor: Make
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    mock_server.set_faults(["401"])
    agent = Agent(name="a", provider="openai", base_url=mock_server.openai_base_url)
    async with make_executor(agent) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert result.error.status_code == 401
    assert "api_key_env: OPENAI_API_KEY" in result.error.message
    assert_no_piece(result.model_dump_json())


@pytest.fixture
async def redirecting_servers() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A server that answers 307 to a second server, which records what reaches it."""
    reached: list[dict[str, str]] = []

    async def target(request: web.Request) -> web.Response:
        reached.append(dict(request.headers))
        return web.json_response({"choices": [{"message": {"content": "stolen"}}]})

    second = web.Application()
    second.router.add_post("/{tail:.*}", target)
    second_runner = web.AppRunner(second)
    await second_runner.setup()
    second_site = web.TCPSite(second_runner, "127.0.0.1", 0)
    await second_site.start()
    port = second_runner.addresses[0][1]

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{port}{request.path}")

    first = web.Application()
    first.router.add_post("/{tail:.*}", redirect)
    first_runner = web.AppRunner(first)
    await first_runner.setup()
    await web.TCPSite(first_runner, "127.0.0.1", 0).start()
    first_port = first_runner.addresses[0][1]
    yield f"http://127.0.0.1:{first_port}", reached
    await first_runner.cleanup()
    await second_runner.cleanup()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_redirect_is_not_followed_with_the_key(
    redirecting_servers: tuple[str, list[dict[str, str]]], provider: str
) -> None:
    url, reached = redirecting_servers
    base = url + "/v1" if provider == "openai" else url
    agent = Agent(name="a", provider=provider, base_url=base, api_key=SECRET)  # type: ignore[arg-type]
    async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert (result.status, result.error.status_code) == (ExecutionStatus.FAILED, 307)
    assert reached == []


# -- redaction ----------------------------------------------------------------------------------


@given(
    secret=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=8, max_size=60),
    before=st.integers(0, 600),
    after=st.integers(0, 600),
    limit=st.integers(1, 600),
    keep=st.sampled_from(["head", "tail"]),
)
def test_a_cut_never_leaves_a_piece_of_the_key(
    secret: str, before: int, after: int, limit: int, keep: str
) -> None:
    text = "." * before + secret + "," * after
    assert_no_piece(Redactor([secret]).cut(text, limit, keep=keep), secret)


@pytest.mark.parametrize("size", range(MIN_PARTIAL, len(SECRET)))
def test_a_piece_of_the_key_at_either_end_is_redacted(size: int) -> None:
    redact = Redactor([SECRET])
    assert redact(f"body ends with {SECRET[:size]}") == "body ends with ***"
    assert redact(f"{SECRET[-size:]} starts the tail") == "*** starts the tail"
    assert redact(f"{SECRET[:size]} is in the middle") == f"{SECRET[:size]} is in the middle"
    assert "Redactor of 1 secret" in repr(redact)
    assert SECRET not in repr(redact)


async def test_a_key_straddling_the_error_cut_leaks_no_piece(
    mock_server: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The body is {"error": {"message": "<padding>Incorrect API key provided: <key>", ...}}, and
    # a result keeps its first 500 characters: these paddings move the key across that cut.
    caplog.set_level(logging.DEBUG)
    base = mock_server.openai_base_url
    agent = Agent(name="a", provider="openai", base_url=base, api_key=SECRET, max_retries=0)  # type: ignore[arg-type]
    paddings = range(400, 470)
    mock_server.set_faults([f"401:{n}" for n in paddings])
    async with TaskExecutor([agent], retry_policy=FAST_RETRY) as executor:
        results = [await executor.execute(AgentTask(id=f"t{n}", prompt="x")) for n in paddings]
    assert {r.error.status_code for r in results if r.error} == {401}
    messages = [r.error.message for r in results if r.error]
    assert any("provided: ***" in m for m in messages)  # the key fitted, or straddled the cut
    assert any("provided:" not in m for m in messages)  # the cut came before it
    for result in results:
        assert_no_piece(result.model_dump_json() + repr(result))
    assert_no_piece(caplog.text)


async def test_a_provider_exception_quoting_the_key_is_redacted(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    provider_registry: Callable[..., None],
) -> None:
    class Careless(providers_module.Provider):
        name = "careless"

        async def complete(self, agent, prompt, pool, timeout_s):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)
            raise RuntimeError(f"could not authenticate with {self.api_key(agent)} at all")

    provider_registry(Careless)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-0123456789")
    agents = [Agent(name="c", provider="careless", api_key=SECRET)]  # type: ignore[arg-type]
    async with TaskExecutor(agents) as executor:
        (result,) = await ProjectOrchestrator(executor).execute_tasks(
            [AgentTask(id="t", prompt="x")]
        )
    assert result.error is not None
    assert result.error.kind == "internal"
    assert result.error.message == "RuntimeError: could not authenticate with *** at all"
    assert "unexpected error" in caplog.text
    assert "Traceback" in caplog.text
    assert_no_piece(caplog.text + result.model_dump_json())


# -- what scripts receive -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*script execution is deprecated:DeprecationWarning")
@pytest.mark.parametrize("engine", ["async", "legacy"])
async def test_script_env_inherits_by_default_and_can_be_limited(
    monkeypatch: pytest.MonkeyPatch, make_executor: Make, engine: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET + "-anthropic")
    monkeypatch.setenv("PATH", os.environ.get("PATH", "/usr/bin"))
    command = [sys.executable, str(AGENTS_DIR / "env_names.py")]
    agents = [
        Agent(name="all", mode="script", command=command),
        Agent(
            name="some",
            mode="script",
            command=command,
            env=ScriptEnv(inherit=False, keep=["OPENAI_API_KEY", "NOT_SET_ANYWHERE"]),
        ),
    ]
    async with make_executor(agents) as executor:
        with flags.use_engine(engine):
            inherited = await executor.execute(AgentTask(id="t", prompt="x"), agent="all")
            limited = await executor.execute(AgentTask(id="t", prompt="x"), agent="some")
    assert inherited.output is not None
    assert limited.output is not None
    assert {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "PATH"} <= set(inherited.output.split())
    names = set(limited.output.split())
    assert {"OPENAI_API_KEY", "PATH"} <= names
    assert not names & {"ANTHROPIC_API_KEY", "NOT_SET_ANYWHERE"}
    assert names <= {*BASE_SCRIPT_ENV, "OPENAI_API_KEY", "LC_CTYPE", "PWD"}


@pytest.mark.filterwarnings("ignore:.*script execution is deprecated:DeprecationWarning")
@pytest.mark.parametrize("engine", ["async", "legacy"])
@pytest.mark.parametrize("after", [0, 1, 7, 1990, 1999, 2000, 2010])
async def test_a_script_printing_its_key_to_stderr_leaks_no_piece(
    monkeypatch: pytest.MonkeyPatch, make_executor: Make, engine: str, after: int
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    code = (
        "import os, sys; sys.stdin.read(); "
        f"sys.stderr.write('key=' + os.environ['OPENAI_API_KEY'] + '.' * {after}); sys.exit(3)"
    )
    agent = Agent(name="s", mode="script", command=[sys.executable, "-c", code])
    async with make_executor(agent) as executor:
        with flags.use_engine(engine):
            result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert result.error.kind == "script_exit"
    assert "exited with 3" in result.error.message
    assert_no_piece(result.model_dump_json())


def test_script_env_round_trips_in_a_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "agents:\n"
        "  - {name: s, mode: script, command: [python, a.py],"
        " env: {inherit: false, keep: [OPENAI_API_KEY]}}\n"
        "tasks: [{id: t, prompt: x}]\n"
    )
    (agent,) = load_plan(plan).agents
    assert agent.env == ScriptEnv(inherit=False, keep=["OPENAI_API_KEY"])
    assert Agent.model_validate_json(agent.model_dump_json()) == agent


@pytest.mark.parametrize("vendor", VENDORS[:3], ids=lambda v: v.url_var)
def test_a_blank_base_url_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch, vendor: Vendor
) -> None:
    """``OPENAI_BASE_URL=`` (or blanks) names no endpoint: requests and the key go to the
    vendor's own, as with the variable unset."""
    from taskexec.providers import get_provider

    provider = get_provider(vendor.provider)
    monkeypatch.setenv(vendor.url_var, "  ")
    assert provider.environment_base_url() is None
    assert provider.base_url(Agent(name="a", provider=vendor.provider)) == (
        provider.default_base_url
    )
