"""The masks family: the weight-pruning paper's tables — the main table at ``masks.sparsity``
(pruning baselines, BalancedSubnet, CSP and each mask mode per seed), the ablation rows
(``masks.ablations``) and the sweeps (``masks.sweep``) — as the stages sample_memories, train_mask,
prune_baseline, balanced_subnet, csp and masks_report. The comparison methods' points come from
:mod:`memctl.planning.pruning`; an edit in several tables is planned once (the first label wins)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from memctl.config import ConfigError, resolve_bf16, settings_hash
from memctl.edit_methods import baseline
from memctl.labels import MASK_MODE_LABELS
from memctl.planning.context import Context, FamilyPlan
from memctl.planning.core import Edit, Job, StagePlan, as_json, model_args, new_edit
from memctl.planning.data import calibration_windows
from memctl.planning.pruning import Point, Sources, balanced_subnet_point, baseline_point, csp_points

#: The stages that write the tables' edits, in plan order.
EDIT_STAGES = ("train_mask", "prune_baseline", "balanced_subnet", "csp")


def mask_point(src: Sources, mode: str, sparsity: float, threshold: float | None, table: str, label: str | None = None,
               **change: Any) -> Point:
    """One mask (``change``: job settings that differ from the config's, e.g. a seed or a gate kind)."""
    from memctl.masks import settings as mask_settings

    ctx = src.ctx
    masks = ctx.config["masks"]
    job = {k: v for k, v in masks.items() if k not in mask_settings.CONFIG_ONLY}
    job.update(mode=mode, sparsity=sparsity, lambda_s=mask_settings.lambda_s_of(masks, mode), seed=masks["seeds"][0])
    job.update(change)
    if mode == "down":
        job["threshold"] = threshold
    job["bf16"] = resolve_bf16(job["bf16"], bool(ctx.base.gpu))  # `auto`: bf16 where it is fast
    job = mask_settings.resolve_mask_job(job)  # the job's settings, resolved once (a frozen MaskJob)
    settings = job.to_dict()  # what --settings carries (MaskJob.to_json) and the hash covers
    calibration = src.calibration
    upstream = [calibration.hash, ctx.data.extract_hash if mode != "none" else None]
    h = settings_hash(ctx.model.key, ctx.config["model"], ctx.base.gpu, upstream, settings)
    inputs = {"calibration": calibration.path}
    args: tuple[str, ...] = ("--calibration", calibration.path)
    if mode != "none":  # the memorization term trains on the extraction-rate track's train side
        er_train = ctx.data.tables["er_train"]
        inputs["memorized"] = er_train
        args += ("--memorized", er_train)
    series = MASK_MODE_LABELS[mode]
    # forget: scored on its own training memories (the `none` mask on the same rows: the paired
    # `up` vs `none` comparison there too); lambda_s: the tables check the comparison is paired
    return Point("train_mask", f"mask-{mode}-{h}", settings, label or series, series, table, inputs, args,
                 dict(family="ours", mode=mode, sparsity=sparsity, threshold=threshold if mode == "down" else None,
                      seed=job.seed, lambda_s=job.lambda_s, mem_loss_tokens=job.mem_loss_tokens,
                      forget=src.forget), (calibration,))


def _main_points(src: Sources) -> list[Point]:
    """The main table at ``masks.sparsity``: pruning baselines, BalancedSubnet, CSP, each mode per seed."""
    masks, pruning = src.ctx.config["masks"], src.ctx.config["pruning"]
    if pruning["second_moments"] == "kfac" and "sequential" in pruning["forms"]:
        raise ConfigError(
            f"pruning.second_moments: 'kfac' works with pruning.forms: [one_pass] only (the K-FAC factors "
            f"are the unpruned model's statistics; the sequential form needs those of the pruned blocks "
            f"below); got pruning.forms: {pruning['forms']}"
        )
    r = masks["sparsity"]
    points = [baseline_point(src, method, form, r, "main") for method in pruning["methods"]
              for form in baseline(method).planned_forms(pruning["forms"])]
    if pruning["balanced_subnet"]["enabled"]:
        points.append(balanced_subnet_point(src))
    points += csp_points(src)
    for mode in masks["modes"]:
        for seed in masks["seeds"]:  # the first seed's mask is the mode's reference run
            points.append(mask_point(src, mode, r, masks["threshold"], "main",
                                     None if seed == masks["seeds"][0] else f"{MASK_MODE_LABELS[mode]}, seed {seed}",
                                     seed=seed))
    return points


def _mode_ablations(src: Sources, mode: str) -> tuple[list[Point], list[tuple[str, str, str, float | None, bool]]]:
    """One ablated mode's masks and rows (ablation, setting, edit, target sparsity, is the reference)."""
    from memctl.masks import settings as mask_settings

    masks = src.ctx.config["masks"]
    abl, r, t = masks["ablations"], masks["sparsity"], masks["threshold"]
    base = MASK_MODE_LABELS[mode][:-1]  # "Ours (up"
    reference = mask_point(src, mode, r, t, "ablations")  # the main-table mask (first seed)
    points, rows = [reference], []

    def ablated(ablation: str, setting: str, target: float | None, point: Point) -> None:
        points.append(point)
        rows.append((ablation, setting, point.edit, target, False))

    if abl["regularizers"]:
        ablation = "regularizers"
        if "sparsity_only" in abl["regularizers"]:  # no memorization term: the `none` objective
            ablated(ablation, "sparsity only", r, mask_point(src, "none", r, None, "ablations", f"{base}, sparsity only)",
                                                   lambda_s=mask_settings.lambda_s_of(masks, mode)))
        if "memorization_only" in abl["regularizers"]:  # no sparsity term: no target sparsity
            ablated(ablation, "memorization only", None, mask_point(src, mode, r, t, "ablations", f"{base}, memorization only)",
                                                          lambda_s=0, eval_mask="threshold"))
        rows.append((ablation, "both", reference.edit, r, True))
    if abl["gates"]:
        ablation = "gate"
        rows.append((ablation, f"gate {masks['gate']}", reference.edit, r, True))
        for kind in (k for k in abl["gates"] if k != masks["gate"]):
            ablated(ablation, f"gate {kind}", r, mask_point(src, mode, r, t, "ablations", f"{base}, gate {kind})", gate=kind))
    if abl["logit_ranks"]:
        ablation, own = "logit_rank", masks["logit_rank"]
        rows.append((ablation, "full-rank logits" if own is None else f"logit rank {own}", reference.edit, r, True))
        for rank in (k for k in abl["logit_ranks"] if k != own):
            ablated(ablation, f"logit rank {rank}", r, mask_point(src, mode, r, t, "ablations", f"{base}, logit rank {rank})",
                                                        logit_rank=rank))
    if abl["mem_loss_tokens"]:  # L_mem over the suffix only (or the whole sequence): masks.mem_loss_tokens
        ablation, own = "mem_loss_tokens", masks["mem_loss_tokens"]
        rows.append((ablation, f"L_mem over {own} tokens", reference.edit, r, True))
        for tokens in (k for k in abl["mem_loss_tokens"] if k != own):
            ablated(ablation, f"L_mem over {tokens} tokens", r, mask_point(
                src, mode, r, t, "ablations", f"{base}, L_mem over {tokens} tokens)", mem_loss_tokens=tokens))
    return points, rows


def _ablation_points(src: Sources) -> tuple[list[Point], list[dict[str, Any]]]:
    """The weight-pruning paper's ablation rows (``masks.ablations``): Table 5's regularizers, the
    gate kinds of appendix A, the low-rank gate logits of appendix D, L_mem's tokens; each a mask of
    one ablated mode at the first seed with one setting changed, next to that mode's main-table
    mask (its reference). Returns (points, rows of the ablations table)."""
    abl = src.ctx.config["masks"]["ablations"]
    if not (abl["regularizers"] or abl["gates"] or abl["logit_ranks"] or abl["mem_loss_tokens"]):
        return [], []
    points, records = [], []
    for mode in abl["modes"]:
        mode_points, rows = _mode_ablations(src, mode)
        points += mode_points
        base = MASK_MODE_LABELS[mode][:-1]
        records += [{"edit": edit, "label": f"{base}, {setting})", "ablation": ablation, "setting": setting,
                     "mode": mode, "target_sparsity": target, "reference": ref}
                    for ablation, setting, edit, target, ref in rows]
    return points, records


def _sweep_points(src: Sources) -> list[Point]:
    """The sparsity sweep (paper Fig. 3; baselines too where asked) and the threshold sweep (Fig. 4)."""
    masks, pruning = src.ctx.config["masks"], src.ctx.config["pruning"]
    r, sweep = masks["sparsity"], masks["sweep"]
    points = []
    for s in sweep["sparsities"]:
        points += [mask_point(src, mode, s, masks["threshold"], "sparsity", f"{MASK_MODE_LABELS[mode]}, sparsity {s:.2f}")
                   for mode in sweep["sparsity_modes"]]
        if sweep["baselines"]:
            points += [baseline_point(src, method, baseline(method).planned_forms(pruning["forms"])[0], s,
                                      "sparsity", f"{baseline(method).label}, sparsity {s:.2f}")
                       for method in pruning["methods"]]
    points += [mask_point(src, "down", r, t, "threshold", f"Ours (down), t={t:g}") for t in sweep["thresholds"]]
    if sweep["thresholds"]:
        points.append(mask_point(src, "down", r, masks["threshold"], "threshold"))
    return points


def _fold(ctx: Context, points: list[Point], spec: dict[str, dict[str, Any]]) -> tuple[dict[str, list[Job]], list[Edit]]:
    """Each point's edit and job once (the first, main-table label wins); ``spec`` (a new dict of the
    caller's: the masks report's edits) lists every table each edit appears in."""
    m, base = ctx.model, ctx.base
    jobs: dict[str, list[Job]] = {stage: [] for stage in EDIT_STAGES}
    known, edits = dict(ctx.edits), []
    for p in points:
        if p.edit not in spec:
            edit = new_edit(known, m, p.edit, p.label, p.stage, **p.info)
            known[p.edit] = edit
            edits.append(edit)
            outputs = {"delta": edit.delta}
            out_args: tuple[str, ...] = ("--out", edit.delta)
            if p.stage != "prune_baseline":
                outputs["log"] = f"{m.dir}/edits/{p.edit}/train_log.parquet"
                out_args += ("--log", outputs["log"])
            jobs[p.stage].append(Job(
                p.stage, p.edit, {**m.inputs, **p.inputs}, outputs,
                (*model_args(m), *p.args, "--settings", as_json(dict(p.settings)), "--label", p.label, *out_args),
                base.log(p.stage, p.edit), base.bench(p.stage, p.edit), p.settings, p.label,
            ))
            spec[p.edit] = dict(edit=p.edit, series=p.series, delta=edit.delta, tables=[], **p.info)
        if p.table not in spec[p.edit]["tables"]:
            spec[p.edit]["tables"].append(p.table)
    return jobs, edits


def _report(ctx: Context, spec: dict[str, dict[str, Any]], ablations: list[dict[str, Any]]) -> StagePlan:
    base, masks = ctx.base, ctx.config["masks"]
    report = {"title": f"Masks and pruning baselines at sparsity {masks['sparsity']:g}", "edits": list(spec.values())}
    if ablations:
        report["ablations"] = ablations
    h = settings_hash(ctx.data.eval_hash, report)
    out = f"{base.results}/masks"
    outputs = {"markdown": f"{out}/table.md", "table": f"{out}/table.parquet", "html": f"{out}/table.html"}
    for table in ("sparsity", "threshold"):
        if any(table in e["tables"] for e in spec.values()):
            outputs.update({f"{table}_{ext}": f"{out}/ablation_{table}.{ext}" for ext in ("md", "parquet", "png", "svg")})
    if ablations:
        outputs.update({f"ablations_{ext}": f"{out}/ablations.{ext}" for ext in ("md", "parquet")})
    metrics = [ctx.data.metrics(e) for e in spec]
    return base.stage("masks_report", [Job(
        "masks_report", "", {"metrics": metrics, "scores": [p.replace("/metrics.parquet", "/scores.parquet") for p in metrics],
                             "deltas": [e["delta"] for e in spec.values() if e["delta"]]},
        outputs, ("--metrics", *metrics, "--spec", as_json(report), "--out-dir", out),
        base.log("masks_report", h), base.bench("masks_report", h), report,
    )], shown={k: ("4. Masks and pruning", f"masks_{PurePosixPath(v).stem}.rst") for k, v in outputs.items()
               if v.endswith((".html", ".png"))})


def plan_masks(ctx: Context) -> FamilyPlan:
    """Masks, pruning baselines, BalancedSubnet and CSP (main table, ablations and sweeps), the
    sample of their training memories every one of them is scored on (Origin too: it replaces the
    ``none`` edit), and the masks report. Exports ``main_table_edits`` (Origin first)."""
    from memctl.masks import settings as mask_settings

    base, m, masks = ctx.base, ctx.model, ctx.config["masks"]
    spec: dict[str, dict[str, Any]] = {"none": {"edit": "none", "series": "Origin", "family": "origin", "delta": None,
                                                "tables": ["main"]}}
    samples, points, ablations, replaced = [], [], [], ()
    if masks["enabled"]:
        # the forget track: one seeded sample of the masks' training memories (er_train), scored by
        # every edit trained on them, the `none` masks and Origin (the same rows for all)
        own = mask_settings.resolve_own_memories(masks["own_memories"]).to_dict()  # once: OwnMemories.to_json()
        h = settings_hash(ctx.data.extract_hash, own)
        forget, er_train = f"{m.dir}/memories-{h}/er_train.parquet", ctx.data.tables["er_train"]
        origin = ctx.edits["none"]
        replaced = (Edit(origin.id, origin.label, origin.stage, origin.delta, {**origin.info, "forget": forget}),)
        spec["none"]["forget"] = forget
        samples.append(Job("sample_memories", h, {"table": er_train}, {"sample": forget},
                           ("--table", er_train, "--settings", as_json(own), "--out", forget),
                           base.log("sample_memories", h), base.bench("sample_memories", h), own))
        src = Sources(ctx, calibration_windows(ctx, "masks"), forget)
        points = _main_points(src)
        ablation_points, ablations = _ablation_points(src)
        points += ablation_points + _sweep_points(src)
    jobs, edits = _fold(ctx, points, spec)
    edit_pattern = {"delta": f"{m.dir}/edits/{{edit}}/delta.safetensors"}
    log_pattern = {**edit_pattern, "log": f"{m.dir}/edits/{{edit}}/train_log.parquet"}
    stages = [base.stage("sample_memories", samples, wildcard="sample",
                         outputs={"sample": f"{m.dir}/memories-{{sample}}/er_train.parquet"})]
    stages += [base.stage(stage, jobs[stage], wildcard="edit",
                          outputs=edit_pattern if stage == "prune_baseline" else log_pattern) for stage in EDIT_STAGES]
    stages.append(_report(ctx, spec, ablations))
    return FamilyPlan(stages=tuple(stages), edits=tuple(edits), replaced=replaced,
                      targets=tuple(stages[-1].outputs.values()) if masks["enabled"] else (),
                      calibration=tuple({c.hash: c for p in points for c in p.calibration}.values()),
                      exports={"main_table_edits": tuple(e for e, s in spec.items() if "main" in s["tables"])})
