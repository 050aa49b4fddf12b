"""The provider registry and availability."""

from __future__ import annotations

from typing import ClassVar

import pytest

from taskexec import (
    Agent,
    AgentTask,
    ExecutionStatus,
    ProviderNotFoundError,
    TaskExecutor,
    Usage,
    providers,
)
from taskexec.providers import (
    ChatReply,
    ClientPool,
    Provider,
    get_provider,
    is_provider_available,
    list_available_providers,
    register_provider,
)


class ShoutProvider(Provider):
    name: ClassVar[str] = "shout"

    async def complete(
        self, agent: Agent, prompt: str, pool: ClientPool, timeout_s: float | None
    ) -> ChatReply:
        return ChatReply(prompt.upper(), Usage(input_tokens=1, output_tokens=1))


class NeedsPackageProvider(ShoutProvider):
    name: ClassVar[str] = "needs-package"
    requires: ClassVar[tuple[str, ...]] = ("taskexec_no_such_module_here",)
    extra: ClassVar[str | None] = "fancy"


@pytest.fixture
def registry(provider_registry: object) -> None:
    """Isolate registrations made by a test."""


def test_availability_follows_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert list_available_providers() == ["offline"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("GEMINI_API_KEY", "g-x")
    assert list_available_providers() == ["gemini", "offline", "openai"]
    assert is_provider_available("openai")
    assert not is_provider_available("anthropic")
    assert not is_provider_available("no-such-provider")


def test_gemini_key_order_prefers_google_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "from-gemini")
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google")
    assert get_provider("gemini").api_key(Agent(name="g", provider="gemini")) == "from-google"
    agent = Agent(name="g", provider="gemini", api_key="own")  # type: ignore[arg-type]
    assert get_provider("gemini").api_key(agent) == "own"


def test_custom_base_url_needs_no_key() -> None:
    openai = get_provider("openai")
    assert (
        openai.unavailable(Agent(name="o", provider="openai", base_url="http://localhost:11434/v1"))
        is None
    )
    missing = openai.unavailable(Agent(name="o", provider="openai"))
    assert missing is not None
    assert missing.reason == "missing_api_key"
    assert "OPENAI_API_KEY" in missing.message


def test_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://proxy.local/")
    provider = get_provider("anthropic")
    assert (
        provider.endpoint(Agent(name="c", provider="anthropic")) == "http://proxy.local/v1/messages"
    )  # type: ignore[attr-defined]


@pytest.mark.usefixtures("registry")
async def test_user_registered_provider_is_used_by_an_agent() -> None:
    register_provider(ShoutProvider)
    assert "shout" in providers.list_providers()
    assert is_provider_available("shout")
    async with TaskExecutor([Agent(name="loud", provider="shout")]) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="hello"))
    assert (result.status, result.output) == (ExecutionStatus.SUCCESS, "HELLO")


@pytest.mark.usefixtures("registry")
async def test_missing_dependency_names_the_extra_and_falls_back() -> None:
    register_provider(NeedsPackageProvider())
    assert not is_provider_available("needs-package")
    plain = Agent(name="p", provider="needs-package")
    reason = get_provider("needs-package").unavailable(plain)
    assert reason is not None
    assert reason.reason == "missing_dependency"
    assert "pip install 'taskexec[fancy]'" in reason.message
    async with TaskExecutor([plain]) as executor:
        result = await executor.execute(AgentTask(id="t", prompt="x"))
    assert result.error is not None
    assert (result.error.kind, result.status) == ("configuration", ExecutionStatus.FAILED)


@pytest.mark.usefixtures("registry")
def test_entry_points_are_loaded_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEntryPoint:
        name = "from-plugin"

        def load(self) -> type[Provider]:
            return ShoutProvider

    monkeypatch.setattr(providers, "_entry_points_loaded", False)
    monkeypatch.setattr(providers, "entry_points", lambda group: [FakeEntryPoint()])
    assert isinstance(get_provider("from-plugin"), ShoutProvider)
    with pytest.raises(ProviderNotFoundError, match="entry point group"):
        get_provider("still-unknown")
