"""Ctrl-C, SIGTERM and SIGHUP: how a command stops cleanly, and how it stops at once."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import ClassVar

from .._modes.script import kill_live_groups

__all__ = ("Interrupts",)


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) during a run.

    The first one cancels cleanly: requests closed, scripts' process groups stopped, a
    ``cancelled`` result for every unfinished task, then exit 128 plus the signal's number (130
    for SIGINT, 143 for SIGTERM, 129 for SIGHUP). A second one exits at once, after it has
    SIGKILLed every script process group still running: no child outlives the command either
    way.
    """

    NAMES: ClassVar[dict[int, str]] = {
        signal.SIGINT: "Ctrl-C",
        signal.SIGTERM: "SIGTERM",
        # Scripts run in sessions of their own, so a terminal that closes reaches only this
        # process: left to its default, SIGHUP would end it and orphan them.
        signal.SIGHUP: "SIGHUP",
    }
    _WHAT: ClassVar[dict[int, str]] = {
        signal.SIGINT: "interrupted",
        signal.SIGTERM: "terminated",
        signal.SIGHUP: "hung up",
    }

    @classmethod
    def signals(cls) -> list[int]:
        """The signals to handle: SIGHUP only where it is not ignored (under ``nohup`` the user
        asked the command to outlive the terminal)."""
        return [s for s in cls.NAMES if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN]

    def __init__(self) -> None:
        self.signum: int | None = None
        #: Why the run stopped when no signal stopped it.
        self.why: str | None = None
        self.on_first: Callable[[], object] = lambda: None

    @property
    def exit_code(self) -> int:
        """128 plus the number of the first signal, as shells report it."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        """The first signal, as the user knows it (or why the run stopped without one)."""
        if self.signum is None and self.why is not None:
            return self.why
        return self.NAMES.get(self.signum or signal.SIGINT, "a signal")

    def stop(self, why: str) -> None:
        """Cancel the run as a first signal does, for a reason of the command's own."""
        if self.signum is None and self.why is None:
            self.why = why
            self.on_first()

    def __call__(self, signum: int) -> None:
        if self.signum is not None:
            kill_live_groups()
            os._exit(self.exit_code)  # the second signal: leave at once, children ended
        self.signum = signum
        print(
            f"\ntaskexec: {self._WHAT[signum]}, cancelling "
            f"({self.NAMES[signum]} again to quit at once)",
            file=sys.stderr,
        )
        self.on_first()
