"""The shape docs/architecture.md promises: packages in layers, each importing only the layers below it (no back-edge
between packages), no import cycles between modules, small modules, a short loop."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "gradwise"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """gradwise modules `path` imports anywhere in its body (lazy imports inside functions included)."""
    found = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != this)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(path, set(mods)) for name, path in mods.items()}
    assert "gradwise.train.step" in graph["gradwise.tools.planner"]  # the parser sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The packages (and top-level modules), bottom first: each may import only those before it (docs/architecture.md).
LAYERS = [
    "errors", "io", "config",                                   # the foundation
    "optim", "memory", "diagnostics", "data", "nn", "resolve",  # the math, data and models; settling a config
    "checkpoint",                                               # the checkpoint format and sharded I/O
    "parallel",                                                 # the sync strategies the step calls
    "arguments",                                                # the Python API's arguments, checked
    "train",                                                    # the step engine, the Trainer, sources, callbacks
    "tools", "asynchronous", "launch", "report", "outputs",     # the clients of the Trainer
    "bench", "experiments", "cli", "__main__",                  # the front ends
]


def package(module: str) -> str:
    """The layer a module belongs to: its top-level package or module under gradwise ("gradwise" itself: the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gradwise"


def package_edges() -> dict[tuple[str, str], list[str]]:
    mods = modules()
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in mods.items():
        for dep in imports(path, set(mods)):
            a, b = package(name), package(dep)
            if a != b:
                edges.setdefault((a, b), []).append(f"{name} -> {dep}")
    return edges


def test_packages_import_only_the_layers_below_them():
    """The root package composes everything (it hands the Trainer its planner); any other back-edge fails."""
    edges = package_edges()
    known = set(LAYERS) | {"gradwise"}
    assert {a for a, _ in edges} | {b for _, b in edges} <= known, "a package missing from LAYERS"
    assert ("train", "parallel") in edges and ("tools", "train") in edges  # the parser sees real edges
    upward = [f"{a} -> {b} ({edges[(a, b)][0]})" for a, b in edges
              if a != "gradwise" and LAYERS.index(b) >= LAYERS.index(a)]
    assert not upward, "imports against the layers: " + "; ".join(sorted(upward))


def test_module_sizes_and_the_loop():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert max(sizes.values()) <= 400, max(sizes, key=sizes.get)
    assert sizes["gradwise.train.trainer"] <= 300
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text())
    fit = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 50
