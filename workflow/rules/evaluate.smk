# Per-(model, edit) metrics, and the results tables.


EDIT_PATTERN = "|".join(re.escape(edit) for edit in EDITS)


rule evaluate:
    input:
        unpack(model_inputs),
        unpack(edit_inputs),
        memorized=f"{EXTRACT_DIR}/memorized_test.parquet",
        heldout=HELDOUT,
        reference=REFERENCE_TOPK,
    output:
        metrics=f"{EVAL_DIR}/{{edit}}/metrics.parquet",
        scores=f"{EVAL_DIR}/{{edit}}/scores.parquet",
    params:
        code=stage_code("evaluate"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(config["evaluate"]),
        method=lambda wildcards: EDITS[wildcards.edit],
        delta=delta_arg,
        out_dir=parent_dir,
    wildcard_constraints:
        edit=EDIT_PATTERN,
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/evaluate/{EVAL_HASH}-{{edit}}.log",
    benchmark:
        f"{ROOT}/benchmarks/evaluate/{EVAL_HASH}-{{edit}}.tsv"
    resources:
        mem_mb=mem_mb(8000, "evaluate"),
        runtime=runtime_min(60, "evaluate"),
        gpu=GPU,
    shell:
        "memctl evaluate --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} --edit {wildcards.edit} --method {params.method:q} {params.delta}"
        " --memorized {input.memorized} --heldout {input.heldout} --reference {input.reference}"
        " --settings {params.settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule report:
    input:
        metrics=expand("{dir}/{edit}/metrics.parquet", dir=EVAL_DIR, edit=list(EDITS)),
        by_copies=f"{EXTRACT_DIR}/by_copies.parquet",
    output:
        results=f"{RESULTS}/results.md",
        table=f"{RESULTS}/results.parquet",
        html=report(f"{RESULTS}/results.html", caption="../report/results.rst", category="Results"),
        by_copies=f"{RESULTS}/extraction_by_copies.md",
        plot=report(
            f"{RESULTS}/extraction_by_copies.png",
            caption="../report/extraction_by_copies.rst",
            category="Extraction",
        ),
    params:
        code=stage_code("report"),
        out_dir=parent_dir,
    conda:
        ENV
    log:
        f"{ROOT}/logs/report/{EVAL_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/report/{EVAL_HASH}.tsv"
    resources:
        mem_mb=mem_mb(2000, "report"),
        runtime=runtime_min(10, "report"),
    shell:
        "memctl report --metrics {input.metrics} --by-copies {input.by_copies}"
        " --out-dir {params.out_dir} > {log} 2>&1"
