# Text windows: held-out text (utility metrics, the nDCG@10 reference) and calibration text
# (K-FAC factors, mask training, Wanda / SparseGPT statistics): one calibration job per distinct
# text (memctl.plan: the demo's training stream for the factors, its documents for the masks).


rule heldout:
    input:
        unpack(inputs("heldout")),
    output:
        **outputs("heldout"),
    log:
        PLAN.stage("heldout").log,
    benchmark:
        PLAN.stage("heldout").benchmark
    conda:
        ENV
    resources:
        **resources("heldout"),
    params:
        args=args("heldout"),
        code=code("heldout"),
    shell:
        "memctl heldout {params.args} > {log:q} 2>&1"


rule calibration:
    input:
        unpack(inputs("calibration")),
    output:
        **outputs("calibration"),
    log:
        PLAN.stage("calibration").log,
    benchmark:
        PLAN.stage("calibration").benchmark
    wildcard_constraints:
        **constraints("calibration"),
    conda:
        ENV
    resources:
        **resources("calibration"),
    params:
        args=args("calibration"),
        code=code("calibration"),
    shell:
        "memctl calibration {params.args} > {log:q} 2>&1"


rule reference_topk:
    input:
        unpack(inputs("reference_topk")),
    output:
        **outputs("reference_topk"),
    log:
        PLAN.stage("reference_topk").log,
    benchmark:
        PLAN.stage("reference_topk").benchmark
    conda:
        ENV
    threads: threads("reference_topk")
    resources:
        **resources("reference_topk"),
    params:
        args=args("reference_topk"),
        code=code("reference_topk"),
    shell:
        "memctl reference-topk --threads {threads} --batch-size {resources.batch_size}"
        " --heldout-batch-size {resources.heldout_batch_size}"
        " {params.args} > {log:q} 2>&1"
