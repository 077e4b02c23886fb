# Curvature edits (the loss-curvature paper): K-FAC factors over the calibration windows, collected
# once and decomposed once; every edit (explicit or from a sweep) is one branch
# apply_edit -> evaluate; a spectrum analysis and a report close the stage.
#
#   {MODEL_DIR}/kfac-<h>/factors/ + summary.parquet                 collect_kfac (or shards + merge)
#   {MODEL_DIR}/kfac-<h>/eigen-<h>/eigen/ + summary.parquet         decompose_kfac
#   {MODEL_DIR}/kfac-<h>/eigen-<h>/spectrum-<h>/spectrum.parquet    kfac_spectrum
#   {MODEL_DIR}/edits/<edit id>/delta.safetensors                   apply_edit (evaluated by `evaluate`)
#   {RESULTS}/curvature.md, curvature_sweep.png, curvature_edits.parquet, curvature_spectrum.png


wildcard_constraints:
    shard=r"\d+",


rule collect_kfac:
    input:
        unpack(model_inputs),
        windows=CALIBRATION,
    output:
        **with_sidecars(
            {
                "factors": directory(
                    f"{KFAC_DIR}/factors" if CURV_SHARDS == 1 else f"{KFAC_DIR}/shards/{{shard}}/factors"
                ),
                "summary": f"{KFAC_DIR}/summary.parquet"
                if CURV_SHARDS == 1
                else f"{KFAC_DIR}/shards/{{shard}}/summary.parquet",
            }
        ),
    params:
        code=stage_code("collect_kfac"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(CURV_COLLECT_SETTINGS),
        shard=lambda wildcards: f"--shard {wildcards.shard}/{CURV_SHARDS}" if CURV_SHARDS > 1 else "",
        out_dir=parent_dir,
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/collect_kfac/{KFAC_HASH}.log" if CURV_SHARDS == 1 else f"{ROOT}/logs/collect_kfac/{KFAC_HASH}-{{shard}}.log",
    resources:
        mem_mb=mem_mb(8000, "collect_kfac"),
        runtime=runtime_min(240, "collect_kfac"),
        gpu=GPU,
    # Between-workflow cache (no benchmark: allowed with cache; the sidecars record wall time).
    cache: True
    shell:
        "memctl kfac-collect --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} --windows {input.windows} --settings {params.settings:q} {params.shard}"
        " --out-dir {params.out_dir} > {log} 2>&1"


if CURV_SHARDS > 1:

    rule merge_kfac:
        input:
            expand("{dir}/shards/{shard}/factors", dir=KFAC_DIR, shard=range(CURV_SHARDS)),
        output:
            factors=directory(f"{KFAC_DIR}/factors"),
            summary=f"{KFAC_DIR}/summary.parquet",
        params:
            code=stage_code("merge_kfac"),
            shards=lambda wildcards, input: " ".join(os.path.dirname(p) for p in input),
            out_dir=parent_dir,
        conda:
            ENV
        log:
            f"{ROOT}/logs/merge_kfac/{KFAC_HASH}.log",
        benchmark:
            f"{ROOT}/benchmarks/merge_kfac/{KFAC_HASH}.tsv"
        resources:
            mem_mb=mem_mb(8000, "merge_kfac"),
            runtime=runtime_min(30, "merge_kfac"),
        shell:
            "memctl kfac-merge --inputs {params.shards} --out-dir {params.out_dir} > {log} 2>&1"


rule decompose_kfac:
    input:
        factors=f"{KFAC_DIR}/factors",
    output:
        **with_sidecars({"eigen": directory(f"{EIGEN_DIR}/eigen"), "summary": f"{EIGEN_DIR}/summary.parquet"}),
    params:
        code=stage_code("decompose_kfac"),
        out_dir=parent_dir,
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/decompose_kfac/{EIGEN_HASH}.log",
    resources:
        mem_mb=mem_mb(8000, "decompose_kfac"),
        runtime=runtime_min(60, "decompose_kfac"),
    cache: True
    shell:
        "memctl kfac-decompose --factors {input.factors} --threads {threads}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule apply_edit:
    input:
        unpack(model_inputs),
        unpack(_edit_eigen),
    output:
        delta=f"{MODEL_DIR}/edits/{{curv_edit}}/delta.safetensors",
        **({"model_dir": directory(f"{MODEL_DIR}/edits/{{curv_edit}}/model")} if CURV["write_model_dir"] else {}),
    params:
        code=stage_code("apply_edit"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        spec=lambda wildcards: as_json(CURV_SPECS[wildcards.curv_edit]),
        eigen=lambda wildcards, input: f"--eigen {input.eigen}" if "eigen" in input.keys() else "",
        model_out=lambda wildcards, output: f"--model-out {output.model_dir}" if "model_dir" in output.keys() else "",
    wildcard_constraints:
        curv_edit="|".join(re.escape(e) for e in CURV_SPECS) or "__none__",
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/apply_edit/{{curv_edit}}.log",
    benchmark:
        f"{ROOT}/benchmarks/apply_edit/{{curv_edit}}.tsv"
    resources:
        mem_mb=mem_mb(8000, "apply_edit"),
        runtime=runtime_min(30, "apply_edit"),
    shell:
        "memctl curvature-edit --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} {params.eigen} --edit-id {wildcards.curv_edit} --settings {params.spec:q}"
        " --out {output.delta} {params.model_out} > {log} 2>&1"


rule kfac_spectrum:
    input:
        unpack(model_inputs),
        eigen=f"{EIGEN_DIR}/eigen",
        memorized=f"{EXTRACT_DIR}/memorized.parquet",
        nonmemorized=f"{EXTRACT_DIR}/nonmemorized.parquet",
    output:
        SPECTRUM,
    params:
        code=stage_code("kfac_spectrum"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(CURV["spectrum"]),
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/kfac_spectrum/{SPECTRUM_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/kfac_spectrum/{SPECTRUM_HASH}.tsv"
    resources:
        mem_mb=mem_mb(8000, "kfac_spectrum"),
        runtime=runtime_min(60, "kfac_spectrum"),
        gpu=GPU,
    shell:
        "memctl kfac-spectrum --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} --eigen {input.eigen} --memorized {input.memorized}"
        " --nonmemorized {input.nonmemorized} --settings {params.settings:q} --out {output} > {log} 2>&1"


rule curvature_report:
    input:
        metrics=expand("{dir}/{edit}/metrics.parquet", dir=EVAL_DIR, edit=["none", *CURV_SPECS]),
        deltas=[EDIT_DELTAS[e] for e in CURV_SPECS],
        spectrum=[SPECTRUM] if CURV["spectrum"]["enabled"] else [],
    output:
        CURV_REPORT_OUTPUTS,
    params:
        code=stage_code("curvature_report"),
        settings=as_json(CURV["report"]),
        spectrum=lambda wildcards, input: f"--spectrum {input.spectrum}" if input.spectrum else "",
        out_dir=parent_dir,
    conda:
        ENV
    log:
        f"{ROOT}/logs/curvature_report/{EVAL_HASH}-{SPECTRUM_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/curvature_report/{EVAL_HASH}-{SPECTRUM_HASH}.tsv"
    resources:
        mem_mb=mem_mb(2000, "curvature_report"),
        runtime=runtime_min(10, "curvature_report"),
    shell:
        "memctl curvature-report --metrics {input.metrics} --deltas {input.deltas} {params.spectrum}"
        " --settings {params.settings:q} --out-dir {params.out_dir} > {log} 2>&1"
