"""The data family: the embedded demo (corpus, tokenizer, pretrained model), the model under
study, its text stages (candidates, extract, heldout, reference_topk) and, once the consumers have
asked for them, the calibration texts (:func:`plan_calibration`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from memctl.config import ConfigError, resolve_bf16, settings_hash
from memctl.planning.context import Base, Calibration, Context, Corpus, Data, FamilyPlan
from memctl.planning.core import (CORPUS_TABLES, EXTRACT_TABLES, SAFE_TAG, Job, Model, StagePlan, as_json, model_args,
                                  split_runtime)


def _demo(base: Base) -> tuple[list[StagePlan], Corpus, str, str]:
    """demo_corpus, demo_tokenizer, demo_pretrain; (stages, corpus, model dir, model hash)."""
    demo = base.config["demo"]
    corpus_hash = settings_hash(base.python_version, demo["corpus"], demo["canaries"])
    tokenizer_hash = settings_hash(corpus_hash, demo["tokenizer"])
    # bf16 `auto` resolved here: a model trained in bf16 and one in fp32 are different artifacts
    train = {**demo["train"], "bf16": resolve_bf16(demo["train"]["bf16"], bool(base.gpu))}
    model_hash = settings_hash(tokenizer_hash, demo["architecture"], train, base.gpu)
    corpus = f"{base.root}/demo/corpus-{corpus_hash}"
    tokenizer = f"{base.root}/demo/tokenizer-{tokenizer_hash}"
    model = f"{base.root}/demo/model-{model_hash}"
    files = {f"corpus_{t}": f"{corpus}/{t}.parquet" for t in CORPUS_TABLES}
    h = corpus_hash
    stages = [base.stage("demo_corpus", [Job(
        "demo_corpus", "", {}, {t: f"{corpus}/{t}.parquet" for t in CORPUS_TABLES},
        ("--settings", as_json(demo["corpus"]), "--canary-settings", as_json(demo["canaries"]), "--out-dir", corpus),
        base.log("demo_corpus", h), base.bench("demo_corpus", h), {"corpus": demo["corpus"], "canaries": demo["canaries"]},
    )])]
    h = tokenizer_hash
    stages.append(base.stage("demo_tokenizer", [Job(
        "demo_tokenizer", "", {"train": files["corpus_train"]}, {"tokenizer": tokenizer},
        ("--corpus", corpus, "--settings", as_json(demo["tokenizer"]), "--out", tokenizer),
        base.log("demo_tokenizer", h), base.bench("demo_tokenizer", h), demo["tokenizer"],
    )], directories=("tokenizer",)))
    h = model_hash
    stages.append(base.stage("demo_pretrain", [Job(
        "demo_pretrain", "", {"train": files["corpus_train"], "tokenizer": tokenizer},
        {"model": model, "model_meta": f"{model}.meta.json"},
        ("--corpus", corpus, "--tokenizer", tokenizer, "--arch-settings", as_json(demo["architecture"]),
         "--settings", as_json(train), "--out", model),
        base.log("demo_pretrain", h), base.bench("demo_pretrain", h),
        {"architecture": demo["architecture"], "train": train},
    )], directories=("model",)))
    return stages, Corpus(corpus, files), model, model_hash


def _model_under_study(base: Base, demo_dir: str, demo_hash: str) -> Model:
    cfg = base.config
    model = cfg["model"]
    if model["source"] == "demo":
        tag = model.get("tag") or f"demo-{demo_hash}"
        ref, key, inputs = demo_dir, demo_hash, {"model": demo_dir}
    else:
        from memctl.models import model_tag

        tag = model_tag(model)
        ref = str(model["name_or_path"])
        key = settings_hash(ref, model["revision"])
        inputs = {"model": ref} if model["source"] == "local" else {}
    if not SAFE_TAG.fullmatch(tag) or set(tag) == {"."}:
        raise ConfigError(f"model.tag: {tag!r} is not a path-safe name (letters, digits, '.', '_', '-'; "
                          f"starting with a letter or digit; '@' only before a revision)")
    from memctl.config import check_model_fit

    check_model_fit(cfg, base.dims)  # extraction window vs context, npy ids vs vocabulary
    from memctl.models import check_placement

    check_placement(model)  # device_map / max_memory
    settings = dict(model, tag=tag)
    if base.gpu and settings.get("device", "auto") == "auto" and not cfg["resources"].get("allow_cpu_fallback"):
        settings["device"] = "cuda"  # asked for a GPU: a job that gets none fails instead of running on the CPU
    return Model(model["source"], tag, ref, key, f"{base.root}/{tag}", settings, inputs)


def _text_stages(base: Base, m: Model, corpus: Corpus) -> tuple[list[StagePlan], Data]:
    """candidates, extract, heldout, reference_topk."""
    cfg, gpu = base.config, base.gpu
    ext = cfg["extract"]
    lengths = {"prefix_len": ext["prefix_len"], "suffix_len": ext["suffix_len"]}
    cand = dict(cfg["candidates"], **lengths)
    candidates_hash = settings_hash(m.key, cand)
    path = f"{m.dir}/candidates-{candidates_hash}/candidates.parquet"
    stages = [base.stage("candidates", [Job(
        "candidates", "", {**m.inputs, **corpus.inputs(cfg, "candidates")}, {"candidates": path},
        (*model_args(m), *corpus.args(cfg, "candidates"), "--settings", as_json(cfg["candidates"]),
         "--extract-settings", as_json(lengths), "--out", path),
        base.log("candidates", candidates_hash), base.bench("candidates", candidates_hash), cand,
    )])]
    # GPU and CPU kernels round differently (borderline sequences can flip): the device is in the key.
    ext, ext_runtime = split_runtime("extract", ext)
    extract_hash = settings_hash(candidates_hash, cfg["model"], ext, gpu)
    extract_dir = f"{m.dir}/extract-{extract_hash}"
    tables = {t: f"{extract_dir}/{t}.parquet" for t in EXTRACT_TABLES}
    outputs = {**tables, **{f"{t}_meta": f"{p}.meta.json" for t, p in tables.items()}}
    stages.append(base.stage("extract", [Job(
        "extract", "", {**m.inputs, "candidates": path}, outputs,
        (*model_args(m), "--candidates", path, "--settings", as_json(ext), "--out-dir", extract_dir),
        base.log("extract", extract_hash), None, ext, runtime=ext_runtime,
    )]))
    # CSP puts its prompt vectors in front of every input: held-out windows leave room for them,
    # so that every row (CSP's too) scores the same tokens within the model's context
    reserve = int(cfg["csp"]["prompt_length"]) if cfg["masks"]["enabled"] and cfg["csp"]["enabled"] else 0
    heldout_hash = settings_hash(m.key, cfg["heldout"], *([{"reserve_positions": reserve}] if reserve else []))
    heldout = f"{m.dir}/heldout-{heldout_hash}/windows.safetensors"
    stages.append(base.stage("heldout", [Job(
        "heldout", "", {**m.inputs, **corpus.inputs(cfg, "heldout")}, {"windows": heldout},
        (*model_args(m), *corpus.args(cfg, "heldout"), "--settings", as_json(cfg["heldout"]),
         *(("--reserve-positions", str(reserve)) if reserve else ()), "--out", heldout),
        base.log("heldout", heldout_hash), base.bench("heldout", heldout_hash), cfg["heldout"],
    )]))
    ev, ev_runtime = split_runtime("evaluate", cfg["evaluate"])
    # only what the reference depends on: the held-out windows it scores
    ref_settings = {"ndcg_windows": ev["ndcg_windows"], "ndcg_sequences": ev["ndcg_sequences"]}
    h = settings_hash(heldout_hash, extract_hash, cfg["model"], ref_settings, gpu)
    reference = f"{m.dir}/reference-{h}/top10.safetensors"
    er_test = tables["er_test"]
    stages.append(base.stage("reference_topk", [Job(
        "reference_topk", "", {**m.inputs, "heldout": heldout, "sequences": er_test}, {"topk": reference},
        (*model_args(m), "--heldout", heldout, "--sequences", er_test, "--settings", as_json(ref_settings),
         "--out", reference),
        base.log("reference_topk", h), base.bench("reference_topk", h), ref_settings, runtime=dict(ev_runtime),
    )]))
    eval_hash = settings_hash(extract_hash, heldout_hash, cfg["model"], ev, gpu)
    # every sequence an evaluation or validation split scores (the validation slice too, like the
    # test sequences it stands in for)
    evaluated = (tables["memorized_test"], tables["memorized_val"], tables["er_test"], tables["ood"])
    data = Data(corpus, path, extract_hash, tables, evaluated, int(ext["disjoint_ngram"]), heldout, reference, ev,
                ev_runtime, eval_hash, f"{m.dir}/eval-{eval_hash}")
    return stages, data


def plan_data(ctx: Context) -> FamilyPlan:
    """The demo's stages, the model under study and its text stages; exports ``model`` and ``data``."""
    demo_stages, corpus, demo_dir, demo_hash = _demo(ctx.base)
    model = _model_under_study(ctx.base, demo_dir, demo_hash)
    text_stages, data = _text_stages(ctx.base, model, corpus)
    return FamilyPlan(stages=(*demo_stages, *text_stages), exports={"model": model, "data": data})


