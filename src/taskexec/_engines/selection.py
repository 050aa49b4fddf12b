"""What the engine of a call is chosen from: the rollback flag and the cluster, if any."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .._models import EngineName

__all__ = ("BROKER_ENV_VAR", "RESULTS_ENV_VAR", "ClusterURLs", "Selection", "env_value")

#: The environment variables that send work to workers, named here (not in the optional
#: part) so that an in-process call can look at them without loading the optional part.
BROKER_ENV_VAR = "TASKEXEC_BROKER_URL"
RESULTS_ENV_VAR = "TASKEXEC_RESULTS_URL"


def env_value(name: str) -> str | None:
    """Return an environment variable's value, or None when it is unset or blank."""
    return os.environ.get(name, "").strip() or None


@dataclass(frozen=True, slots=True)
class ClusterURLs:
    """Where a cluster is: the broker and the results store (either may still be missing)."""

    # Out of the repr: a URL may carry a password (tracebacks show locals' reprs).
    broker: str | None = field(repr=False)
    results: str | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a call's engine is chosen from, read at call time."""

    #: The rollback flag (:func:`taskexec.flags.get_engine`).
    flag: EngineName
    #: The executor's cluster, else the environment's; None: no cluster configured.
    cluster: ClusterURLs | None
