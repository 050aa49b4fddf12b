"""Read the call sites recorded at run time under ``TASKEXEC_SYNC_TRACE=FILE``.

Each line of the file is ``{"file": ABSOLUTE_PATH, "line": N, "shim": NAME}``, appended by
:func:`taskexec._callsite.record_sync_call` once per call site and process.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ("TraceError", "read_trace")


class TraceError(Exception):
    """A trace file that cannot be read, or a line of it that is not a recorded call site."""


def read_trace(path: str) -> set[tuple[str, int]]:
    """Return the ``(file, line)`` pairs recorded in the trace file ``path``.

    Raises:
        TraceError: The file cannot be read, or a line is not a recorded call site.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read the trace file {path}: {exc.strerror}") from exc
    sites: set[tuple[str, int]] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file, lineno = record["file"], record["line"]
        except (ValueError, KeyError, TypeError) as exc:
            raise TraceError(
                f"{path}:{number}: not a recorded call site (expected JSON with file and line)"
            ) from exc
        if not isinstance(file, str) or not isinstance(lineno, int):
            raise TraceError(f"{path}:{number}: file must be a string and line an integer")
        sites.add((file, lineno))
    return sites
