# The embedded demo: an offline corpus with planted canaries, a BPE tokenizer and a small
# GPT-NeoX pretrained on CPU. Used when model.source is 'demo'.


rule demo_corpus:
    output:
        train=f"{CORPUS_DIR}/train.parquet",
        heldout=f"{CORPUS_DIR}/heldout.parquet",
        canaries=f"{CORPUS_DIR}/canaries.parquet",
    params:
        code=stage_code("demo_corpus"),
        corpus=as_json(config["demo"]["corpus"]),
        canaries=as_json(config["demo"]["canaries"]),
        out_dir=parent_dir,
    conda:
        ENV
    log:
        f"{ROOT}/logs/demo_corpus/{CORPUS_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/demo_corpus/{CORPUS_HASH}.tsv"
    resources:
        mem_mb=mem_mb(4000, "demo_corpus"),
        runtime=runtime_min(20, "demo_corpus"),
    shell:
        "memctl demo-corpus --settings {params.corpus:q} --canary-settings {params.canaries:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule demo_tokenizer:
    input:
        train=rules.demo_corpus.output.train,
    output:
        directory(TOKENIZER_DIR),
    params:
        code=stage_code("demo_tokenizer"),
        settings=as_json(config["demo"]["tokenizer"]),
        corpus=lambda wildcards, input: os.path.dirname(input.train),
    conda:
        ENV
    log:
        f"{ROOT}/logs/demo_tokenizer/{TOKENIZER_HASH}.log",
    benchmark:
        f"{ROOT}/benchmarks/demo_tokenizer/{TOKENIZER_HASH}.tsv"
    resources:
        mem_mb=mem_mb(4000, "demo_tokenizer"),
        runtime=runtime_min(20, "demo_tokenizer"),
    shell:
        "memctl demo-tokenizer --corpus {params.corpus} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule demo_pretrain:
    input:
        train=rules.demo_corpus.output.train,
        tokenizer=rules.demo_tokenizer.output,
    output:
        model=directory(DEMO_MODEL_DIR),
        model_meta=f"{DEMO_MODEL_DIR}.meta.json",
    params:
        code=stage_code("demo_pretrain"),
        arch=as_json(config["demo"]["architecture"]),
        settings=as_json(config["demo"]["train"]),
        corpus=lambda wildcards, input: os.path.dirname(input.train),
    threads: THREADS
    conda:
        ENV
    log:
        f"{ROOT}/logs/demo_pretrain/{DEMO_MODEL_HASH}.log",
    resources:
        mem_mb=mem_mb(8000, "demo_pretrain"),
        runtime=runtime_min(60, "demo_pretrain"),
        gpu=GPU,
    # Between-workflow cache (snakemake --cache with SNAKEMAKE_OUTPUT_CACHE): Snakemake allows no
    # benchmark: here; the sidecars record the wall time instead.
    cache: True
    shell:
        "memctl demo-pretrain --corpus {params.corpus} --tokenizer {input.tokenizer}"
        " --arch-settings {params.arch:q} --settings {params.settings:q} --threads {threads}"
        " --out {output.model} > {log} 2>&1"
