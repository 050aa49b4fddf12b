"""Read the given files: one libcst parse each, and the facts the value flow is built from.

Nothing here decides anything: the collector notes every definition, binding, call, ``with``,
``return`` and annotation with the context it runs in (a function or a module's top level) and
with what would stop an ``await`` there (a lambda, a lazily consumed generator expression, a
class body). :mod:`.flow` follows values through these facts.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst._nodes.internal import CodegenState
from libcst.metadata import MetadataWrapper, PositionProvider

from .model import EXECUTOR_CALLS, THREAD_CALLS, ClassInfo, Context, FuncInfo, ModuleInfo

__all__ = (
    "Facts",
    "ParseFailure",
    "binding_names",
    "collect",
    "find_files",
    "is_main_guard",
    "load_module",
    "module_names",
)

#: Consumers that read a whole iterable at once: a generator expression handed to one of them
#: can become a list comprehension without changing what runs when.
EAGER_CONSUMERS = frozenset(
    {"sum", "list", "tuple", "set", "frozenset", "sorted", "dict", "min", "max", "join"}
)

_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "venv"})


class ParseFailure(Exception):
    """A file that could not be read or parsed."""


def find_files(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """Return ``(file, root)`` for every Python file under ``paths``; root names modules."""
    found: list[tuple[Path, Path]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
                found.extend(
                    (Path(folder) / name, path) for name in sorted(files) if name.endswith(".py")
                )
        elif path.is_file():
            found.append((path, path.parent))
        else:
            raise ParseFailure(f"{given}: no such file or directory")
    # A file named twice (a folder and a file in it) is one module.
    seen: set[str] = set()
    unique = []
    for file, root in found:
        real = os.path.realpath(file)
        if real not in seen:
            seen.add(real)
            unique.append((file, root))
    return unique


def module_names(file: Path, root: Path) -> list[str]:
    """Dotted names an import could use for ``file``: from its root, and every shorter tail."""
    relative = file.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return [".".join(parts[i:]) for i in range(len(parts)) if parts[i:]]


def load_module(file: Path, root: Path, display: str) -> ModuleInfo:
    """Parse ``file`` and note the line of every node."""
    try:
        source = file.read_text(encoding="utf-8")
        tree = cst.parse_module(source)
    except (OSError, UnicodeDecodeError, cst.ParserSyntaxError) as exc:
        raise ParseFailure(f"{display}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    module = ModuleInfo(file, display, module_names(file, root), source, tree)
    module.lines = line_numbers(tree)
    return module


_NEWLINE = re.compile(r"\r\n?|\n")


class _LineState(CodegenState):
    """libcst's code generation, keeping only the line each node starts on.

    The same rules as ``PositionProvider`` (a node's syntactic start where the node records
    one, else where its code starts), without the column arithmetic and the position objects
    for every node: about seven times faster, and line numbers are all the report needs.
    """

    def __init__(self, module: cst.Module) -> None:
        super().__init__(
            default_indent=module.default_indent, default_newline=module.default_newline
        )
        self.line = 1
        self.lines: dict[cst.CSTNode, int] = {}
        self.starts: list[int] = []

    def add_token(self, value: str) -> None:
        if "\n" in value or "\r" in value:
            self.line += len(_NEWLINE.findall(value))

    def add_indent_tokens(self) -> None:
        pass  # indentation holds no newline

    def pop_trailing_newline(self) -> None:
        pass  # the last newline ends the last line: no node starts after it

    def before_codegen(self, node: cst.CSTNode) -> None:
        self.starts.append(self.line)

    def after_codegen(self, node: cst.CSTNode) -> None:
        start = self.starts.pop()
        self.lines.setdefault(node, start)

    @contextlib.contextmanager
    def record_syntactic_position(
        self,
        node: cst.CSTNode,
        *,
        start_node: cst.CSTNode | None = None,
        end_node: cst.CSTNode | None = None,
    ) -> Iterator[None]:
        start = self.line
        yield
        self.lines[node] = self.lines[start_node] if start_node is not None else start


def line_numbers(tree: cst.Module) -> dict[cst.CSTNode, int]:
    """The line every node of ``tree`` starts on, as libcst's ``PositionProvider`` gives it."""
    try:
        state = _LineState(tree)
        tree._codegen(state)
        return state.lines
    except (AttributeError, TypeError, KeyError):  # pragma: no cover - another libcst's internals
        positions = MetadataWrapper(tree, unsafe_skip_copy=True).resolve(PositionProvider)
        return {node: where.start.line for node, where in positions.items()}


