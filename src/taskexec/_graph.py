"""Checks and orderings of a task dependency graph, shared by the plan loader and both engines."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ._models import AgentTask

__all__ = ("find_cycles", "graph_problems", "topological_order")


def _where(index: int, task: AgentTask) -> str:
    return f"tasks[{index}] (id {task.id!r})"


def find_cycles(tasks: Sequence[AgentTask]) -> list[list[str]]:
    """Return each dependency cycle once, as the ids along it (the first id repeated at the end)."""
    known = {t.id for t in tasks}
    edges = {t.id: [d for d in t.depends_on if d in known] for t in tasks}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for root in edges:
        if root in state:
            continue
        # Iterative DFS: deep chains must not hit the recursion limit.
        path: list[str] = [root]
        iterators = [iter(edges[root])]
        state[root] = 1
        while iterators:
            step = next(iterators[-1], None)
            if step is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(step) == 1:
                cycle = path[path.index(step) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    cycles.append([*cycle, step])
            elif step not in state:
                state[step] = 1
                path.append(step)
                iterators.append(iter(edges[step]))
    return cycles


def graph_problems(tasks: Sequence[AgentTask]) -> list[str]:
    """Return every structural problem: duplicate ids, unknown or self dependencies, cycles."""
    problems: list[str] = []
    counts = Counter(t.id for t in tasks)
    reported: set[str] = set()
    for index, task in enumerate(tasks):
        if counts[task.id] > 1 and task.id not in reported:
            reported.add(task.id)
            problems.append(
                f"{_where(index, task)}.id: duplicate task id {task.id!r} "
                f"({counts[task.id]} tasks use it); task ids must be unique"
            )
    problems.extend(
        f"{_where(index, task)}.depends_on: unknown task {dep!r}; "
        "depend only on tasks in the same plan"
        for index, task in enumerate(tasks)
        for dep in task.depends_on
        if dep not in counts
    )
    problems.extend(
        f"tasks: dependency cycle {' -> '.join(cycle)}; break one of these edges"
        for cycle in find_cycles(tasks)
    )
    return problems


def topological_order(tasks: Sequence[AgentTask]) -> list[AgentTask]:
    """Return the tasks with every dependency before its dependents, otherwise in input order.

    The graph must be valid (see :func:`graph_problems`).
    """
    by_id = {t.id: t for t in tasks}
    placed: set[str] = set()
    order: list[AgentTask] = []
    for task in tasks:
        stack = [(task, iter(task.depends_on))]
        while stack:
            current, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                if current.id not in placed:
                    placed.add(current.id)
                    order.append(current)
            elif dep not in placed:
                stack.append((by_id[dep], iter(by_id[dep].depends_on)))
    return order
