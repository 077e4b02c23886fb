# Pruning masks that suppress or amplify memorization (the weight-pruning paper), the pruning
# baselines (magnitude, Wanda, SparseGPT) and BalancedSubnet; see docs/masks.md.
#
# Every result is an edit: register_edit() hands its delta to the evaluate rule, and masks_report
# turns the metrics into the paper-style tables and the ablation plots under {RESULTS}/masks/.
# An edit id carries the hash of exactly the settings (and upstream hashes) its job used, so a
# changed threshold reruns only the down-mode jobs, a changed sweep list only the added points.

MASKS = config["masks"]
PRUNING = config["pruning"]
BSN = PRUNING["balanced_subnet"]
MEMORIZED_TRAIN = f"{EXTRACT_DIR}/memorized_train.parquet"
MASK_MODE_LABELS = {
    "none": "Ours (none)",
    "up": "Ours (up)",
    "down": "Ours (down)",
    "reciprocal": "Ours (reciprocal)",
}
BASELINE_LABELS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
# The curvature stage's K-FAC factors directory (pruning.second_moments: kfac): its A factors are
# the layer-input second moments Wanda and SparseGPT need, from the unpruned model (one-pass form).
KFAC_FACTORS = f"{KFAC_DIR}/factors" if "KFAC_DIR" in globals() else None

MASK_JOBS = {}  # edit id -> train-mask settings
PRUNE_JOBS = {}  # edit id -> prune settings
BSN_JOBS = {}  # edit id -> balanced-subnet settings
MASKS_SPEC = {"none": {"edit": "none", "series": "Origin", "family": "origin", "delta": None, "tables": ["main"]}}


def _edit_delta(edit):
    return f"{MODEL_DIR}/edits/{edit}/delta.safetensors"


def _add_edit(jobs, edit, job, label, series, table, **info):
    """Register an edit once (the first, main-table label wins); list every table it appears in."""
    if edit not in MASKS_SPEC:
        register_edit(edit, label, _edit_delta(edit))
        jobs[edit] = job
        MASKS_SPEC[edit] = dict(edit=edit, series=series, delta=_edit_delta(edit), tables=[], **info)
    if table not in MASKS_SPEC[edit]["tables"]:
        MASKS_SPEC[edit]["tables"].append(table)


def _add_mask(mode, sparsity, threshold, table, label=None):
    job = {k: v for k, v in MASKS.items() if k not in ("enabled", "modes", "sweep", "lambda_s", "threshold")}
    job.update(mode=mode, sparsity=sparsity, lambda_s=MASKS["lambda_s"][mode])
    if mode == "down":
        job["threshold"] = threshold
    upstream = [CALIBRATION_HASH, EXTRACT_HASH if mode != "none" else None]
    edit = f"mask-{mode}-" + settings_hash(MODEL_KEY, config["model"], config["resources"]["gpu"], upstream, job)
    series = MASK_MODE_LABELS[mode]
    _add_edit(MASK_JOBS, edit, job, label or series, series, table, family="ours", mode=mode, sparsity=sparsity,
              threshold=threshold if mode == "down" else None)


def _add_baseline(method, form, sparsity, table, label=None):
    job = {"method": method, "sparsity": sparsity, "groups": PRUNING["groups"]}
    if method != "magnitude":
        keys = ["calibration_windows", "batch_size", "second_moments"]
        keys += ["damp", "block_size"] if method == "sparsegpt" else []
        job.update({k: PRUNING[k] for k in keys}, form=form)
    kfac = job.get("second_moments") == "kfac"
    upstream = [] if method == "magnitude" else [KFAC_FACTORS if kfac else CALIBRATION_HASH]
    h = settings_hash(MODEL_KEY, config["model"], config["resources"]["gpu"], upstream, job)
    tag = "-onepass" if form == "one_pass" and method != "magnitude" else ""
    series = BASELINE_LABELS[method] + (" (one-pass)" if tag else "")
    _add_edit(PRUNE_JOBS, f"{method}{tag}-{h}", job, label or series, series, table, family="baseline",
              method=method, form=form if method != "magnitude" else "none", sparsity=sparsity)


