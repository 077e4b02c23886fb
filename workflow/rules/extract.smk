# Candidates -> greedy extraction -> memorized / non-memorized splits.


rule candidates:
    input:
        unpack(model_inputs),
        unpack(local_data_input("candidates")),
    output:
        CANDIDATES,
    params:
        code=stage_code("candidates"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(config["candidates"]),
        extract=as_json(config["extract"]),
        corpus=corpus_arg,
    conda:
        ENV
    log:
        f"{ROOT}/logs/candidates/{CANDIDATES_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/candidates/{CANDIDATES_HASH}.tsv"
    resources:
        mem_mb=mem_mb(4000, "candidates"),
        runtime=runtime_min(30, "candidates"),
    shell:
        "memctl candidates --model {params.model:q} --model-settings {params.model_settings:q}"
        " {params.corpus} --settings {params.settings:q} --extract-settings {params.extract:q}"
        " --out {output} > {log} 2>&1"


rule extract:
    input:
        unpack(model_inputs),
        candidates=CANDIDATES,
    output:
        **with_sidecars({table: f"{EXTRACT_DIR}/{table}.parquet" for table in EXTRACT_TABLES}),
    params:
        code=stage_code("extract"),
        model=MODEL_REF,
        model_settings=as_json(MODEL_SETTINGS),
        settings=as_json(config["extract"]),
        out_dir=parent_dir,
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/extract/{EXTRACT_HASH}.log",
    resources:
        mem_mb=mem_mb(8000, "extract"),
        runtime=runtime_min(120, "extract"),
        gpu=GPU,
    # Between-workflow cache (snakemake --cache with SNAKEMAKE_OUTPUT_CACHE): Snakemake allows no
    # benchmark: here; the sidecars record the wall time instead.
    cache: True
    shell:
        "memctl extract --model {params.model:q} --model-settings {params.model_settings:q}"
        " --threads {threads} --candidates {input.candidates} --settings {params.settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
