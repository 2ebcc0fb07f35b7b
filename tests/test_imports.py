"""The package's import graph has no cycle, and inference imports no calibration machinery.

Edges are every import statement of a module, including those inside functions (a deferred
import hides a cycle from the interpreter, not from a reader); ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("splitq_jax",)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its source)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # an attribute path: its longest module prefix
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_level_imports():
    g = import_graph()
    assert "splitq_jax.errors" in g["splitq_jax.quant"]  # a module-level import
    assert "splitq_jax.quantized.export" in g["splitq_jax.quantize"]  # imported inside a function


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_inference_imports_no_calibration_engine():
    """Loading and running a checkpoint needs neither the calibration engine nor the methods.
    (optax itself is out of reach: flax.nnx imports it, flax/nnx/helpers.py.)"""
    code = ("import sys; import splitq_jax.runtime; from splitq_jax.runtime import load_quantized; "
            "from splitq_jax import load_quantized as lq; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('splitq_jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
    assert "splitq_jax.runtime" in out
    engine = {"splitq_jax.calibrate", "splitq_jax.pipeline", "splitq_jax.quantize", "splitq_jax.methods.splitq.mocd",
              "splitq_jax.parallel", "splitq_jax.methods", "splitq_jax.preflight", "splitq_jax.calib",
              "splitq_jax.config", "splitq_jax.methods.splitq.split_linear"}
    assert not engine & set(out), sorted(engine & set(out))


def test_stored_format_knows_no_method():
    """Nothing the quantized package or the runtime imports, even inside functions, reaches a
    method, the calibration engine or a method's configuration."""
    g = import_graph()
    seen, todo = set(), [m for m in g if m.startswith("splitq_jax.quantized")] + ["splitq_jax.runtime"]
    while todo:
        for w in g[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    banned = {m for m in seen if m.startswith(("splitq_jax.methods", "splitq_jax.calib"))} | (
        seen & {"splitq_jax.calibrate", "splitq_jax.pipeline", "splitq_jax.quantize", "splitq_jax.config",
                "splitq_jax.methods.splitq.split_linear", "splitq_jax.methods.splitq.mocd", "splitq_jax.parallel"})
    assert not banned, sorted(banned)
