# Text windows from a source: held-out text (utility metrics, the nDCG@10 reference) and
# calibration text (K-FAC factors, mask training, Wanda / SparseGPT statistics).


rule heldout:
    input:
        unpack(model_inputs),
        unpack(local_data_input("heldout")),
    output:
        HELDOUT,
    params:
        code=stage_code("heldout"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(config["heldout"]),
        corpus=corpus_arg,
    conda:
        ENV
    log:
        f"{ROOT}/logs/heldout/{HELDOUT_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/heldout/{HELDOUT_HASH}.tsv"
    resources:
        mem_mb=mem_mb(4000, "heldout"),
        runtime=runtime_min(30, "heldout"),
    shell:
        "memctl heldout --model {params.model:q} --model-settings {params.model_settings:q}"
        " {params.corpus} --settings {params.settings:q} --out {output} > {log} 2>&1"


rule calibration:
    input:
        unpack(model_inputs),
        unpack(local_data_input("calibration")),
    output:
        CALIBRATION,
    params:
        code=stage_code("calibration"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(config["calibration"]),
        corpus=corpus_arg,
    conda:
        ENV
    log:
        f"{ROOT}/logs/calibration/{CALIBRATION_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/calibration/{CALIBRATION_HASH}.tsv"
    resources:
        mem_mb=mem_mb(4000, "calibration"),
        runtime=runtime_min(30, "calibration"),
    shell:
        "memctl calibration --model {params.model:q} --model-settings {params.model_settings:q}"
        " {params.corpus} --settings {params.settings:q} --out {output} > {log} 2>&1"


rule reference_topk:
    input:
        unpack(model_inputs),
        heldout=HELDOUT,
    output:
        REFERENCE_TOPK,
    params:
        code=stage_code("reference_topk"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        # only what the reference depends on: changing generation batch sizes keeps it
        settings=as_json(
            {k: config["evaluate"][k] for k in ("ndcg_windows", "heldout_batch_size")}
        ),
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/reference_topk/{REFERENCE_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/reference_topk/{REFERENCE_HASH}.tsv"
    resources:
        mem_mb=mem_mb(8000, "reference_topk"),
        runtime=runtime_min(30, "reference_topk"),
        gpu=GPU,
    shell:
        "memctl reference-topk --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} --heldout {input.heldout} --settings {params.settings:q} --out {output}"
        " > {log} 2>&1"
