"""The structure the code promises (docs/architecture.md): an acyclic import graph inside
robust_cert, function-local imports included, and a core that works without MLflow."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "robust_cert"


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict) -> str:
    """The robust_cert module an imported dotted name lives in."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """module -> the robust_cert modules it imports anywhere in its body (top level, inside
    functions, under TYPE_CHECKING: every import statement counts). ``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module, else ``pkg``."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {_target(a.name, modules) for a in node.names
                         if a.name.split(".")[0] == "robust_cert"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "robust_cert":
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    deps.add(full if full in modules else _target(source, modules))
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert "robust_cert.loaders" in graph["robust_cert.api"]  # function-local imports count
    found = cycles(graph)
    detail = "; ".join(" ↔ ".join(c) for c in found)
    assert not found, f"import cycles inside robust_cert: {detail}"


#: Modules of the core: they must not import MLflow, nor the MLflow plugin, anywhere.
CORE = ("robust_cert.api", "robust_cert.engine", "robust_cert.loaders", "robust_cert.policy",
        "robust_cert.verdict", "robust_cert.certificate", "robust_cert.data",
        "robust_cert.plan", "robust_cert.verification", "robust_cert.devices")


def test_core_and_metrics_import_no_mlflow():
    graph = import_graph()
    core = [m for m in graph if m in CORE or m.startswith(("robust_cert.metrics",
                                                            "robust_cert.models",
                                                            "robust_cert.report"))]
    offenders = {m: sorted(d for d in graph[m] if d.startswith("robust_cert.mlflow_plugin"))
                 for m in core}
    assert not {m: d for m, d in offenders.items() if d}
    for m in core:
        tree = ast.parse(module_names()[m].read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == "mlflow"], m


_NO_MLFLOW = textwrap.dedent("""
    import importlib.abc, sys

    class NoMlflow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mlflow" or name.startswith("mlflow."):
                raise ImportError(f"{name} is not installed (made unimportable by the test)")
            return None

    sys.meta_path.insert(0, NoMlflow())
    import tempfile
    import torch
    from torch import nn
    import robust_cert
    from robust_cert.report import write_report

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    policy = {"name": "no-mlflow", "metrics": {
        "accuracy": {}, "robust_accuracy": {"eps": [0.05], "attacks": ["pgd"], "steps": 2},
        "probabilistic_robustness": {"eps": 0.05, "samples": 400}},
        "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    cert = robust_cert.certify(model, "digits", policy, progress=False)
    with tempfile.TemporaryDirectory() as out:
        files = write_report(cert, out, pdf="off")
    loaded = [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]
    assert not loaded, loaded
    print(cert.verdict, files.html.name)
""")


def test_certify_a_module_with_mlflow_unimportable(tmp_path):
    env = {**os.environ, "ROBUST_CERT_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _NO_MLFLOW], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["PASS", "report.html"]
