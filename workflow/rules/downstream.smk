# Downstream tasks through lm-evaluation-harness (the weight-pruning paper's Table 4): jobs exist
# only when downstream.tasks lists a task; each evaluates several edits on one loaded model.


rule downstream:
    input:
        unpack(inputs("downstream")),
    output:
        **outputs("downstream"),
    log:
        PLAN.stage("downstream").log,
    benchmark:
        PLAN.stage("downstream").benchmark
    wildcard_constraints:
        **constraints("downstream"),
    conda:
        ENV
    threads: threads("downstream")
    resources:
        **resources("downstream"),
    params:
        args=args("downstream"),
        code=code("downstream"),
    shell:
        "memctl downstream --threads {threads} {params.args} > {log:q} 2>&1"


rule downstream_report:
    input:
        unpack(inputs("downstream_report")),
    output:
        **outputs("downstream_report"),
    log:
        PLAN.stage("downstream_report").log,
    benchmark:
        PLAN.stage("downstream_report").benchmark
    conda:
        ENV
    resources:
        **resources("downstream_report"),
    params:
        args=args("downstream_report"),
        code=code("downstream_report"),
    shell:
        "memctl downstream-report {params.args} > {log:q} 2>&1"
