"""One migration: read the files, follow the values, decide, rewrite, and say what and why."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from .decide import Decisions, decide
from .discover import ParseFailure, collect, dotted, find_files, load_module
from .flow import Flow, Project
from .model import BLOCKING_METHODS, FuncInfo, ModuleInfo, ShimCall, Site
from .rewrite import ModulePlan, rewrite, shim_class_expr

__all__ = ("Entry", "FileResult", "Migration", "plan_migration")


@dataclass(frozen=True, order=True)
class Entry:
    """One line of the report: where, what kind of change (or ``sync``), and the detail."""

    display: str
    line: int
    kind: str
    text: str

    def render(self) -> str:
        return f"{self.display}:{self.line}: {self.kind:<10} {self.text}"


@dataclass
class FileResult:
    """A file and its source after the migration."""

    module: ModuleInfo
    new_source: str

    @property
    def changed(self) -> bool:
        return self.new_source != self.module.source


@dataclass
class Migration:
    """Everything ``taskexec migrate`` reports, diffs or writes."""

    files: list[FileResult] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    shim_sites: int = 0
    left_sync: int = 0
    traced_outside: int = 0

    @property
    def changed(self) -> list[FileResult]:
        return [f for f in self.files if f.changed]


def _snippet(module: ModuleInfo, node: cst.CSTNode, limit: int = 72) -> str:
    if isinstance(node, cst.With):
        items = [item.with_changes(comma=cst.MaybeSentinel.DEFAULT) for item in node.items]
        text = "with " + ", ".join(module.code(item).strip() for item in items)
    else:
        lines = module.code(node).splitlines()
        # A statement's code starts with the comments above it: show the code.
        text = " ".join(s for s in lines if s.strip() and not s.strip().startswith("#"))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(site: Site) -> str:
    context = site.context
    return f"in {context.describe()}" if isinstance(context, FuncInfo) else "at module level"


#: pytest-asyncio's setting that runs every ``async def`` test without a marker.
_ASYNCIO_AUTO = re.compile(r"""^\s*asyncio_mode\s*=\s*["']?auto\b""", re.MULTILINE)
_PYTEST_CONFIGS = ("pyproject.toml", "pytest.ini", "setup.cfg", "tox.ini")


def _async_tests(path: Path) -> bool:
    """Whether the pytest configuration that governs ``path`` runs ``async def`` tests."""
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    for candidate in (folder, *folder.parents):
        for name in _PYTEST_CONFIGS:
            config = candidate / name
            if config.is_file():
                try:
                    if _ASYNCIO_AUTO.search(config.read_text(encoding="utf-8")):
                        return True
                except (OSError, UnicodeDecodeError):
                    continue
    return False


def plan_migration(paths: Sequence[str], traced: Iterable[tuple[str, int]] = ()) -> Migration:
    """Analyse the Python files under ``paths`` and compute their migrated sources.

    Args:
        paths: Files and directories (searched for ``*.py``).
        traced: ``(absolute file, line)`` of blocking calls recorded at run time.

    Raises:
        ParseFailure: A path does not exist.
    """
    migration = Migration()
    modules: list[ModuleInfo] = []
    for file, root in find_files(paths):
        display = os.path.relpath(file) if not os.path.isabs(str(file)) else str(file)
        try:
            modules.append(load_module(file, root, display))
        except ParseFailure as exc:
            migration.errors.append(str(exc))
    facts = {module: collect(module) for module in modules}
    traced_set = {(os.path.realpath(f), line) for f, line in traced}
    known = {os.path.realpath(m.path) for m in modules}
    migration.traced_outside = sum(1 for f, _ in traced_set if f not in known)
    project = Project(modules, facts)
    project.async_tests = any(_async_tests(Path(p)) for p in paths)
    project.traced = {
        (str(m.path), line)
        for m in modules
        for f, line in traced_set
        if f == os.path.realpath(m.path)
    }
    flow = Flow(project)
    flow.run()
    decisions = decide(flow)
    plans = _plans(flow, decisions, migration)
    for module in modules:
        migration.files.append(FileResult(module, rewrite(module, plans[module])))
    migration.entries[:] = sorted(set(migration.entries))
    return migration


