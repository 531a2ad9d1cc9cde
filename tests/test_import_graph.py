"""xorl_jax's own modules import each other without cycles, read from their source (no import runs).

Two graphs: modules (a package's __init__ is the package), and components (each subpackage of xorl_jax is one node,
each top-level module its own; see BLOCKS). An edge is an import run when the module loads: statements outside
function bodies, except under `if TYPE_CHECKING:`. A function-level import of the package's own modules is kept only
where it keeps JAX (or an optional GPU dependency) out of a path that must not load it, and says so in a comment.
Run this file with python to print the cycles of both graphs, and of the graphs that count imports inside functions
as well.
"""

from __future__ import annotations

import ast
import os

PACKAGE = "xorl_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def module_files(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> source path, for every .py under the package."""
    out = {}
    base = os.path.dirname(root)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, name), base)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(folder, name)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body, in_functions: bool = False):
    """Import nodes that run when the module loads (outside function bodies, not under TYPE_CHECKING); with
    in_functions, also those inside function bodies."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _load_time_imports(node.orelse, in_functions)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                yield from _load_time_imports(getattr(node, field, None) or [], in_functions)


def _targets(node, importer: str, is_package: bool, modules) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = importer.split(".") if is_package else importer.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = []
    for name in names:
        parts = name.split(".")
        if name in modules and name != importer:
            out.append(name)  # named: an edge even to the importer's own package (its __init__ may import it back)
        # importing a.b.c first loads a and a.b: edges, except to the importer's ancestors (loaded before it runs)
        for i in range(1, len(parts)):
            target = ".".join(parts[:i])
            if target in modules and target != importer and not importer.startswith(target + "."):
                out.append(target)
    return out


def module_graph(root: str = ROOT, in_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at load time (with in_functions, also inside its functions)."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        graph[name] = {t for node in _load_time_imports(tree.body, in_functions)
                       for t in _targets(node, name, is_package, modules)}
    return graph


# The building blocks of the model's math count as one component: parallel/rules.py (the logical-axis table) is used
# by kernels and layers, and parallel/expert.py builds on layers/experts.py; the module graph keeps them acyclic.
BLOCKS = ("xorl_jax.kernels", "xorl_jax.layers", "xorl_jax.parallel")


def component(module: str) -> str:
    """xorl_jax.models.qwen3 -> xorl_jax.models; xorl_jax.config -> xorl_jax.config; kernels, layers, parallel ->
    one component."""
    top = ".".join(module.split(".")[:2])
    return "xorl_jax.{kernels,layers,parallel}" if top in BLOCKS else top


def component_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        out.setdefault(component(name), set()).update(component(t) for t in targets if component(t) != component(name))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (or a self-import), each shown as one cycle."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

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
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or v in graph.get(v, ()):
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, scc) for scc in sorted(sccs)]


def _one_cycle(graph, scc: list[str]) -> list[str]:
    """A shortest path from the component's first node back to itself, inside the component."""
    start, members = scc[0], set(scc)
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph.get(path[-1], ())):
                if w == start:
                    return path + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        paths = nxt
    return scc


def _show(found) -> str:
    return "\n".join("  " + " -> ".join(c) for c in found)


def test_graph_sees_the_package():
    graph = module_graph()
    assert len(graph) > 40
    assert "xorl_jax.models.registry" in graph["xorl_jax.models.loading"]  # a known module-level import


def test_cycles_are_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import NAME\n")
    (pkg / "sub" / "c.py").write_text("NAME = 1\n")
    (pkg / "a.py").write_text("import os\n\nfrom pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    assert cycles(module_graph(str(pkg))) == []
    assert cycles(module_graph(str(pkg), in_functions=True)) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "b.py").write_text("from . import a\n\n\ndef f():\n    pass\n")  # relative, at module level
    assert cycles(module_graph(str(pkg))) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "b.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from pkg.sub import OTHER\n\nNAME = 1\n")  # back into its package's __init__
    assert cycles(module_graph(str(pkg))) == [["pkg.sub", "pkg.sub.c", "pkg.sub"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_import_cycle():
    found = cycles(module_graph())
    assert not found, "module import cycles:\n" + _show(found)


def test_no_component_import_cycle():
    found = cycles(component_graph(module_graph()))
    assert not found, "component import cycles:\n" + _show(found)


def test_no_cycle_through_imports_inside_functions():
    """An import moved into a function to dodge a cycle still closes it at run time: none of those either."""
    graph = module_graph(in_functions=True)
    found = cycles(graph) + cycles(component_graph(graph))
    assert not found, "import cycles through function-level imports:\n" + _show(found)


if __name__ == "__main__":
    for in_functions in (False, True):
        g = module_graph(in_functions=in_functions)
        what = "all imports (module level and inside functions)" if in_functions else "module-level imports"
        print(f"{what}, module cycles:\n" + (_show(cycles(g)) or "  none"))
        print(f"{what}, component cycles:\n" + (_show(cycles(component_graph(g))) or "  none"))
