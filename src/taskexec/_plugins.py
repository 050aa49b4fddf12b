"""Optional parts that join the core by name, loaded only when a call needs them.

The core imports no optional part. It knows each by the module to load and the extra that
installs it (the way Celery names its result backends), and loads it the first time a call
needs it; the part then registers what it provides (the workers engine registers itself with
:func:`taskexec._engines.registry.register_engine`). A missing extra is a
:class:`MissingExtraError` that names the ``pip install`` to run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import MissingExtraError

if TYPE_CHECKING:
    from types import ModuleType

    from ._engines.selection import Selection

__all__ = ("PLUGINS", "Plugin", "load_plugin", "load_wanted", "wants_workers")


def wants_workers(selection: Selection) -> bool:
    """True when a call runs on workers: the async engine with a cluster configured."""
    return selection.flag == "async" and selection.cluster is not None


@dataclass(frozen=True, slots=True)
class Plugin:
    """An optional part: the module that registers it, and the extra that installs it."""

    module: str
    extra: str
    #: The top-level packages the extra installs (an ImportError of another one is a bug).
    packages: tuple[str, ...]
    #: True when a call made under a selection needs this part.
    wanted: Callable[[Selection], bool]


PLUGINS: dict[str, Plugin] = {
    "workers": Plugin(
        "taskexec.distributed", "workers", ("aio_pika", "aiormq", "redis"), wants_workers
    ),
}
_loaded: dict[str, ModuleType] = {}


def load_plugin(name: str, needed_for: str = "") -> ModuleType:
    """Import an optional part (once) and return its module.

    Raises:
        MissingExtraError: The extra that installs it is not installed.
    """
    module = _loaded.get(name)
    if module is not None:
        return module
    plugin = PLUGINS[name]
    try:
        module = importlib.import_module(plugin.module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in plugin.packages or not _absent(missing):
            raise  # installed, yet it failed to import: a real error, not a missing extra
        why = f"{needed_for} needs" if needed_for else "this needs"
        raise MissingExtraError(
            f"{why} the optional part {plugin.extra!r} ({missing} is not installed): "
            f"pip install 'taskexec[{plugin.extra}]'"
        ) from None
    _loaded[name] = module
    return module


def _absent(package: str) -> bool:
    """True when ``package`` cannot be found at all (blocked counts as absent)."""
    if sys.modules.get(package, False) is None:
        return True  # blocked on purpose (sys.modules[name] = None), as import itself treats it
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True


def load_wanted(selection: Selection) -> None:
    """Load every optional part a call made under ``selection`` needs."""
    for name, plugin in PLUGINS.items():
        if name not in _loaded and plugin.wanted(selection):
            load_plugin(name, "a cluster (TASKEXEC_BROKER_URL / --broker)")
