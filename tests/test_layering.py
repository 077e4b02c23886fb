"""Who may import whom: the store's modules import only downward, nothing imports the dispatcher,
core modules never import the demo. Read from the source (AST), so these tests load nothing heavy."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import memctl
from memctl import stages

SRC = Path(memctl.__file__).parent
#: The store's modules, each importing only modules before it.
STORE_ORDER = ["layout", "permissions", "locks", "hashing", "leftovers", "provenance", "atomic", "claims",
               "verification"]


def imported(tree: ast.AST) -> set[str]:
    """Modules named by the import statements anywhere in ``tree`` (function-local ones too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.AST]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SRC.rglob("*.py"))}


def test_store_modules_import_only_downward():
    assert sorted(p.stem for p in (SRC / "store").glob("*.py") if p.stem != "__init__") == sorted(STORE_ORDER)
    for i, name in enumerate(STORE_ORDER):
        tree = ast.parse((SRC / "store" / f"{name}.py").read_text(encoding="utf-8"))
        uses = {m.split(".")[2] for m in imported(tree) if m.startswith("memctl.store.")}
        assert uses <= set(STORE_ORDER[:i]), f"memctl.store.{name} imports {sorted(uses - set(STORE_ORDER[:i]))}"
        others = {m for m in imported(tree) if m.startswith("memctl") and not m.startswith("memctl.store")}
        assert others <= {"memctl", "memctl.__version__"}, f"memctl.store.{name} imports {sorted(others)}"


def test_what_snakemake_imports_is_light():
    """Snakemake imports the store, the planner and the registry while it parses the workflow:
    no torch (seconds per job process), no pandas or numpy."""
    code = ("import sys, memctl.store, memctl.plan, memctl.stages, memctl.lab; "
            "print(sorted({'torch', 'pandas', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------ the package's layers


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    return stages._imports(stages._parsed(MODULES[name]), name) - {"memctl"}


#: Layer of each module, bottom (0) to top; a module may import its own layer or lower ones.
LAYERS = {
    "memctl.config": 0, "memctl.store": 0, "memctl.stages": 0, "memctl.progress": 0, "memctl.labels": 0,
    "memctl.edit_methods": 0,
    "memctl.metric_records": 0, "memctl.arguments": 0,
    "memctl.architectures": 1, "memctl.models": 1, "memctl.metrics": 1, "memctl.capture": 1,
    "memctl.edits": 1, "memctl.data": 1, "memctl.generation": 1, "memctl.corpus_stream": 1, "memctl.overlap": 1,
    "memctl.soft_prompt": 1, "memctl.stats": 1, "memctl.splits": 1, "memctl.power": 1, "memctl.plots": 1,
    "memctl.extract": 2, "memctl.evaluate": 2, "memctl.report": 2, "memctl.curvature": 2, "memctl.masks": 2,
    "memctl.pruning": 2, "memctl.demo": 2, "memctl.vision": 2,
    "memctl.plan": 3, "memctl.planning": 3, "memctl.lab": 3, "memctl.runner": 3,
    "memctl.commands": 4, "memctl.curvature.cli": 4, "memctl.masks.cli": 4, "memctl.demo.cli": 4,
    "memctl.downstream": 4, "memctl.vision.cli": 4, "memctl.init": 4,
    "memctl.cli": 5,
}


def layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{name} has no layer in tests/test_layering.py (add it and to docs/architecture.md)")
    return LAYERS[best]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "memctl"))
def test_imports_go_downward(name):
    for imported in imports_of(name):
        if imported.startswith(name + ".") or name.startswith(imported + "."):
            continue  # a package and its own modules
        assert layer(imported) <= layer(name), f"{name} (layer {layer(name)}) imports {imported} (layer {layer(imported)})"


def test_nothing_imports_the_dispatcher_and_core_never_imports_the_demo():
    for name in MODULES:
        found = imports_of(name)
        assert "memctl.cli" not in found, name
        if not name.startswith("memctl.demo"):
            assert not any(m.startswith("memctl.demo") for m in found), name
