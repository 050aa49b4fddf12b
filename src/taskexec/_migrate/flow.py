"""Find the objects of ``taskexec.sync`` classes by following values, and the call graph.

A *slot* is a place a value can be: a local or global name, an attribute of a class's instances
(``self.executor``), a parameter, a function's return value, one expression (a constructor
call), or the elements of a container. Assignments, arguments, returns, ``with ... as`` and
``for`` loops join slots into components (union-find). A component is a *shim* when it holds a
constructor of a ``taskexec.sync`` class, or a value annotated with one, or (``--trace``) a
value a blocking call was recorded on at run time. Every object in one component must move to
the async API together, or stay together.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import libcst as cst

from .discover import Facts, Where, binding_names, dotted
from .model import (
    BLOCKING_METHODS,
    EXECUTOR_CALLS,
    SHIM_CLASSES,
    THREAD_CALLS,
    ClassInfo,
    Context,
    FuncCall,
    FuncInfo,
    ModuleInfo,
    ShimCall,
    ShimWith,
    Site,
)

__all__ = ("Component", "Flow", "Project")

#: Builtins a shim object may be handed to without escaping the analysis.
HARMLESS = frozenset({"print", "repr", "str", "id", "type", "isinstance", "len", "bool", "hash"})


Slot = Hashable


@dataclass(eq=False)
class Component:
    """What is known about one set of joined slots."""

    shim: set[str] = field(default_factory=set)
    classes: list[ClassInfo] = field(default_factory=list)
    ctors: list[tuple[ModuleInfo, cst.Call]] = field(default_factory=list)
    escapes: list[str] = field(default_factory=list)
    traced: bool = False
    elements: Slot | None = None
    #: The class itself as a value (``FACTORIES = {"x": TaskExecutor}``): where it is named.
    class_refs: list[tuple[ModuleInfo, cst.BaseExpression, str]] = field(default_factory=list)
    #: Instances made by calling such a value: the slots of the classes that made them.
    factories: list[Slot] = field(default_factory=list)

    def merge(self, other: Component) -> None:
        self.shim |= other.shim
        self.class_refs += [c for c in other.class_refs if c not in self.class_refs]
        self.factories += [f for f in other.factories if f not in self.factories]
        self.classes += [c for c in other.classes if c not in self.classes]
        self.ctors += [c for c in other.ctors if c not in self.ctors]
        self.escapes += [e for e in other.escapes if e not in self.escapes]
        self.traced = self.traced or other.traced


@dataclass(eq=False)
class Project:
    """The given files, parsed, with their facts."""

    modules: list[ModuleInfo]
    facts: dict[ModuleInfo, Facts]
    by_name: dict[str, ModuleInfo] = field(default_factory=dict)
    traced: set[tuple[str, int]] = field(default_factory=set)
    #: pytest runs ``async def`` tests here (pytest-asyncio's ``asyncio_mode = auto``).
    async_tests: bool = False

    def __post_init__(self) -> None:
        for module in self.modules:
            for name in module.names:
                self.by_name.setdefault(name, module)

    def resolve_module(self, importer: ModuleInfo, name: str) -> ModuleInfo | None:
        """The given module an import names, relative imports included."""
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            package = importer.names[0].split(".") if importer.names else []
            is_package = importer.path.name == "__init__.py"
            keep = len(package) - (level - 1) - (0 if is_package else 1)
            if keep < 0:
                return None
            rest = name.lstrip(".")
            name = ".".join([*package[:keep], *([rest] if rest else [])])
        return self.by_name.get(name)


class Flow:
    """Union-find over slots, and the evaluation of expressions to slots."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.parent: dict[Slot, Slot] = {}
        self.data: dict[Slot, Component] = {}
        self.changed = False
        self.callbacks: dict[FuncInfo, str] = {}
        self.sites: list[Site] = []
        self._importing: set[tuple[ModuleInfo, str]] = set()

    # -- union-find --------------------------------------------------------------------------

    def find(self, slot: Slot) -> Slot:
        root = slot
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while slot != root:
            self.parent[slot], slot = root, self.parent[slot]
        return root

    def comp(self, slot: Slot) -> Component:
        root = self.find(slot)
        if root not in self.data:
            self.data[root] = Component()
        return self.data[root]

    def union(self, a: Slot | None, b: Slot | None) -> None:
        if a is None or b is None:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.changed = True
        ca, cb = self.comp(ra), self.comp(rb)
        self.parent[rb] = ra
        elements_b = cb.elements
        ca.merge(cb)
        del self.data[rb]
        if ca.elements is None:
            ca.elements = elements_b
        elif elements_b is not None:
            self.union(ca.elements, elements_b)

    def elements(self, slot: Slot) -> Slot:
        comp = self.comp(slot)
        if comp.elements is None:
            comp.elements = ("elements", self.find(slot))
        return comp.elements

    def mark_shim(self, slot: Slot, name: str) -> None:
        comp = self.comp(slot)
        if name not in comp.shim:
            comp.shim.add(name)
            self.changed = True

    def mark_class(self, slot: Slot, cls: ClassInfo) -> None:
        comp = self.comp(slot)
        if cls not in comp.classes:
            comp.classes.append(cls)
            self.changed = True

    def escape(self, slot: Slot | None, reason: str) -> None:
        if slot is None:
            return
        comp = self.comp(slot)
        if reason not in comp.escapes:
            comp.escapes.append(reason)

    # -- names -------------------------------------------------------------------------------

    def lookup(self, name: str, context: Context) -> tuple[str, object] | None:
        """What ``name`` means in ``context``: a local or global slot, a function, a class, a
        ``taskexec.sync`` class, or a given module."""
        function = context if isinstance(context, FuncInfo) else None
        module = context.module if isinstance(context, FuncInfo) else context
        while function is not None:
            if name in function.nested:
                return "func", function.nested[name]
            if name in function.nested_classes:
                return "class", function.nested_classes[name]
            if name in function.locals:
                return "slot", ("local", function, name)
            function = function.parent
        if name in module.functions:
            return "func", module.functions[name]
        if name in module.classes:
            return "class", module.classes[name]
        if name in module.shim_names:
            return "shim", module.shim_names[name]
        if name in module.imports:
            key = (module, name)
            if key in self._importing:
                return None  # an import cycle (a package re-exporting what imports it)
            self._importing.add(key)
            try:
                return self._imported(module, name)
            finally:
                self._importing.discard(key)
        if name in module.globals:
            return "slot", ("global", module, name)
        return None

    def _imported(self, module: ModuleInfo, name: str) -> tuple[str, object] | None:
        """What an imported name refers to among the given modules."""
        target, attr = module.imports[name]
        other = self.project.resolve_module(module, target)
        if attr is None:
            return ("module", other) if other is not None else None
        joined = f"{target}{attr}" if target.endswith(".") else f"{target}.{attr}"
        sub = self.project.resolve_module(module, joined)
        defined = other is not None and (
            attr in other.functions or attr in other.classes or attr in other.globals
        )
        if sub is not None and not defined:
            return "module", sub  # `from package import submodule`
        return self.member(other, attr) if other is not None else None

    def member(self, module: ModuleInfo, name: str) -> tuple[str, object] | None:
        """``module.name`` for a given module."""
        if name in module.functions:
            return "func", module.functions[name]
        if name in module.classes:
            return "class", module.classes[name]
        if name in module.shim_names:
            return "shim", module.shim_names[name]
        if name in module.imports:
            return self.lookup(name, module)
        return "slot", ("global", module, name)

    def method(self, cls: ClassInfo, name: str, seen: int = 0) -> FuncInfo | None:
        """``cls.name``, looked up in the class and then in its bases among the given files."""
        if name in cls.methods:
            return cls.methods[name]
        if seen > 10:
            return None
        for base in cls.bases:
            found = self.lookup(base.rsplit(".", 1)[-1], cls.module)
            if found is not None and found[0] == "class":
                base_cls = found[1]
                assert isinstance(base_cls, ClassInfo)
                method = self.method(base_cls, name, seen + 1)
                if method is not None:
                    return method
        return None

    def root_class(self, cls: ClassInfo) -> ClassInfo:
        """The first class up ``cls``'s bases among the given files: instances of a class and
        of its subclasses share attribute slots (``self.ex`` set in one, read in the other)."""
        for _ in range(10):
            for base in cls.bases:
                found = self.lookup(base.rsplit(".", 1)[-1], cls.module)
                if found is not None and found[0] == "class":
                    base_cls = found[1]
                    assert isinstance(base_cls, ClassInfo)
                    cls = base_cls
                    break
            else:
                return cls
        return cls

    def shim_class(self, expr: cst.BaseExpression, context: Context) -> str | None:
        """The ``taskexec.sync`` class ``expr`` names (``TaskExecutor``, ``sync.X``, ...)."""
        module = context.module if isinstance(context, FuncInfo) else context
        if isinstance(expr, cst.Name):
            found = self.lookup(expr.value, context)
            return str(found[1]) if found is not None and found[0] == "shim" else None
        if isinstance(expr, cst.Attribute) and expr.attr.value in SHIM_CLASSES:
            head = dotted(expr.value)
            if head in module.sync_aliases or (
                head is not None
                and head.endswith(".sync")
                and head[: -len(".sync")] in module.taskexec_aliases
            ):
                return expr.attr.value
        if isinstance(expr, cst.SimpleString) and expr.raw_value in SHIM_CLASSES:
            return expr.raw_value
        if isinstance(expr, cst.BinaryOperation):  # X | None
            return self.shim_class(expr.left, context) or self.shim_class(expr.right, context)
        if isinstance(expr, cst.Subscript):  # Optional[X]
            for element in expr.slice:
                if isinstance(element.slice, cst.Index):
                    found_cls = self.shim_class(element.slice.value, context)
                    if found_cls:
                        return found_cls
        return None

    def user_class(self, expr: cst.BaseExpression, context: Context) -> ClassInfo | None:
        """The class of the given files ``expr`` names (in an annotation)."""
        if isinstance(expr, cst.SimpleString):
            expr = cst.Name(expr.raw_value) if expr.raw_value.isidentifier() else expr
        callee = self.callee(expr, context)
        return callee[1] if callee is not None and isinstance(callee[1], ClassInfo) else None

    def self_class(self, expr: cst.BaseExpression, context: Context) -> ClassInfo | None:
        """The class of ``self`` when ``expr`` is the ``self`` of a method."""
        function = context if isinstance(context, FuncInfo) else None
        while function is not None:
            if (
                isinstance(expr, cst.Name)
                and function.self_name == expr.value
                and "classmethod" not in function.decorators
            ):
                return function.cls
            if isinstance(expr, cst.Name) and expr.value in function.locals:
                return None
            function = function.parent
        return None

    def callee(
        self, func: cst.BaseExpression, context: Context
    ) -> tuple[bool, FuncInfo | ClassInfo] | None:
        """The function or class a call calls, and whether it is bound (a method on an
        instance: its first parameter is not among the arguments)."""
        if isinstance(func, cst.Name):
            found = self.lookup(func.value, context)
            if found is not None and found[0] in ("func", "class"):
                target = found[1]
                assert isinstance(target, FuncInfo | ClassInfo)
                return False, target
            return None
        if not isinstance(func, cst.Attribute):
            return None
        attr = func.attr.value
        cls = self.self_class(func.value, context)
        if cls is not None:
            method = self.method(cls, attr)
            return (True, method) if method is not None else None
        if isinstance(func.value, cst.Name):
            found = self.lookup(func.value.value, context)
            if found is not None and found[0] == "module":
                other = found[1]
                assert isinstance(other, ModuleInfo)
                member = self.member(other, attr)
                if member is not None and member[0] in ("func", "class"):
                    target = member[1]
                    assert isinstance(target, FuncInfo | ClassInfo)
                    return False, target
                return None
            if found is not None and found[0] == "class":
                owner = found[1]
                assert isinstance(owner, ClassInfo)
                method = self.method(owner, attr)
                return (False, method) if method is not None else None
        receiver = self.slot(func.value, context)
        if receiver is not None:
            for owner in self.comp(receiver).classes:
                method = self.method(owner, attr)
                if method is not None:
                    return True, method
        return None

    # -- expressions to slots ----------------------------------------------------------------

    def slot(self, expr: cst.BaseExpression, context: Context) -> Slot | None:
        """The slot ``expr``'s value lives in, or None when it is not followed."""
        module = context.module if isinstance(context, FuncInfo) else context
        shim = (
            self.shim_class(expr, context) if isinstance(expr, cst.Name | cst.Attribute) else None
        )
        if shim is not None:
            # A taskexec.sync class used as a value, to be called later.
            ref: Slot = ("node", expr)
            comp = self.comp(ref)
            if (module, expr, shim) not in comp.class_refs:
                comp.class_refs.append((module, expr, shim))
                self.changed = True
            return ref
        if isinstance(expr, cst.Name):
            found = self.lookup(expr.value, context)
            return found[1] if found is not None and found[0] == "slot" else None
        if isinstance(expr, cst.Await):
            return self.slot(expr.expression, context)
        if isinstance(expr, cst.Attribute):
            cls = self.self_class(expr.value, context)
            if cls is not None:
                return ("attr", self.root_class(cls), expr.attr.value)
            if isinstance(expr.value, cst.Name):
                found = self.lookup(expr.value.value, context)
                if found is not None and found[0] == "module":
                    other = found[1]
                    assert isinstance(other, ModuleInfo)
                    member = self.member(other, expr.attr.value)
                    return member[1] if member is not None and member[0] == "slot" else None
            receiver = self.slot(expr.value, context)
            if receiver is not None and self.comp(receiver).classes:
                return ("attr", self.root_class(self.comp(receiver).classes[0]), expr.attr.value)
            return None
        if isinstance(expr, cst.Call):
            return self.call_slot(expr, context, module)
        if isinstance(expr, cst.Subscript):
            inner = self.slot(expr.value, context)
            return self.elements(inner) if inner is not None else None
        if isinstance(expr, cst.List | cst.Tuple | cst.Set):
            container: Slot = ("node", expr)
            for element in expr.elements:
                self.union(self.elements(container), self.slot(element.value, context))
            return container
        if isinstance(expr, cst.Dict):
            container = ("node", expr)
            for item in expr.elements:
                if isinstance(item, cst.DictElement):
                    self.union(self.elements(container), self.slot(item.value, context))
            return container
        if isinstance(expr, cst.IfExp):
            body, orelse = self.slot(expr.body, context), self.slot(expr.orelse, context)
            self.union(body, orelse)
            return body or orelse
        if isinstance(expr, cst.BooleanOperation):
            left, right = self.slot(expr.left, context), self.slot(expr.right, context)
            self.union(left, right)
            return left or right
        if isinstance(expr, cst.NamedExpr):
            target = self.slot(expr.target, context)
            self.union(target, self.slot(expr.value, context))
            return target
        return None

    def call_slot(self, call: cst.Call, context: Context, module: ModuleInfo) -> Slot | None:
        shim = self.shim_class(call.func, context)
        if shim is not None:
            slot: Slot = ("node", call)
            self.mark_shim(slot, shim)
            comp = self.comp(slot)
            if (module, call) not in comp.ctors:
                comp.ctors.append((module, call))
            return slot
        target = self.callee(call.func, context)
        if target is not None:
            if isinstance(target[1], ClassInfo):
                slot = ("node", call)
                self.mark_class(slot, target[1])
                return slot
            return ("return", target[1])
        if isinstance(call.func, cst.Attribute) and call.func.attr.value in (
            "get",
            "pop",
            "values",
            "copy",
        ):
            inner = self.slot(call.func.value, context)
            if inner is None:
                return None
            return inner if call.func.attr.value == "copy" else self.elements(inner)
        factory = self.slot(call.func, context)
        refs = self.comp(factory).class_refs if factory is not None else []
        if factory is None or not refs:
            return None
        # Every instance a class value makes moves with every other: the class value changes.
        slot = ("node", call)
        self.union(slot, ("instances", refs[0][1]))
        for _, _, name in refs:
            self.mark_shim(slot, name)
        comp = self.comp(slot)
        if factory not in comp.factories:
            comp.factories.append(factory)
            self.changed = True
        return slot

    # -- the passes --------------------------------------------------------------------------

    def bind_args(self, call: cst.Call, target: FuncInfo, bound: bool, context: Context) -> None:
        params = target.node.params
        positional = [p.name.value for p in (*params.posonly_params, *params.params)]
        if bound:
            positional = positional[1:]
        index = 0
        for arg in call.args:
            if arg.star:
                continue
            value = self.slot(arg.value, context)
            if arg.keyword is not None:
                self.union(("local", target, arg.keyword.value), value)
            elif index < len(positional):
                self.union(("local", target, positional[index]), value)
                index += 1

    def run(self) -> None:
        """Follow values until nothing more joins; then list the sites."""
        for _ in range(20):
            self.changed = False
            for module in self.project.modules:
                self.one_pass(module, self.project.facts[module])
            if not self.changed:
                break
        for module in self.project.modules:
            self.find_sites(module, self.project.facts[module])

    def one_pass(self, module: ModuleInfo, facts: Facts) -> None:
        for context, targets, value in facts.assigns:
            source = self.slot(value, context)
            for target in targets:
                if isinstance(target, cst.Tuple | cst.List):
                    for name in binding_names(target):
                        slot = self.slot(cst.Name(name), context)
                        if source is not None:
                            self.union(slot, self.elements(source))
                else:
                    self.union(self.slot(target, context), source)
        for context, target, iterable in facts.fors:
            source = self.slot(iterable, context)
            if source is not None and isinstance(target, cst.Name):
                self.union(self.slot(target, context), self.elements(source))
        for function, value in facts.returns:
            self.union(("return", function), self.slot(value, function))
        for function, param, annotation in facts.param_annotations:
            self.annotate(("local", function, param), annotation, function)
        for function, annotation in facts.return_annotations:
            self.annotate(("return", function), annotation, function)
        for context, target, annotation in facts.annotations:
            slot = self.slot(target, context)
            if slot is not None:
                self.annotate(slot, annotation, context)
        for call, where in facts.calls:
            context = where.context
            shim = self.shim_class(call.func, context)
            called = self.callee(call.func, context) if shim is None else None
            if shim is not None:
                ctor = ("node", call)
                self.slot(call, context)
                for index, arg in enumerate(call.args):
                    # A sync orchestrator takes a sync executor: they move together.
                    keyword = arg.keyword.value if arg.keyword is not None else None
                    if shim == "ProjectOrchestrator" and (keyword == "executor" or index == 0):
                        self.union(ctor, self.slot(arg.value, context))
            elif called is not None:
                bound, callee = called
                if isinstance(callee, ClassInfo):
                    init = self.method(callee, "__init__")
                    if init is not None:
                        self.bind_args(call, init, True, context)
                else:
                    self.bind_args(call, callee, bound, context)
            if (
                isinstance(call.func, cst.Attribute)
                and call.func.attr.value in BLOCKING_METHODS
                and (str(module.path), module.line(call)) in self.project.traced
            ):
                receiver = self.slot(call.func.value, context)
                if receiver is not None and not self.comp(receiver).traced:
                    self.comp(receiver).traced = True
                    self.changed = True

    def annotate(self, slot: Slot, annotation: cst.BaseExpression, context: Context) -> None:
        shim = self.shim_class(annotation, context)
        if shim is not None:
            self.mark_shim(slot, shim)
            return
        cls = self.user_class(annotation, context)
        if cls is not None:
            self.mark_class(slot, cls)

    def is_shim(self, slot: Slot | None) -> bool:
        if slot is None:
            return False
        comp = self.comp(slot)
        return bool(comp.shim) or comp.traced

    def find_sites(self, module: ModuleInfo, facts: Facts) -> None:
        """Shim calls, shim ``with`` statements, calls of given functions, and callbacks."""
        for call, where in facts.calls:
            if call in facts.awaited:
                continue
            context = where.context
            func = call.func
            if isinstance(func, cst.Attribute) and func.attr.value in BLOCKING_METHODS:
                receiver = self.slot(func.value, context)
                if self.is_shim(receiver):
                    traced = (str(module.path), module.line(call)) in self.project.traced
                    self.sites.append(
                        ShimCall(
                            *self._where(module, call, where),
                            method=func.attr.value,
                            key=self.find(receiver),
                            traced=traced and not self.comp(receiver).shim,
                        )
                    )
                    continue
            if isinstance(func, cst.Attribute) and func.attr.value == "stream":
                receiver = self.slot(func.value, context)
                if self.is_shim(receiver):
                    self.escape(
                        receiver,
                        f"its stream() at {module.display}:{module.line(call)} is iterated "
                        "synchronously (move it to `async with`/`async for` by hand)",
                    )
                    continue
            target = self.callee(func, context)
            if target is not None and isinstance(target[1], FuncInfo):
                if not target[1].is_async:
                    self.sites.append(FuncCall(*self._where(module, call, where), callee=target[1]))
            elif target is None and self.shim_class(func, context) is None:
                self._escapes(module, call, context)
            if isinstance(func, cst.Name) and func.value == "getattr" and call.args:
                self._getattr(module, call, context)
        for node, where in facts.withs:
            shims = [self.slot(item.item, where.context) for item in node.items]
            if not any(self.is_shim(s) for s in shims):
                continue
            if not all(self.is_shim(s) for s in shims) or node.asynchronous is not None:
                for slot in shims:
                    self.escape(
                        slot,
                        f"the with statement at {module.display}:{module.line(node)} also "
                        "enters a context manager that is not a taskexec.sync object",
                    )
                continue
            for slot in shims:
                self.sites.append(ShimWith(*self._where(module, node, where), key=self.find(slot)))
        for context, value, receiver in facts.values:
            self._callback(module, context, value, receiver)

    def _where(
        self, module: ModuleInfo, node: cst.CSTNode, where: Where
    ) -> tuple[
        Context,
        ModuleInfo,
        cst.CSTNode,
        str | None,
        cst.GeneratorExp | None,
        cst.BaseStatement | None,
        cst.BaseStatement | None,
        bool,
    ]:
        return (
            where.context,
            module,
            node,
            where.barrier,
            where.eager_genexp,
            where.top,
            where.guard_top,
            where.threaded,
        )

    def _escapes(self, module: ModuleInfo, call: cst.Call, context: Context) -> None:
        """A shim object handed to code outside the given files stays a shim object."""
        name = dotted(call.func) or module.code(call.func)
        last = name.rsplit(".", 1)[-1]
        if last in HARMLESS:
            return
        for arg in call.args:
            slot = self.slot(arg.value, context)
            if self.is_shim(slot):
                how = "a thread" if last in THREAD_CALLS else f"{name}()"
                self.escape(
                    slot,
                    f"it is passed to {how} at {module.display}:{module.line(call)}, "
                    "outside the given files",
                )

    def _getattr(self, module: ModuleInfo, call: cst.Call, context: Context) -> None:
        """``getattr(obj, name)``: what it can reach is called without ``await``."""
        owner = self.self_class(call.args[0].value, context)
        literal = call.args[1].value if len(call.args) > 1 else None
        wanted = literal.raw_value if isinstance(literal, cst.SimpleString) else None
        reason = f"it is reached through getattr() at {module.display}:{module.line(call)}"
        candidates: list[FuncInfo] = []
        if owner is not None:
            candidates = [m for m in owner.methods.values() if wanted in (None, m.node.name.value)]
        elif wanted is not None:
            candidates = [
                f
                for m in self.project.modules
                for f in m.all_functions
                if f.node.name.value == wanted
            ]
        for function in candidates:
            self.callbacks.setdefault(function, reason)

    def _callback(
        self,
        module: ModuleInfo,
        context: Context,
        value: cst.BaseExpression,
        receiver: cst.Call | None,
    ) -> None:
        """A function used as a value is called by whoever receives it, without ``await``."""
        if isinstance(value, cst.Attribute) and value.attr.value in BLOCKING_METHODS:
            slot = self.slot(value.value, context)
            if self.is_shim(slot):
                self.escape(
                    slot,
                    f"its {value.attr.value} method is passed as a value at "
                    f"{module.display}:{module.line(value)} (a callback)",
                )
                return
        if not isinstance(value, cst.Name | cst.Attribute):
            return
        target = self.callee(value, context)
        if target is None or not isinstance(target[1], FuncInfo):
            return
        where = f"{module.display}:{module.line(value)}"
        name = dotted(receiver.func) if receiver is not None else None
        last = name.rsplit(".", 1)[-1] if name else ""
        if last in THREAD_CALLS:
            reason = f"it is a thread target ({name}() at {where})"
        elif last in EXECUTOR_CALLS:
            reason = f"it is an executor callback ({name}() at {where})"
        elif name:
            reason = f"it is handed to {name}() at {where} as a callback, called without await"
        else:
            reason = f"it is used as a value at {where} (a callback, called without await)"
        self.callbacks.setdefault(target[1], reason)
