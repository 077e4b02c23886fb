# Candidates -> greedy extraction -> memorized / non-memorized splits.


rule candidates:
    input:
        unpack(inputs("candidates")),
    output:
        **outputs("candidates"),
    log:
        PLAN.stage("candidates").log,
    benchmark:
        PLAN.stage("candidates").benchmark
    conda:
        ENV
    resources:
        **resources("candidates"),
    params:
        args=args("candidates"),
        code=code("candidates"),
    shell:
        "memctl candidates {params.args} > {log:q} 2>&1"


rule extract:
    input:
        unpack(inputs("extract")),
    output:
        **outputs("extract"),
    log:
        PLAN.stage("extract").log,
    cache: True
    conda:
        ENV
    threads: threads("extract")
    resources:
        **resources("extract"),
    params:
        args=args("extract"),
        code=code("extract"),
    shell:
        "memctl extract --threads {threads} --batch-size {resources.batch_size}"
        " {params.args} > {log:q} 2>&1"
