# The embedded demo: an offline corpus with planted canaries, a BPE tokenizer and a small
# GPT-NeoX pretrained on CPU (used when model.source is 'demo').


rule demo_corpus:
    input:
        unpack(inputs("demo_corpus")),
    output:
        **outputs("demo_corpus"),
    log:
        PLAN.stage("demo_corpus").log,
    benchmark:
        PLAN.stage("demo_corpus").benchmark
    conda:
        ENV
    resources:
        **resources("demo_corpus"),
    params:
        args=args("demo_corpus"),
        code=code("demo_corpus"),
    shell:
        "memctl demo-corpus {params.args} > {log:q} 2>&1"


rule demo_tokenizer:
    input:
        unpack(inputs("demo_tokenizer")),
    output:
        **outputs("demo_tokenizer"),
    log:
        PLAN.stage("demo_tokenizer").log,
    benchmark:
        PLAN.stage("demo_tokenizer").benchmark
    conda:
        ENV
    resources:
        **resources("demo_tokenizer"),
    params:
        args=args("demo_tokenizer"),
        code=code("demo_tokenizer"),
    shell:
        "memctl demo-tokenizer {params.args} > {log:q} 2>&1"


rule demo_pretrain:
    input:
        unpack(inputs("demo_pretrain")),
    output:
        **outputs("demo_pretrain"),
    log:
        PLAN.stage("demo_pretrain").log,
    cache: True
    conda:
        ENV
    threads: threads("demo_pretrain")
    resources:
        **resources("demo_pretrain"),
    params:
        args=args("demo_pretrain"),
        code=code("demo_pretrain"),
    shell:
        "memctl demo-pretrain --threads {threads} {params.args} > {log:q} 2>&1"
