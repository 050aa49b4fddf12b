"""What the command prints: terminal-safe text, and standard streams whose reader may go away."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from typing import IO

__all__ = ("BestEffortStream", "UsageError", "lines", "printable", "warn")


class UsageError(Exception):
    """A mistake on the command line or in the environment: message, exit 2, no traceback."""


#: Characters that would act on a terminal instead of showing: C0 and C1 controls (ESC starts
#: escape sequences; NUL, BEL, CR rewrite or ring), and the bidirectional overrides and isolates
#: that reorder what is shown. Line breaks and tabs become spaces; the rest is shown escaped.
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in "\n\t":
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class BestEffortStream(io.TextIOBase):
    """Standard output or error whose reader may go away: a pipe closed by ``| head``, a
    terminal that hung up, or a descriptor closed before the start (``2>&-``; Python then has
    no stream at all). Writes that fail are dropped, so the run goes on and every result still
    reaches ``--output``; a closed stderr must not cost the tasks still running.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        super().__init__()
        self.stream = stream
        self.lost = stream is None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.stream is not None and not self.lost:
            try:
                self.stream.write(text)
            except OSError:
                self._lose(self.stream)
        return len(text)

    def flush(self) -> None:
        if self.stream is not None and not self.lost:
            try:
                self.stream.flush()
            except OSError:
                self._lose(self.stream)

    def isatty(self) -> bool:
        try:
            return self.stream is not None and not self.lost and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise io.UnsupportedOperation("the stream was closed before the command started")
        return self.stream.fileno()

    def _lose(self, stream: IO[str]) -> None:
        self.lost = True
        # What the stream still buffers would fail again when Python flushes it at exit (and
        # turn the exit code into 120): point its descriptor at /dev/null, as Python's notes on
        # SIGPIPE advise.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, stream.fileno())
            finally:
                os.close(devnull)


def lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.splitlines())


def printable(text: str) -> str:
    """Return ``text`` safe to print on a terminal: control characters shown, not obeyed.

    Only what is printed is escaped; the JSONL results keep the exact text.
    """
    return _TERMINAL_UNSAFE.sub(_escape_char, text.replace("\r\n", "\n"))


def warn(message: str) -> None:
    print(f"taskexec: {printable(message)}", file=sys.stderr)
