"""The package's import graph has no cycle, read statically (nothing is imported to check it).

Every import counts, including those deferred into functions: a cycle held together by a
deferred import is still a cycle, it only fails later. Importing `a.b.c` runs `a/__init__.py`
and `a/b/__init__.py` first, so it is an edge to those packages too, except to the importer's own
packages (they are already running when it is imported)."""
import ast
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def module_files(src: str, package: str) -> dict[str, str]:
    """{"pkg.sub.mod": path} for every .py under src/package (a package is named by its __init__.py)."""
    found = {}
    for folder, _, files in os.walk(os.path.join(src, package)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), src)[:-3].split(os.sep)
                found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
    return found


def imported_names(path: str, module: str, is_package: bool) -> set[str]:
    """Absolute dotted names this file imports, at any depth of its code; `from X import y` gives
    X and X.y (y may be a submodule; names that are not modules are dropped by the caller)."""
    tree = ast.parse(open(path).read(), path)
    here = module if is_package else module.rpartition(".")[0]  # what `from . import` means in this file
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_graph(src: str, package: str) -> dict[str, set[str]]:
    """module -> the package modules whose code runs when it imports what it imports."""
    files = module_files(src, package)
    packages = {m for m, p in files.items() if p.endswith("__init__.py")}
    graph = {}
    for module, path in files.items():
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}  # itself and its packages
        edges = set()
        for name in imported_names(path, module, module in packages):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b, a.b.c
                target = ".".join(parts[:i])
                if target in files and target not in own:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component (Tarjan), as a path that returns to its start."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_in(graph, comp) for comp in comps]


def cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & comp):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return [start]


def test_the_package_has_no_import_cycle():
    graph = import_graph(SRC, "bitnet")
    assert len(graph) > 30 and "bitnet.trainer" in graph and "bitnet.diagnose.report" in graph
    assert "bitnet.checkpoint" in graph["bitnet.trainer"]  # the graph sees real edges
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_cycles_held_by_deferred_imports_and_package_inits(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .sub.helpers import g  # deferred\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("from .report import r\n")
    (pkg / "sub" / "helpers.py").write_text("def g(): pass\n")
    (pkg / "sub" / "report.py").write_text("from ..low import f\nfrom . import helpers\nr = 1\n")
    graph = import_graph(str(tmp_path), "pkg")
    # low -> sub (its __init__ runs first) -> sub.report -> low; sub.report's own package is not an edge
    assert graph["pkg.low"] == {"pkg.sub", "pkg.sub.helpers"}
    assert graph["pkg.sub.report"] == {"pkg.low", "pkg.sub.helpers"}
    assert find_cycles(graph) == [["pkg.low", "pkg.sub", "pkg.sub.report", "pkg.low"]]
    (pkg / "low.py").write_text("def f():\n    return 1\n")  # the deferred import gone: no cycle
    assert find_cycles(import_graph(str(tmp_path), "pkg")) == []


def test_the_self_test_bugs_and_switches_stay_off_the_production_path():
    # build.py chooses an injected bug; the old name's shim and the diagnosis of a bug run's checkpoint
    # are the only other readers of the bug table
    graph = import_graph(SRC, "bitnet")
    readers = {m for m, edges in graph.items() if "bitnet.bugs" in edges}
    assert "bitnet.build" in readers and readers <= {"bitnet.build", "bitnet.diagnose.bugs"}
    # importing everything a training run uses does not load the bug table
    code = ("import sys, bitnet.experiment, bitnet.cli, bitnet.trainer, bitnet.diagnose, bitnet.export; "
            "print('bitnet.bugs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    # no library module reads a test-only environment switch
    readers = [m for m, p in module_files(SRC, "bitnet").items() if "BITNET_TEST" in open(p).read()]
    assert readers == []
