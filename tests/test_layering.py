"""Dependencies run one way (docs/architecture.md, "Layering"): no package imports a higher one."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxalign")

LAYERS = {
    **dict.fromkeys(("losses", "models", "parallel", "data", "perf", "runtime", "precision", "tokenizers"), 1),
    **dict.fromkeys(("scoring", "sampling"), 2),
    **dict.fromkeys(("caches", "objectives"), 3),
    "train": 4,
    **dict.fromkeys(("online", "bench", "distill"), 5),
    "sample": 5,
}


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "jaxalign")
    return {n for n in names if n.startswith("jaxalign.")}


def test_no_package_imports_a_higher_layer():
    problems = []
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            own = os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")
            if own == "__init__":
                continue
            for imported in _imports(path):
                other = imported.split(".")[1]
                if other in LAYERS and LAYERS[other] > LAYERS[own]:
                    problems.append(f"{os.path.relpath(path, ROOT)} imports {imported}")
    assert not problems, "\n".join(problems)


def test_every_package_has_a_layer():
    packages = {n.removesuffix(".py") for n in os.listdir(PACKAGE) if not n.startswith(("_", "."))}
    assert packages - {"py.typed"} <= set(LAYERS), packages - set(LAYERS)


def test_importing_the_trainer_loads_no_benchmark_module():
    code = "import sys, jaxalign.train.loop; assert not any(m.startswith('jaxalign.bench') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
