"""The house rules, checked on the source: module and function sizes, the README's length, no probing
of a rollout backend, and no import circles between the package's modules (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rl", "rollout", "rewards", "kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_no_module_over_500_lines_and_no_function_over_80():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        src = path.read_text()
        if len(src.splitlines()) > 500:
            long_modules.append((name, len(src.splitlines())))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions.append((name, node.name, n))
    assert long_modules == [] and long_functions == []


def test_readme_is_a_manual_of_at_most_350_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350


def test_no_backend_is_probed_with_hasattr_or_getattr():
    """Backends declare what they do (``rollout.backends.base``); a probe of an object named like a
    backend is a defect."""
    probes = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
            ):
                target = ast.unparse(node.args[0]) if node.args else ""
                if "backend" in target or target in ("be", "self.backend", "t.backend"):
                    probes.append((name, node.lineno, ast.unparse(node)))
    assert probes == []


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from a.b import c`: the module a.b.c when it is one, else a.b
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def test_no_import_circles_between_modules():
    mods = _modules()
    known = set(mods)
    graph = {
        name: {m for m in _imports(name, path, known) if mods[m].name != "__init__.py"} for name, path in mods.items()
    }
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