def _plans(flow: Flow, decisions: Decisions, migration: Migration) -> dict[ModuleInfo, ModulePlan]:
    plans = {module: ModulePlan() for module in flow.project.modules}
    report = migration.entries.append
    for site in decisions.awaited:
        module, plan = site.module, plans[site.module]
        assert isinstance(site.node, cst.Call)
        method = None
        if isinstance(site, ShimCall):
            migration.shim_sites += 1
            renamed = BLOCKING_METHODS[site.method]
            method = renamed if renamed != site.method else None
        plan.awaited[site.node] = method
        if isinstance(site.context, ModuleInfo):
            continue  # reported as the entry point that runs it
        text = _snippet(module, site.node)
        if method is not None:
            text += f" (as await ...{method}())"
        if isinstance(site, ShimCall) and site.traced:
            text += " [found at run time]"
        report(Entry(module.display, module.line(site.node), "await", f"{text} {_where(site)}"))
    for with_site in decisions.async_withs:
        module, plan = with_site.module, plans[with_site.module]
        assert isinstance(with_site.node, cst.With)
        migration.shim_sites += 1
        plan.async_withs.add(with_site.node)
        report(
            Entry(
                module.display,
                module.line(with_site.node),
                "async with",
                f"{_snippet(module, with_site.node)} {_where(with_site)}",
            )
        )
    for site in [*decisions.awaited, *decisions.async_withs]:
        plan = plans[site.module]
        if site.eager_genexp is not None:
            plan.genexps.add(site.eager_genexp)
        if isinstance(site.context, ModuleInfo):
            top = site.guard_top or site.top
            if top is not None and top not in plan.entry:
                plan.entry.add(top)
    for module, plan in plans.items():
        for top in plan.entry:
            report(
                Entry(
                    module.display,
                    module.line(top),
                    "entry",
                    f"runs under asyncio.run(): {_snippet(module, top, 56)}",
                )
            )
    for function in decisions.async_functions:
        plans[function.module].async_functions.add(function.node)
        report(
            Entry(
                function.module.display,
                function.module.line(function.node),
                "async def",
                function.describe(),
            )
        )
    for site, reason in decisions.left_sync:
        migration.shim_sites += 1
        migration.left_sync += 1
        node = site.node
        text = f"{_snippet(site.module, node)} {_where(site)}: {reason}"
        if isinstance(site, ShimCall) and site.traced:
            text += " [found at run time]"
        report(Entry(site.module.display, site.module.line(node), "sync", text))
    _imports(flow, decisions, plans, migration)
    return plans


def _imports(
    flow: Flow, decisions: Decisions, plans: dict[ModuleInfo, ModulePlan], migration: Migration
) -> None:
    """Which imported shim names moved entirely, and the constructors that change class."""
    converted = {flow.find(key) for key in decisions.converted}
    moved_refs: set[cst.Name] = set()
    ctor_calls: list[tuple[ModuleInfo, cst.Call]] = []
    class_refs: list[tuple[ModuleInfo, cst.BaseExpression, str]] = []
    for key in converted:
        for module, call in flow.comp(key).ctors:
            ctor_calls.append((module, call))
            if isinstance(call.func, cst.Name):
                moved_refs.add(call.func)
        for factory in flow.comp(key).factories:
            for module, ref, cls in flow.comp(factory).class_refs:
                class_refs.append((module, ref, cls))
                if isinstance(ref, cst.Name):
                    moved_refs.add(ref)
    annotations: list[tuple[ModuleInfo, cst.Name]] = []
    for owner, facts in flow.project.facts.items():
        annotated = [(("local", f, p), a, f) for f, p, a in facts.param_annotations] + [
            (("return", f), a, f) for f, a in facts.return_annotations
        ]
        for slot, annotation, _ in annotated:
            if flow.find(slot) in converted:
                names = _names(annotation)
                moved_refs.update(names)
                annotations += [(owner, n) for n in names if n.value in owner.shim_names]
    for module in flow.project.modules:
        plan = plans[module]
        facts = flow.project.facts[module]
        found: dict[str, list[cst.Name]] = {}
        for ref in facts.shim_refs:
            found.setdefault(ref.value, []).append(ref)
        for local, nodes in found.items():
            if all(n in moved_refs for n in nodes):
                plan.moved_names.add(local)
                line = min(module.line(n) for n in facts.shim_imports.get(local, nodes))
                migration.entries.append(
                    Entry(
                        module.display,
                        line,
                        "import",
                        f"{local} from taskexec.sync -> from taskexec (every use moved)",
                    )
                )
    for module, ref, cls in class_refs:
        if isinstance(ref, cst.Name) and ref.value in plans[module].moved_names:
            continue
        plans[module].renames[ref] = shim_class_expr(module, cls)
        plans[module].import_taskexec |= not module.taskexec_aliases
        migration.entries.append(
            Entry(
                module.display,
                module.line(ref),
                "async obj",
                f"{_snippet(module, ref)} -> taskexec.{cls} (a class used as a value)",
            )
        )
    for module, name in annotations:
        # The name still means the sync class here: the annotation names the async one.
        if name.value not in plans[module].moved_names:
            plans[module].renames[name] = shim_class_expr(module, module.shim_names[name.value])
            plans[module].import_taskexec |= not module.taskexec_aliases
    for module, call in ctor_calls:
        plan = plans[module]
        func = call.func
        if isinstance(func, cst.Name) and func.value in plan.moved_names:
            continue
        cls = (
            module.shim_names.get(func.value, "")
            if isinstance(func, cst.Name)
            else dotted(func) or ""
        ).rsplit(".", 1)[-1]
        if not cls:
            continue
        plan.ctors[call] = shim_class_expr(module, cls)
        plan.import_taskexec = plan.import_taskexec or not module.taskexec_aliases
        migration.entries.append(
            Entry(
                module.display,
                module.line(call),
                "async obj",
                f"{_snippet(module, func)}(...) -> taskexec.{cls}(...)",
            )
        )


def _names(node: cst.CSTNode) -> set[cst.Name]:
    found: set[cst.Name] = set()

    class _Names(cst.CSTVisitor):
        def visit_Name(self, name: cst.Name) -> None:
            found.add(name)

    node.visit(_Names())
    return found
