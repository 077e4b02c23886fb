"""The report family: the results page (stage ``report``: both evaluation tracks of every edit,
the frontier, the by-copies tables and plots, the masks table where masks run), what its captions
name (:func:`report_run`) and what ``snakemake`` prints when a run succeeds (:func:`results_summary`)."""

from __future__ import annotations

from typing import Any

from memctl.planning.context import Context, FamilyPlan
from memctl.planning.core import Job, Plan, as_json
from memctl.planning.data import calibration_used

#: Edit record fields the results report shows (what tells two rows apart).
REPORT_EDIT_FIELDS = ("family", "method", "mode", "form", "sparsity", "threshold", "seed", "calibration")


def report_run(ctx: Context) -> dict[str, Any]:
    """The configuration the results page's captions name (the report job's ``--spec`` ``run``):
    the model, the extraction window and splits, and the masks' settings where they run. Every
    value is upstream of an artifact the report reads, so it adds no rerun of its own."""
    model, ext = ctx.config["model"], ctx.config["extract"]
    run: dict[str, Any] = {"model": ctx.model.tag, "source": model["source"],
                           "name_or_path": model.get("name_or_path"), "revision": model.get("revision")}
    run.update({k: ext.get(k) for k in ("prefix_len", "suffix_len", "er_test_fraction", "test_fraction",
                                        "split_seed")})
    masks = ctx.config["masks"]
    if masks["enabled"]:
        run["masks"] = {k: masks.get(k) for k in ("modes", "sparsity", "threshold", "steps", "seeds")}
        run["masks"]["sweep"] = {k: masks["sweep"].get(k) for k in ("sparsities", "sparsity_modes", "thresholds")}
    return run


def _edit_records(ctx: Context) -> list[dict[str, Any]]:
    """What tells the rows apart (method, strength, layers, sparsity, seed): the edits' records."""
    curvature_specs = ctx.stages["apply_edit"].jobs if "apply_edit" in ctx.stages else {}
    records = []
    for e in ctx.edits.values():
        rec = {k: v for k, v in e.info.items() if k in REPORT_EDIT_FIELDS and v is not None}
        if e.id in curvature_specs:
            spec = curvature_specs[e.id].settings
            rec.update({k: spec[k] for k in ("layers", "strength") if spec.get(k) is not None})
        records.append({"edit": e.id, "label": e.label, **rec})
    return records


def plan_report(ctx: Context) -> FamilyPlan:
    """The results page over every edit's evaluation; its outputs go first in the targets."""
    base, data, r = ctx.base, ctx.data, ctx.base.results
    metrics = [data.metrics(e) for e in ctx.edits]
    scores = [f"{data.eval_dir}/{e}/scores.parquet" for e in ctx.edits]
    # every plot as PNG and SVG (memctl.plots.save); results.html embeds the SVGs
    outputs = {"results": f"{r}/results.md", "table": f"{r}/results.parquet", "html": f"{r}/results.html",
               "frontier": f"{r}/frontier.png", "frontier_svg": f"{r}/frontier.svg",
               "by_copies": f"{r}/extraction_by_copies.md", "plot": f"{r}/extraction_by_copies.png",
               "plot_svg": f"{r}/extraction_by_copies.svg",
               "edits_by_copies": f"{r}/edits_by_copies.md", "edits_by_copies_table": f"{r}/edits_by_copies.parquet",
               "edits_by_copies_plot": f"{r}/edits_by_copies.png",
               "edits_by_copies_svg": f"{r}/edits_by_copies.svg"}
    # their sidecars: what was dropped (the report's data section: one row per calibration text)
    used = calibration_used(ctx)
    data_files = [data.candidates, data.tables["er_train"],
                  *dict.fromkeys([*(p for c, p in used.items() if c != "kfac"), used["kfac"]])]
    report_spec = {"edits": _edit_records(ctx), "run": report_run(ctx)}
    # the results page shows the masks table and its ablation plots where the config runs masks
    masks_inputs: dict[str, Any] = {}
    masks_args: tuple[str, ...] = ()
    if ctx.config["masks"]["enabled"]:
        masks_out = ctx.stages["masks_report"].outputs
        figures = [masks_out[f"{t}_svg"] for t in ("sparsity", "threshold") if f"{t}_svg" in masks_out]
        masks_inputs = {"masks_table": masks_out["markdown"], "masks_figures": figures}
        masks_args = ("--masks-table", masks_out["markdown"], *(("--masks-figures", *figures) if figures else ()))
    by_copies = data.tables["by_copies"]
    stage = base.stage("report", [Job(
        "report", "", {"metrics": metrics, "scores": scores, "by_copies": by_copies, "data": data_files, **masks_inputs},
        outputs,
        ("--metrics", *metrics, "--scores", *scores, "--by-copies", by_copies,
         "--data-provenance", *data_files, *masks_args, "--spec", as_json(report_spec), "--out-dir", r),
        base.log("report", data.eval_hash), base.bench("report", data.eval_hash), report_spec,
    )], shown={"html": ("1. Results", "results.rst"), "frontier": ("1. Results", "frontier.rst"),
               "plot": ("2. Extraction by copies", "extraction_by_copies.rst"),
               "edits_by_copies_plot": ("2. Extraction by copies", "edits_by_copies.rst")})
    targets = (outputs["html"], outputs["results"], outputs["frontier"], outputs["by_copies"], outputs["plot"],
               outputs["edits_by_copies"], outputs["edits_by_copies_plot"])
    return FamilyPlan(stages=(stage,), targets=targets, targets_at="start")


def results_summary(plan: Plan) -> str:
    """What ``snakemake`` prints when a run succeeds: where the tables, plots and reports are."""
    from pathlib import Path

    names = [("results.html", "start here: the summary table with intervals, the frontier, by-copies and masks "
                               "plots, every table, in one page"),
             ("results.md", "both evaluation tracks, every edit, with intervals"),
             ("frontier.png", "memorization against perplexity, every edit (and .svg)"),
             ("extraction_by_copies.png", "extraction rate vs copy count (and .svg)"),
             ("edits_by_copies.png", "every edit per copy-count bucket (and .svg)"),
             ("curvature.md", "K-FAC vs SVD at matched perplexity"),
             ("masks/table.md", "masks and pruning baselines, the paper's table"),
             ("vision.md", "the vision track")]
    lines = [f"memctl: results in {plan.results}/"]
    for name, what in names:
        path = Path(plan.results) / name
        if path.exists():
            lines.append(f"  {path}  ({what})")
    lines.append("  snakemake --report report.html  gathers them with every stage's plots (its first page links results.html)")
    return "\n".join(lines)
