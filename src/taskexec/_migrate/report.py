"""What ``taskexec migrate`` prints: the report of every site, or a unified diff."""

from __future__ import annotations

import difflib

from .migration import Migration

__all__ = ("render_diff", "render_report")


def render_report(migration: Migration) -> str:
    """Every call site found, what changes there, and every site left sync with its reason."""
    lines = [entry.render() for entry in migration.entries]
    lines += [f"error: {error}" for error in migration.errors]
    changed = len(migration.changed)
    moved = migration.shim_sites - migration.left_sync
    summary = (
        f"{migration.shim_sites} call site(s) of taskexec.sync in {len(migration.files)} "
        f"file(s): {moved} move to the async API, {migration.left_sync} stay sync; "
        f"{changed} file(s) would change"
    )
    if migration.traced_outside:
        summary += f"; {migration.traced_outside} traced site(s) are outside the given files"
    return "\n".join([*lines, summary]) + "\n"


def render_diff(migration: Migration) -> str:
    """A unified diff of every file that would change (``a/`` before, ``b/`` after)."""
    chunks: list[str] = []
    for result in migration.changed:
        name = result.module.display
        chunks.extend(
            difflib.unified_diff(
                result.module.source.splitlines(keepends=True),
                result.new_source.splitlines(keepends=True),
                fromfile=f"a/{name}",
                tofile=f"b/{name}",
            )
        )
    return "".join(chunks)
