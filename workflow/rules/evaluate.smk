# Per-(model, edit) metrics, and the results tables.


rule evaluate:
    input:
        unpack(inputs("evaluate")),
    output:
        **outputs("evaluate"),
    log:
        PLAN.stage("evaluate").log,
    benchmark:
        PLAN.stage("evaluate").benchmark
    wildcard_constraints:
        **constraints("evaluate"),
    conda:
        ENV
    threads: threads("evaluate")
    resources:
        **resources("evaluate"),
    params:
        args=args("evaluate"),
        code=code("evaluate"),
    shell:
        "memctl evaluate --threads {threads} --batch-size {resources.batch_size} --heldout-batch-size {resources.heldout_batch_size}"
        " {params.args} > {log:q} 2>&1"


rule report:
    input:
        unpack(inputs("report")),
    output:
        **outputs("report"),
    log:
        PLAN.stage("report").log,
    benchmark:
        PLAN.stage("report").benchmark
    conda:
        ENV
    resources:
        **resources("report"),
    params:
        args=args("report"),
        code=code("report"),
    shell:
        "memctl report {params.args} > {log:q} 2>&1"
