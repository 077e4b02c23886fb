# Pruning masks that suppress or amplify memorization (the weight-pruning paper), the pruning
# baselines (magnitude, Wanda, SparseGPT) and BalancedSubnet; see docs/masks.md.
#
# Every result is an edit: register_edit() hands its delta to the evaluate rule, and masks_report
# turns the metrics into the paper-style tables and the ablation plots under {RESULTS}/masks/.
# An edit id carries the hash of exactly the settings (and upstream hashes) its job used, so a
# changed threshold reruns only the down-mode jobs, a changed sweep list only the added points.


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
        MASKS_REPORT_DECLARED,
    params:
        code=stage_code("masks_report"),
        spec=as_json(MASKS_REPORT_SPEC),
        out_dir=parent_dir,
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
