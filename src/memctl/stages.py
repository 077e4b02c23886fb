"""The stage registry: one vocabulary for rules, commands, code hashes and resource estimates.

Every pipeline stage has one entry here. Its ``name`` is the Snakemake rule, its ``command`` the
``memctl`` subcommand the rule runs (``entry`` is the function behind it), its ``profile`` the
resource model of :mod:`memctl.lab`. Which source files a stage's outputs depend on is not listed by
hand: :func:`code_files` reads the entry function and follows the package's own imports
(transitively, function-local imports included), so editing any module a stage runs changes
:func:`code_hash` and reruns that stage and what depends on it. Shared infrastructure that cannot
change an artifact's content (the store, the dispatcher, this registry and the planner) is left out
by :data:`INFRASTRUCTURE`.

This module imports nothing heavy: Snakemake reads it while it parses the workflow.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE = "memctl"
SRC = Path(__file__).resolve().parent

#: Modules (and packages, with everything under them) whose code never shapes an artifact: the
#: store (atomic writes, sidecars), the dispatcher, this registry, the planner, the resource
#: estimates and the runner's plumbing (argument parsing, logging; the model itself is loaded by
#: memctl.models, which counts).
INFRASTRUCTURE = ("memctl.store", "memctl.cli", "memctl.stages", "memctl.plan", "memctl.planning", "memctl.lab",
                  "memctl.runner", "memctl.progress")


@dataclass(frozen=True)
class Stage:
    """One stage = one rule = one ``memctl`` subcommand."""

    name: str  #: rule name (snake_case)
    command: str  #: ``memctl`` subcommand
    entry: str  #: ``module:function`` that runs the subcommand
    profile: str  #: resource model in :mod:`memctl.lab` (what dominates memory and time)
    gpu: bool = False  #: runs on an accelerator when the config has one
    threads: bool = False  #: uses the job's threads (torch)
    cache: bool = False  #: in Snakemake's between-workflow cache (outputs declared with sidecars)
    mem_mb: int = 4000  #: request when the model's size is unknown at parse time
    runtime_min: int = 30  #: floor of the wall-time request
    family: str = "core"  #: docs/architecture.md groups stages by family

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    @property
    def function(self) -> str:
        return self.entry.partition(":")[2]


_C, _CU, _M, _D = "memctl.commands", "memctl.curvature.cli", "memctl.masks.cli", "memctl.demo.cli"
_V = "memctl.vision.cli"

#: Every stage, in DAG order.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("demo_corpus", "demo-corpus", f"{_D}:cmd_corpus", "light", family="demo", runtime_min=20),
        Stage("demo_tokenizer", "demo-tokenizer", f"{_D}:cmd_tokenizer", "light", family="demo", runtime_min=20),
        Stage("demo_pretrain", "demo-pretrain", f"{_D}:cmd_pretrain", "pretrain", gpu=True, threads=True,
              cache=True, mem_mb=8000, runtime_min=60, family="demo"),
        Stage("candidates", "candidates", f"{_C}:cmd_candidates", "light"),
        Stage("extract", "extract", f"{_C}:cmd_extract", "generate", gpu=True, threads=True, cache=True,
              mem_mb=8000, runtime_min=120),
        Stage("heldout", "heldout", f"{_C}:cmd_heldout", "light"),
        Stage("calibration", "calibration", f"{_C}:cmd_calibration", "light"),
        Stage("reference_topk", "reference-topk", f"{_C}:cmd_reference_topk", "score", gpu=True, threads=True,
              mem_mb=8000),
        Stage("evaluate", "evaluate", f"{_C}:cmd_evaluate", "score", gpu=True, threads=True, mem_mb=8000,
              runtime_min=60),
        Stage("report", "report", f"{_C}:cmd_report", "light", mem_mb=2000, runtime_min=10),
        Stage("collect_kfac", "kfac-collect", f"{_CU}:cmd_collect", "kfac", gpu=True, threads=True, cache=True,
              mem_mb=8000, runtime_min=240, family="curvature"),
        Stage("merge_kfac", "kfac-merge", f"{_CU}:cmd_merge", "eigh", mem_mb=8000, family="curvature"),
        Stage("decompose_kfac", "kfac-decompose", f"{_CU}:cmd_decompose", "eigh", gpu=True, threads=True, cache=True,
              mem_mb=8000, runtime_min=60, family="curvature"),
        Stage("apply_edit", "curvature-edit", f"{_CU}:cmd_edit", "edit", threads=True, mem_mb=8000,
              family="curvature"),
        Stage("kfac_spectrum", "kfac-spectrum", f"{_CU}:cmd_spectrum", "edit", gpu=True, threads=True,
              mem_mb=8000, runtime_min=60, family="curvature"),
        Stage("curvature_report", "curvature-report", f"{_CU}:cmd_report", "light", mem_mb=2000, runtime_min=10,
              family="curvature"),
        Stage("sample_memories", "sample-memories", f"{_M}:cmd_sample_memories", "light", mem_mb=2000,
              runtime_min=10, family="masks"),
        Stage("train_mask", "train-mask", f"{_M}:cmd_train_mask", "mask", gpu=True, threads=True, mem_mb=8000,
              runtime_min=240, family="masks"),
        Stage("prune_baseline", "prune", f"{_M}:cmd_prune", "prune", gpu=True, threads=True, mem_mb=8000,
              runtime_min=60, family="masks"),
        Stage("balanced_subnet", "balanced-subnet", f"{_M}:cmd_balanced_subnet", "mask", gpu=True, threads=True,
              mem_mb=8000, runtime_min=120, family="masks"),
        Stage("csp", "csp", f"{_M}:cmd_csp", "mask", gpu=True, threads=True, mem_mb=8000, runtime_min=60,
              family="masks"),
        Stage("downstream", "downstream", "memctl.downstream:cmd_downstream", "score", gpu=True, threads=True,
              mem_mb=8000, runtime_min=120, family="downstream"),
        Stage("downstream_report", "downstream-report", "memctl.downstream:cmd_downstream_report", "light",
              mem_mb=2000, runtime_min=10, family="downstream"),
        Stage("masks_report", "masks-report", f"{_M}:cmd_report", "light", mem_mb=4000, runtime_min=10,
              family="masks"),
        # the vision track (memctl.vision, docs/vision.md): a ViT memorizing noised labels
        Stage("vision_data", "vision-data", f"{_V}:cmd_data", "light", runtime_min=20, family="vision"),
        Stage("vision_train", "vision-train", f"{_V}:cmd_train", "pretrain", gpu=True, threads=True, mem_mb=8000,
              runtime_min=60, family="vision"),
        Stage("vision_kfac", "vision-kfac", f"{_V}:cmd_kfac", "kfac", gpu=True, threads=True, mem_mb=8000,
              runtime_min=60, family="vision"),
        Stage("vision_edit", "vision-edit", f"{_V}:cmd_edit", "edit", threads=True, mem_mb=8000, family="vision"),
        Stage("vision_evaluate", "vision-evaluate", f"{_V}:cmd_evaluate", "score", gpu=True, threads=True,
              mem_mb=8000, runtime_min=60, family="vision"),
        Stage("vision_spectrum", "vision-spectrum", f"{_V}:cmd_spectrum", "edit", gpu=True, threads=True,
              mem_mb=8000, family="vision"),
        Stage("vision_report", "vision-report", f"{_V}:cmd_report", "light", mem_mb=2000, runtime_min=10,
              family="vision"),
    )
}


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}") from None


# ------------------------------------------------------------------------- code dependencies


@cache
def _module_file(module: str) -> Path | None:
    """The source file of a ``memctl`` module (a package's ``__init__.py``), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SRC.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _infrastructure(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in INFRASTRUCTURE)


def _imports(tree: ast.AST, module: str) -> set[str]:
    """``memctl`` modules imported anywhere in ``tree`` (``from memctl.x import y`` counts y when
    it is a module itself)."""
    found: set[str] = set()
    package = module if _module_file(module) and _module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    result = set()
    for name in found:
        if name.split(".")[0] != PACKAGE or _module_file(name) is None:
            continue
        # importing a.b.c runs a/__init__.py and a/b/__init__.py too
        parts = name.split(".")
        result.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in result if _module_file(m) is not None}