if MASKS["enabled"]:
    if PRUNING["second_moments"] == "kfac" and not KFAC_FACTORS:
        raise WorkflowError(
            "pruning.second_moments: 'kfac' needs the curvature stage's factors (KFAC_DIR), "
            "which this workflow does not define"
        )
    r = MASKS["sparsity"]
    for method in PRUNING["methods"]:
        for form in (["sequential"] if method == "magnitude" else PRUNING["forms"]):
            _add_baseline(method, form, r, "main")
    if BSN["enabled"]:
        bsn = {k: v for k, v in BSN.items() if k != "enabled"}
        retain_hash = EXTRACT_HASH if bsn["retain"] == "nonmemorized" else [EXTRACT_HASH, CALIBRATION_HASH]
        bsn_id = "bsn-" + settings_hash(MODEL_KEY, config["model"], config["resources"]["gpu"], retain_hash, bsn)
        _add_edit(BSN_JOBS, bsn_id, bsn, "BalancedSubnet", "BalancedSubnet", "main", family="baseline",
                  method="balanced_subnet", sparsity=bsn["ratio"])
    for mode in MASKS["modes"]:
        _add_mask(mode, r, MASKS["threshold"], "main")
    sweep = MASKS["sweep"]
    for s in sweep["sparsities"]:
        for mode in sweep["sparsity_modes"]:
            _add_mask(mode, s, MASKS["threshold"], "sparsity", f"{MASK_MODE_LABELS[mode]}, sparsity {s:.2f}")
        if sweep["baselines"]:
            for method in PRUNING["methods"]:
                _add_baseline(method, "sequential", s, "sparsity", f"{BASELINE_LABELS[method]}, sparsity {s:.2f}")
    for t in sweep["thresholds"]:
        _add_mask("down", r, t, "threshold", f"Ours (down), t={t:g}")
    if sweep["thresholds"]:
        _add_mask("down", r, MASKS["threshold"], "threshold")

MASKS_REPORT_SPEC = {"title": f"Masks and pruning baselines at sparsity {MASKS['sparsity']:g}",
                     "edits": list(MASKS_SPEC.values())}
MASKS_REPORT_HASH = settings_hash(EVAL_HASH, MASKS_REPORT_SPEC)
MASKS_RESULTS = f"{RESULTS}/masks"
MASKS_REPORT_OUTPUTS = [f"{MASKS_RESULTS}/table.md", f"{MASKS_RESULTS}/table.parquet"]
for _table in ("sparsity", "threshold"):
    if any(_table in e["tables"] for e in MASKS_SPEC.values()):
        MASKS_REPORT_OUTPUTS += [f"{MASKS_RESULTS}/ablation_{_table}.{ext}" for ext in ("md", "parquet", "png")]
if MASKS["enabled"]:
    EXTRA_OUTPUTS.extend(MASKS_REPORT_OUTPUTS)


def _edit_pattern(jobs):
    return "|".join(re.escape(e) for e in jobs) or "(?!x)x"


def _mask_inputs(wildcards):
    """Calibration windows always; the memorized training split for the modes that use it."""
    inputs = {"calibration": CALIBRATION}
    if MASK_JOBS[wildcards.edit]["mode"] != "none":
        inputs["memorized"] = MEMORIZED_TRAIN
    return inputs


def _prune_inputs(wildcards):
    job = PRUNE_JOBS[wildcards.edit]
    if job["method"] == "magnitude":
        return {}
    if job.get("second_moments") == "kfac":
        return {"factors": KFAC_FACTORS}
    return {"calibration": CALIBRATION}


def _optional_args(wildcards, input):
    """``--name path`` for each optional input the job has (memorized / calibration / factors)."""
    names = [n for n in ("memorized", "calibration", "factors") if n in input.keys()]
    return " ".join(f"--{n} {getattr(input, n)}" for n in names)


