"""Exceptions: each survives pickling and says what it is."""

from __future__ import annotations

import inspect
import pickle

import pytest

import taskexec
from taskexec import _errors
from taskexec._http import TransportError
from taskexec._models import ExecutionError
from taskexec._retry import AttemptFailed

PUBLIC_ERRORS = [
    obj
    for _, obj in inspect.getmembers(_errors, inspect.isclass)
    if issubclass(obj, taskexec.TaskexecError)
]


def test_every_public_error_is_exported_and_derives_from_taskexec_error() -> None:
    assert len(PUBLIC_ERRORS) >= 7
    for error in PUBLIC_ERRORS:
        assert getattr(taskexec, error.__name__) is error


@pytest.mark.parametrize("error", PUBLIC_ERRORS, ids=lambda e: e.__name__)
def test_every_error_survives_pickling(error: type[Exception]) -> None:
    if error is taskexec.PlanError:
        original: Exception = taskexec.PlanError(["a: bad", "b: worse"], source="plan.yaml")
    elif error is taskexec.UnpricedAgentError:
        original = taskexec.UnpricedAgentError(["llama", "qwen"], 2.5)
    else:
        original = error("agent 'x' cannot do that; fix it")
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is error
    assert str(copy) == str(original)
    if isinstance(original, taskexec.PlanError):
        assert isinstance(copy, taskexec.PlanError)
        assert (copy.problems, copy.source) == (["a: bad", "b: worse"], "plan.yaml")
        assert str(copy).startswith("plan.yaml: 2 problems found")
    if isinstance(original, taskexec.UnpricedAgentError):
        assert isinstance(copy, taskexec.UnpricedAgentError)
        assert (copy.agents, copy.max_cost_usd) == (["llama", "qwen"], 2.5)


def test_internal_errors_survive_pickling() -> None:
    failed = AttemptFailed(
        ExecutionError(kind="http_status", message="HTTP 429", status_code=429, retryable=True),
        retry_after_s=1.5,
    )
    copy = pickle.loads(pickle.dumps(failed))
    assert (copy.error, copy.retry_after_s, str(copy)) == (failed.error, 1.5, "HTTP 429")
    transport = pickle.loads(pickle.dumps(TransportError("timeout", "no response")))
    assert (transport.kind, str(transport)) == ("timeout", "no response")


def test_sync_in_async_context_is_also_a_runtime_error() -> None:
    assert issubclass(taskexec.SyncInAsyncContextError, RuntimeError)
    assert issubclass(taskexec.SyncInAsyncContextError, taskexec.TaskexecError)
