"""``llm`` mode: a chat call to the agent's provider, over the pooled client, with retries."""

from __future__ import annotations

from .._models import ExecutionError
from .._retry import run_attempts
from ..providers import get_provider
from ..providers.base import ChatReply
from . import Call, Outcome
from .script import run_script

__all__ = ("run_llm",)


async def run_llm(call: Call) -> Outcome:
    """Get a chat reply; run the agent's script instead if its provider cannot run here."""
    agent = call.agent
    provider = get_provider(agent.provider)
    unavailable = provider.unavailable(agent)
    if unavailable is not None:
        if agent.command:
            outcome = await run_script(call)
            outcome.metadata.update(
                execution_mode="script_fallback", fallback_reason=unavailable.reason
            )
            return outcome
        config_error = ExecutionError(kind="configuration", message=unavailable.message)
        metadata = {"execution_mode": "llm", "provider": agent.provider}
        return Outcome(error=config_error, metadata=metadata)

    async def attempt(timeout_s: float | None) -> ChatReply:
        return await provider.complete(agent, call.prompt, call.pool, timeout_s)

    reply, error = await run_attempts(call, attempt)
    metadata = {"execution_mode": "llm", "provider": agent.provider}
    if agent.model:
        metadata["model"] = agent.model
    if reply is None:
        return Outcome(error=error, metadata=metadata)
    return Outcome(output=reply.text, usage=reply.usage, metadata=metadata)