def calibration_windows(ctx: Context, consumer: str, without_memories: bool = False) -> Calibration:
    """The calibration text that ``consumer`` reads: ``kfac`` (the factors) or ``masks`` (mask
    training, Wanda / SparseGPT, BalancedSubnet's retain set), and the ``calibration`` job that
    writes it (the stage is keyed by its hash: one job per distinct setting). With
    ``calibration.source: demo`` each consumer's ``calibration.demo_text`` (``stream``: the
    training stream, canaries included, as the loss-curvature paper's factors; ``documents``: no
    canaries, as the weight-pruning paper's C4); any other source is one text for both. Windows
    sharing ``extract.disjoint_ngram`` tokens with an evaluated sequence are dropped; with
    ``without_memories`` (the curvature ablation) the demo's documents are read and windows
    sharing a run with any memorized sequence are dropped too. The consumer's family returns it in
    its :attr:`FamilyPlan.calibration`."""
    cfg, m, data = ctx.config, ctx.model, ctx.data
    settings = {k: v for k, v in cfg["calibration"].items() if k != "demo_text"}
    demo = settings["source"] == "demo"
    text = ("documents" if without_memories else cfg["calibration"]["demo_text"][consumer]) if demo else None
    n = data.disjoint_ngram
    exclude = [*data.evaluated, *([data.tables["memorized"]] if without_memories else [])] if n > 0 else []
    # the held-out perplexity must not be measured on text the edits were fitted on
    heldout = data.heldout if same_text(cfg["heldout"], cfg["calibration"]) else None
    if heldout and n == 0:
        raise ConfigError(f"calibration: reads the same text as heldout ({text_source(cfg['heldout'])}), and with "
                          "extract.disjoint_ngram 0 nothing keeps the held-out windows out of the calibration windows; "
                          "set extract.disjoint_ngram (default 16) or give calibration other text")
    h = settings_hash(m.key, settings, *([{"demo_text": text}] if demo else []),
                      *([data.extract_hash, n, [PurePosixPath(p).stem for p in exclude]] if exclude else []),
                      *([{"heldout_windows": PurePosixPath(heldout).parent.name, "disjoint_ngram": n}] if heldout else []))
    out = f"{m.dir}/calibration-{h}/windows.safetensors"
    extra = ("--exclude", *exclude) if exclude else ()
    extra += ("--heldout-windows", heldout) if heldout else ()
    extra += ("--disjoint-ngram", str(n)) if exclude or heldout else ()
    extra += ("--demo-text", text) if demo else ()
    job = Job(
        "calibration", h,
        {**m.inputs, **data.corpus.inputs(cfg, "calibration"), **({"exclude": exclude} if exclude else {}),
         **({"heldout_windows": heldout} if heldout else {})},
        {"windows": out},
        (*model_args(m), *data.corpus.args(cfg, "calibration"), "--settings", as_json(settings), *extra, "--out", out),
        ctx.base.log("calibration", h), ctx.base.bench("calibration", h),
        dict(settings, **({"demo_text": text} if demo else {}), exclude=[PurePosixPath(p).stem for p in exclude],
             **({"heldout_windows": PurePosixPath(heldout).parent.name} if heldout else {})),
    )
    return Calibration(consumer, without_memories, out, h, job)


