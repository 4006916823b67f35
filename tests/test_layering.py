"""The package's layers (docs/ARCHITECTURE.md), checked on its import graph by package prefix.

The graph is read from the source (every `import`, also those inside functions), so a lazy import counts as
much as a top-level one. A module may import modules of a lower layer or of its own subpackage, never of a
higher one; `core` imports torch, safetensors and the standard library only; nothing imports `testing`
(test helpers) at run time; no cycles. The checker is tested on a planted violation.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lora_ogpsa

PACKAGE_DIR = Path(lora_ogpsa.__file__).parent

# Lowest first. A name is a subpackage or a top-level module of lora_ogpsa; "" is the package itself (the
# public API of `from lora_ogpsa import ...`, over the callback and the signals).
LAYERS: dict[str, int] = {"utils": 0, "core": 0, "config": 1, "data": 2, "models": 2, "signals": 3, "callback": 4,
                          "eval": 4, "refusal": 1, "export": 4, "": 5, "train": 6, "experiment": 7, "demo": 8,
                          "cli": 9, "entry": 10, "__main__": 11, "testing": 10}
CORE_ALLOWED = {"torch", "safetensors", "__future__"}


def _module_name(path: Path) -> str:
    parts = ["lora_ogpsa", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (`from P import X` counts as P.X when that is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                names.add(candidate if candidate in MODULES else node.module)
    return names


GRAPH = {name: {target for target in _imports(path) if target in MODULES} for name, path in MODULES.items()}


def layer_of(module: str) -> str:
    """The layer name of a module: its subpackage or top-level module under lora_ogpsa ("" for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a layer, or into a layer the table does not know."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer_of(source), layer_of(target)
            if here not in LAYERS or there not in LAYERS:
                found.append(f"{source} -> {target}: a layer missing from LAYERS")
            elif here != there and LAYERS[there] > LAYERS[here]:
                found.append(f"{source} ({here or 'lora_ogpsa'}) imports {target} ({there or 'lora_ogpsa'}), a higher "
                             "layer")
    return found


def test_the_graph_sees_the_package():
    assert {"lora_ogpsa.cli", "lora_ogpsa.utils.files", "lora_ogpsa.experiment.engine", "lora_ogpsa.core.subspace",
            "lora_ogpsa.callback.router"} <= set(MODULES)
    reachable, todo = set(), ["lora_ogpsa.cli"]
    while todo:
        for target in GRAPH[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert "lora_ogpsa.demo.run" in reachable  # the graph follows lazy imports


def test_every_import_points_down_the_layers():
    assert violations(GRAPH) == []


@pytest.mark.parametrize("planted", [("lora_ogpsa.core.subspace", "lora_ogpsa.train.run"),
                                     ("lora_ogpsa.signals.reference", "lora_ogpsa.experiment.engine"),
                                     ("lora_ogpsa.eval.run", "lora_ogpsa.testing.tiny"),
                                     ("lora_ogpsa.newpackage.thing", "lora_ogpsa.core.subspace")])
def test_the_checker_finds_a_planted_violation(planted):
    source, target = planted
    graph = {name: set(targets) for name, targets in GRAPH.items()}
    graph.setdefault(source, set()).add(target)
    assert any(line.startswith(source) for line in violations(graph))


def test_every_subpackage_and_top_module_has_a_layer():
    assert {layer_of(name) for name in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(name for name in MODULES if layer_of(name) == "core"))
def test_core_imports_torch_safetensors_and_the_standard_library_only(module):
    allowed = set(sys.stdlib_module_names) | CORE_ALLOWED
    outside = sorted(name for name in _imports(MODULES[module])
                     if name.split(".")[0] not in allowed and layer_of(name) != "core")
    assert outside == [], f"{module} imports {outside}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, name, target])}"
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("module", ["lora_ogpsa.core.subspace", "lora_ogpsa.core.projector", "lora_ogpsa.core.sketch",
                                    "lora_ogpsa.config", "lora_ogpsa"])
def test_core_modules_do_not_import_the_hf_stack(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('transformers', 'trl', 'peft', 'bitsandbytes', 'accelerate', 'datasets')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{module} pulled in {result.stdout.strip()}"


def test_no_comment_points_outside_the_repository():
    """Docs the code cites must be in this repository (DESIGN.md / STYLE.md are not)."""
    repo = PACKAGE_DIR.parent
    outside = [f"{path.relative_to(repo)}:{number}" for directory in ("lora_ogpsa", "tests", "benchmarks",
                                                                        "experiments", "scripts", "examples")
               for path in (repo / directory).rglob("*.py")
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if ("DESIGN.md" in line or "STYLE.md" in line or "../shared" in line) and path.name != Path(__file__).name]
    assert outside == []
