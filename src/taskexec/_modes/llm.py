"""``llm`` mode: a chat call to the agent's provider, over the pooled client, with retries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .._limits import (
    LimiterUnavailable,
    Limits,
    LimitWaitTooLong,
    RateHeaders,
    estimate_tokens,
    has_limits,
    limiter_for,
    over_tpm,
)
from .._models import Agent, ExecutionError, Usage
from .._pricing import load_table, needs_table, priced
from .._retry import AttemptFailed, run_attempts
from .._tracing import add_event
from .._tracing_llm import traced_complete
from ..providers import Provider, get_provider
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
        return Outcome(
            error=config_error, metadata={"execution_mode": "llm", "provider": agent.provider}
        )

    # The key and endpoint name the limit; an agent without limits does not look them up.
    limiter = (
        limiter_for(agent, provider.name, _endpoint(provider, agent), provider.api_key(agent))
        if has_limits(agent)
        else None
    )
    waited = 0.0
    complete = traced_complete(provider, agent)  # provider.complete, in a span when traced

    async def attempt(timeout_s: float | None) -> ChatReply:
        nonlocal waited
        if limiter is None:
            return await complete(agent, call.prompt, call.pool, timeout_s)
        estimate = estimate_tokens(agent, call.prompt)
        too_large = over_tpm(agent, estimate, limiter.in_force.tpm)
        if too_large is not None:
            raise AttemptFailed(ExecutionError(kind="configuration", message=too_large))
        loop = asyncio.get_running_loop()
        # The limiter's clock is time.monotonic(); the deadline is on the loop's clock.
        deadline = call.deadline - loop.time() + time.monotonic()
        try:
            wait = await limiter.acquire(estimate, deadline)
            waited += wait
            if wait > 0:
                add_event("taskexec.rate_limit.wait", {"taskexec.wait_s": wait})
            async with limiter.request(deadline):
                try:
                    reply = await complete(agent, call.prompt, call.pool, timeout_s)
                except AttemptFailed as failed:
                    if failed.error.status_code == 429:
                        # One 429 pauses the agent, not one task (its Retry-After, else 1 s).
                        pause = failed.retry_after_s or 1.0
                        add_event("taskexec.rate_limit.pause", {"taskexec.wait_s": pause})
                        await limiter.pause(pause)
                    raise
        except LimitWaitTooLong as exc:
            raise AttemptFailed(limit_wait_error(call, exc, limiter.in_force)) from None
        except LimiterUnavailable as exc:
            raise AttemptFailed(limiter_unavailable(call, exc)) from None
        await limiter.correct(estimate, reply.usage.input_tokens + reply.usage.output_tokens)
        await limiter.tighten(RateHeaders.parse(reply.headers))
        return reply

    reply, error = await run_attempts(call, attempt)
    if needs_table(agent):
        await load_table()  # once per process, in a thread: the loop never waits on it
    metadata: dict[str, Any] = {"execution_mode": "llm", "provider": agent.provider}
    if agent.model:
        metadata["model"] = agent.model
    if limiter is not None:
        metadata["rate_limit_wait_s"] = round(waited, 6)
    if reply is None:
        return Outcome(error=error, usage=priced(agent, Usage()), metadata=metadata)
    usage = priced(agent, reply.usage, reply.model)
    return Outcome(output=reply.text, usage=usage, metadata=metadata)


def limit_wait_error(call: Call, exc: LimitWaitTooLong, limits: Limits) -> ExecutionError:
    """The error of a task whose next slot (or place in flight) is past its deadline, naming
    the numbers in force for its key and model."""
    message = (
        f"task {call.task_id!r} would wait {exc.wait_s:.1f} s for agent {call.agent.name!r}'s "
        f"rate limit (rpm {limits.rpm}, tpm {limits.tpm}, max_in_flight {limits.max_in_flight}), "
        "past its deadline"
    )
    return ExecutionError(kind="timeout", message=message)


def limiter_unavailable(call: Call, exc: LimiterUnavailable) -> ExecutionError:
    """The error of a task whose rate limit's Redis stayed away until its deadline (the limiter
    asked again until then: not retried)."""
    message = f"task {call.task_id!r} could not take agent {call.agent.name!r}'s rate limit: {exc}"
    return ExecutionError(kind="connection", message=message)


def _endpoint(provider: Provider, agent: Agent) -> str:
    """Where the provider sends the agent's requests (part of the limit's identity)."""
    base_url = getattr(provider, "base_url", None)
    return str(base_url(agent)) if callable(base_url) else agent.base_url or ""
