"""The rollback flag: which engine runs tasks, read at call time.

``TASKEXEC_ENGINE=legacy`` (or :func:`set_engine` / :func:`use_engine`) switches every entry
point of both APIs to the pre-refactor sync engine on the next call, with no redeploy. A call in
flight finishes on the engine it started with. Precedence: :func:`use_engine` (this context
only), then :func:`set_engine` (the whole process), then the environment variable, then
``"async"``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ._errors import ConfigurationError
from ._models import EngineName

__all__ = (
    "ENGINE_NAMES",
    "ENV_VAR",
    "EngineName",
    "environment_engine",
    "get_engine",
    "parse_engine",
    "set_engine",
    "use_engine",
)

#: The names the rollback flag takes.
ENGINE_NAMES: tuple[EngineName, ...] = ("async", "legacy")
ENV_VAR = "TASKEXEC_ENGINE"

log = logging.getLogger("taskexec")
_process_engine: EngineName | None = None
_context_engine: contextvars.ContextVar[EngineName | None] = contextvars.ContextVar(
    "taskexec_engine", default=None
)
_last_seen: EngineName = "async"
_lock = threading.Lock()


def _check(name: str, where: str) -> EngineName:
    if name not in ENGINE_NAMES:
        raise ConfigurationError(f"{where}={name!r} is not an engine; use one of: async, legacy")
    return name


def parse_engine(value: str | None, where: str = ENV_VAR) -> EngineName | None:
    """Return the engine a setting names, or None when it names none (unset or blank).

    The one parser of engine names, for the environment and the command line alike: case and
    surrounding blanks do not matter (``LEGACY``, `` legacy ``).

    Raises:
        ConfigurationError: ``value`` names no engine; the message names ``where``.
    """
    raw = (value or "").strip().lower()
    return _check(raw, where) if raw else None


def environment_engine() -> EngineName | None:
    """Return the engine ``TASKEXEC_ENGINE`` names, or None when it is unset or blank."""
    return parse_engine(os.environ.get(ENV_VAR))


def get_engine(*, announce: bool = True) -> EngineName:
    """Return the engine the next call will use, logging once at WARNING when it changes.

    Args:
        announce: Log the change (an operator flipping the flag on a running service wants to
            see it); a command that chose its engine from its own flag does not.
    """
    global _last_seen
    engine = _context_engine.get() or _process_engine
    source = "use_engine()" if _context_engine.get() else "set_engine()"
    if engine is None:
        engine = environment_engine()
        source = ENV_VAR if engine else "default"
        engine = engine or "async"
    if engine != _last_seen:
        with _lock:
            if engine != _last_seen:
                if announce:
                    log.warning(
                        "taskexec engine switched from %s to %s (%s)", _last_seen, engine, source
                    )
                _last_seen = engine
    return engine


def set_engine(name: str | None) -> None:
    """Set the engine for the whole process; ``None`` goes back to ``TASKEXEC_ENGINE``.

    Raises:
        ConfigurationError: ``name`` is not ``"async"`` or ``"legacy"``.
    """
    global _process_engine
    _process_engine = None if name is None else _check(name.strip().lower(), "set_engine")


@contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Use ``name`` for calls made inside the ``with`` block (this thread or task only).

    Raises:
        ConfigurationError: ``name`` is not ``"async"`` or ``"legacy"``.
    """
    token = _context_engine.set(_check(name.strip().lower(), "use_engine"))
    try:
        yield
    finally:
        _context_engine.reset(token)


_RENAMED = {"Engine": "EngineName", "ENGINES": "ENGINE_NAMES"}


def __getattr__(name: str) -> object:
    """The names this module had until the engine seam (``Engine``, ``ENGINES``), with a warning."""
    if name in _RENAMED:
        import warnings

        warnings.warn(
            f"taskexec.flags.{name} is now taskexec.flags.{_RENAMED[name]} (the engine classes "
            "took the old name's meaning)",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
