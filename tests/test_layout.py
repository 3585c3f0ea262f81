"""The package's layout: imports point one way (types/device -> ops -> models -> data -> inference ->
train -> bench -> study -> integrations -> cli) and no module imports itself back through others.
Read from the source with ``ast``, so it covers imports inside functions too (a lazy import that
closes a cycle is still a cycle)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maeformer_fast"
# Lowest first. A module may import from its own layer and the layers below it, never above.
LAYERS = [
    {"types", "weights", "device", "seeds"},
    {"ops"},
    {"models"},
    {"data"},
    {"inference"},
    {"train"},
    {"bench"},
    {"study"},
    {"integrations"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body (``from . import x`` of a
    submodule counts as importing that submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in known:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    found.discard(name)
    return found


def layer(name: str) -> int | None:
    """The layer of a module (None for the package itself: the public API sits above everything)."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{name}: not in any layer of test_layout.LAYERS; add its folder there")


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of modules, first = last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_hand_made_graphs():
    """The checker itself: a three-module loop is found, a diamond is not a cycle. Mutation seen
    failing: ``find_cycle`` returning None where it meets a module on the current path."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_no_import_cycles():
    """Mutation seen failing: ``from .loaders import finish_batch`` re-added to data/resident.py, at the
    top or inside its function (data.loaders -> data.resident -> data.loaders)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    """No module imports from a higher layer. Mutation seen failing: data/loaders.py taking
    ``step_generator`` from ``train.runtime`` again (data -> train)."""
    upward = []
    for name, targets in import_graph().items():
        here = layer(name)
        for target in targets:
            there = layer(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


# A module of an optional extra (the nnU-Net trainers) may refuse to import where the extra is not
# installed, with an ImportError named after the extra's package (and saying how to install it).
ON_ITS_OWN = """
import importlib, importlib.util, sys
import torch, numpy, scipy, nibabel, safetensors  # third-party imports are slow and not under test
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "maeformer_fast" or m.startswith("maeformer_fast.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as error:
        if error.name != "nnunetv2" or importlib.util.find_spec("nnunetv2") is not None:
            failed.append(f"{name}: {error!r}")
    except Exception as error:
        failed.append(f"{name}: {error!r}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module imports with none of the package loaded before it (one interpreter; the package's
    modules are dropped from ``sys.modules`` before each), so no module relies on another having been
    imported first. Mutation seen failing: ``from .loaders import make_loader`` at the top of
    data/batch.py (importing data.batch first then fails: loaders takes ``finish_batch`` from a
    half-initialised batch); the other two tests fail on it too. Where nnunetv2 is missing, the nnU-Net
    trainers module refuses to import with its install message and that is no failure; mutation seen
    failing: that ImportError raised without ``name="nnunetv2"``."""
    names = sorted(modules())
    result = subprocess.run([sys.executable, "-c", ON_ITS_OWN, *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_public_api_names_resolve():
    """Every name ``maeformer_fast`` exports lazily exists where it points. Mutation seen failing:
    ``predict`` pointed at its module's old place, ``maeformer_fast.train.predict``."""
    package = importlib.import_module("maeformer_fast")
    for name in package.__all__:
        assert getattr(package, name) is not None
