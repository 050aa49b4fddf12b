"""Decide what moves to ``await`` and what stays on ``taskexec.sync``, and why.

A context (a function, or a module's top level) has to become async when it calls a blocking
method of a shim object that moves, or a function that becomes async. Some functions cannot:
thread targets, callbacks, special methods, decorated functions, generators, methods a framework
calls. A context that would have to be async but cannot, or that would also call something left
on the sync API (a blocking shim on a running event loop raises), pins everything it would have
awaited to the sync API instead, and that propagates. Every step only adds to the pinned sets,
so the loop ends; what is left async is exactly what can be awaited all the way up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import libcst as cst

from .discover import dotted
from .flow import Flow, Slot
from .model import Context, FuncCall, FuncInfo, ModuleInfo, ShimCall, ShimWith, Site

__all__ = ("Decisions", "decide")

#: Decorators that leave a method a plain function the class calls.
TRANSPARENT_DECORATORS = frozenset({"staticmethod", "classmethod"})
#: Bases that bring no caller of their own.
NEUTRAL_BASES = frozenset({"", "object", "ABC", "abc.ABC", "Protocol", "typing.Protocol"})


@dataclass
class Decisions:
    """The outcome: what becomes async, what is awaited, and every site left sync with why."""

    async_functions: set[FuncInfo] = field(default_factory=set)
    async_modules: set[ModuleInfo] = field(default_factory=set)
    converted: set[Slot] = field(default_factory=set)
    awaited: list[Site] = field(default_factory=list)
    async_withs: list[ShimWith] = field(default_factory=list)
    left_sync: list[tuple[Site, str]] = field(default_factory=list)
    forced: dict[FuncInfo, str] = field(default_factory=dict)
    genexps: set[cst.GeneratorExp] = field(default_factory=set)


def _pinned_by_shape(flow: Flow, function: FuncInfo) -> str | None:
    """Why ``function`` cannot be a coroutine function whatever it calls, if it cannot."""
    name = function.node.name.value
    if name.startswith("__") and name.endswith("__"):
        return f"{name} is a special method, which Python calls without await"
    for decorator in function.decorators:
        if decorator not in TRANSPARENT_DECORATORS:
            return f"it is decorated with @{decorator}, which calls it without await"
    if function.yields:
        return "it is a generator: it would become an async generator, iterated differently"
    cls = function.cls
    if cls is not None:
        for base in cls.bases:
            if base in NEUTRAL_BASES:
                continue
            found = flow.lookup(base.rsplit(".", 1)[-1], cls.module)
            if found is None or found[0] != "class":
                return (
                    f"it is a method of {cls.name}, a subclass of {base} from outside the given "
                    "files, which may call it without await"
                )
    if not flow.project.async_tests and _is_test(function):
        return (
            "it is a test, which pytest calls without await (tests move too where the pytest "
            "configuration has pytest-asyncio's asyncio_mode = auto)"
        )
    return flow.callbacks.get(function)


def _is_test(function: FuncInfo) -> bool:
    """A pytest test: ``test*`` at a test module's top level or in its ``Test*`` classes."""
    name = function.module.path.name
    if not (name.startswith("test_") or name.endswith("_test.py")):
        return False
    if function.parent is not None or not function.node.name.value.startswith("test"):
        return False
    return function.cls is None or function.cls.name.startswith("Test")


def _base_reason(flow: Flow, key: Slot) -> str | None:
    """Why the objects of a shim component cannot move, whatever their callers do."""
    comp = flow.comp(key)
    if comp.escapes:
        return comp.escapes[0]
    if not comp.ctors and not comp.factories:
        if comp.traced:
            return (
                "recorded at run time (--trace), but no constructor of a taskexec.sync class in "
                "the given files reaches it"
            )
        return "no constructor of a taskexec.sync class in the given files reaches it"
    return None


