"""What travels through RabbitMQ: task messages to workers, and events about tasks.

A task message names an agent and carries the task, never an agent definition or a key: a worker
runs only the agents its own file defines, with keys from its own environment. Anything that is
not a well-formed task message of this version is refused before a worker looks at it further.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._models import (
    _ID_PATTERN,
    AgentTask,
    ExecutionError,
    ExecutionResult,
    ExecutionStatus,
    Mode,
)
from ._config import RUN_ID_PATTERN

__all__ = (
    "BATCH_VERSION",
    "CONTENT_TYPE",
    "TASK_HEADER",
    "BadMessage",
    "DeltaEvent",
    "FinishedEvent",
    "TaskMessage",
    "addressee",
    "decode_task",
    "failure",
    "inputs_digest",
    "message_digest",
    "routing_key",
    "split_batch",
)

#: The header every task message carries, with the protocol version as its value.
TASK_HEADER = "x-taskexec"
TASK_VERSION = "task/1"
#: The header value of a message that carries several task messages of :data:`TASK_VERSION`,
#: one per line (an encoded task message holds no newline: JSON escapes it in strings).
#: A worker of this version reads both kinds; one of an earlier version refuses a batch.
BATCH_VERSION = "tasks/1"
CONTENT_TYPE = "application/json"
#: A task message larger than this is not a taskexec task (prompts are text, not payloads).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class BadMessage(ValueError):
    """A message on a task queue that is not a taskexec task of this version."""


class TaskMessage(BaseModel):
    """One task of one run, for a worker that serves ``agent``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(pattern=RUN_ID_PATTERN.pattern)
    agent: str
    mode: Mode
    task: AgentTask
    #: The outputs of the task's dependencies, for its ``{{dep}}`` placeholders.
    outputs: dict[str, str | None] | None = None
    #: A digest of what the task runs with (see :func:`inputs_digest`): the worker records it
    #: in the result's metadata, and a re-run of the run id reuses the result only if it
    #: still matches.
    inputs: str | None = None
    #: The W3C trace context of the orchestrator's task span (``traceparent``, ``tracestate``),
    #: so that the worker's spans are its children (empty without the otel extra).
    trace: dict[str, str] | None = None
    #: Stream the reply: the worker publishes its text as :class:`DeltaEvent` pieces (routing
    #: key ``run.<run>.task.<task>.delta``) while it arrives, and stores the result as usual.
    stream: bool = False

    def encode(self) -> bytes:
        """Return the message body."""
        return self.model_dump_json(exclude_defaults=True).encode()


def inputs_digest(
    task: AgentTask,
    agent: str,
    mode: str,
    model: str | None,
    outputs: Mapping[str, str | None] | None,
) -> str:
    """A digest of what a task runs with: its rendered prompt (placeholders filled), the
    agent, the mode and the model. A stored result counts for a re-run only with the same one."""
    material = json.dumps(
        [task.render_prompt(outputs), agent, mode, model or ""], ensure_ascii=False
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def message_digest(body: bytes, version: object) -> str:
    """A digest of a task message as sent: its protocol version header and its body. A worker
    that cannot read a message records it; the orchestrator that sent that very message
    recognises it (and no other one)."""
    material = f"{version}\n".encode() + body
    return hashlib.sha256(material).hexdigest()[:32]


def decode_task(body: bytes, headers: object, content_type: str | None) -> TaskMessage:
    """Return the task a message carries.

    Raises:
        BadMessage: The message is not a taskexec task of this version.
    """
    if not isinstance(headers, dict) or TASK_HEADER not in headers:
        raise BadMessage(f"no {TASK_HEADER}: {TASK_VERSION} header")
    if headers[TASK_HEADER] != TASK_VERSION:
        raise BadMessage(
            f"a task message of protocol {headers[TASK_HEADER]!r}; this worker reads "
            f"{TASK_VERSION!r}"
        )
    if content_type != CONTENT_TYPE:
        raise BadMessage(f"content type {content_type!r}, not {CONTENT_TYPE}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"{len(body)} bytes, more than a task may have")
    try:
        return TaskMessage.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"invalid task: {exc.error_count()} problem(s)") from None


def split_batch(body: bytes, headers: object, content_type: str | None) -> list[bytes] | None:
    """Return the task messages a batch carries (each as its own bytes, as sent), or None if
    the message is not a batch.

    Raises:
        BadMessage: It says it is a batch, but cannot be one.
    """
    if not isinstance(headers, dict) or headers.get(TASK_HEADER) != BATCH_VERSION:
        return None
    if content_type != CONTENT_TYPE:
        raise BadMessage(f"content type {content_type!r}, not {CONTENT_TYPE}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"{len(body)} bytes, more than a batch of tasks may have")
    parts = body.split(b"\n")
    if not all(parts):
        raise BadMessage("a batch of tasks with an empty line")
    return parts


def addressee(body: bytes, headers: object) -> tuple[str, str, str] | None:
    """Return the run, task and agent a taskexec message that could not be read is for.

    A message with the taskexec header that fails to decode comes from an orchestrator of
    another version (or one with a bug): its run waits on the task, so the worker records why
    it did not run it. Anything without the header, or without a run id and task id that could
    name them, has no run to tell, and None is returned.
    """
    if not isinstance(headers, dict) or TASK_HEADER not in headers:
        return None
    if len(body) > MAX_MESSAGE_BYTES:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("task"), dict):
        return None
    run_id, task_id, agent = data.get("run_id"), data["task"].get("id"), data.get("agent")
    if not (isinstance(run_id, str) and RUN_ID_PATTERN.fullmatch(run_id)):
        return None
    if not (isinstance(task_id, str) and re.fullmatch(_ID_PATTERN, task_id)):
        return None
    return run_id, task_id, agent if isinstance(agent, str) else ""


#: Workers publish ``finished`` (a "started" event per task measured 10% of the throughput
#: of two workers, for a state that the registry's in-flight counts already show).
State = Literal["finished", "delta"]


class FinishedEvent(BaseModel):
    """Something that happened to a task of a run, on the events exchange.

    ``id`` is unique per event, so a consumer that sees one twice (a redelivery) can drop it.
    A ``finished`` event carries the result when the worker's was the run's first result for
    the task; otherwise ``duplicate`` is true and the stored result is the one that counts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str
    task_id: str
    state: State
    worker: str
    result: ExecutionResult | None = None
    duplicate: bool = False


class DeltaEvent(BaseModel):
    """A piece of a streamed task's text, from the worker streaming it to its orchestrator.

    ``attempt`` names one execution of the task (a worker's), ``seq`` orders its pieces from 0:
    pieces of another attempt mean the first worker was lost mid-stream, and the text already
    received is never sent twice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    task_id: str
    attempt: str
    seq: int = Field(ge=0)
    text: str


def routing_key(run_id: str, task_id: str, state: State) -> str:
    """The topic of an event: ``run.<run_id>.task.<task_id>.<state>``."""
    return f"run.{run_id}.task.{task_id}.{state}"


def failure(
    task_id: str, agent: str, mode: Mode | str, kind: str, message: str, **metadata: Any
) -> ExecutionResult:
    """Return the ``failed`` result of a task that the cluster could not run (it never started)."""
    now = datetime.now(UTC)
    return ExecutionResult(
        task_id=task_id,
        status=ExecutionStatus.FAILED,
        error=ExecutionError(kind=kind, message=message),
        agent=agent,
        mode=mode,
        engine="async",
        attempts=0,
        started_at=now,
        finished_at=now,
        duration_s=0.0,
        metadata=metadata,
    )
