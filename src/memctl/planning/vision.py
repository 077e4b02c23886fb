"""The vision family (:mod:`memctl.vision`, docs/vision.md): noised-label images, a ViT trained
on them, its K-FAC factors and eigenbases, edits per method, one evaluation of every edit, the band
analysis and the vision report; with ``vision.only`` its report is the only target."""

from __future__ import annotations

from pathlib import PurePosixPath

from memctl.config import ConfigError, settings_hash
from memctl.planning.context import Context, FamilyPlan
from memctl.planning.core import Job, StagePlan, as_json


def plan_vision(ctx: Context) -> FamilyPlan:
    """The vision track (:mod:`memctl.vision`, docs/vision.md), planned when ``vision.enabled``:
    data -> ViT -> K-FAC factors and eigenbases -> edits per method -> one evaluation of every
    edit -> band analysis -> report. With ``vision.only``, ``rule all`` asks for it alone."""
    base, vis = ctx.base, ctx.config["vision"]
    if not vis["enabled"]:
        if vis["only"]:
            raise ConfigError("vision.only: true needs vision.enabled: true")
        return FamilyPlan()
    missing = sorted(set(vis["edits"]["methods"]) - {m for m, v in vis["edits"]["strengths"].items() if v})
    if missing:
        raise ConfigError(f"vision.edits.strengths: no values for the methods {missing} of vision.edits.methods")
    if any(m != "svd" for m in vis["edits"]["methods"]) and set(vis["edits"]["roles"]) - set(vis["kfac"]["roles"]):
        raise ConfigError(f"vision.edits.roles {vis['edits']['roles']}: K-FAC edits need factors of these roles; "
                          f"vision.kfac.roles collects {vis['kfac']['roles']}")
    if vis["spectrum"]["enabled"] and set(vis["spectrum"]["roles"]) - set(vis["kfac"]["roles"]):
        raise ConfigError(f"vision.spectrum.roles {vis['spectrum']['roles']}: not in vision.kfac.roles "
                          f"{vis['kfac']['roles']}")
    if vis["data"]["source"] == "imagefolder" and not vis["data"]["path"]:
        raise ConfigError("vision.data.path: required when vision.data.source is 'imagefolder'")
    stages: list[StagePlan] = []
    add = lambda *args, **kw: stages.append(base.stage(*args, **kw))
    root, device = f"{base.root}/vision", "cuda" if base.gpu else "cpu"
    h = settings_hash(vis["data"])
    data = f"{root}/data-{h}"
    source = {"images": vis["data"]["path"]} if vis["data"]["source"] == "imagefolder" else {}
    add("vision_data", [Job(
        "vision_data", "", source, {"data": data}, ("--settings", as_json(vis["data"]), "--out-dir", data),
        base.log("vision_data", h), base.bench("vision_data", h), vis["data"],
    )], directories=("data",))
    train_settings = {"model": vis["model"], "train": vis["train"]}
    train_hash = settings_hash(h, train_settings, base.gpu)
    train = f"{root}/vit-{train_hash}"
    model = f"{train}/model"
    add("vision_train", [Job(
        "vision_train", "", {"data": data}, {"model": model, "log": f"{train}/train_log.parquet"},
        ("--data", data, "--settings", as_json(train_settings), "--device", device, "--out-dir", train),
        base.log("vision_train", train_hash), base.bench("vision_train", train_hash), train_settings,
    )], directories=("model",))
    kfac_hash = settings_hash(train_hash, vis["kfac"])
    kfac = f"{train}/kfac-{kfac_hash}"
    add("vision_kfac", [Job(
        "vision_kfac", "", {"model": model, "data": data},
        {"factors": f"{kfac}/factors", "eigen": f"{kfac}/eigen", "summary": f"{kfac}/summary.parquet"},
        ("--model", model, "--data", data, "--settings", as_json(vis["kfac"]), "--device", device, "--out-dir", kfac),
        base.log("vision_kfac", kfac_hash), base.bench("vision_kfac", kfac_hash), vis["kfac"],
    )], directories=("factors", "eigen"))
    edit_settings = {k: v for k, v in vis["edits"].items() if k != "methods"}
    jobs = []
    for method in vis["edits"]["methods"]:
        svd = method == "svd"
        key = f"{method.replace('_', '-')}-{settings_hash(train_hash if svd else kfac_hash, edit_settings, method)}"
        out = f"{train}/edits-{key}"
        eigen = {} if svd else {"eigen": f"{kfac}/eigen"}
        jobs.append(Job(
            "vision_edit", key, {"model": model, **eigen}, {"deltas": f"{out}/deltas", "table": f"{out}/edits.parquet"},
            ("--model", model, *(("--eigen", eigen["eigen"]) if eigen else ()), "--method", method,
             "--settings", as_json(edit_settings), "--out-dir", out),
            base.log("vision_edit", key), base.bench("vision_edit", key), dict(edit_settings, method=method),
        ))
    add("vision_edit", jobs, wildcard="vision_edits",
             outputs={"deltas": f"{train}/edits-{{vision_edits}}/deltas",
                      "table": f"{train}/edits-{{vision_edits}}/edits.parquet"},
             directories=("deltas",))
    edit_dirs = [f"{train}/edits-{j.key}" for j in jobs]
    eval_hash = settings_hash(h, [j.key for j in jobs], vis["evaluate"])
    metrics = f"{train}/eval-{eval_hash}/metrics.parquet"
    add("vision_evaluate", [Job(
        "vision_evaluate", "", {"model": model, "data": data, "edits": [f"{d}/edits.parquet" for d in edit_dirs],
                                "deltas": [f"{d}/deltas" for d in edit_dirs]},
        {"metrics": metrics},
        ("--model", model, "--data", data, "--edits", *edit_dirs, "--settings", as_json(vis["evaluate"]),
         "--device", device, "--out", metrics),
        base.log("vision_evaluate", eval_hash), base.bench("vision_evaluate", eval_hash), vis["evaluate"],
    )])
    spectrum_hash = settings_hash(kfac_hash, vis["spectrum"])
    spectrum = f"{kfac}/spectrum-{spectrum_hash}/spectrum.parquet"
    add("vision_spectrum", [Job(
        "vision_spectrum", "", {"model": model, "data": data, "eigen": f"{kfac}/eigen"}, {"spectrum": spectrum},
        ("--model", model, "--data", data, "--eigen", f"{kfac}/eigen", "--settings", as_json(vis["spectrum"]),
         "--device", device, "--out", spectrum),
        base.log("vision_spectrum", spectrum_hash), base.bench("vision_spectrum", spectrum_hash), vis["spectrum"],
    )])
    with_spectrum = bool(vis["spectrum"]["enabled"])
    out = f"{base.results}/vision"
    report = {"markdown": "vision.md", "html": "vision.html", "table": "vision_edits.parquet",
              "best": "vision_best.parquet", "blocks": "vision_blocks.png", "blocks_svg": "vision_blocks.svg"}
    if with_spectrum:
        report.update(spectrum="vision_spectrum.png", spectrum_svg="vision_spectrum.svg")
    report = {k: f"{out}/{v}" for k, v in report.items()}
    name = settings_hash(eval_hash, spectrum_hash if with_spectrum else None, vis["report"])
    add("vision_report", [Job(
        "vision_report", "", {"metrics": metrics, "data": data, "model": model, "log": f"{train}/train_log.parquet",
                              "summary": f"{kfac}/summary.parquet", **({"spectrum": spectrum} if with_spectrum else {})},
        report,
        ("--metrics", metrics, *(("--spectrum", spectrum) if with_spectrum else ()), "--data", data,
         "--train-dir", train, "--kfac-summary", f"{kfac}/summary.parquet", "--settings", as_json(vis["report"]),
         "--out-dir", out),
        base.log("vision_report", name), base.bench("vision_report", name), vis["report"],
    )], shown={k: ("6. Vision", f"{PurePosixPath(v).stem}.rst") for k, v in report.items()
               if v.endswith((".html", ".png"))})
    return FamilyPlan(stages=tuple(stages), targets=tuple(report.values()), targets_at="only" if vis["only"] else "end")
