"""``taskexec migrate PATH... [--write] [--diff] [--check] [--trace FILE]``.

Exit codes: 0 done (report, diff or write), 1 with ``--check`` when a file would change,
2 a usage error (no such path, an unreadable trace, a file that does not parse, libcst missing).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ("register", "run")

EXIT_OK, EXIT_CHANGES, EXIT_USAGE = 0, 1, 2

INSTALL_HINT = "taskexec migrate needs libcst: pip install 'taskexec[migrate]'"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``migrate`` command to the ``taskexec`` parser's subcommands."""
    parser = subparsers.add_parser(
        "migrate",
        help="move blocking taskexec.sync call sites to await (a codemod)",
        description="Report, diff or rewrite the call sites of taskexec.sync in PATH...: "
        "functions that reach a blocking shim become async def, their calls are awaited up to "
        "the entry points, which run under asyncio.run(). Sites that cannot move safely stay "
        "on taskexec.sync and are listed with the reason. Without --write nothing is changed.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Python files or directories")
    parser.add_argument("--write", action="store_true", help="rewrite the files in place")
    parser.add_argument(
        "--diff", action="store_true", help="print a unified diff instead of the report"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when anything would change (for CI)"
    )
    parser.add_argument(
        "--trace",
        metavar="FILE",
        help="call sites recorded at run time with TASKEXEC_SYNC_TRACE=FILE",
    )
    parser.set_defaults(handler=run, func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``taskexec migrate``; return the exit code."""
    try:
        from .migration import plan_migration
    except ModuleNotFoundError as exc:
        if exc.name != "libcst":
            raise
        print(f"taskexec: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE
    from .discover import ParseFailure
    from .report import render_diff, render_report
    from .trace import TraceError, read_trace

    try:
        traced = read_trace(args.trace) if args.trace else set()
        migration = plan_migration(args.paths, traced)
    except (TraceError, ParseFailure) as exc:
        print(f"taskexec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.diff:
        sys.stdout.write(render_diff(migration))
    else:
        sys.stdout.write(render_report(migration))
    if args.write:
        for result in migration.changed:
            result.module.path.write_text(result.new_source, encoding="utf-8")
        print(f"wrote {len(migration.changed)} file(s)", file=sys.stderr)
    if migration.errors:
        for error in migration.errors:
            print(f"taskexec: cannot migrate {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.check and migration.changed:
        return EXIT_CHANGES
    return EXIT_OK
