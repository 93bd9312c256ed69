"""The shape of the package (docs/architecture.md): no import cycles, no two modules with the same
file name, no module much over 500 lines. Parsed with ast, nothing imported."""

import ast
import collections
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cpt_jax")
MAX_LINES = 550


def _modules(package=PACKAGE):
    """{dotted module name: path} for every .py file under `package` (a package is named by its __init__)."""
    out = {}
    for root, _, files in os.walk(package):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(root, f), os.path.dirname(package))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = os.path.join(root, f)
    return out


def import_graph(package=PACKAGE):
    """{module: the modules of `package` it imports anywhere in its file}: at module level and inside
    functions alike (a function-level import that dodges a cycle is still a cycle)."""
    modules = _modules(package)
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..data import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph):
    """Each cycle once, as a list of modules starting at its smallest name (Tarjan's strongly connected
    components, then one shortest cycle through each component's smallest member)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        previous, queue = {start: None}, collections.deque([start])
        while queue:  # breadth first inside the component, back to start
            v = queue.popleft()
            if start in graph[v]:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                cycles.append(path[::-1])
                break
            for w in sorted(graph[v] & component):
                if w not in previous:
                    previous[w] = v
                    queue.append(w)
    return sorted(cycles)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert find_cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.sub import c\n    return c\n",  # function level
        "pkg/sub/__init__.py": "from .c import X\n",  # relative
        "pkg/sub/c.py": "from .. import a\nimport pkg.b\nX = 1\n",
        "pkg/d.py": "from pkg.sub import X\n",  # a name of the package, not a module: the package
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(str(tmp_path / "pkg"))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a", "pkg.b"}, "pkg.d": {"pkg.sub"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert "cpt_jax.config" in import_graph()["cpt_jax.train"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], " ; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_no_two_modules_share_a_file_name():
    names = collections.defaultdict(list)
    for path in _modules().values():
        if os.path.basename(path) not in ("__init__.py", "__main__.py"):
            names[os.path.basename(path)].append(os.path.relpath(path, os.path.dirname(PACKAGE)))
    assert {n: p for n, p in names.items() if len(p) > 1} == {}


def test_no_module_is_over_550_lines():
    lengths = {os.path.relpath(p, os.path.dirname(PACKAGE)): sum(1 for _ in open(p)) for p in _modules().values()}
    assert {p: n for p, n in lengths.items() if n > MAX_LINES} == {}
