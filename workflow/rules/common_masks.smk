# Settings, artifact paths and edit registration of the mask and pruning stages (rules: masks.smk).
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
    job_hash = settings_hash(MODEL_KEY, config["model"], config["resources"]["gpu"], upstream, job)
    edit = f"mask-{mode}-{job_hash}"
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
    if PRUNING["second_moments"] == "kfac" and "sequential" in PRUNING["forms"]:
        raise WorkflowError(
            f"pruning.second_moments: 'kfac' works with pruning.forms: [one_pass] only (the K-FAC factors "
            f"are the unpruned model's statistics; the sequential form needs those of the pruned blocks "
            f"below); got pruning.forms: {PRUNING['forms']}"
        )
    r = MASKS["sparsity"]
    for method in PRUNING["methods"]:
        for form in (["sequential"] if method == "magnitude" else PRUNING["forms"]):
            _add_baseline(method, form, r, "main")
    if BSN["enabled"]:
        bsn = {k: v for k, v in BSN.items() if k != "enabled"}
        retain_hash = EXTRACT_HASH if bsn["retain"] == "nonmemorized" else [EXTRACT_HASH, CALIBRATION_HASH]
        bsn_hash = settings_hash(MODEL_KEY, config["model"], config["resources"]["gpu"], retain_hash, bsn)
        bsn_id = f"bsn-{bsn_hash}"
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
                form = "sequential" if method == "magnitude" else PRUNING["forms"][0]
                _add_baseline(method, form, s, "sparsity", f"{BASELINE_LABELS[method]}, sparsity {s:.2f}")
    for t in sweep["thresholds"]:
        _add_mask("down", r, t, "threshold", f"Ours (down), t={t:g}")
    if sweep["thresholds"]:
        _add_mask("down", r, MASKS["threshold"], "threshold")

MASKS_REPORT_SPEC = {"title": f"Masks and pruning baselines at sparsity {MASKS['sparsity']:g}",
                     "edits": list(MASKS_SPEC.values())}
MASKS_REPORT_HASH = settings_hash(EVAL_HASH, MASKS_REPORT_SPEC)
MASKS_RESULTS = f"{RESULTS}/masks"
MASKS_REPORT_OUTPUTS = [f"{MASKS_RESULTS}/table.md", f"{MASKS_RESULTS}/table.parquet", f"{MASKS_RESULTS}/table.html"]
for _table in ("sparsity", "threshold"):
    if any(_table in e["tables"] for e in MASKS_SPEC.values()):
        MASKS_REPORT_OUTPUTS += [f"{MASKS_RESULTS}/ablation_{_table}.{ext}" for ext in ("md", "parquet", "png")]
MASKS_REPORT_DECLARED = shown_in_report(MASKS_REPORT_OUTPUTS, "Masks and pruning", caption_prefix="masks_")
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