rule train_mask:
    input:
        unpack(model_inputs),
        unpack(_mask_inputs),
    output:
        delta=f"{MODEL_DIR}/edits/{{edit}}/delta.safetensors",
        log=f"{MODEL_DIR}/edits/{{edit}}/train_log.parquet",
    params:
        code=stage_code("train_mask"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=lambda wildcards: as_json(MASK_JOBS[wildcards.edit]),
        label=lambda wildcards: EDITS[wildcards.edit],
        data=_optional_args,
    wildcard_constraints:
        edit=_edit_pattern(MASK_JOBS),
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/train_mask/{{edit}}.log",
    benchmark:
        f"{ROOT}/benchmarks/train_mask/{{edit}}.tsv"
    resources:
        mem_mb=mem_mb(8000, "train_mask"),
        runtime=runtime_min(240, "train_mask"),
        gpu=GPU,
    shell:
        "memctl train-mask --model {params.model:q} --model-settings {params.model_settings:q} --threads {threads}"
        " {params.data} --settings {params.settings:q} --label {params.label:q} --out {output.delta}"
        " --log {output.log} > {log} 2>&1"


rule prune_baseline:
    input:
        unpack(model_inputs),
        unpack(_prune_inputs),
    output:
        delta=f"{MODEL_DIR}/edits/{{edit}}/delta.safetensors",
    params:
        code=stage_code("prune_baseline"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=lambda wildcards: as_json(PRUNE_JOBS[wildcards.edit]),
        label=lambda wildcards: EDITS[wildcards.edit],
        data=_optional_args,
    wildcard_constraints:
        edit=_edit_pattern(PRUNE_JOBS),
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/prune_baseline/{{edit}}.log",
    benchmark:
        f"{ROOT}/benchmarks/prune_baseline/{{edit}}.tsv"
    resources:
        mem_mb=mem_mb(8000, "prune_baseline"),
        runtime=runtime_min(60, "prune_baseline"),
        gpu=GPU,
    shell:
        "memctl prune --model {params.model:q} --model-settings {params.model_settings:q} --threads {threads}"
        " {params.data} --settings {params.settings:q} --label {params.label:q} --out {output.delta} > {log} 2>&1"


rule balanced_subnet:
    input:
        unpack(model_inputs),
        forget=MEMORIZED_TRAIN,
        retain=f"{EXTRACT_DIR}/nonmemorized.parquet" if BSN["retain"] == "nonmemorized" else CALIBRATION,
    output:
        delta=f"{MODEL_DIR}/edits/{{edit}}/delta.safetensors",
        log=f"{MODEL_DIR}/edits/{{edit}}/train_log.parquet",
    params:
        code=stage_code("balanced_subnet"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=lambda wildcards: as_json(BSN_JOBS[wildcards.edit]),
        label=lambda wildcards: EDITS[wildcards.edit],
    wildcard_constraints:
        edit=_edit_pattern(BSN_JOBS),
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/balanced_subnet/{{edit}}.log",
    benchmark:
        f"{ROOT}/benchmarks/balanced_subnet/{{edit}}.tsv"
    resources:
        mem_mb=mem_mb(8000, "balanced_subnet"),
        runtime=runtime_min(120, "balanced_subnet"),
        gpu=GPU,
    shell:
        "memctl balanced-subnet --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} --forget {input.forget} --retain {input.retain} --settings {params.settings:q}"
        " --label {params.label:q} --out {output.delta} --log {output.log} > {log} 2>&1"


rule masks_report:
    input:
        metrics=[f"{EVAL_DIR}/{edit}/metrics.parquet" for edit in MASKS_SPEC],
        deltas=[e["delta"] for e in MASKS_SPEC.values() if e["delta"]],
    output:
        MASKS_REPORT_OUTPUTS,
    params:
        code=stage_code("masks_report"),
        spec=as_json(MASKS_REPORT_SPEC),
        out_dir=MASKS_RESULTS,
    conda:
        ENV
    log:
        f"{ROOT}/logs/masks_report/{MASKS_REPORT_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/masks_report/{MASKS_REPORT_HASH}.tsv"
    resources:
        mem_mb=mem_mb(4000, "masks_report"),
        runtime=runtime_min(10, "masks_report"),
    shell:
        "memctl masks-report --metrics {input.metrics} --spec {params.spec:q} --out-dir {params.out_dir}"
        " > {log} 2>&1"
