"""LLM providers, looked up by name, and everything needed to write one.

Built in: ``offline``, ``openai`` (any OpenAI-compatible server), ``anthropic`` and ``gemini``.

A provider subclasses :class:`Provider` (or :class:`HttpProvider` for one JSON POST per attempt)
and implements ``complete(agent, prompt, pool, timeout_s) -> ChatReply``. It receives a
:class:`ClientPool`, whose ``get()`` is the running loop's :class:`HttpClient` (``post`` returns an
:class:`HttpResponse` or raises :class:`TransportError`), and reports a failed attempt by raising
:class:`AttemptFailed` with an ``ExecutionError``; :func:`classify_response`,
:func:`transport_failure` and :func:`redactor` build those the way the built-in providers do, so
retries, ``Retry-After`` and key redaction behave the same. Every name here is public and
documented; nothing a provider needs lives in a private module.
Register your own with :func:`register_provider`, or from a package through the
``taskexec.providers`` entry point group (the entry point names the provider and points at a
:class:`~taskexec.providers.base.Provider` subclass or instance)::

    [project.entry-points."taskexec.providers"]
    mistral = "my_package.providers:MistralProvider"
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points
from threading import Lock

from .._errors import ProviderNotFoundError
from .._http import ClientPool, HttpClient, HttpResponse, TransportError
from .._models import Agent
from .._retry import AttemptFailed, classify_response, transport_failure
from .._secrets import Redactor
from .anthropic import AnthropicProvider
from .base import (
    ChatReply,
    HttpProvider,
    Provider,
    StreamDecoder,
    StreamErrorEvent,
    StreamReply,
    Unavailable,
    redactor,
)
from .gemini import GeminiProvider
from .offline import OfflineProvider
from .openai import OpenAIProvider

__all__ = (
    "ENTRY_POINT_GROUP",
    "AnthropicProvider",
    "AttemptFailed",
    "ChatReply",
    "ClientPool",
    "GeminiProvider",
    "HttpClient",
    "HttpProvider",
    "HttpResponse",
    "OfflineProvider",
    "OpenAIProvider",
    "Provider",
    "StreamDecoder",
    "StreamErrorEvent",
    "StreamReply",
    "TransportError",
    "Unavailable",
    "classify_response",
    "get_provider",
    "is_provider_available",
    "list_available_providers",
    "list_providers",
    "redactor",
    "register_provider",
    "secret_redactor",
    "transport_failure",
)

ENTRY_POINT_GROUP = "taskexec.providers"

_registry: dict[str, Provider] = {
    p.name: p for p in (OfflineProvider(), OpenAIProvider(), AnthropicProvider(), GeminiProvider())
}
_entry_points_loaded = False
_lock = Lock()


def register_provider(provider: Provider | type[Provider], *, name: str | None = None) -> None:
    """Make a provider available to agents by name (``Agent(provider=name)``).

    Args:
        provider: A :class:`Provider` instance, or a subclass to instantiate.
        name: The name agents use; defaults to ``provider.name``.
    """
    instance = provider() if isinstance(provider, type) else provider
    with _lock:
        _registry[name or instance.name] = instance


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    with _lock:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _registry]
        _entry_points_loaded = True
    for ep in found:
        register_provider(ep.load(), name=ep.name)


def get_provider(name: str) -> Provider:
    """Return the provider registered as ``name``.

    Raises:
        ProviderNotFoundError: No provider has that name; the message lists the known ones.
    """
    provider = _registry.get(name)
    if provider is None:
        _load_entry_points()
        provider = _registry.get(name)
    if provider is None:
        known = ", ".join(sorted(_registry))
        raise ProviderNotFoundError(
            f"unknown provider {name!r}; known providers: {known}. Register others with "
            f"taskexec.providers.register_provider() or the {ENTRY_POINT_GROUP!r} entry point group"
        )
    return provider


def secret_redactor(agents: Iterable[Agent] = ()) -> Redactor:
    """Return a redactor for every key taskexec might hold here: each registered provider's key
    variables, and the keys of ``agents`` (``api_key``, ``api_key_env``)."""
    with _lock:
        names = {var for p in _registry.values() for var in p.key_env_vars}
    extra: list[str | None] = []
    for agent in agents:
        if agent.api_key is not None:
            extra.append(agent.api_key.get_secret_value())
        if agent.api_key_env is not None:
            names.add(agent.api_key_env)
    return Redactor.for_environment(sorted(names), *extra)


def list_providers() -> list[str]:
    """Return the names of every registered provider, available here or not."""
    _load_entry_points()
    return sorted(_registry)


def is_provider_available(name: str) -> bool:
    """Return True when provider ``name`` can run here and now (key set, packages importable).

    Availability is judged for the vendor's own endpoint; an agent with a custom ``base_url``
    may need no key at all.
    """
    try:
        return get_provider(name).unavailable(None) is None
    except ProviderNotFoundError:
        return False


def list_available_providers() -> list[str]:
    """Return the names of the providers that can run here and now, sorted."""
    return [name for name in list_providers() if is_provider_available(name)]
