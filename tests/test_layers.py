"""The layering of the package, read from the source with :mod:`ast` (issue 15, item 4).

* ``facecluster.tasks`` (pure kernels) imports neither Dask nor ``facecluster.pipeline``;
* only the CLI (``pipeline/cli.py`` and ``pipeline/commands/``) imports ``pipeline.commands``:
  the demo, the benchmarks and the Python API call the layers below it;
* no module imports an underscore-private name (or module) of another package;
* the import graph between units (each subpackage one unit, each other module one unit) has no
  cycle, counting the imports inside functions: no function-local import hides a cycle.

Every import statement counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder of the repository (the packaging's package-dir mapping)
PACKAGES = {"facecluster": ROOT / "facecluster", "facecluster.pipeline": ROOT / "pipeline",
            "facecluster.tasks": ROOT / "tasks"}
COMMANDS = "facecluster.pipeline.commands"
CLI_MODULES = {"facecluster.pipeline.cli"}
SUBPACKAGE_UNITS = ("facecluster.pipeline.benchmarks", "facecluster.pipeline.commands", "facecluster.pipeline.stages",
                    "facecluster.tasks")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _modules() -> dict[str, Module]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        files = folder.glob("*.py") if pkg == "facecluster" else folder.rglob("*.py")
        for f in files:
            parts = f.relative_to(folder).with_suffix("").parts
            is_pkg = parts[-1] == "__init__"
            name = ".".join((pkg,) + (parts[:-1] if is_pkg else parts))
            mods[name] = Module(name, f, is_pkg)
    return mods


MODULES = _modules()


@dataclass(frozen=True)
class Import:
    importer: Module
    module: str  # absolute name of the module imported from (``from X import n``: X)
    name: str | None  # the name imported from it, None for ``import X``
    line: int

    @property
    def target(self) -> str:
        """The module this import loads: ``X.n`` when that is a module of ours, else ``X``."""
        if self.name and f"{self.module}.{self.name}" in MODULES:
            return f"{self.module}.{self.name}"
        return self.module

    def where(self) -> str:
        return f"{self.importer.path.relative_to(ROOT)}:{self.line}"


def _imports(mod: Module) -> list[Import]:
    out = []
    for node in ast.walk(ast.parse(mod.path.read_text(), str(mod.path))):
        if isinstance(node, ast.Import):
            out += [Import(mod, a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            out += [Import(mod, source, a.name, node.lineno) for a in node.names]
    return out


IMPORTS = [imp for mod in MODULES.values() for imp in _imports(mod)]


def _package_of(name: str) -> str:
    """The package a module of ours belongs to (a package's ``__init__``: that package)."""
    return MODULES[name].package


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _unit(name: str) -> str:
    for unit in SUBPACKAGE_UNITS:
        if name == unit or name.startswith(unit + "."):
            return unit
    return name


def test_every_module_is_read():
    assert "facecluster.tasks.knn" in MODULES and "facecluster.pipeline.stages.score" in MODULES
    assert len(IMPORTS) > 100


def test_tasks_import_neither_dask_nor_pipeline():
    def forbidden(target: str) -> bool:
        return (target.split(".")[0] in ("dask", "distributed", "dask_jobqueue", "pipeline")
                or target == "facecluster" or target.startswith("facecluster.pipeline"))

    bad = [f"{imp.where()} imports {imp.target}" for imp in IMPORTS
           if imp.importer.name.startswith("facecluster.tasks") and forbidden(imp.target)]
    assert not bad, bad


def test_only_the_cli_imports_commands():
    bad = [f"{imp.where()} imports {imp.target}" for imp in IMPORTS
           if (imp.target == COMMANDS or imp.target.startswith(COMMANDS + "."))
           and imp.importer.name not in CLI_MODULES and not imp.importer.name.startswith(COMMANDS)]
    assert not bad, bad


def test_no_private_name_of_another_package():
    bad = []
    for imp in IMPORTS:
        if not imp.target.startswith("facecluster") or imp.target not in MODULES:
            continue
        if _package_of(imp.target) == imp.importer.package:
            continue
        names = imp.target.split(".") + ([imp.name] if imp.name and imp.target != f"{imp.module}.{imp.name}" else [])
        if any(_private(p) for p in names):
            bad.append(f"{imp.where()} imports {imp.target}{'.' + imp.name if imp.name else ''}")
    # attributes of an imported module of another package: ``from facecluster.tasks import gcn; gcn._x``
    for mod in MODULES.values():
        tree = ast.parse(mod.path.read_text())
        bound = {}
        for imp in _imports(mod):
            if imp.target in MODULES and imp.name and imp.target == f"{imp.module}.{imp.name}":
                bound[imp.name] = imp.target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _private(node.attr) and _package_of(bound[node.value.id]) != mod.package):
                bad.append(f"{mod.path.relative_to(ROOT)}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_no_import_cycle_between_units():
    """Tarjan's strongly connected components of the unit graph: none with more than one unit."""
    graph: dict[str, set[str]] = {}
    for imp in IMPORTS:
        a, b = _unit(imp.importer.name), _unit(imp.target)
        if imp.target in MODULES and a != b:
            graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    detail = [f"{imp.where()}: {imp.target}" for c in cycles for imp in IMPORTS
              if _unit(imp.importer.name) in c and _unit(imp.target) in c and _unit(imp.importer.name) != _unit(imp.target)]
    assert not cycles, (cycles, detail)
    # the layers this asserts are the ones the package has: kernels at the bottom, the CLI on top
    assert "facecluster.tasks" not in graph
    assert "facecluster.pipeline.stages" in graph["facecluster.pipeline.train"]
