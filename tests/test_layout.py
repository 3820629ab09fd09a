"""The package's layering, read from the source with `ast` (nothing is imported).

Data flows one way: model and hardware -> ops -> tables -> kernel times -> step -> applications -> CLI.
* core: the modules at the top of ``costmodel/`` (and its ``__init__``); they import only core modules;
* ``costmodel/apps``: applications; they import core modules and each other;
* ``costmodel/tabletools``: making and checking kernel tables; they import core modules and each other;
* ``costmodel/cli.py``: the command line; nothing else imports it.
No import cycles among the package's modules, function-level imports included.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "costmodel"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (``from .. import ops`` names the module
    ``costmodel.ops``; a name imported from a package's ``__init__`` names that package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _area(name: str) -> str:
    parts = name.split(".")
    if name == "costmodel.cli":
        return "cli"
    return parts[1] if len(parts) > 2 or name in ("costmodel.apps", "costmodel.tabletools") else "core"


def test_modules_found():
    assert {"costmodel", "costmodel.io", "costmodel.calibration", "costmodel.step", "costmodel.cli",
            "costmodel.apps.fit", "costmodel.apps.sweep", "costmodel.tabletools.importer"} <= set(MODULES)
    assert GRAPH["costmodel.cli"] and "costmodel.step" in GRAPH["costmodel.apps.sweep"]


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


ALLOWED = {"core": {"core"}, "apps": {"core", "apps"}, "tabletools": {"core", "tabletools"},
           "cli": {"core", "apps", "tabletools"}}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layering(name):
    bad = sorted(dep for dep in GRAPH[name] if _area(dep) not in ALLOWED[_area(name)])
    assert not bad, f"{name} ({_area(name)}) imports {bad}"
