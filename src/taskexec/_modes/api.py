"""``api`` mode: POST the task to a remote agent's endpoint over the pooled client."""

from __future__ import annotations

import json

from .._http import TransportError
from .._models import ExecutionError
from .._retry import AttemptFailed, classify_response, run_attempts, transport_failure
from ..providers.base import redactor
from . import Call, Outcome

__all__ = ("run_api",)


async def run_api(call: Call) -> Outcome:
    """POST the task to ``agent.url``; a 2xx reply ``{"output": "..."}`` is the output."""
    agent = call.agent
    assert agent.url is not None  # the executor checks this before choosing the mode
    url = agent.url
    key = agent.api_key.get_secret_value() if agent.api_key else None
    redact = redactor(key)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    body = json.dumps(
        {
            "task_id": call.task.id,
            "prompt": call.prompt,
            "agent": agent.name,
            "metadata": call.task.metadata,
        }
    ).encode()
    where = f"agent {agent.name!r} at {url}"
    http = call.pool.get()

    async def attempt(timeout_s: float | None) -> str:
        try:
            response = await http.post(url, body, headers, timeout_s)
        except TransportError as exc:
            raise transport_failure(exc, redact, where=where) from None
        failure = classify_response(response, redact, where=where)
        if failure is not None:
            raise failure
        try:
            output = json.loads(response.body)["output"]
            if not isinstance(output, str):
                raise TypeError("output is not a string")
        except (KeyError, TypeError, ValueError) as exc:
            snippet = redact(response.body[:200].decode("utf-8", "replace"))
            message = (
                f'{where} replied {response.status} without {{"output": "..."}} ({exc!r}): '
                f"{snippet}"
            )
            raise AttemptFailed(ExecutionError(kind="bad_response", message=message)) from None
        return output

    output, error = await run_attempts(call, attempt)
    return Outcome(output=output, error=error, metadata={"execution_mode": "api"})
