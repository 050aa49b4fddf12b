"""Rewrite one module as decided: ``async def``, ``await`` in place, ``async with``, imports,
entry points.

libcst keeps every byte it is not asked to change: comments, blank lines, quotes and docstrings
outside the rewritten expressions stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import libcst as cst

from .discover import binding_names, is_main_guard
from .model import SHIM_CLASSES, ModuleInfo

__all__ = ("ModulePlan", "rewrite")


@dataclass
class ModulePlan:
    """What to change in one module (nodes of its original parse)."""

    async_functions: set[cst.FunctionDef] = field(default_factory=set)
    #: Calls to await, with the method name to call instead (``close`` -> ``aclose``).
    awaited: dict[cst.Call, str | None] = field(default_factory=dict)
    async_withs: set[cst.With] = field(default_factory=set)
    genexps: set[cst.GeneratorExp] = field(default_factory=set)
    #: Constructors of async objects and the class expression to call instead.
    ctors: dict[cst.Call, cst.BaseExpression] = field(default_factory=dict)
    #: Imported shim names whose every use moved: imported from ``taskexec`` instead.
    moved_names: set[str] = field(default_factory=set)
    #: Names in annotations of values that move, where the name itself stays sync.
    renames: dict[cst.BaseExpression, cst.BaseExpression] = field(default_factory=dict)
    #: Top-level statements (and statements of the main guard) that now hold an ``await``.
    entry: set[cst.BaseStatement] = field(default_factory=set)
    import_taskexec: bool = False

    def changes(self) -> bool:
        return bool(
            self.async_functions
            or self.awaited
            or self.async_withs
            or self.ctors
            or self.moved_names
            or self.renames
            or self.entry
        )


def _run(expression: cst.BaseExpression) -> cst.Call:
    """``asyncio.run(expression)``."""
    return cst.Call(
        func=cst.Attribute(cst.Name("asyncio"), cst.Name("run")), args=[cst.Arg(expression)]
    )


class _Rewriter(cst.CSTTransformer):
    def __init__(self, module: ModuleInfo, plan: ModulePlan) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self.extra_imports: dict[int, cst.SimpleStatementLine] = {}
        self.used_names = set(module.globals)
        self.top_level = set(module.tree.body)

    # -- expressions -------------------------------------------------------------------------

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        if original_node in self.plan.ctors:
            updated_node = updated_node.with_changes(func=self.plan.ctors[original_node])
        if isinstance(updated_node.func, cst.Await) and not updated_node.func.lpar:
            updated_node = updated_node.with_changes(func=_parenthesize(updated_node.func))
        if original_node not in self.plan.awaited:
            return updated_node
        method = self.plan.awaited[original_node]
        if method is not None and isinstance(updated_node.func, cst.Attribute):
            updated_node = updated_node.with_changes(
                func=updated_node.func.with_changes(attr=cst.Name(method))
            )
        # The call's own parentheses go around the await, so `(x.run()).y` keeps its grouping.
        return cst.Await(
            expression=updated_node.with_changes(lpar=[], rpar=[]),
            lpar=updated_node.lpar,
            rpar=updated_node.rpar,
        )

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        return self.plan.renames.get(original_node, updated_node)

    def leave_Attribute(
        self, original_node: cst.Attribute, updated_node: cst.Attribute
    ) -> cst.BaseExpression:
        if original_node in self.plan.renames:
            return self.plan.renames[original_node]
        if isinstance(updated_node.value, cst.Await) and not updated_node.value.lpar:
            # `x.execute(t).output` -> `(await x.execute(t)).output`: await binds looser.
            return updated_node.with_changes(value=_parenthesize(updated_node.value))
        return updated_node

    def leave_Subscript(
        self, original_node: cst.Subscript, updated_node: cst.Subscript
    ) -> cst.BaseExpression:
        if isinstance(updated_node.value, cst.Await) and not updated_node.value.lpar:
            return updated_node.with_changes(value=_parenthesize(updated_node.value))
        return updated_node

    def leave_GeneratorExp(
        self, original_node: cst.GeneratorExp, updated_node: cst.GeneratorExp
    ) -> cst.BaseExpression:
        if original_node not in self.plan.genexps:
            return updated_node
        # Handed whole to an eager consumer (sum, sorted, join...): a list comprehension
        # computes the same values in the same order, and may hold an await.
        return cst.ListComp(elt=updated_node.elt, for_in=updated_node.for_in)

    # -- statements --------------------------------------------------------------------------

    def leave_FunctionDef(
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        if original_node in self.plan.async_functions:
            return updated_node.with_changes(asynchronous=cst.Asynchronous())
        return updated_node

    def leave_With(self, original_node: cst.With, updated_node: cst.With) -> cst.With:
        if original_node in self.plan.async_withs:
            return updated_node.with_changes(asynchronous=cst.Asynchronous())
        return updated_node

    def leave_ImportFrom(
        self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom
    ) -> cst.ImportFrom:
        module = updated_node.module
        if (
            module is None
            or self.module.tree.code_for_node(module) != "taskexec.sync"
            or isinstance(updated_node.names, cst.ImportStar)
        ):
            return updated_node
        moved = [a for a in updated_node.names if _local(a) in self.plan.moved_names]
        if not moved:
            return updated_node
        if len(moved) == len(updated_node.names):
            return updated_node.with_changes(module=cst.Name("taskexec"))
        kept = [a for a in updated_node.names if a not in moved]
        # The last name keeps what followed the original last name (a newline before `)`).
        kept[-1] = kept[-1].with_changes(comma=updated_node.names[-1].comma)
        # The moved names go on one plain line: their commas may hold the newlines of a
        # parenthesized import.
        moved = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in moved]
        self.extra_imports[id(original_node)] = cst.SimpleStatementLine(
            [cst.ImportFrom(module=cst.Name("taskexec"), names=moved)]
        )
        return updated_node.with_changes(names=kept)

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        if original_node in self.top_level:
            return updated_node  # leave_Module puts the new import on a line of its own
        extra = [
            self.extra_imports.pop(id(small)).body[0]
            for small in original_node.body
            if id(small) in self.extra_imports
        ]
        # An import inside a block: `from taskexec.sync import A; from taskexec import B`.
        return (
            updated_node.with_changes(body=[*updated_node.body, *extra]) if extra else updated_node
        )

    def leave_If(self, original_node: cst.If, updated_node: cst.If) -> cst.If:
        if not is_main_guard(original_node) or not isinstance(updated_node.body, cst.IndentedBlock):
            return updated_node
        assert isinstance(original_node.body, cst.IndentedBlock)
        body = self._entry(list(original_node.body.body), list(updated_node.body.body), 1)
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        body: list[cst.BaseStatement] = []
        segment_o: list[cst.BaseStatement] = []
        segment_u: list[cst.BaseStatement] = []
        for original, updated in zip(original_node.body, updated_node.body, strict=True):
            if is_main_guard(original):
                body += self._entry(segment_o, segment_u, 2)
                segment_o, segment_u = [], []
                body.append(updated)
            else:
                segment_o.append(original)
                segment_u.append(updated)
            smalls = original.body if isinstance(original, cst.SimpleStatementLine) else ()
            for small in smalls:
                extra = self.extra_imports.get(id(small))
                if extra is not None:
                    if segment_u:
                        segment_o.append(extra)
                        segment_u.append(extra)
                    else:
                        body.append(extra)
        body += self._entry(segment_o, segment_u, 2)
        imports = []
        if self.entered and not self.module.has_asyncio:
            imports.append("asyncio")
        if self.plan.import_taskexec:
            imports.append("taskexec")
        return updated_node.with_changes(body=_add_imports(body, imports))

    # -- entry points ------------------------------------------------------------------------

    entered = False

    def _entry(
        self,
        originals: Sequence[cst.BaseStatement],
        updated: Sequence[cst.BaseStatement],
        blank: int,
    ) -> list[cst.BaseStatement]:
        """Statements at a module's top level (``blank`` = 2) or in its main guard (1): the
        ones that now await run under one ``asyncio.run``."""
        marked = [i for i, s in enumerate(originals) if s in self.plan.entry]
        if not marked:
            return list(updated)
        self.entered = True
        first, last = marked[0], marked[-1]
        chunk = list(updated[first : last + 1])
        if len(chunk) == 1 and _single_await(chunk[0]):
            # `main()` -> `asyncio.run(main())`: one await, run once, needs no wrapper.
            return [*updated[:first], chunk[0].visit(_AwaitToRun()), *updated[last + 1 :]]  # type: ignore[list-item]
        name = "_main"
        index = 1
        while name in self.used_names:
            name, index = f"_main_{index}", index + 1
        self.used_names.add(name)
        names = sorted(_top_bindings(chunk))
        inner: list[cst.BaseStatement] = []
        if names:
            # The statements ran at module level: what they bind stays a module global.
            inner.append(
                cst.SimpleStatementLine([cst.Global([cst.NameItem(cst.Name(n)) for n in names])])
            )
        leading = list(_leading(chunk[0]))
        if first > 0:
            # Blank lines around the new function as a formatter would put them (2 at module
            # level, 1 in the main guard); the comments above the first statement stay above.
            while leading and leading[0].comment is None:
                leading.pop(0)
            leading = [cst.EmptyLine(indent=False)] * blank + leading
        inner += [chunk[0].with_changes(leading_lines=()), *chunk[1:]]
        function = cst.FunctionDef(
            name=cst.Name(name),
            params=cst.Parameters(),
            body=cst.IndentedBlock(inner),
            asynchronous=cst.Asynchronous(),
            returns=cst.Annotation(cst.Name("None")),
            leading_lines=leading,
        )
        run = cst.SimpleStatementLine(
            [cst.Expr(_run(cst.Call(cst.Name(name))))],
            leading_lines=[cst.EmptyLine(indent=False)] * blank,
        )
        return [*updated[:first], function, run, *updated[last + 1 :]]


def _leading(statement: cst.BaseStatement) -> Sequence[cst.EmptyLine]:
    """The blank lines and comments above a statement (every statement kind has them)."""
    lines: Sequence[cst.EmptyLine] = getattr(statement, "leading_lines", ())
    return lines


def _local(alias: cst.ImportAlias) -> str:
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return alias.asname.name.value
    return alias.name.value if isinstance(alias.name, cst.Name) else ""


def _parenthesize(node: cst.Await) -> cst.Await:
    return node.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


class _AwaitToRun(cst.CSTTransformer):
    def leave_Await(self, original_node: cst.Await, updated_node: cst.Await) -> cst.Call:
        return _run(updated_node.expression)


class _Counter(cst.CSTVisitor):
    """Awaits in a statement, and whether one is in a loop, comprehension or lambda."""

    def __init__(self) -> None:
        super().__init__()
        self.awaits = 0
        self.depth = 0
        self.repeated = False

    def visit_Await(self, node: cst.Await) -> None:
        self.awaits += 1
        self.repeated = self.repeated or self.depth > 0

    def _enter(self, node: cst.CSTNode) -> None:
        self.depth += 1

    def _leave(self, original_node: cst.CSTNode) -> None:
        self.depth -= 1

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_Lambda = _enter
    leave_ListComp = leave_SetComp = leave_DictComp = leave_GeneratorExp = leave_Lambda = _leave


def _single_await(statement: cst.BaseStatement) -> bool:
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return False
    counter = _Counter()
    statement.visit(counter)
    return counter.awaits == 1 and not counter.repeated


class _Bindings(cst.CSTVisitor):
    """Names a run of top-level statements binds (not inside functions or classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def _add(self, target: cst.BaseExpression) -> None:
        self.names.update(binding_names(target))

    def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
        self._add(node.target)

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self._add(node.target)

    def visit_For(self, node: cst.For) -> None:
        self._add(node.target)

    def visit_WithItem(self, node: cst.WithItem) -> None:
        if node.asname is not None:
            self._add(node.asname.name)

    def visit_ImportAlias(self, node: cst.ImportAlias) -> None:
        name = _local(node) if node.asname is not None else ""
        if not name and isinstance(node.name, cst.Attribute | cst.Name):
            name = self_code(node.name).split(".", 1)[0]
        self.names.add(name)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.names.add(node.name.value)
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.names.add(node.name.value)
        return False

    def visit_Lambda(self, node: cst.Lambda) -> bool:
        return False

    def visit_ListComp(self, node: cst.ListComp) -> bool:
        return False

    def visit_GeneratorExp(self, node: cst.GeneratorExp) -> bool:
        return False

    def visit_ExceptHandler(self, node: cst.ExceptHandler) -> None:
        if node.name is not None:
            self._add(node.name.name)


def self_code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def _top_bindings(statements: Sequence[cst.BaseStatement]) -> set[str]:
    bindings = _Bindings()
    for statement in statements:
        statement.visit(bindings)
    return {n for n in bindings.names if n}


def _add_imports(body: list[cst.BaseStatement], names: list[str]) -> list[cst.BaseStatement]:
    """``import NAME`` before the module's first import (after its docstring and any
    ``from __future__``), taking over that import's leading comments and blank lines."""
    if not names:
        return body
    index = 0
    for i, statement in enumerate(body):
        if isinstance(statement, cst.SimpleStatementLine) and isinstance(
            statement.body[0], cst.Import | cst.ImportFrom
        ):
            small = statement.body[0]
            if isinstance(small, cst.ImportFrom) and self_code(small.module or cst.Name("x")) == (
                "__future__"
            ):
                index = i + 1
                continue
            index = i
            break
        if (
            i == 0
            and isinstance(statement, cst.SimpleStatementLine)
            and isinstance(statement.body[0], cst.Expr)
            and isinstance(statement.body[0].value, cst.SimpleString | cst.ConcatenatedString)
        ):
            index = 1
            continue
        break
    new = [cst.SimpleStatementLine([cst.Import([cst.ImportAlias(cst.Name(n))])]) for n in names]
    if index < len(body):
        target = body[index]
        new[0] = new[0].with_changes(leading_lines=_leading(target))
        body = [*body[:index], *new, target.with_changes(leading_lines=()), *body[index + 1 :]]
    else:
        body = [*body, *new]
    return body


def rewrite(module: ModuleInfo, plan: ModulePlan) -> str:
    """Return the new source of ``module`` (its old source when the plan changes nothing)."""
    if not plan.changes():
        return module.source
    return module.tree.visit(_Rewriter(module, plan)).code


def shim_class_expr(module: ModuleInfo, name: str) -> cst.BaseExpression:
    """``taskexec.NAME`` with the module's own name for the package."""
    assert name in SHIM_CLASSES
    alias = sorted(module.taskexec_aliases)[0] if module.taskexec_aliases else "taskexec"
    return cst.Attribute(cst.Name(alias), cst.Name(name))
