"""The planner by family (memctl.planning, issue 25): each family planner is a pure function of an
immutable context, build_plan composes them in the documented order, and the package's modules
import only downward (core, context, then the families)."""

from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path

import pytest
import yaml

from memctl import lab
from memctl.config import validate_config
from memctl.plan import FAMILIES, build_plan
from memctl.planning.context import Base, Context, FamilyPlan

sys.path.insert(0, str(Path(__file__).parent))
from tiny_store import TINY, TINY_VISION  # noqa: E402

PLANNING = Path(__file__).resolve().parents[1] / "src" / "memctl" / "planning"

#: The family order of docs/architecture.md ("Planning") and the stages each family plans.
FAMILY_STAGES = {
    "data": ["demo_corpus", "demo_tokenizer", "demo_pretrain", "candidates", "extract", "heldout", "reference_topk"],
    "curvature": ["collect_kfac", "merge_kfac", "decompose_kfac", "apply_edit", "kfac_spectrum", "curvature_report"],
    "masks": ["sample_memories", "train_mask", "prune_baseline", "balanced_subnet", "csp", "masks_report"],
    "calibration": ["calibration"],
    "evaluation": ["evaluate"],
    "report": ["report"],
    "downstream": ["downstream", "downstream_report"],
    "vision": ["vision_data", "vision_train", "vision_kfac", "vision_edit", "vision_evaluate", "vision_spectrum",
               "vision_report"],
}


@pytest.fixture(scope="module")
def config():
    """The tiny config with every family planning something: K-FAC shards and the calibration
    ablation, mask ablations, downstream tasks and the vision track."""
    raw = yaml.safe_load(TINY.read_text())
    raw["curvature"]["data"]["shards"] = 2
    raw["curvature"]["ablations"] = {"calibration_without_memories": True}
    raw["masks"]["ablations"] = {"regularizers": ["sparsity_only"], "gates": ["bernoulli"]}
    raw["downstream"] = {"tasks": ["cloze"], "edits": "main"}
    raw["vision"] = copy.deepcopy(TINY_VISION)
    return validate_config(raw)


def contexts(config):
    """(family, planner, the context it is given) in plan order."""
    ctx = Context(Base.of(config, lab.workflow_model_dims(config), "3.11"))
    for name, planner in FAMILIES:
        yield name, planner, ctx
        ctx = ctx.extend(planner(ctx))


@pytest.mark.parametrize("family", list(FAMILY_STAGES))
def test_a_family_planner_is_pure(config, family):
    """Twice on one context: equal plans, and the context (config included) is left as it was."""
    ((_, planner, ctx),) = [c for c in contexts(config) if c[0] == family]
    before = repr(ctx)
    first, second = planner(ctx), planner(ctx)
    assert isinstance(first, FamilyPlan) and first == second
    assert first.stages  # every family plans something with this config
    assert repr(ctx) == before


def test_the_context_is_read_only(config):
    *_, (_, _, ctx) = contexts(config)
    with pytest.raises(TypeError):
        ctx.edits["x"] = ctx.edits["none"]  # type: ignore[index]
    with pytest.raises(TypeError):
        ctx.stages["x"] = ctx.stages["evaluate"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        ctx.targets = ()  # type: ignore[misc]


def test_build_plan_composes_the_families_in_the_documented_order(config):
    assert [name for name, _ in FAMILIES] == list(FAMILY_STAGES)
    for name, planner, ctx in contexts(config):
        assert [s.name for s in planner(ctx).stages] == FAMILY_STAGES[name], name
    plan = build_plan(config, lab.workflow_model_dims(config), python_version="3.11")
    assert list(plan.stages) == [s for stages in FAMILY_STAGES.values() for s in stages]
    # the results page first, vision's report last; the edits: Origin, curvature's, the masks tables'
    vision = tuple(plan.stage("vision_report").outputs.values())
    assert plan.targets[0] == plan.stage("report").outputs["html"] and plan.targets[-len(vision):] == vision
    families = [e.info["family"] for e in plan.edits.values()]
    assert families[0] == "origin" and families[1:1 + families.count("curvature")] == ["curvature"] * families.count(
        "curvature")


def test_vision_only_replaces_the_targets(config):
    only = copy.deepcopy(dict(config))
    only["vision"]["only"] = True
    plan = build_plan(only, lab.workflow_model_dims(only), python_version="3.11")
    assert plan.targets and all("/vision/" in t for t in plan.targets)
    assert "evaluate" in plan.stages  # still planned, just not asked for


#: Which planning modules each may import (besides core and context, which every family reads).
ALLOWED = {"core": set(), "context": {"core"}, "data": set(), "curvature": {"data"}, "pruning": set(),
           "masks": {"data", "pruning"}, "evaluation": set(), "report": {"data"}, "vision": set()}


def test_planning_modules_import_only_downward():
    assert sorted(p.stem for p in PLANNING.glob("*.py") if p.stem != "__init__") == sorted(ALLOWED)
    for name, allowed in ALLOWED.items():
        tree = ast.parse((PLANNING / f"{name}.py").read_text(encoding="utf-8"))
        used = {node.module.split(".")[2] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memctl.planning.")}
        if name not in ("core", "context"):
            allowed = allowed | {"core", "context"}
        assert used <= allowed, f"memctl.planning.{name} imports {sorted(used - allowed)}"
