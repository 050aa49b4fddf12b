"""``api`` mode: POST the task to a remote agent's endpoint over the pooled client."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .._http import HttpResponse, TransportError
from .._models import ExecutionError
from .._retry import (
    AttemptFailed,
    body_snippet,
    classify_response,
    run_attempts,
    transport_failure,
)
from .._secrets import Redactor
from . import Call, Outcome

__all__ = ("ApiRequest", "api_request", "parse_api_response", "run_api")


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """The one request of ``api`` mode, shared by both engines."""

    url: str
    headers: dict[str, str]
    body: bytes
    where: str
    redact: Redactor


def api_request(call: Call) -> ApiRequest:
    """Return the request for ``call``: JSON ``{"task_id", "prompt", "agent", "metadata"}``."""
    agent = call.agent
    assert agent.url is not None  # the executor checks this before choosing the mode
    key = agent.api_key.get_secret_value() if agent.api_key else None
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
    return ApiRequest(
        agent.url, headers, body, f"agent {agent.name!r} at {agent.url}", Redactor([key])
    )


def parse_api_response(request: ApiRequest, response: HttpResponse) -> str:
    """Return the output of a reply, or raise :class:`AttemptFailed` saying what was wrong."""
    failure = classify_response(response, request.redact, where=request.where)
    if failure is not None:
        raise failure
    try:
        output = json.loads(response.body)["output"]
        if not isinstance(output, str):
            raise TypeError("output is not a string")
    except (KeyError, TypeError, ValueError) as exc:
        snippet = body_snippet(request.redact, response.body, 200)
        message = (
            f'{request.where} replied {response.status} without {{"output": "..."}} '
            f"({exc!r}): {snippet}"
        )
        raise AttemptFailed(ExecutionError(kind="bad_response", message=message)) from None
    return output


async def run_api(call: Call) -> Outcome:
    """POST the task to ``agent.url``; a 2xx reply ``{"output": "..."}`` is the output."""
    request = api_request(call)

    async def attempt(timeout_s: float | None) -> str:
        try:
            response = await call.pool.get().post(
                request.url, request.body, request.headers, timeout_s
            )
        except TransportError as exc:
            raise transport_failure(exc, request.redact, where=request.where) from None
        return parse_api_response(request, response)

    output, error = await run_attempts(call, attempt)
    return Outcome(output=output, error=error, metadata={"execution_mode": "api"})