#: The keys that say which text a text section (``heldout``, ``calibration``) reads, per source (the
#: others keep their schema defaults, which differ between the two sections).
TEXT_IDENTITY = {"text": ("path",), "jsonl": ("path", "text_column"), "parquet": ("path", "text_column"),
                 "hf": ("hf_name", "hf_config", "hf_split", "hf_revision", "text_column")}


def same_text(heldout: Mapping[str, Any], calibration: Mapping[str, Any]) -> bool:
    """Whether the held-out and calibration sections read the same text (not ``demo``: its held-out
    documents and its training text are different tables). Then the calibration windows must drop
    the held-out ones, or the masks and pruning baselines are fitted on the text the held-out
    perplexity is measured on (``memctl init`` without ``--calibration`` writes such a config)."""
    source = heldout["source"]
    if source not in TEXT_IDENTITY or calibration["source"] != source:
        return False

    def key(section: Mapping[str, Any]) -> tuple:
        values = {k: section.get(k) for k in TEXT_IDENTITY[source]}
        if values.get("path"):
            values["path"] = os.path.realpath(str(values["path"]))
        if "text_column" in values:
            values["text_column"] = values["text_column"] or "text"
        return tuple(values.items())

    return key(heldout) == key(calibration)


def text_source(section: Mapping[str, Any]) -> str:
    """A text section's source in words (an error message's)."""
    if section.get("path"):
        return f"{section['source']} {section['path']}"
    if section.get("hf_name"):
        return f"hf {section['hf_name']} {section.get('hf_config') or ''} {section.get('hf_split') or ''}".strip()
    return str(section["source"])


def calibration_used(ctx: Context) -> dict[str, str]:
    """Consumer -> the windows it reads (the first asked for; the curvature ablation's text aside)."""
    used: dict[str, str] = {}
    for c in ctx.calibration:
        if not c.without_memories:
            used.setdefault(c.consumer, c.path)
    return used


def plan_calibration(ctx: Context) -> FamilyPlan:
    """The ``calibration`` jobs the consumers (curvature, masks) asked for, in the order they asked."""
    jobs: dict[str, Job] = {}
    for c in ctx.calibration:  # one job per hash (the same settings: the same job)
        jobs.setdefault(c.hash, c.job)
    return FamilyPlan(stages=(ctx.base.stage(
        "calibration", list(jobs.values()), wildcard="calib",
        outputs={"windows": f"{ctx.model.dir}/calibration-{{calib}}/windows.safetensors"}),))
