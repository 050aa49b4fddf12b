"""Which engine runs a call: the registry, and the one function that chooses.

:func:`select_engine` is the only place that reads the rollback flag and the cluster
configuration to decide how a call runs. Engines join through :func:`register_engine`: the
built-in ones below, and optional parts (the workers engine of :mod:`taskexec.distributed`)
when :mod:`taskexec._plugins` loads them. A new engine is a registration, not another ``if``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .. import _plugins
from ..flags import get_engine
from .base import Engine
from .inprocess import AsyncEngine
from .legacy import LegacyEngine
from .selection import BROKER_ENV_VAR, RESULTS_ENV_VAR, ClusterURLs, Selection, env_value

__all__ = (
    "EngineSet",
    "EngineSpec",
    "register_engine",
    "select_engine",
)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """A registered engine: when it applies, how to make one, and its precedence."""

    name: str
    #: True when this engine should run a call made under ``selection``.
    applies: Callable[[Selection], bool]
    #: Makes the engine for an executor (engines are made once per executor and key).
    factory: Callable[[Selection], Engine]
    #: Lower ranks are asked first.
    rank: int
    #: Calls whose selections have different keys get different engine objects (the workers
    #: engine: one per cluster).
    key: Callable[[Selection], Hashable] = lambda selection: None


_REGISTRY: dict[str, EngineSpec] = {}
_ORDER: list[EngineSpec] = []


def register_engine(spec: EngineSpec) -> None:
    """Add an engine (or replace the one registered under the same name)."""
    _REGISTRY[spec.name] = spec
    _ORDER[:] = sorted(_REGISTRY.values(), key=lambda s: (s.rank, s.name))


_LEGACY, _ASYNC = LegacyEngine(), AsyncEngine()
register_engine(
    EngineSpec("legacy", lambda s: s.flag == "legacy", lambda s: _LEGACY, rank=0),
)
register_engine(EngineSpec("async", lambda s: True, lambda s: _ASYNC, rank=1000))


class EngineSet:
    """The engines one executor has used, each opened once and closed with the executor.

    Args:
        broker_url: The executor's own broker (wins over ``TASKEXEC_BROKER_URL``).
        results_url: The executor's own results store (wins over ``TASKEXEC_RESULTS_URL``).
        in_process: Never send work to a cluster (a worker runs the tasks it takes here).
    """

    __slots__ = ("_open", "broker_url", "in_process", "results_url")

    def __init__(
        self,
        broker_url: str | None = None,
        results_url: str | None = None,
        *,
        in_process: bool = False,
    ) -> None:
        self.broker_url = (broker_url or "").strip() or None
        self.results_url = (results_url or "").strip() or None
        self.in_process = in_process
        self._open: dict[tuple[str, Hashable], Engine] = {}

    def cluster(self) -> ClusterURLs | None:
        """The cluster calls would use now: the executor's URLs, else the environment's."""
        if self.in_process:
            return None
        broker = self.broker_url or env_value(BROKER_ENV_VAR)
        results = self.results_url or env_value(RESULTS_ENV_VAR)
        if broker is None and results is None:
            return None
        return ClusterURLs(broker, results)

    def get(self, spec: EngineSpec, selection: Selection) -> Engine:
        """Return this executor's engine for ``spec``, making it on first use."""
        key = (spec.name, spec.key(selection))
        engine = self._open.get(key)
        if engine is None:
            engine = self._open[key] = spec.factory(selection)
        return engine

    async def aclose(self) -> None:
        """Close every engine this executor opened."""
        engines = list(self._open.values())
        self._open.clear()
        for engine in engines:
            await engine.aclose()


def select_engine(engines: EngineSet, *, announce: bool = True) -> Engine:
    """Return the engine for the call being made now, from settings read at call time.

    The rollback flag first: ``legacy`` runs in-process whatever else is set. Otherwise a
    configured cluster (the executor's, or ``TASKEXEC_BROKER_URL`` / ``TASKEXEC_RESULTS_URL``)
    runs tasks on its workers, and without one the async engine runs them here.

    Args:
        engines: The engines of the executor the call goes through.
        announce: Log a change of the rollback flag (see :func:`taskexec.flags.get_engine`).

    Raises:
        MissingExtraError: The call needs an optional part that is not installed.
    """
    selection = Selection(get_engine(announce=announce), engines.cluster())
    _plugins.load_wanted(selection)
    for spec in _ORDER:
        if spec.applies(selection):
            return engines.get(spec, selection)
    raise AssertionError("the async engine applies to every call")  # pragma: no cover
