"""Which async classes get blocking shims in ``taskexec.sync``, and what differs.

Every public member of a declared class is mirrored: coroutine methods become blocking methods
with the same name, parameters, defaults, annotations and docstring; plain methods and properties
delegate. A public async member the generator cannot mirror must be listed in ``exclude`` with the
reason, or generation fails: adding an async method without deciding its sync story breaks CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shim:
    """One async class to mirror."""

    module: str
    name: str
    exclude: dict[str, str] = field(default_factory=dict)


#: Async name -> sync name.
RENAMES = {"aclose": "close"}

SHIMS = (
    Shim("taskexec._executor", "TaskExecutor"),
    Shim(
        "taskexec._orchestrator",
        "ProjectOrchestrator",
        exclude={
            "stream": "an async iterator; sync callers use execute_tasks()",
            "executor": "returns the async executor; keep the sync one you passed in",
            "bus": "the message bus is async-only for now (see the contract)",
        },
    ),
)