def decide(flow: Flow) -> Decisions:
    """Run the pinning loop over the sites ``flow`` found."""
    decisions = Decisions()
    sites_of: dict[Context, list[Site]] = {}
    for site in flow.sites:
        sites_of.setdefault(site.context, []).append(site)
    pinned: dict[Slot, str] = {}
    for key in {flow.find(s.key) for s in flow.sites if isinstance(s, ShimCall | ShimWith)}:
        reason = _base_reason(flow, key)
        if reason is not None:
            pinned[key] = reason
    forced = decisions.forced
    for module in flow.project.modules:
        for function in module.all_functions:
            reason = _pinned_by_shape(flow, function)
            if reason is not None:
                forced[function] = reason

    def key_of(site: ShimCall | ShimWith) -> Slot:
        return flow.find(site.key)

    def is_native(context: Context) -> bool:
        return isinstance(context, FuncInfo) and context.is_async

    while True:
        async_ctx = _least(sites_of, lambda s, a: _needs(s, a, pinned, key_of))
        sync_ctx = _blocking(sites_of, pinned, key_of)
        changed = False

        def pin(site: Site, reason: str, async_ctx: set[Context] = async_ctx) -> None:
            nonlocal changed
            if isinstance(site, ShimCall | ShimWith):
                if key_of(site) not in pinned:
                    pinned[key_of(site)] = reason
                    changed = True
            elif isinstance(site, FuncCall) and site.callee in async_ctx:
                assert site.callee is not None
                if site.callee not in forced:
                    forced[site.callee] = reason
                    changed = True

        for context, sites in sites_of.items():
            why: str | None = None
            # An `async def` of the source is async already: only its lambdas and lazy
            # generators can still bar an await.
            if context in async_ctx and not is_native(context):
                if isinstance(context, FuncInfo) and context in forced:
                    why = f"{context.describe()}, which stays sync: {forced[context]}"
                elif isinstance(context, ModuleInfo):
                    why = _module_conflict(
                        context,
                        sites,
                        lambda s, a=async_ctx: _needs(s, a, pinned, key_of),  # type: ignore[misc]
                        sync_ctx,
                        pinned,
                        key_of,
                    )
                elif context in sync_ctx:
                    why = f"{context.describe()}, which also {sync_ctx[context]}"
            for site in sites:
                if not _needs(site, async_ctx, pinned, key_of):
                    continue
                if why is not None:
                    pin(site, f"it is used in {why}")
                elif site.barrier is not None:
                    line = site.module.line(site.node)
                    pin(site, f"it is called {site.barrier} at {site.module.display}:{line}")
        if not changed:
            break

    for context, sites in sites_of.items():
        for site in sites:
            if isinstance(site, ShimCall | ShimWith):
                key = key_of(site)
                if key in pinned:
                    decisions.left_sync.append((site, pinned[key]))
                    continue
                decisions.converted.add(key)
                if isinstance(site, ShimWith):
                    decisions.async_withs.append(site)
                else:
                    decisions.awaited.append(site)
            elif isinstance(site, FuncCall) and site.callee in async_ctx:
                decisions.awaited.append(site)
            else:
                continue
            if site.eager_genexp is not None:
                decisions.genexps.add(site.eager_genexp)
            if isinstance(context, FuncInfo):
                if not context.is_async:
                    decisions.async_functions.add(context)
            else:
                decisions.async_modules.add(context)
    return decisions


def _needs(site: Site, async_ctx: set[Context], pinned: dict[Slot, str], key_of: object) -> bool:
    """Whether ``site`` would be awaited as things stand."""
    if isinstance(site, ShimCall | ShimWith):
        assert callable(key_of)
        return key_of(site) not in pinned
    return isinstance(site, FuncCall) and site.callee in async_ctx


def _least(sites_of: dict[Context, list[Site]], needs: object) -> set[Context]:
    """The contexts that must be async: the least fixpoint of ``needs``."""
    assert callable(needs)
    found: set[Context] = set()
    grew = True
    while grew:
        grew = False
        for context, sites in sites_of.items():
            if context not in found and any(needs(s, found) for s in sites):
                found.add(context)
                grew = True
    return found


def _blocking(
    sites_of: dict[Context, list[Site]], pinned: dict[Slot, str], key_of: object
) -> dict[Context, str]:
    """The contexts that call the sync API, directly or through functions that do; with what."""
    assert callable(key_of)
    found: dict[Context, str] = {}
    grew = True
    while grew:
        grew = False
        for context, sites in sites_of.items():
            if context in found or (isinstance(context, FuncInfo) and context.is_async):
                continue
            for site in sites:
                what: str | None = None
                if site.threaded:
                    continue  # it blocks another thread: no event loop runs there
                if isinstance(site, ShimCall | ShimWith) and key_of(site) in pinned:
                    code = dotted(site.node.func) if isinstance(site.node, cst.Call) else None
                    what = f"calls {code or 'an object'}() on the sync API"
                elif isinstance(site, FuncCall) and site.callee in found:
                    assert site.callee is not None
                    what = f"calls {site.callee.describe()}, which blocks on the sync API"
                if what is not None:
                    found[context] = what
                    grew = True
                    break
    return found


def _module_conflict(
    module: ModuleInfo,
    sites: list[Site],
    needs: Callable[[Site], bool],
    sync_ctx: dict[Context, str],
    pinned: dict[Slot, str],
    key_of: Callable[[ShimCall | ShimWith], Slot],
) -> str | None:
    """Why a module's top level cannot await: a statement that blocks on the sync API lies
    between the first and the last statement that would await (they run under one
    ``asyncio.run``, where a blocking shim raises). Statements outside that run are fine."""

    def position(site: Site) -> tuple[bool, int]:
        if site.guard_top is not None:
            guard = site.top
            assert isinstance(guard, cst.If)
            assert isinstance(guard.body, cst.IndentedBlock)
            statements: list[cst.BaseStatement] = list(guard.body.body)
            return True, statements.index(site.guard_top)
        assert site.top is not None
        statements = list(module.tree.body)
        return False, statements.index(site.top)

    awaiting = [position(s) for s in sites if needs(s)]
    for site in sites:
        what = None
        if site.threaded:
            continue
        if isinstance(site, ShimCall | ShimWith) and key_of(site) in pinned:
            what = f"{module.line(site.node)} blocks on the sync API"
        elif isinstance(site, FuncCall) and site.callee in sync_ctx:
            assert site.callee is not None
            what = (
                f"{module.line(site.node)} calls {site.callee.describe()}, which blocks on the "
                "sync API"
            )
        if what is None:
            continue
        guard, index = position(site)
        same = [i for g, i in awaiting if g == guard]
        if same and min(same) <= index <= max(same):
            return (
                f"the module level of {module.display}, which would run under asyncio.run(): "
                f"line {what}"
            )
    return None