def is_main_guard(node: cst.CSTNode) -> bool:
    """``if __name__ == "__main__":``."""
    if not isinstance(node, cst.If) or not isinstance(node.test, cst.Comparison):
        return False
    test = node.test
    if len(test.comparisons) != 1 or not isinstance(test.comparisons[0].operator, cst.Equal):
        return False
    sides = {
        cst.Module([]).code_for_node(test.left),
        cst.Module([]).code_for_node(test.comparisons[0].comparator),
    }
    return "__name__" in sides and bool(sides & {'"__main__"', "'__main__'"})


def binding_names(target: cst.BaseExpression) -> Iterator[str]:
    """The names an assignment target binds (``a``, ``a, (b, *c)``), not attributes."""
    if isinstance(target, cst.Name):
        yield target.value
    elif isinstance(target, cst.Tuple | cst.List):
        for element in target.elements:
            yield from binding_names(element.value)
    elif isinstance(target, cst.StarredElement):
        yield from binding_names(target.value)


def dotted(node: cst.BaseExpression) -> str | None:
    """``a.b.c`` as a string, or None for anything but names and attributes."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted(node.value)
        return None if head is None else f"{head}.{node.attr.value}"
    return None


@dataclass(eq=False)
class Where:
    """Where a fact was seen: its context, what bars an ``await`` there, its top statement."""

    context: Context
    barrier: str | None
    eager_genexp: cst.GeneratorExp | None
    top: cst.BaseStatement | None
    guard_top: cst.BaseStatement | None
    threaded: bool


#: Why an await cannot go in a lambda handed to a thread or an executor.
THREADED = "in a lambda run on another thread"


@dataclass
class Facts:
    """Everything the collector saw in one module."""

    calls: list[tuple[cst.Call, Where]] = field(default_factory=list)
    assigns: list[tuple[Context, list[cst.BaseExpression], cst.BaseExpression]] = field(
        default_factory=list
    )
    returns: list[tuple[FuncInfo, cst.BaseExpression]] = field(default_factory=list)
    withs: list[tuple[cst.With, Where]] = field(default_factory=list)
    fors: list[tuple[Context, cst.BaseExpression, cst.BaseExpression]] = field(default_factory=list)
    #: Expressions used as values (arguments, container elements, assigned values): a function
    #: named there is a callback. With the call that receives it, if any.
    values: list[tuple[Context, cst.BaseExpression, cst.Call | None]] = field(default_factory=list)
    annotations: list[tuple[Context, cst.BaseExpression, cst.BaseExpression]] = field(
        default_factory=list
    )
    param_annotations: list[tuple[FuncInfo, str, cst.BaseExpression]] = field(default_factory=list)
    return_annotations: list[tuple[FuncInfo, cst.BaseExpression]] = field(default_factory=list)
    #: Calls already under ``await`` (code migrated before).
    awaited: set[cst.Call] = field(default_factory=set)
    #: Every use of an imported ``taskexec.sync`` name (imports and attribute names aside).
    shim_refs: list[cst.Name] = field(default_factory=list)
    #: The ``from taskexec.sync import`` statements, by the local name they bind.
    shim_imports: dict[str, list[cst.ImportFrom]] = field(default_factory=dict)


class _Collector(cst.CSTVisitor):
    """One pass over a module: definitions, bindings and the facts of :class:`Facts`."""

    def __init__(self, module: ModuleInfo) -> None:
        super().__init__()
        self.module = module
        self.facts = Facts()
        #: Innermost last: the functions and classes we are in.
        self.scopes: list[FuncInfo | ClassInfo] = []
        #: Per function frame: what bars an await (lambda, lazy generator, class body).
        self.barriers: list[list[tuple[str, cst.GeneratorExp | None]]] = [[]]
        self.declared_global: list[set[str]] = [set()]
        self.eager: set[cst.GeneratorExp] = set()
        self.threaded: set[cst.Lambda] = set()
        #: Names that are not uses of a name: attribute names, imported names.
        self.not_uses: set[cst.Name] = set()
        self.top: cst.BaseStatement | None = None
        self.guard_top: cst.BaseStatement | None = None

    # -- where we are ------------------------------------------------------------------------

    @property
    def function(self) -> FuncInfo | None:
        for scope in reversed(self.scopes):
            if isinstance(scope, FuncInfo):
                return scope
        return None

    @property
    def context(self) -> Context:
        return self.function or self.module

    def where(self) -> Where:
        barrier, eager = None, None
        for reason, genexp in self.barriers[-1]:
            if reason == "eager":
                eager = genexp
            else:
                barrier = reason
        threaded = any(reason == THREADED for reason, _ in self.barriers[-1])
        return Where(self.context, barrier, eager, self.top, self.guard_top, threaded)

    def bind(self, names: Iterable[str]) -> None:
        scope = self.scopes[-1] if self.scopes else None
        for name in names:
            if isinstance(scope, FuncInfo):
                if name not in self.declared_global[-1]:
                    scope.locals.add(name)
                else:
                    self.module.globals.add(name)
            elif scope is None:
                self.module.globals.add(name)

    def bind_import(self, names: Iterable[str]) -> None:
        # An import in a function is looked up like a module-level one (what it names matters
        # more than where): it is not made a local slot.
        if self.function is None:
            self.bind(names)

    # -- definitions -------------------------------------------------------------------------

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        bases = [dotted(arg.value) or "" for arg in node.bases]
        info = ClassInfo(self.module, node, node.name.value, bases)
        scope = self.scopes[-1] if self.scopes else None
        if scope is None:
            self.module.classes[info.name] = info
        elif isinstance(scope, FuncInfo):
            scope.nested_classes[info.name] = info
        self.bind([info.name])
        self.scopes.append(info)
        self.barriers[-1].append(("in a class body", None))

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.scopes.pop()
        self.barriers[-1].pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        params = node.params
        names = [p.name.value for p in (*params.posonly_params, *params.params)]
        if isinstance(params.star_arg, cst.Param):
            names.append(params.star_arg.name.value)
        names += [p.name.value for p in params.kwonly_params]
        if params.star_kwarg is not None:
            names.append(params.star_kwarg.name.value)
        scope = self.scopes[-1] if self.scopes else None
        cls = scope if isinstance(scope, ClassInfo) else None
        parent = self.function
        prefix = f"{scope.qualname}." if scope is not None else ""
        if isinstance(scope, FuncInfo):
            prefix = f"{scope.qualname}.<locals>."
        info = FuncInfo(self.module, node, prefix + node.name.value, cls, parent, names, set(names))
        if cls is not None:
            cls.methods[node.name.value] = info
        elif isinstance(scope, FuncInfo):
            scope.nested[node.name.value] = info
            scope.locals.add(node.name.value)
        else:
            self.module.functions[node.name.value] = info
            self.module.globals.add(node.name.value)
        self.module.all_functions.append(info)
        for param in (*params.posonly_params, *params.params, *params.kwonly_params):
            if param.annotation is not None:
                self.facts.param_annotations.append(
                    (info, param.name.value, param.annotation.annotation)
                )
        if node.returns is not None:
            self.facts.return_annotations.append((info, node.returns.annotation))
        self.scopes.append(info)
        self.barriers.append([])
        self.declared_global.append(set())

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        info = self.scopes.pop()
        assert isinstance(info, FuncInfo)
        info.locals -= self.declared_global.pop()
        self.barriers.pop()

    def visit_Global(self, node: cst.Global) -> None:
        self.declared_global[-1].update(item.name.value for item in node.names)

    def visit_Nonlocal(self, node: cst.Nonlocal) -> None:
        self.declared_global[-1].update(item.name.value for item in node.names)

    # -- what bars an await ------------------------------------------------------------------

    def visit_Lambda(self, node: cst.Lambda) -> None:
        self.barriers[-1].append((THREADED if node in self.threaded else "in a lambda", None))

    def leave_Lambda(self, original_node: cst.Lambda) -> None:
        self.barriers[-1].pop()

    def visit_GeneratorExp(self, node: cst.GeneratorExp) -> None:
        if node in self.eager:
            self.barriers[-1].append(("eager", node))
        else:
            self.barriers[-1].append(
                (
                    "in a generator expression that is consumed lazily (an await would make it an "
                    "async generator)",
                    None,
                )
            )

    def leave_GeneratorExp(self, original_node: cst.GeneratorExp) -> None:
        self.barriers[-1].pop()

    # -- imports -----------------------------------------------------------------------------

    def visit_Import(self, node: cst.Import) -> None:
        for alias in node.names:
            name = dotted(alias.name) or ""
            local = alias.asname.name if alias.asname is not None else None
            if name == "asyncio" and local is None:
                self.module.has_asyncio = True
            if isinstance(local, cst.Name):
                if name == "taskexec.sync":
                    self.module.sync_aliases.add(local.value)
                elif name == "taskexec":
                    self.module.taskexec_aliases.add(local.value)
                else:
                    self.module.imports[local.value] = (name, None)
                self.bind_import([local.value])
            else:
                head = name.split(".", 1)[0]
                if head == "taskexec":
                    self.module.taskexec_aliases.add(head)
                else:
                    self.module.imports.setdefault(head, (head, None))
                    self.module.imports[name] = (name, None)
                self.bind_import([head])

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if isinstance(node.names, cst.ImportStar):
            return
        base = dotted(node.module) if node.module is not None else ""
        level = len(node.relative)
        if level:
            base = "." * level + (base or "")
        for alias in node.names:
            name = alias.name.value if isinstance(alias.name, cst.Name) else ""
            local = (
                alias.asname.name.value
                if isinstance(alias.asname, cst.AsName) and isinstance(alias.asname.name, cst.Name)
                else name
            )
            if isinstance(alias.name, cst.Name):
                self.not_uses.add(alias.name)
            if isinstance(alias.asname, cst.AsName) and isinstance(alias.asname.name, cst.Name):
                self.not_uses.add(alias.asname.name)
            if base == "taskexec.sync":
                self.module.shim_names[local] = name
                self.facts.shim_imports.setdefault(local, []).append(node)
            elif base == "taskexec" and name == "sync":
                self.module.sync_aliases.add(local)
            else:
                self.module.imports[local] = (base or "", name)
            self.bind_import([local])

    # -- bindings and values -----------------------------------------------------------------

    def visit_Assign(self, node: cst.Assign) -> None:
        targets: list[cst.BaseExpression] = [t.target for t in node.targets]
        for target in targets:
            self.bind(binding_names(target))
        self.facts.assigns.append((self.context, targets, node.value))
        self.facts.values.append((self.context, node.value, None))

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self.bind(binding_names(node.target))
        self.facts.annotations.append((self.context, node.target, node.annotation.annotation))
        if node.value is not None:
            self.facts.assigns.append((self.context, [node.target], node.value))
            self.facts.values.append((self.context, node.value, None))

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self.bind(binding_names(node.target))

    def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
        self.bind(binding_names(node.target))
        self.facts.assigns.append((self.context, [node.target], node.value))

    def visit_For(self, node: cst.For) -> None:
        self.bind(binding_names(node.target))
        self.facts.fors.append((self.context, node.target, node.iter))

    def visit_CompFor(self, node: cst.CompFor) -> None:
        # Comprehension variables live in the comprehension; for following values they are
        # locals of the enclosing context (a name is not reused for another executor there).
        self.bind(binding_names(node.target))
        self.facts.fors.append((self.context, node.target, node.iter))

    def visit_With(self, node: cst.With) -> None:
        for item in node.items:
            if item.asname is not None:
                self.bind(binding_names(item.asname.name))
                self.facts.assigns.append((self.context, [item.asname.name], item.item))
        self.facts.withs.append((node, self.where()))

    def visit_ExceptHandler(self, node: cst.ExceptHandler) -> None:
        if node.name is not None:
            self.bind(binding_names(node.name.name))

    def visit_Return(self, node: cst.Return) -> None:
        function = self.function
        if node.value is not None:
            self.facts.values.append((self.context, node.value, None))
            if function is not None:
                self.facts.returns.append((function, node.value))

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self.not_uses.add(node.attr)

    def visit_Name(self, node: cst.Name) -> None:
        if node.value in self.module.shim_names and node not in self.not_uses:
            self.facts.shim_refs.append(node)

    def visit_Yield(self, node: cst.Yield) -> None:
        function = self.function
        if function is not None:
            function.yields = True

    def visit_Await(self, node: cst.Await) -> None:
        if isinstance(node.expression, cst.Call):
            self.facts.awaited.add(node.expression)

    def visit_Call(self, node: cst.Call) -> None:
        func = node.func
        name = func.value if isinstance(func, cst.Name) else None
        if isinstance(func, cst.Attribute):
            name = func.attr.value
        if (
            name in EAGER_CONSUMERS
            and len(node.args) == 1
            and not node.args[0].keyword
            and not node.args[0].star
            and isinstance(node.args[0].value, cst.GeneratorExp)
        ):
            self.eager.add(node.args[0].value)
        if name in THREAD_CALLS or name in EXECUTOR_CALLS:
            self.threaded.update(a.value for a in node.args if isinstance(a.value, cst.Lambda))
        self.facts.calls.append((node, self.where()))
        for arg in node.args:
            self.facts.values.append((self.context, arg.value, node))

    def _elements(self, elements: Sequence[cst.BaseElement | cst.BaseDictElement]) -> None:
        for element in elements:
            if isinstance(element, cst.Element | cst.DictElement):
                self.facts.values.append((self.context, element.value, None))

    def visit_List(self, node: cst.List) -> None:
        self._elements(node.elements)

    def visit_Tuple(self, node: cst.Tuple) -> None:
        self._elements(node.elements)

    def visit_Set(self, node: cst.Set) -> None:
        self._elements(node.elements)

    def visit_Dict(self, node: cst.Dict) -> None:
        self._elements(node.elements)


def collect(module: ModuleInfo) -> Facts:
    """Walk ``module`` once: note its definitions on it, and return the facts."""
    collector = _Collector(module)
    for statement in module.tree.body:
        collector.top = statement
        if is_main_guard(statement):
            assert isinstance(statement, cst.If)
            statement.test.visit(collector)
            for inner in statement.body.body:
                assert isinstance(inner, cst.BaseStatement)
                collector.guard_top = inner
                inner.visit(collector)
            collector.guard_top = None
            if statement.orelse is not None:
                statement.orelse.visit(collector)
        else:
            statement.visit(collector)
    return collector.facts
