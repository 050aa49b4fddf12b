"""Which line of the user's code a warning belongs to.

Python shows a ``DeprecationWarning`` by default only when it is attributed to ``__main__``, so
a warning attributed to a line inside taskexec (or asyncio, or a bridge thread) is never seen.
A call through ``taskexec.sync`` records the caller's line before it crosses into the event loop
(possibly another thread's); an ``await`` finds it by walking out of the library's frames.
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

__all__ = (
    "MIGRATION_GUIDE",
    "CallSite",
    "caller_site",
    "current_site",
    "enter_sync_call",
    "guide",
    "record_sync_call",
    "warn_at_caller",
    "warn_sync_call",
)


class CallSite(NamedTuple):
    """A line of user code: file, line number and the module's globals."""

    filename: str
    lineno: int
    module_globals: dict[str, Any]


def guide(name: str) -> str:
    """Return where the guide ``name`` (``MIGRATION.md``) is on this machine.

    The wheel ships the guides as ``taskexec/docs/``; a source checkout has them in ``docs/``.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "docs" / name, package.parent.parent / "docs" / name):
        if candidate.is_file():
            return str(candidate)
    return f"docs/{name} in the taskexec repository"


#: Where deprecation warnings send users.
MIGRATION_GUIDE = f"the migration guide, {guide('MIGRATION.md')}"

#: Set by the sync bridge for the length of one blocking call.
caller_site: contextvars.ContextVar[CallSite | None] = contextvars.ContextVar(
    "taskexec_caller_site", default=None
)

#: Frames of these packages are the machinery between the user's line and the warning.
_MACHINERY = ("taskexec", "asyncio", "concurrent", "threading", "asgiref", "contextlib")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_machinery(frame: FrameType) -> bool:
    name = str(frame.f_globals.get("__name__", ""))
    # By file as well as by name: ``python -m taskexec`` runs taskexec's own code as __main__.
    return name.split(".", 1)[0] in _MACHINERY or frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def site_of(frame: FrameType) -> CallSite:
    """Return the call site of ``frame``."""
    return CallSite(frame.f_code.co_filename, frame.f_lineno, frame.f_globals)


def current_site() -> CallSite | None:
    """Return the user's line that led here: the recorded one, else the first frame outside
    the library and the event-loop machinery on this thread's stack (None if there is none)."""
    recorded = caller_site.get()
    if recorded is not None:
        return recorded
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _is_machinery(frame):
        frame = frame.f_back
    return site_of(frame) if frame is not None else None


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to the user's line, so the default filters apply to it there.

    A ``DeprecationWarning`` is then shown by default when that line is in ``__main__``.
    """
    site = current_site()
    if site is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = site.module_globals
    # No module_globals argument: that would make linecache ask the module's loader for the
    # source, which fails for some (runpy's __main__); the line is read by file name instead.
    warnings.warn_explicit(
        message,
        category,
        site.filename,
        site.lineno,
        module=str(module_globals.get("__name__", "<unknown>")),
        registry=module_globals.setdefault("__warningregistry__", {}),
    )


#: ``TASKEXEC_WARN_SYNC=1`` warns once per call site of a blocking shim.
WARN_SYNC_ENV = "TASKEXEC_WARN_SYNC"
_SYNC_NAMES = {"aclose": "close"}
_warned_sites: set[tuple[str, int]] = set()
_warned_lock = threading.Lock()


def enter_sync_call(cls: str, name: str, frame: FrameType) -> contextvars.Token[CallSite | None]:
    """Record the line a blocking shim was called from (``frame``), for the warnings raised
    during the call, and warn there under ``TASKEXEC_WARN_SYNC``; reset ``caller_site`` with
    the token returned when the call is over."""
    site = site_of(frame)
    shim = f"taskexec.sync.{cls}.{_SYNC_NAMES.get(name, name)}"
    if os.environ.get(WARN_SYNC_ENV, "") not in ("", "0"):
        warn_sync_call(shim, f"taskexec.{cls}.{name}", site)
    trace = os.environ.get(TRACE_SYNC_ENV, "")
    if trace:
        record_sync_call(trace, shim, site)
    return caller_site.set(caller_site.get() or site)


#: ``TASKEXEC_SYNC_TRACE=FILE`` appends one JSON line per call site of a blocking shim to FILE,
#: for ``taskexec migrate --trace FILE``.
TRACE_SYNC_ENV = "TASKEXEC_SYNC_TRACE"
_traced_sites: set[tuple[str, str, int]] = set()


def record_sync_call(path: str, shim: str, site: CallSite) -> None:
    """Append ``{"file", "line", "shim"}`` for ``site`` to ``path``, once per site and process."""
    key = (path, site.filename, site.lineno)
    with _warned_lock:
        if key in _traced_sites:
            return
        _traced_sites.add(key)
    line = json.dumps({"file": os.path.abspath(site.filename), "line": site.lineno, "shim": shim})
    # One write of one line in append mode: lines from concurrent processes (a test suite run
    # with xdist) do not interleave.
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def warn_sync_call(shim: str, target: str, site: CallSite) -> None:
    """With ``TASKEXEC_WARN_SYNC=1``: warn once per call site of a blocking shim, so that a team
    can list what is left to migrate."""
    with _warned_lock:
        if (site.filename, site.lineno) in _warned_sites:
            return
        _warned_sites.add((site.filename, site.lineno))
    token = caller_site.set(site)
    try:
        warn_at_caller(
            f"{shim}() is a blocking shim; migrate this call to `await {target}()` "
            f"(see {MIGRATION_GUIDE})",
            DeprecationWarning,
        )
    finally:
        caller_site.reset(token)
