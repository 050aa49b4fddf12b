"""What the codemod knows about the files it was given: modules, classes, functions, call sites.

Nodes are libcst nodes of one parse per file; they are compared by identity, which is what
libcst's transformers hand back as ``original_node``, so a decision made on a node here finds
that node again when the file is rewritten.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

__all__ = (
    "BLOCKING_METHODS",
    "EXECUTOR_CALLS",
    "SHIM_CLASSES",
    "THREAD_CALLS",
    "ClassInfo",
    "Context",
    "FuncCall",
    "FuncInfo",
    "ModuleInfo",
    "ShimCall",
    "ShimWith",
    "Site",
)

#: The classes ``taskexec.sync`` exports, each the blocking twin of ``taskexec.<name>``.
SHIM_CLASSES = frozenset({"TaskExecutor", "ProjectOrchestrator"})

#: Calls that run a function on another thread, or later.
THREAD_CALLS = frozenset({"Thread", "Timer", "start_new_thread"})
EXECUTOR_CALLS = frozenset({"submit", "map", "run_in_executor", "apply_async", "starmap"})

#: Methods of the shims that block, with the async method each becomes.
BLOCKING_METHODS = {
    "execute": "execute",
    "execute_task": "execute_task",
    "execute_tasks": "execute_tasks",
    "run": "run",
    "close": "aclose",
}


@dataclass(eq=False)
class ClassInfo:
    """A class defined at the top level of a module, or nested in a function."""

    module: ModuleInfo
    node: cst.ClassDef
    name: str
    bases: list[str]
    methods: dict[str, FuncInfo] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return self.name


@dataclass(eq=False)
class FuncInfo:
    """A ``def`` or ``async def``: a function, a method or a nested function."""

    module: ModuleInfo
    node: cst.FunctionDef
    qualname: str
    cls: ClassInfo | None
    parent: FuncInfo | None
    params: list[str]
    locals: set[str] = field(default_factory=set)
    nested: dict[str, FuncInfo] = field(default_factory=dict)
    nested_classes: dict[str, ClassInfo] = field(default_factory=dict)
    #: The body has a ``yield`` (of its own, not of a nested function).
    yields: bool = False

    @property
    def is_async(self) -> bool:
        return self.node.asynchronous is not None

    @property
    def decorators(self) -> list[str]:
        return [cst.Module([]).code_for_node(d.decorator) for d in self.node.decorators]

    @property
    def is_method(self) -> bool:
        return self.cls is not None and "staticmethod" not in self.decorators

    @property
    def self_name(self) -> str | None:
        """The name of ``self`` (or ``cls``) in a method, if it has one."""
        return self.params[0] if self.is_method and self.params else None

    def describe(self) -> str:
        return f"{self.qualname}()"


@dataclass(eq=False)
class ModuleInfo:
    """One file: its parse, its names and what they are bound to."""

    path: Path
    display: str
    names: list[str]
    source: str
    tree: cst.Module
    lines: dict[cst.CSTNode, int] = field(default_factory=dict)
    functions: dict[str, FuncInfo] = field(default_factory=dict)
    classes: dict[str, ClassInfo] = field(default_factory=dict)
    all_functions: list[FuncInfo] = field(default_factory=list)
    #: Local name -> the ``taskexec.sync`` class it is bound to (``from taskexec.sync import X``).
    shim_names: dict[str, str] = field(default_factory=dict)
    #: Names bound to the ``taskexec.sync`` module (``from taskexec import sync``).
    sync_aliases: set[str] = field(default_factory=set)
    #: Names bound to the ``taskexec`` package (``import taskexec``, ``import taskexec.sync``).
    taskexec_aliases: set[str] = field(default_factory=set)
    #: Local name -> (module name, attribute or None): imports of the other given files.
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    globals: set[str] = field(default_factory=set)
    has_asyncio: bool = False

    @property
    def qualname(self) -> str:
        return "<module>"

    def describe(self) -> str:
        return f"module level of {self.display}"

    def line(self, node: cst.CSTNode) -> int:
        return self.lines.get(node, 0)

    def code(self, node: cst.CSTNode) -> str:
        return self.tree.code_for_node(node)


#: Where a call site runs: in a function, or at a module's top level.
Context = FuncInfo | ModuleInfo


@dataclass(eq=False)
class Site:
    """A place in a context that may have to change.

    ``barrier`` names what stops an ``await`` there (a lambda, a lazily consumed generator
    expression, a class body); ``eager_genexp`` is a generator expression that can become a list
    comprehension if an ``await`` lands in it; ``top`` is the module-level statement it is in.
    """

    context: Context
    module: ModuleInfo
    node: cst.CSTNode
    barrier: str | None
    eager_genexp: cst.GeneratorExp | None
    top: cst.BaseStatement | None
    guard_top: cst.BaseStatement | None
    #: In a lambda handed to a thread or an executor: it blocks that thread, not the caller's.
    threaded: bool


@dataclass(eq=False)
class ShimCall(Site):
    """``x.execute(...)`` (or another blocking method) on an object of a ``taskexec.sync`` class."""

    method: str = ""
    key: object = None
    traced: bool = False


@dataclass(eq=False)
class ShimWith(Site):
    """``with x:`` on an object of a ``taskexec.sync`` class."""

    key: object = None


@dataclass(eq=False)
class FuncCall(Site):
    """A call of a function defined in the given files."""

    callee: FuncInfo | None = None


def walk_functions(module: ModuleInfo) -> Iterator[FuncInfo]:
    """Every function of ``module``, outer before inner."""
    yield from module.all_functions
