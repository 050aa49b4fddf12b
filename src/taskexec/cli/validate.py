"""``taskexec validate PLAN``: check a plan and list every problem."""

from __future__ import annotations

import argparse

from .._plan import load_plan
from ._status import EXIT_OK

__all__ = ("register", "validate")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` command."""
    parser = commands.add_parser("validate", help="check a plan and list every problem")
    parser.add_argument("plan")
    parser.set_defaults(handler=validate)


def validate(args: argparse.Namespace) -> int:
    """Load the plan (a PlanError names every problem); return the exit code."""
    plan = load_plan(args.plan)
    print(f"{args.plan}: ok ({len(plan.tasks)} tasks, {len(plan.agents)} agents)")
    return EXIT_OK
