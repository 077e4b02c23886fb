"""The evaluation family: one ``evaluate`` job per edit planned so far (Origin included), and
lm-eval's downstream tasks of the chosen edits (:func:`plan_downstream`, after the report)."""

from __future__ import annotations

from memctl.config import settings_hash
from memctl.planning.context import Context, FamilyPlan
from memctl.planning.core import Job, as_json, model_args


def plan_evaluation(ctx: Context) -> FamilyPlan:
    """Every edit scored on the test tracks, the held-out windows and, where it was trained on a set
    of its own, that set (the forget track)."""
    base, m, data = ctx.base, ctx.model, ctx.data
    t, ev = data.tables, data.evaluate_settings
    jobs = []
    for edit in ctx.edits.values():
        delta = {"delta": edit.delta} if edit.delta else {}
        # an edit trained on a set of its own is scored on it too (the forget track): BalancedSubnet's
        # forget set; the masks' and CSP's sample of er_train (masks.own_memories), also Origin's
        forget = {"forget": edit.info["forget"]} if edit.info.get("forget") else {}
        out_dir = f"{data.eval_dir}/{edit.id}"
        name = f"{data.eval_hash}-{edit.id}"
        jobs.append(Job(
            "evaluate", edit.id,
            {**m.inputs, **delta, **forget, "memorized": t["memorized_test"], "er_test": t["er_test"],
             "validation": t["memorized_val"], "ood": t["ood"], "heldout": data.heldout, "reference": data.reference},
            {"metrics": f"{out_dir}/metrics.parquet", "scores": f"{out_dir}/scores.parquet"},
            (*model_args(m), "--edit", edit.id, "--method", edit.label,
             *(("--delta", edit.delta) if edit.delta else ()), "--memorized", t["memorized_test"],
             "--er-test", t["er_test"], "--validation", t["memorized_val"],
             "--ood", t["ood"], *(("--forget", forget["forget"]) if forget else ()),
             "--heldout", data.heldout, "--reference", data.reference, "--settings", as_json(ev),
             "--out-dir", out_dir),
            base.log("evaluate", name), base.bench("evaluate", name), ev, edit.label, runtime=data.eval_runtime,
        ))
    return FamilyPlan(stages=(base.stage(
        "evaluate", jobs, wildcard="edit",
        outputs={"metrics": f"{data.eval_dir}/{{edit}}/metrics.parquet", "scores": f"{data.eval_dir}/{{edit}}/scores.parquet"},
        log=f"{base.root}/logs/evaluate/{data.eval_hash}-{{edit}}.log"),))


def plan_downstream(ctx: Context) -> FamilyPlan:
    """lm-eval downstream tasks (config section ``downstream``): the chosen edits (``main``: the
    masks' main table, exported by the masks family; else every edit) in jobs of
    ``edits_per_job`` (each loads the model once and applies the edits in turn), and Table 4."""
    base, m, cfg = ctx.base, ctx.model, ctx.config["downstream"]
    chosen = list(ctx.exports["main_table_edits"]) if cfg["edits"] == "main" else list(ctx.edits)
    h = settings_hash(m.key, ctx.config["model"], base.gpu, {k: v for k, v in cfg.items() if k != "edits_per_job"})
    out_dir = f"{m.dir}/downstream-{h}"
    size = cfg["edits_per_job"] or max(1, len(chosen))
    jobs = []
    for start in range(0, len(chosen), size) if cfg["tasks"] else ():
        part = [ctx.edits[e] for e in chosen[start:start + size]]
        key = f"{start // size:03d}-{settings_hash([e.id for e in part])}"
        spec = [{"edit": e.id, "label": e.label, "delta": e.delta} for e in part]
        deltas = [e.delta for e in part if e.delta]
        tasks = {"tasks": cfg["include_path"]} if cfg["include_path"] else {}
        out = f"{out_dir}/{key}.parquet"
        jobs.append(Job(
            "downstream", key, {**m.inputs, **tasks, "deltas": deltas}, {"results": out},
            (*model_args(m), "--edits", as_json(spec), "--settings", as_json(cfg), "--out", out),
            base.log("downstream", f"{h}-{key}"), base.bench("downstream", f"{h}-{key}"), cfg,
        ))
    results = [j.outputs["results"] for j in jobs]
    outputs = {k: f"{base.results}/downstream.{k}" for k in ("md", "parquet", "html")}
    stages = (
        base.stage("downstream", jobs, wildcard="part", outputs={"results": f"{out_dir}/{{part}}.parquet"},
                   log=f"{base.root}/logs/downstream/{h}-{{part}}.log"),
        base.stage("downstream_report", [Job(
            "downstream_report", "", {"results": results}, outputs,
            ("--results", *results, "--settings", as_json(cfg), "--out-dir", base.results),
            base.log("downstream_report", h), base.bench("downstream_report", h), cfg,
        )], shown={"html": ("5. Downstream tasks", "downstream.rst")}),
    )
    return FamilyPlan(stages=stages, targets=tuple(outputs.values()) if cfg["tasks"] else ())