@cache
def _source(path: Path) -> tuple[str, tuple[str, ...]]:
    """A module's text and its lines with their endings (``read_text`` leaves only ``\\n``)."""
    text = path.read_text(encoding="utf-8")
    return text, tuple(line + "\n" for line in text.split("\n"))


@cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(_source(path)[0], filename=str(path))


@cache
def _module_imports(module: str) -> frozenset[str]:
    """:func:`_imports` of a whole module (parsed and walked once per process)."""
    return frozenset(_imports(_parsed(_module_file(module)), module))


def _segment(lines: tuple[str, ...], node: ast.AST) -> str:
    """``ast.get_source_segment`` on lines split once (it splits the whole file on every call)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset : node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset :].decode()
    tail = lines[last].encode()[: node.end_col_offset].decode()
    return head + "".join(lines[first + 1 : last]) + tail


@cache
def _entry_closure(module: str, function: str) -> tuple[tuple[ast.AST, ...], frozenset[str]]:
    """The entry function and the module's top-level definitions it uses (transitively), and the
    modules all of them (and the module's top-level imports) import."""
    path = _module_file(module)
    if path is None:
        raise ValueError(f"stage entry module {module} not found under {SRC}")
    tree = _parsed(path)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    if function not in defs:
        raise ValueError(f"stage entry {module}:{function} not found")
    chosen, todo = {}, [function]
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        chosen[name] = defs[name]
        todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs]
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign))]
    nodes = [*top_level, *chosen.values()]
    modules = set()
    for node in nodes:
        modules |= _imports(node, module)
    modules.add(PACKAGE)
    return tuple(nodes), frozenset(modules)


