"""The engine's import graph: no cycles (imports inside functions count: a lazy import hides a cycle, it does not
remove it), and importing every engine module on a fresh interpreter loads no Slicer, Qt, CTK or VTK."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "SlicerProxyPrompt" / "proxyprompt"
FORBIDDEN = ("slicer", "qt", "ctk", "vtk", "vtkmodules", "mrml")


def _module_names():
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph():
    """module -> the engine modules it imports (anywhere in its body), as dotted names."""
    modules = _module_names()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, `level - 1` packages up
                    parts = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                    base = ".".join(parts)
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # a module importing its own package's __init__ (e.g. the registry loading built-ins) is no cycle
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_engine_has_no_import_cycles():
    graph = import_graph()
    assert "proxyprompt.models.sam2_model" in graph["proxyprompt.models.loader"]  # function-level imports count
    assert "proxyprompt.models.base" in graph["proxyprompt.models.sam2_model"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_engine_loads_no_slicer_qt_ctk_or_vtk():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import proxyprompt\n"
        "for info in pkgutil.walk_packages(proxyprompt.__path__, 'proxyprompt.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env_path = str(PACKAGE.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "proxyprompt.pipeline" in loaded and "proxyprompt.models.sam2_model" in loaded
    assert [name for name in loaded if name.split(".")[0].lower() in FORBIDDEN] == []
