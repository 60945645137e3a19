"""The package's import layering (docs/architecture.md, "Layering"), checked by parsing every
module's imports with ``ast`` — top-level AND function-level ones, so a lazy import cannot
hide a dependency that the table forbids.

Three checks over ``covidmt_jax/``:

1. every import of a package module goes to a layer the importer's layer may use (``ALLOWED``);
2. ``taskspec`` imports the standard library only (no JAX, not even numpy) and
   ``normalisation`` the standard library and numpy only;
3. no function-level import hides a cycle: if ``A`` imports ``B`` inside a function, ``B``
   must not reach ``A`` through top-level imports.

The checker is tested on small crafted packages (a violation of each kind must be reported).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "covidmt_jax"

# Layers, lowest first. A module belongs to the first layer with a matching entry: an exact
# module name, or a prefix ending in "." (every module below it). Top-level modules that are
# not listed are applications ("apps", the top layer), which nothing below may import.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("covidmt_jax", "covidmt_jax.taskspec", "covidmt_jax.normalisation",
                   "covidmt_jax.cpu_malloc", "covidmt_jax.errors"),
    "data": ("covidmt_jax.data", "covidmt_jax.data.", "covidmt_jax.channels"),
    "models": ("covidmt_jax.models", "covidmt_jax.models."),
    "metrics": ("covidmt_jax.metrics",),
    "parallel": ("covidmt_jax.parallel",),
    "explain": ("covidmt_jax.explain",),
    "model_files": ("covidmt_jax.export", "covidmt_jax.weights"),
    "tasks": ("covidmt_jax.tasks",),
    "config": ("covidmt_jax.config_lib",),
    "inference": ("covidmt_jax.lungs", "covidmt_jax.xrv"),
    "apps": ("covidmt_jax.",),
}
# Which layers each layer may import (its own layer included where listed).
ALLOWED: dict[str, frozenset[str]] = {
    "foundation": frozenset({"foundation"}),
    "data": frozenset({"foundation", "data"}),
    "models": frozenset({"foundation", "models"}),
    "metrics": frozenset({"foundation", "metrics"}),
    "parallel": frozenset({"foundation", "parallel"}),
    "explain": frozenset({"foundation", "models", "explain"}),
    "model_files": frozenset({"foundation", "models", "model_files"}),
    "tasks": frozenset({"foundation", "models", "metrics", "tasks"}),
    "config": frozenset({"foundation", "data", "models", "config"}),
    "inference": frozenset({"foundation", "data", "models", "model_files", "inference"}),
    "apps": frozenset(LAYERS),
}
# Modules whose imports are restricted to these top-level distributions (stdlib always allowed).
PURE: dict[str, frozenset[str]] = {
    "covidmt_jax.taskspec": frozenset(),
    "covidmt_jax.errors": frozenset(),
    "covidmt_jax.normalisation": frozenset({"numpy"}),
}


class Import(NamedTuple):
    importer: str      # module doing the import
    target: str        # imported module (a package module, or a top-level distribution name)
    line: int
    in_function: bool


def layer_of(module: str, layers: dict[str, tuple[str, ...]] = LAYERS) -> str:
    for layer, entries in layers.items():
        for e in entries:
            if module == e or (e.endswith(".") and module.startswith(e)):
                return layer
    raise ValueError(f"{module}: in no layer")


def package_modules(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package in ``package_dir``."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import statement of ``module``; names of the package resolve to the deepest
    package module (``from covidmt_jax import metrics`` -> ``covidmt_jax.metrics``)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module.split(".")[0]
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    name = alias.name
                    while name not in modules and "." in name and name.split(".")[0] == pkg:
                        name = name.rsplit(".", 1)[0]
                    yield Import(module, name, child.lineno, in_function)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                if base.split(".")[0] != pkg:
                    yield Import(module, base, child.lineno, in_function)
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    yield Import(module, sub if sub in modules else base, child.lineno, in_function)
            yield from visit(child, inner)

    yield from visit(tree, False)


def check_package(package_dir: Path, layers=LAYERS, allowed=ALLOWED, pure=PURE) -> list[str]:
    """All violations of the three rules in the package at ``package_dir`` (empty when clean)."""
    modules = package_modules(package_dir)
    pkg = package_dir.name
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found = {m: list(imports_of(m, p, modules)) for m, p in modules.items()}
    problems = []
    for m, imps in found.items():
        layer = layer_of(m, layers)
        for imp in imps:
            top = imp.target.split(".")[0]
            if top == pkg:
                target_layer = layer_of(imp.target, layers)
                if target_layer not in allowed[layer]:
                    problems.append(f"{modules[m].name}:{imp.line}: {m} ({layer}) imports {imp.target} "
                                    f"({target_layer}); {layer} may import {sorted(allowed[layer])}")
            elif m in pure and top not in stdlib and top not in pure[m]:
                problems.append(f"{modules[m].name}:{imp.line}: {m} must stay "
                                f"{'standard-library only' if not pure[m] else 'stdlib + ' + ', '.join(sorted(pure[m]))}"
                                f" but imports {imp.target}")
    # hidden cycles: a function-level import A -> B where B reaches A through top-level imports
    top_edges = {m: {i.target for i in imps if not i.in_function and i.target in modules}
                 for m, imps in found.items()}
    for m, imps in found.items():
        for imp in imps:
            if imp.in_function and imp.target in modules and imp.target != m:
                seen, todo = set(), [imp.target]
                while todo:
                    cur = todo.pop()
                    if cur == m:
                        problems.append(f"{modules[m].name}:{imp.line}: function-level import of "
                                        f"{imp.target} in {m} hides an import cycle "
                                        f"({imp.target} imports {m} at module level, directly or not)")
                        break
                    if cur not in seen:
                        seen.add(cur)
                        todo.extend(top_edges.get(cur, ()))
    return problems


# ----------------------------------------------------------------------------- the package

def test_the_package_follows_the_layering():
    problems = check_package(PACKAGE_DIR)
    assert not problems, "\n".join(problems)


def test_every_layer_is_reachable_and_the_table_is_acyclic():
    """The table itself: every layer appears in ALLOWED, and "may import" (minus self) has no
    cycle, so the layers have an order."""
    assert set(ALLOWED) == set(LAYERS)
    order, left = [], {k: set(v) - {k} for k, v in ALLOWED.items()}
    while left:
        ready = [k for k, deps in left.items() if deps <= set(order)]
        assert ready, f"the layer table has a cycle among {sorted(left)}"
        order += sorted(ready)
        for k in ready:
            del left[k]
    assert order[0] == "foundation" and order[-1] == "apps"


def test_architecture_doc_lists_every_layer():
    doc = (PACKAGE_DIR.parent / "docs" / "architecture.md").read_text()
    section = doc.split("## Layering", 1)[1].split("\n## ", 1)[0]
    for layer in LAYERS:
        assert f"| {layer} " in section, f"docs/architecture.md's layering table lacks {layer!r}"


def test_taskspec_imports_without_jax():
    """Importing the task description loads neither JAX nor numpy (a fresh interpreter)."""
    import subprocess
    code = ("import sys, covidmt_jax.taskspec, covidmt_jax.normalisation; "
            "bad = [m for m in ('jax', 'flax', 'grain') if m in sys.modules]; "
            "assert not bad, bad; assert 'numpy' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)


# ----------------------------------------------------------------------------- the checker itself

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "covidmt_jax"


CLEAN = {
    "covidmt_jax/__init__.py": "",
    "covidmt_jax/taskspec.py": "import dataclasses\n",
    "covidmt_jax/normalisation.py": "import numpy as np\n",
    "covidmt_jax/models/__init__.py": "from covidmt_jax.models import heads\n",
    "covidmt_jax/models/heads.py": "import jax\nfrom covidmt_jax.taskspec import TaskSpec\n",
    "covidmt_jax/data/__init__.py": "",
    "covidmt_jax/data/images.py": "from covidmt_jax.normalisation import normalise\n",
    "covidmt_jax/metrics.py": "import numpy as np\n",
    "covidmt_jax/tasks.py": "from covidmt_jax import metrics\nfrom covidmt_jax.models.heads import x\n",
    "covidmt_jax/train.py": "from covidmt_jax import tasks, models\nfrom covidmt_jax.data import images\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    assert check_package(_write(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("rel, text, expect", [
    # models import data (top level)
    ("covidmt_jax/models/heads.py", "from covidmt_jax.data import images\n", "covidmt_jax.data.images (data)"),
    # models import tasks inside a function: lazy imports are checked too (this one also
    # hides a cycle, tasks -> models.heads, reported as well)
    ("covidmt_jax/models/heads.py", "def f():\n    from covidmt_jax import tasks\n", "covidmt_jax.tasks (tasks)"),
    # metrics import models (relative import)
    ("covidmt_jax/metrics.py", "from .models import heads\n", "covidmt_jax.models.heads (models)"),
    # models import an application module
    ("covidmt_jax/models/heads.py", "import covidmt_jax.train\n", "covidmt_jax.train (apps)"),
    # the task description pulls in JAX / numpy
    ("covidmt_jax/taskspec.py", "import jax.numpy as jnp\n", "standard-library only"),
    ("covidmt_jax/taskspec.py", "def f():\n    import numpy\n", "standard-library only"),
    ("covidmt_jax/normalisation.py", "import numpy\nimport PIL.Image\n", "stdlib + numpy"),
])
def test_checker_reports_a_layer_violation(tmp_path, rel, text, expect):
    pkg = _write(tmp_path, {**CLEAN, rel: text})
    problems = check_package(pkg)
    assert problems and expect in problems[0], problems


def test_checker_reports_a_function_level_import_that_hides_a_cycle(tmp_path):
    files = {**CLEAN,
             "covidmt_jax/data/images.py": "def f():\n    from covidmt_jax.data import pipeline\n",
             "covidmt_jax/data/pipeline.py": "from covidmt_jax.data.images import load\n"}
    problems = check_package(_write(tmp_path, files))
    assert len(problems) == 1 and "hides an import cycle" in problems[0], problems
    # the same lazy import without the reverse edge is fine
    files["covidmt_jax/data/pipeline.py"] = "import numpy\n"
    assert check_package(_write(tmp_path, files)) == []
