"""The layering the folder names promise, checked on every import statement of the library and data_prep
(those inside functions too): each package imports only the packages listed below it, no module imports
itself back through others (no import cycle), and DeepSpeed and `transformers` stay where they belong.
docs/architecture.md draws the same layers."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

from tests.conftest import REPO

# Each package, bottom to top, with the packages it may import; a package may only name packages above it
# in this list. `aliases` are the `python -m megatron_bloom.<command>` modules kept for existing scripts.
LAYERS: Dict[str, Set[str]] = {
    "errors": set(),
    "fence": {"errors"},
    "model": {"errors"},
    "config": {"errors", "model"},
    "data": {"errors", "config"},
    "parallel": {"errors", "model"},
    "pipeline": {"errors", "fence", "model", "parallel"},
    "tasks": {"errors", "model", "config", "data"},
    "checkpoint": {"errors", "fence", "model", "config", "data", "parallel", "pipeline"},
    "inference": {"errors", "model", "config", "data", "parallel", "checkpoint", "tasks"},
    "training": {"errors", "fence", "model", "config", "data", "parallel", "pipeline", "tasks", "checkpoint",
                 "inference"},
    "planner": {"errors", "model", "config", "pipeline", "parallel", "checkpoint", "training"},
    "launcher": {"errors", "config", "parallel", "training"},
    "data_prep": {"errors", "data"},
    "cli": {"errors", "fence", "model", "config", "data", "parallel", "pipeline", "tasks", "checkpoint", "training",
            "inference", "planner", "launcher", "data_prep"},
    "aliases": {"cli"},
}
# Third-party libraries only some packages may import: DeepSpeed's public engine and pipeline in `pipeline/`
# and `training/`, its internals in `fence/` alone; `transformers` is the tests' reference, never a
# dependency of the library; datatrove runs preprocessing jobs (`data_prep/`) and nothing else.
CONFINED = {"deepspeed": {"fence", "pipeline", "training"}, "transformers": set(), "datatrove": {"data_prep"}}
INTERNALS_ONLY_IN_FENCE = "deepspeed.runtime"  # DeepSpeed's modules outside its public API


def source_modules() -> Dict[str, Path]:
    """Dotted module name -> file, for the library and data_prep (a package's `__init__` is the package)."""
    modules = {}
    for root in ("megatron_bloom", "data_prep"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = source_modules()


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "data_prep":
        return "data_prep"
    if len(parts) == 1:
        return "megatron_bloom"  # the package's own __init__
    if (REPO / "megatron_bloom" / parts[1]).is_dir() or parts[1] == "errors":
        return parts[1]
    return "aliases"


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: what a module does when run as a script, not what it depends on."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports_of(path: Path) -> List[str]:
    """Every module an import statement of `path` names (outside a `__main__` block): our modules resolved
    to the module imported (a `from package import submodule` to the submodule)."""
    return imports_in(path.read_text(), str(path))


def imports_in(source: str, where: str = "<source>") -> List[str]:
    found: List[str] = []

    def visit(node: ast.AST) -> None:
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{where}: relative import"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append(submodule if submodule in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


GRAPH = {module: sorted({name for name in imports_of(path) if name in MODULES and name != module})
         for module, path in MODULES.items()}


def test_every_package_is_placed_in_the_layers():
    packages = {package_of(module) for module in MODULES} - {"megatron_bloom"}
    assert packages == set(LAYERS), packages ^ set(LAYERS)
    order = list(LAYERS)
    for package, allowed in LAYERS.items():
        below = set(order[: order.index(package)])
        assert allowed <= below, f"{package} may import {allowed - below}, which are not below it"


@pytest.mark.parametrize("package", list(LAYERS))
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = []
    for module, path in MODULES.items():
        if package_of(module) != package:
            continue
        for name in imports_of(path):
            top = name.split(".")[0]
            target = package_of(name) if name in MODULES else None
            if target not in (None, package, "megatron_bloom") and target not in LAYERS[package]:
                wrong.append(f"{module} imports {name} ({target})")
            if top in CONFINED and package not in CONFINED[top]:
                wrong.append(f"{module} imports {name}")
            if name.startswith(INTERNALS_ONLY_IN_FENCE) and package != "fence":
                wrong.append(f"{module} imports {name}, DeepSpeed's internals (only fence/ may)")
    assert not wrong, "imports that break the layering:\n" + "\n".join(sorted(set(wrong)))


def import_cycles(graph: Dict[str, List[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): the import cycles."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            connect(module)
    return cycles


def test_no_import_cycles():
    assert not import_cycles(GRAPH), f"import cycles: {import_cycles(GRAPH)}"


def test_the_checks_see_imports_inside_functions_and_cycles():
    source = """
import torch
from megatron_bloom.model import cpu_kernels, ModelConfig

def f():
    from megatron_bloom.training.loop import train

if __name__ == "__main__":
    from megatron_bloom.cli.train import main
"""
    assert imports_in(source) == ["torch", "megatron_bloom.model.cpu_kernels", "megatron_bloom.model",
                                  "megatron_bloom.training.loop"]
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert import_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_the_data_commands_start_without_torch():
    """mbloom-preprocess, -train-tokenizer and -merge-shards need no torch, Hydra or DeepSpeed: a start without
    them is 0.4 s here against 3.6 s, in every task of a preprocessing job. A fresh interpreter: the test
    process has imported everything."""
    import subprocess
    import sys

    modules = ["megatron_bloom.cli.preprocess", "megatron_bloom.cli.train_tokenizer", "megatron_bloom.cli.merge_shards"]
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted(name for name in ('torch', 'hydra', 'deepspeed') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
