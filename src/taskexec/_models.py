"""Pydantic models shared by every engine: tasks, agents, results.

All models round-trip exactly through JSON:
``Model.model_validate_json(m.model_dump_json()) == m``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

__all__ = (
    "BASE_SCRIPT_ENV",
    "PLACEHOLDER_RE",
    "Agent",
    "AgentTask",
    "EngineName",
    "ErrorKind",
    "ExecutionError",
    "ExecutionResult",
    "ExecutionStatus",
    "Mode",
    "Price",
    "ScriptEnv",
    "Usage",
)

Mode = Literal["llm", "api", "script"]
#: The engines the rollback flag chooses between (``taskexec.flags``).
EngineName = Literal["async", "legacy"]

_ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"
#: ``{{dep_id}}`` in a prompt names the output of a dependency.
PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


class ExecutionStatus(enum.StrEnum):
    """The terminal state of one task."""

    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentTask(_Model):
    """One unit of work for an agent.

    A prompt may name a dependency's output as ``{{dep_id}}``; every name used that way must also
    be listed in ``depends_on``.
    """

    id: str = Field(min_length=1, pattern=_ID_PATTERN)
    prompt: str
    title: str | None = None
    deliverables: list[str] = Field(default_factory=list)
    success_criteria: list[str] = Field(default_factory=list)
    agent: str | None = None
    mode: Mode | None = None
    depends_on: list[str] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _placeholders_are_dependencies(self) -> AgentTask:
        missing = sorted(set(self.placeholders()) - set(self.depends_on))
        if missing:
            names = ", ".join(missing)
            raise ValueError(
                f"prompt uses {{{{{missing[0]}}}}} but depends_on does not list {names}; "
                "add it to depends_on or remove the placeholder"
            )
        return self

    def placeholders(self) -> list[str]:
        """Return the dependency ids named as ``{{dep_id}}`` in the prompt, in order."""
        return PLACEHOLDER_RE.findall(self.prompt)

    def without_done(self, outputs: Mapping[str, str | None]) -> AgentTask:
        """Return this task with the dependencies in ``outputs`` already done.

        Their placeholders are filled with their outputs (a missing output is an empty string)
        and they leave ``depends_on``; ``taskexec run --resume`` uses it for tasks whose
        dependencies succeeded in an earlier run.
        """
        done = {d: outputs[d] or "" for d in self.depends_on if d in outputs}
        if not done:
            return self
        return self.model_copy(
            update={
                "prompt": _fill(self.prompt, done),
                "depends_on": [d for d in self.depends_on if d not in done],
            }
        )

    def render_prompt(self, outputs: Mapping[str, str | None] | None = None) -> str:
        """Return the prompt sent to the agent.

        Placeholders are replaced by the matching dependency output (placeholders without an
        output are left as written); the deliverables and success criteria follow as lists, only
        when present, so a bare prompt renders as itself.

        Args:
            outputs: Dependency outputs by task id.

        Returns:
            The rendered prompt.
        """
        text = _fill(self.prompt, outputs) if outputs else self.prompt
        if self.deliverables:
            text += "\n\nExpected deliverables:\n" + "\n".join(f"- {d}" for d in self.deliverables)
        if self.success_criteria:
            text += "\n\nSuccess criteria:\n" + "\n".join(f"- {c}" for c in self.success_criteria)
        return text


def _fill(text: str, outputs: Mapping[str, str | None]) -> str:
    """Replace each ``{{dep_id}}`` that has an output; leave the others as written."""
    if "{{" not in text:
        return text

    def fill(match: re.Match[str]) -> str:
        value = outputs.get(match.group(1))
        return match.group(0) if value is None else value

    return PLACEHOLDER_RE.sub(fill, text)


class Usage(_Model):
    """Token counts reported by the provider (zero when it reports none), and their cost.

    ``input_tokens`` counts every prompt token, cached ones included, on every vendor (Anthropic
    reports cache reads and writes apart from its ``input_tokens``; they are added here);
    ``cache_read_tokens`` and ``cache_write_tokens`` say how many of them were read from or
    written to the vendor's prompt cache. ``output_tokens`` counts every billed output token
    (Gemini's thinking tokens included). ``cost_usd`` is None when the price is unknown: never a
    guess.
    """

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cache_read_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)
    cost_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Price(_Model):
    """What an agent's model costs, in US dollars per million tokens.

    It wins over the maintained price table (``genai-prices``): set it for a model the table
    does not know (a local model: all zeros) or for negotiated prices. A cache price left unset
    is the input price (an upper bound: cached tokens are never cheaper to count that way).
    """

    input_per_mtok: float = Field(ge=0, allow_inf_nan=False)
    output_per_mtok: float = Field(ge=0, allow_inf_nan=False)
    cache_read_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class ErrorKind(enum.StrEnum):
    """Why a task did not succeed: the values of :attr:`ExecutionError.kind`."""

    #: The server answered with a non-2xx status (``status_code`` says which).
    HTTP_STATUS = "http_status"
    #: No complete response: the connection was refused, reset or dropped.
    CONNECTION = "connection"
    #: The task's deadline (or one attempt's timeout) passed.
    TIMEOUT = "timeout"
    #: A 2xx reply whose body is not what the protocol says.
    BAD_RESPONSE = "bad_response"
    #: A script exited non-zero (or was killed by a signal).
    SCRIPT_EXIT = "script_exit"
    #: A dependency did not succeed, so the task never ran.
    DEPENDENCY_FAILED = "dependency_failed"
    #: The run was cancelled (fail-fast, Ctrl-C, SIGTERM, the caller).
    CANCELLED = "cancelled"
    #: The agent cannot run here (no key, a missing package, a script that cannot start).
    CONFIGURATION = "configuration"
    #: A bug inside taskexec or a provider; the message names the exception.
    INTERNAL = "internal"
    #: Distributed runs: no live worker served the task's agent within the wait allowed.
    NO_WORKER = "no_worker"
    #: Distributed runs: every worker that took the task died with it, up to the delivery
    #: limit; the task's message was moved to the dead-letter queue instead of running again.
    DEAD_LETTERED = "dead_lettered"
    #: Distributed runs: the result stored for the task in Redis is not one this version can
    #: read (another program or version wrote it); the message names the key.
    BAD_RESULT = "bad_result"
    #: The run's cost ceiling (``max_cost_usd``) could not hold the task's worst-case cost, so
    #: the task never started (``skipped``).
    BUDGET_EXHAUSTED = "budget_exhausted"


class ExecutionError(_Model):
    """Why a task did not succeed.

    ``kind`` is an :class:`ErrorKind` value. The field is a plain ``str``, so that results
    written by another version (a JSONL file, a worker) still load when a kind is added.
    """

    kind: str
    message: str
    status_code: int | None = None
    retryable: bool = False


class ExecutionResult(_Model):
    """The one result every task gets, whether it ran, failed, or never ran."""

    task_id: str
    status: ExecutionStatus
    output: str | None = None
    error: ExecutionError | None = None
    agent: str
    mode: str
    engine: EngineName
    attempts: int = Field(ge=0)
    started_at: AwareDatetime
    finished_at: AwareDatetime
    duration_s: float = Field(ge=0)
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.status is ExecutionStatus.SUCCESS


#: What a script started with ``ScriptEnv(inherit=False)`` still gets: enough to find programs,
#: write temporary files and decode text, and no credentials.
BASE_SCRIPT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


class ScriptEnv(_Model):
    """What a script agent's process receives from taskexec's environment.

    By default (``inherit=True``) a script gets the whole environment, provider keys included,
    as the pre-refactor ``execute_*.py`` scripts expect. With ``inherit=False`` it gets only the
    variables in :data:`BASE_SCRIPT_ENV` and those named in ``keep``, e.g.
    ``env: {inherit: false, keep: [OPENAI_API_KEY]}`` in a plan.
    """

    inherit: bool = True
    keep: list[str] = Field(default_factory=list)

    def build(self, environ: Mapping[str, str]) -> dict[str, str] | None:
        """Return the script's environment, or None to inherit this process's unchanged."""
        if self.inherit:
            return None
        names = (*BASE_SCRIPT_ENV, *self.keep)
        return {name: environ[name] for name in names if name in environ}


class Agent(_Model):
    """Who runs a task and how it is reached.

    ``mode`` picks the default way to reach the agent: ``llm`` (a chat call to ``provider``),
    ``api`` (``POST url``) or ``script`` (run ``command``). An ``llm`` agent that also has a
    ``command`` falls back to that script when its provider cannot run here.

    Keys: ``api_key`` is sent as given. Without it, a key from the environment (``OPENAI_API_KEY``
    and the like) is sent only to the vendor's own endpoint or to the base URL the environment
    names (``OPENAI_BASE_URL`` and the like), never to a ``base_url`` set here: a plan file cannot
    send the operator's key to a host of its choosing. ``api_key_env`` names the variable to read
    a key from for a custom ``base_url``, when that is what the operator wants.

    ``env`` limits what a script (``command``) inherits; by default it inherits the whole
    environment, provider keys included.
    """

    name: str = Field(min_length=1, pattern=_ID_PATTERN)
    mode: Mode = "llm"
    provider: str = "offline"
    model: str | None = None
    system_prompt: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    url: str | None = None
    command: list[str] | None = None
    env: ScriptEnv = Field(default_factory=ScriptEnv)
    timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=2, ge=0)
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0)
    #: Requests per minute this agent's key and model may send (spaced, never a burst).
    rpm: int | None = Field(default=None, gt=0)
    #: Tokens per minute (prompt estimate plus ``max_tokens``, corrected by the reply's usage).
    tpm: int | None = Field(default=None, gt=0)
    #: Requests of this agent's key and model out at once (across processes with Redis).
    max_in_flight: int | None = Field(default=None, gt=0)
    #: USD per million tokens; wins over the maintained price table (None: use the table).
    price: Price | None = None

    @model_validator(mode="after")
    def _tpm_fits_one_request(self) -> Agent:
        if self.tpm is not None and self.max_tokens is not None and self.tpm < self.max_tokens:
            raise ValueError(
                f"tpm ({self.tpm}) is smaller than max_tokens ({self.max_tokens}): a single "
                "request could never be sent; raise tpm or lower max_tokens"
            )
        return self

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("command must name a program, e.g. ['python', 'agent.py']")
        return value

    @field_validator("base_url", "url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value is not None else None
