"""The curvature family: K-FAC factors (collect_kfac, merge_kfac for shards) and eigenbases
(decompose_kfac) over the calibration text, one apply_edit per edit of ``curvature.edits`` (and the
calibration-without-memories ablation's rows), the spectrum and the curvature report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from memctl.config import ConfigError, settings_hash
from memctl.planning.context import Calibration, Context, FamilyPlan
from memctl.planning.core import EIGEN_METHOD, WITHOUT_MEMORIES, Edit, Job, as_json, model_args, new_edit, with_meta
from memctl.planning.data import calibration_windows


@dataclass(frozen=True)
class Chain:
    """The jobs of one factors -> eigenbasis chain over one calibration text."""

    collect: tuple[Job, ...]
    merge: tuple[Job, ...]
    decompose: Job
    kfac_hash: str
    factors: str  #: the factors directory
    eigen_hash: str
    eigen_dir: str


def kfac_chain(ctx: Context, windows: Calibration) -> Chain:
    """collect_kfac (+ merge_kfac over ``curvature.data.shards``) and decompose_kfac over one
    calibration text (the stages are keyed: the ablation's chain beside the main one)."""
    cfg, m, curv, base = ctx.config, ctx.model, ctx.config["curvature"], ctx.base
    # Factors depend on the model (its dtype and device), the calibration text, the data pass and
    # the module set.
    kfac_hash = settings_hash(windows.hash, m.key, cfg["model"], curv["data"], curv["modules"], base.gpu)
    kfac = f"{m.dir}/kfac-{kfac_hash}"
    eigen_hash = settings_hash(kfac_hash, EIGEN_METHOD)
    eigen_dir = f"{kfac}/eigen-{eigen_hash}"
    collect = {"data": curv["data"], "modules": curv["modules"]}
    shards = int(curv["data"]["shards"])
    collect_args = (*model_args(m), "--windows", windows.path, "--settings", as_json(collect))
    inputs = {**m.inputs, "windows": windows.path}
    merge: tuple[Job, ...] = ()
    if shards == 1:
        outs = with_meta({"factors": f"{kfac}/factors", "summary": f"{kfac}/summary.parquet"})
        collected = (Job("collect_kfac", kfac_hash, inputs, outs, (*collect_args, "--out-dir", kfac),
                         base.log("collect_kfac", kfac_hash), None, collect),)
    else:
        jobs = []
        for i in range(shards):
            key = f"{kfac_hash}/shards/{i}"
            d = f"{m.dir}/kfac-{key}"
            outs = with_meta({"factors": f"{d}/factors", "summary": f"{d}/summary.parquet"})
            jobs.append(Job("collect_kfac", key, dict(inputs), outs,
                            (*collect_args, "--shard", f"{i}/{shards}", "--out-dir", d),
                            base.log("collect_kfac", key), None, dict(collect, shard=i)))
        collected = tuple(jobs)
        shard_dirs = [f"{kfac}/shards/{i}" for i in range(shards)]
        merge = (Job(
            "merge_kfac", kfac_hash, {"shards": [f"{d}/factors" for d in shard_dirs]},
            {"factors": f"{kfac}/factors", "summary": f"{kfac}/summary.parquet"},
            ("--inputs", *shard_dirs, "--out-dir", kfac),
            base.log("merge_kfac", kfac_hash), base.bench("merge_kfac", kfac_hash),
        ),)
    key = f"{kfac_hash}/eigen-{eigen_hash}"
    decompose = Job(
        "decompose_kfac", key, {"factors": f"{kfac}/factors"},
        with_meta({"eigen": f"{eigen_dir}/eigen", "summary": f"{eigen_dir}/summary.parquet"}),
        ("--factors", f"{kfac}/factors", "--out-dir", eigen_dir), base.log("decompose_kfac", key), None,
    )
    return Chain(collected, merge, decompose, kfac_hash, f"{kfac}/factors", eigen_hash, eigen_dir)


def _ablation_specs(ctx: Context, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation rows of curvature.ablations.calibration_without_memories: each K-FAC edit again,
    on factors of calibration text without the memories ([] when off)."""
    cfg, curv = ctx.config, ctx.config["curvature"]
    if not (curv["ablations"]["calibration_without_memories"] and any(s["method"] != "svd" for s in specs)):
        return []
    if cfg["calibration"]["source"] != "demo" and ctx.data.disjoint_ngram == 0:
        raise ConfigError(
            f"curvature.ablations.calibration_without_memories: with calibration.source "
            f"{cfg['calibration']['source']!r} the memories are removed by dropping windows that share an "
            f"extract.disjoint_ngram-token run with a memorized sequence, and extract.disjoint_ngram is 0; set it "
            f"(e.g. 16) or turn the ablation off")
    labels = {spec["label"] for spec in specs}
    rows = []
    for spec in specs:
        if spec["method"] == "svd":  # SVD reads no factors: no ablation row
            continue
        label = spec["label"] + WITHOUT_MEMORIES
        if label in labels:
            raise ConfigError(
                f"curvature.edits: the label {label!r} is also the label that "
                f"curvature.ablations.calibration_without_memories gives the ablation row of {spec['label']!r}; "
                f"give that edit another label")
        rows.append({**spec, "calibration": "without_memories", "label": label})
    return rows


def _apply_edits(ctx: Context, planned: list[tuple[dict[str, Any], Chain]]) -> tuple[list[Job], list[Edit]]:
    """One apply_edit job and edit per spec. K-FAC ids chain the eigenbasis hash, SVD ids only the model's."""
    from memctl.curvature import settings as curvature_settings

    cfg, m, curv, base = ctx.config, ctx.model, ctx.config["curvature"], ctx.base
    svd_upstream = settings_hash(m.key, cfg["model"])
    known, jobs, edits = dict(ctx.edits), [], []
    for spec, chain in planned:
        svd = spec["method"] == "svd"
        edit_id = curvature_settings.edit_id(spec, svd_upstream if svd else chain.eigen_hash)
        marker = {"calibration": spec["calibration"]} if "calibration" in spec else {}
        edit = new_edit(known, m, edit_id, spec["label"], "apply_edit", family="curvature", method=spec["method"],
                        **marker)
        known[edit_id] = edit
        edits.append(edit)
        outputs = {"delta": edit.delta}
        extra: tuple[str, ...] = ()
        if curv["write_model_dir"]:
            outputs["model_dir"] = f"{m.dir}/edits/{edit_id}/model"
            extra = ("--model-out", outputs["model_dir"])
        eigen = {} if svd else {"eigen": f"{chain.eigen_dir}/eigen"}
        jobs.append(Job(
            "apply_edit", edit_id, {**m.inputs, **eigen}, outputs,
            (*model_args(m), *(("--eigen", eigen["eigen"]) if eigen else ()), "--edit-id", edit_id,
             "--settings", as_json(spec), "--out", edit.delta, *extra),
            base.log("apply_edit", edit_id), base.bench("apply_edit", edit_id), spec, spec["label"],
        ))
    return jobs, edits


def plan_curvature(ctx: Context) -> FamilyPlan:
    """Exports ``kfac_factors`` (the main chain's factors: the pruning baselines' second moments)."""
    from memctl.curvature import settings as curvature_settings

    m, curv, base, data = ctx.model, ctx.config["curvature"], ctx.base, ctx.data
    n_layers = None if base.dims is None else base.dims.num_layers
    curvature_settings.check(curv)
    specs = curvature_settings.expand_edits(curv, n_layers)
    calibration = [calibration_windows(ctx, "kfac")]
    chains = [kfac_chain(ctx, calibration[0])]
    main = chains[0]
    spectrum_hash = settings_hash(main.eigen_hash, data.extract_hash, curv["spectrum"])
    spectrum = f"{main.eigen_dir}/spectrum-{spectrum_hash}/spectrum.parquet"
    planned = [(spec, main) for spec in specs]
    ablation = _ablation_specs(ctx, specs)
    if ablation:
        calibration.append(calibration_windows(ctx, "kfac", without_memories=True))
        chains.append(kfac_chain(ctx, calibration[1]))
        planned += [(spec, chains[1]) for spec in ablation]
    pattern = with_meta({"factors": f"{m.dir}/kfac-{{kfac}}/factors", "summary": f"{m.dir}/kfac-{{kfac}}/summary.parquet"})
    stages = [base.stage("collect_kfac", [j for c in chains for j in c.collect], wildcard="kfac", outputs=pattern,
                         directories=("factors",))]
    if any(c.merge for c in chains):
        stages.append(base.stage("merge_kfac", [j for c in chains for j in c.merge], wildcard="kfac",
                                 outputs={"factors": f"{m.dir}/kfac-{{kfac}}/factors",
                                          "summary": f"{m.dir}/kfac-{{kfac}}/summary.parquet"}, directories=("factors",)))
    stages.append(base.stage("decompose_kfac", [c.decompose for c in chains], wildcard="eigen",
                             outputs=with_meta({"eigen": f"{m.dir}/kfac-{{eigen}}/eigen",
                                                "summary": f"{m.dir}/kfac-{{eigen}}/summary.parquet"}),
                             directories=("eigen",)))
    jobs, edits = _apply_edits(ctx, planned)
    pattern = {"delta": f"{m.dir}/edits/{{curv_edit}}/delta.safetensors"}
    if curv["write_model_dir"]:
        pattern["model_dir"] = f"{m.dir}/edits/{{curv_edit}}/model"
    stages.append(base.stage("apply_edit", jobs, wildcard="curv_edit", outputs=pattern,
                             directories=("model_dir",) if curv["write_model_dir"] else ()))
    tables, eigen = data.tables, f"{main.eigen_dir}/eigen"
    stages.append(base.stage("kfac_spectrum", [Job(
        "kfac_spectrum", "",
        {**m.inputs, "eigen": eigen, "memorized": tables["memorized"], "nonmemorized": tables["nonmemorized"]},
        {"spectrum": spectrum},
        (*model_args(m), "--eigen", eigen, "--memorized", tables["memorized"],
         "--nonmemorized", tables["nonmemorized"], "--settings", as_json(curv["spectrum"]), "--out", spectrum),
        base.log("kfac_spectrum", spectrum_hash), base.bench("kfac_spectrum", spectrum_hash), curv["spectrum"],
    )]))
    report = {"markdown": "curvature.md", "sweep": "curvature_sweep.png", "sweep_svg": "curvature_sweep.svg",
              "table": "curvature_edits.parquet", "html": "curvature.html"}
    if curv["spectrum"]["enabled"]:
        report.update(spectrum="curvature_spectrum.png", spectrum_svg="curvature_spectrum.svg")
    report = {k: f"{base.results}/{v}" for k, v in report.items()}
    metrics = [data.metrics(e) for e in ["none", *(e.id for e in edits)]]
    scores = [path.replace("/metrics.parquet", "/scores.parquet") for path in metrics]
    deltas = [e.delta for e in edits]
    spectra = [spectrum] if curv["spectrum"]["enabled"] else []
    name = f"{data.eval_hash}-{spectrum_hash}"
    stages.append(base.stage("curvature_report", [Job(
        "curvature_report", "", {**m.inputs, "metrics": metrics, "scores": scores, "deltas": deltas,
                                 "spectrum": spectra, "memorized": tables["memorized_test"]},
        report,
        (*model_args(m), "--memorized", tables["memorized_test"], "--metrics", *metrics,
         "--scores", *scores, "--deltas", *deltas, *(("--spectrum", spectrum) if spectra else ()),
         "--settings", as_json(curv["report"]), "--out-dir", base.results),
        base.log("curvature_report", name), base.bench("curvature_report", name), curv["report"],
    )], shown={k: ("3. Curvature", f"{PurePosixPath(v).stem}.rst") for k, v in report.items()
               if v.endswith((".html", ".png"))}))
    targets = tuple(report.values()) if edits or curv["spectrum"]["enabled"] else ()
    return FamilyPlan(stages=tuple(stages), edits=tuple(edits), targets=targets, calibration=tuple(calibration),
                      exports={"kfac_factors": main.factors})
