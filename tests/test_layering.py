"""The layering rules of DESIGN.md §2, checked on the package's import graph.

The graph is read from the source (every `import`, also those inside functions), so a lazy import counts as
much as a top-level one. Layers: math (`subspace`, `projector`) imports torch, safetensors and the standard
library only; integration (`reference`, `callback`) never reaches assembly (`train`, `export`, `merge`,
`evaluate`, `cli`) or the demo; nothing in the library imports the demo, which only the CLI may; no cycles.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lora_ogpsa

PACKAGE_DIR = Path(lora_ogpsa.__file__).parent
MATH = ("lora_ogpsa.subspace", "lora_ogpsa.projector", "lora_ogpsa.sketch")
INTEGRATION = ("lora_ogpsa.reference", "lora_ogpsa.callback")
ASSEMBLY = ("lora_ogpsa.train", "lora_ogpsa.export", "lora_ogpsa.merge", "lora_ogpsa.evaluate", "lora_ogpsa.eval_run",
            "lora_ogpsa.cli")
DEMO_USERS = ("lora_ogpsa.cli", "lora_ogpsa.__main__")


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


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_sees_the_package():
    assert {"lora_ogpsa.cli", "lora_ogpsa.files", "lora_ogpsa.demo.run", *MATH, *INTEGRATION} <= set(MODULES)
    assert "lora_ogpsa.demo.run" in _reachable("lora_ogpsa.cli")  # the graph follows lazy imports


@pytest.mark.parametrize("module", MATH)
def test_math_imports_torch_safetensors_and_the_standard_library_only(module):
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "__future__", *MATH}
    outside = sorted(name for name in _imports(MODULES[module]) if name.split(".")[0] not in allowed
                     and name not in allowed)
    assert outside == [], f"{module} imports {outside}"


@pytest.mark.parametrize("module", INTEGRATION)
def test_integration_never_reaches_assembly_or_the_demo(module):
    bad = sorted(name for name in _reachable(module) if name in ASSEMBLY or name.startswith("lora_ogpsa.demo"))
    assert bad == [], f"{module} reaches {bad}"


def test_only_the_cli_imports_the_demo():
    library = [name for name in MODULES if not name.startswith("lora_ogpsa.demo") and name not in DEMO_USERS]
    offenders = {name: sorted(t for t in GRAPH[name] if t.startswith("lora_ogpsa.demo")) for name in library}
    assert {name: found for name, found in offenders.items() if found} == {}


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


@pytest.mark.parametrize("module", [*MATH, "lora_ogpsa.config"])
def test_math_modules_do_not_import_the_hf_stack(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('transformers', 'trl', 'peft', 'bitsandbytes', 'accelerate', 'datasets')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{module} pulled in {result.stdout.strip()}"
