"""The layering the docs promise (docs/architecture.md): no import cycles, entry points that share no private
helpers, and host-device setup before JAX starts in every entry point."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nfjax"
ENTRY_POINTS = ("nfjax.train", "nfjax.evaluate", "nfjax.predict", "nfjax.export", "nfjax.benchmark")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in the file (or at module level only)."""
    tree, out = ast.parse(path.read_text()), []
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            out.append((base, [alias.name for alias in node.names]))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, names in imports(path):
            submodules = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
            edges |= submodules
            # ``from package import submodule`` needs the submodule, not the package's own names
            if target in modules and (not names or len(submodules) < len(names)):
                edges.add(target)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    """Function-level (lazy) imports count too: a cycle through them is still two modules that need each other."""
    graph = import_graph()
    assert "nfjax.experiment" in graph["nfjax.trainer"]  # the graph sees real edges
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_import_no_private_helper_of_another_module(entry):
    path = PACKAGE / (entry.split(".")[1] + ".py")
    for target, names in imports(path):
        if target.startswith("nfjax"):
            assert not [n for n in names if n.startswith("_")], (entry, target, names)
            assert target not in ENTRY_POINTS or target == entry, (entry, "imports the entry point", target)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_splits_the_cpu_host_before_jax_starts(entry):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(NFJAX_HOST_DEVICES="2", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    code = f"import {entry}, jax; print(jax.local_device_count())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"