@cache
def code_files(name: str) -> tuple[Path, ...]:
    """Source files whose code shapes the outputs of stage ``name``: the modules its entry
    function imports, transitively, infrastructure excluded (the entry module itself counts only
    with the definitions the entry uses, see :func:`code_hash`)."""
    stage = get(name)
    _, todo = _entry_closure(stage.module, stage.function)
    seen: set[str] = set()
    todo = set(todo)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo |= _module_imports(module) - seen
    # Infrastructure is followed (the runner loads the model through memctl.models) but not hashed.
    kept = {m for m in seen if not _infrastructure(m)} - {stage.module}
    return tuple(sorted({_module_file(m) for m in kept}))


def clear_caches() -> None:
    """Forget parsed sources (after editing them in the same process, as the tests do)."""
    for cached in (_module_file, _source, _parsed, _module_imports, _entry_closure, code_files, _source_digest):
        cached.cache_clear()


#: Code hashes computed by earlier processes, kept beside Python's own bytecode cache
#: (``SRC/__pycache__``) under the digest of every source file of the package: Snakemake parses
#: the workflow (and hashes every stage's code, 0.8 s of parsing 60 modules) in every run and, on a
#: cluster, in every job. Any edit to any module changes the digest and the hashes are computed
#: again; an unwritable package (a read-only install) is simply not cached.
CODE_HASH_CACHE = "memctl-code-hashes.json"


@cache
def _source_digest() -> str:
    """sha256 of every ``.py`` file under :data:`SRC` (relative path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(SRC.rglob("*.py")):
        digest.update(path.relative_to(SRC).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _cached_code_hashes() -> dict[str, str]:
    try:
        saved = json.loads((SRC / "__pycache__" / CODE_HASH_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("sources") != _source_digest() or not isinstance(saved.get("hashes"), dict):
        return {}
    return saved["hashes"]


def _save_code_hash(key: str, value: str) -> None:
    """Add one hash to the cache file with the store's atomic write (a temporary sibling renamed
    into place; a writer killed half way leaves a leftover the next write removes): concurrent jobs
    never read half a file; one of two simultaneous additions may be lost and is computed again."""
    from memctl.store import write_json

    try:
        write_json(SRC / "__pycache__" / CODE_HASH_CACHE,
                   {"sources": _source_digest(), "hashes": {**_cached_code_hashes(), key: value}})
    except OSError:
        pass  # a read-only package: computed again in the next process


def code_hash(name: str) -> str:
    """Short hash of the code stage ``name`` runs: the entry function with the top-level
    definitions and imports of its module that it uses, and every module of :func:`code_files`.
    Kept between processes while no source file of the package changes (:data:`CODE_HASH_CACHE`)."""
    stage = get(name)
    key = stage.entry
    known = _cached_code_hashes().get(key)
    if known is not None:
        return known
    value = _compute_code_hash(stage)
    _save_code_hash(key, value)
    return value


def _compute_code_hash(stage: Stage) -> str:
    name = stage.name
    digest = hashlib.sha256()
    _, lines = _source(_module_file(stage.module))
    nodes, _ = _entry_closure(stage.module, stage.function)
    digest.update(stage.entry.encode())
    for node in nodes:
        digest.update(_segment(lines, node).encode())
    for file in code_files(name):
        digest.update(file.relative_to(SRC).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def job_threads(name: str, resources: Mapping[str, Any]) -> int:
    """Threads of stage ``name``'s jobs: ``resources.stage_threads[name]`` where set, else
    ``resources.threads`` for the stages that run torch, else 1."""
    if not get(name).threads:
        return 1
    return int((resources.get("stage_threads") or {}).get(name, resources["threads"]))


def stage_threads_problems(resources: Mapping[str, Any]) -> list[str]:
    """Config errors of ``resources.stage_threads``: unknown rules and rules that run on one thread."""
    problems = []
    for name in resources.get("stage_threads") or {}:
        if name not in STAGES:
            problems.append(f"resources.stage_threads.{name}: no such rule (rules: {', '.join(STAGES)})")
        elif not STAGES[name].threads:
            problems.append(f"resources.stage_threads.{name}: this rule runs on one thread")
    return problems


def commands() -> dict[str, Stage]:
    """``memctl`` subcommand -> stage."""
    return {s.command: s for s in STAGES.values()}


def command_modules() -> list[str]:
    """The modules that define stage subcommands (each has ``register(subparsers)``), in order."""
    return list(dict.fromkeys(s.module for s in STAGES.values()))
