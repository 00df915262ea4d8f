"""Import rules between jf-ray's layers: light modules stay torch-free, dependencies point one way.

Read from the source (every import statement, the lazy ones inside functions included), except the torch
checks, which import the module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import jf_ray

PACKAGE = Path(jf_ray.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every jf_ray module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("jf_ray.") and _exists(name)}


def _exists(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(package: str) -> dict[str, set[str]]:
    """{module: the jf_ray modules it imports} for every module of ``package`` (a dotted name)."""
    root = PACKAGE.parent.joinpath(*package.split("."))
    files = [root.with_suffix(".py")] if root.with_suffix(".py").is_file() else sorted(root.rglob("*.py"))
    return {module_name(path): imported_modules(path) for path in files}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # The base model is pretrained with its own loop; post-training code builds on it, never the reverse.
        ("jf_ray.basemodel", ("jf_ray.training", "jf_ray.trajectories", "jf_ray.pipeline", "jf_ray.serving")),
        # Evaluating any checkpoint needs nothing of how the embedded base model was built.
        ("jf_ray.evaluation", ("jf_ray.basemodel", "jf_ray.training")),
        ("jf_ray.scoring", ("jf_ray.basemodel", "jf_ray.training")),
        ("jf_ray.modeling", ("jf_ray.basemodel", "jf_ray.training", "jf_ray.decoding")),
        ("jf_ray.workloads", ("jf_ray.basemodel", "jf_ray.training", "jf_ray.decoding", "jf_ray.modeling")),
        ("jf_ray.decoding", ("jf_ray.training", "jf_ray.trajectories", "jf_ray.serving", "jf_ray.pipeline")),
    ],
)
def test_layers_import_downwards_only(package, forbidden):
    wrong = {
        module: sorted(name for name in names if any(_under(name, bad) for bad in forbidden))
        for module, names in imports_of(package).items()
    }
    assert not {module: names for module, names in wrong.items() if names}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated at its end), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        if state.get(module) == "open":
            return path[path.index(module) :] + [module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            cycle = visit(name, [*path, module])
            if cycle:
                return cycle
        state[module] = "done"
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)


def test_no_module_imports_back_into_its_importers():
    """Modules depend one way, lazy imports included; a package's ``__init__`` re-exporting its modules is no
    layer and is left out."""
    packages = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    graph = {
        module: {name for name in names if name not in packages and name != module}
        for module, names in imports_of("jf_ray").items()
        if module not in packages
    }
    assert _find_cycle(graph) is None


def test_workload_generators_import_only_the_shared_module():
    """workloads.common imports no other workload module; load.py imports the generators, none imports it."""
    graph = {
        module: {name for name in names if _under(name, "jf_ray.workloads") and name != "jf_ray.workloads"}
        for module, names in imports_of("jf_ray.workloads").items()
    }
    assert not graph["jf_ray.workloads.common"]
    assert [module for module, names in graph.items() if "jf_ray.workloads.load" in names] == ["jf_ray.workloads"]


@pytest.mark.parametrize(
    "code",
    [
        "import jf_ray.pipeline.config",
        "import jf_ray.decoding.registry, jf_ray.decoding.types",
        "import jf_ray.workloads, jf_ray.config",
        "import jf_ray.serving.config, jf_ray.trajectories.config, jf_ray.packing.config",
        "from jf_ray.cli.main import build_parser; build_parser()",
    ],
)
def test_configs_registry_and_cli_parser_load_no_torch(code):
    """Reading a config, the decoder names or ``jf-ray --help`` must not wait seconds for torch."""
    check = f"import sys; {code}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
