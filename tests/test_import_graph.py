"""The project's import graph is a DAG with one-way packages and no private cross-imports.

`import_graph(root)` reads every project module with `ast` (nothing is imported): the packages jaxmodel/,
training/, inference/ (subpackages included), the top-level normistral*.py and bench/*.py. It counts
module-level imports AND imports inside functions (a lazy import that hides a cycle is still a cycle),
relative imports, and bench's bare `from common import ...` (bench scripts put bench/ on sys.path). A
module that calls `importlib.import_module` (the packages' lazy `__getattr__` exports) gets an edge to each
project module a string constant in it names. An import names the most specific project module it can
(`from jaxmodel import storage` -> jaxmodel.storage, `from jaxmodel import MistralConfig` -> jaxmodel);
the parent packages' __init__ files it also runs are not edges (they would make every `from pkg.mod
import x` inside pkg a cycle with pkg/__init__.py).

`problems(root)` lists, one line each: cycles (with the files of each), jaxmodel importing training/inference,
training and inference importing each other, and private names (`_name`, not dunders) taken from another
project module by `from m import _name` or `m._name`.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxmodel", "training", "inference")


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the project's packages, normistral*.py and bench/*.py."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted(root.glob("normistral*.py")):
        modules[path.stem] = path
    for path in sorted((root / "bench").glob("*.py")):
        modules[f"bench.{path.stem}"] = path
    return modules


def _resolve(name: str, importer: str, modules: dict) -> str | None:
    """The project module an absolute dotted `name` names, seen from `importer` (None: not ours)."""
    if importer.startswith("bench.") and f"bench.{name.split('.')[0]}" in modules:
        name = f"bench.{name}"  # bench/ is on the scripts' sys.path
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, importer: str, path: Path) -> str:
    """The absolute module of a `from ... import` (relative imports resolved against the importer's package)."""
    if not node.level:
        return node.module or ""
    package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Reader(ast.NodeVisitor):
    """Collects one module's imports (edges) and the private names it takes from other project modules."""

    def __init__(self, importer: str, path: Path, modules: dict):
        self.importer, self.path, self.modules = importer, path, modules
        self.edges: dict[str, int] = {}  # imported module -> first line
        self.private: list[tuple[int, str]] = []  # (line, what)
        self.aliases: dict[str, str] = {}  # local name -> project module it is bound to
        self.named: dict[str, int] = {}  # project modules named by string constants -> first line
        self.dynamic = False  # calls importlib.import_module

    def _edge(self, target: str | None, line: int) -> None:
        if target and target != self.importer:
            self.edges.setdefault(target, line)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _resolve(alias.name, self.importer, self.modules)
            self._edge(target, node.lineno)
            if target:
                # `import a.b` binds `a`; `import a.b as c` binds c to a.b
                bound = alias.name if alias.asname else alias.name.split(".")[0]
                self.aliases[alias.asname or bound] = _resolve(bound, self.importer, self.modules) or target

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute(node, self.importer, self.path)
        for alias in node.names:
            sub = _resolve(f"{base}.{alias.name}", self.importer, self.modules)
            target = _resolve(base, self.importer, self.modules)
            if sub and sub.endswith(f".{alias.name}") and sub != target:  # a submodule
                self._edge(sub, node.lineno)
                self.aliases[alias.asname or alias.name] = sub
                continue
            self._edge(target, node.lineno)
            if target and target != self.importer and _private(alias.name):
                self.private.append((node.lineno, f"imports {alias.name} from {target}"))

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in self.modules:
            self.named.setdefault(node.value, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        self.dynamic |= (_dotted(node.func) or "").endswith("import_module")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = _dotted(node.value)
        module = owner and self.aliases.get(owner.split(".")[0])
        if module and "." in owner:
            module = _resolve(module + owner[owner.index("."):], self.importer, self.modules)
        if module and module != self.importer and _private(node.attr):
            self.private.append((node.lineno, f"uses {module}.{node.attr}"))
        self.generic_visit(node)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return inner and f"{inner}.{node.attr}"
    return None


def import_graph(root: Path) -> tuple[dict[str, dict[str, int]], list[str], dict[str, Path]]:
    """(module -> {imported project module: line}, private-name uses, module -> file) for the tree at root."""
    modules = project_modules(root)
    graph, private = {}, []
    for name, path in modules.items():
        reader = _Reader(name, path, modules)
        reader.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for target, line in reader.named.items() if reader.dynamic else ():
            reader._edge(target, line)
        graph[name] = reader.edges
        private += [f"{path.relative_to(root)}:{line} {what}" for line, what in reader.private]
    return graph, private, modules


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    return module.split(".")[0]


def problems(root: Path) -> list[str]:
    """Every violation in the tree at root, one line each naming the files (empty: the house is in order)."""
    graph, private, modules = import_graph(root)
    found = []
    for cycle in find_cycles(graph):
        edges = [f"{modules[a].relative_to(root)}:{line} -> {modules[b].relative_to(root)}"
                 for a in cycle for b, line in sorted(graph[a].items()) if b in cycle]
        found.append(f"import cycle of {len(cycle)} modules: " + "; ".join(edges))
    forbidden = {"jaxmodel": ("training", "inference"), "training": ("inference",), "inference": ("training",)}
    for a, targets in sorted(graph.items()):
        for b, line in sorted(targets.items()):
            if _package(b) in forbidden.get(_package(a), ()):
                found.append(f"{modules[a].relative_to(root)}:{line} imports {b} ({_package(a)}/ must not "
                             f"import {_package(b)}/)")
    return found + [f"private name: {p}" for p in private]


def test_project_imports_have_no_cycle_no_wrong_direction_and_no_private_names():
    graph, _, _ = import_graph(ROOT)
    assert len(graph) > 50 and "jaxmodel.model" in graph["jaxmodel.convert"]  # the reader sees the project
    assert problems(ROOT) == []


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_a_planted_cycle_through_an_import_inside_a_function_is_reported(tmp_path):
    _plant(tmp_path, {
        "jaxmodel/__init__.py": "",
        "jaxmodel/a.py": "from jaxmodel.b import f\n",
        "jaxmodel/b.py": "def f():\n    from . import a  # lazy: still a cycle\n    return a\n",
        "jaxmodel/c.py": "from jaxmodel import a\n",  # imports into the cycle, not part of it
    })
    found = problems(tmp_path)
    assert found == ["import cycle of 2 modules: jaxmodel/a.py:1 -> jaxmodel/b.py; jaxmodel/b.py:2 -> jaxmodel/a.py"]


def test_a_lazy_package_export_counts_as_an_import(tmp_path):
    _plant(tmp_path, {
        "jaxmodel/__init__.py": "import importlib\n_EXPORTS = {'f': 'jaxmodel.a'}\n\ndef __getattr__(name):\n"
                                "    return getattr(importlib.import_module(_EXPORTS[name]), name)\n",
        "jaxmodel/a.py": "from jaxmodel import g\n\ndef f():\n    pass\n",
    })
    assert problems(tmp_path) == ["import cycle of 2 modules: jaxmodel/__init__.py:2 -> jaxmodel/a.py; "
                                  "jaxmodel/a.py:1 -> jaxmodel/__init__.py"]


def test_wrong_direction_and_private_names_are_reported(tmp_path):
    _plant(tmp_path, {
        "jaxmodel/__init__.py": "",
        "jaxmodel/util.py": "def _helper():\n    pass\n",
        "training/__init__.py": "",
        "training/t.py": "from jaxmodel.util import _helper\n",
        "inference/__init__.py": "",
        "inference/i.py": "import jaxmodel.util as u\n\ndef g():\n    import training.t\n    return u._helper\n",
        "jaxmodel/bad.py": "def h():\n    from inference import i\n",
    })
    assert problems(tmp_path) == [
        "inference/i.py:4 imports training.t (inference/ must not import training/)",
        "jaxmodel/bad.py:2 imports inference.i (jaxmodel/ must not import inference/)",
        "private name: training/t.py:1 imports _helper from jaxmodel.util",
        "private name: inference/i.py:5 uses jaxmodel.util._helper",
    ]
