# Pruning masks that suppress or amplify memorization, the pruning baselines, BalancedSubnet and CSP
# (the weight-pruning paper; docs/masks.md), and the paper-style tables.


rule sample_memories:
    input:
        unpack(inputs("sample_memories")),
    output:
        **outputs("sample_memories"),
    log:
        PLAN.stage("sample_memories").log,
    benchmark:
        PLAN.stage("sample_memories").benchmark
    wildcard_constraints:
        **constraints("sample_memories"),
    conda:
        ENV
    resources:
        **resources("sample_memories"),
    params:
        args=args("sample_memories"),
        code=code("sample_memories"),
    shell:
        "memctl sample-memories {params.args} > {log:q} 2>&1"


rule train_mask:
    input:
        unpack(inputs("train_mask")),
    output:
        **outputs("train_mask"),
    log:
        PLAN.stage("train_mask").log,
    benchmark:
        PLAN.stage("train_mask").benchmark
    wildcard_constraints:
        **constraints("train_mask"),
    conda:
        ENV
    threads: threads("train_mask")
    resources:
        **resources("train_mask"),
    params:
        args=args("train_mask"),
        code=code("train_mask"),
    shell:
        "memctl train-mask --threads {threads} {params.args} > {log:q} 2>&1"


rule prune_baseline:
    input:
        unpack(inputs("prune_baseline")),
    output:
        **outputs("prune_baseline"),
    log:
        PLAN.stage("prune_baseline").log,
    benchmark:
        PLAN.stage("prune_baseline").benchmark
    wildcard_constraints:
        **constraints("prune_baseline"),
    conda:
        ENV
    threads: threads("prune_baseline")
    resources:
        **resources("prune_baseline"),
    params:
        args=args("prune_baseline"),
        code=code("prune_baseline"),
    shell:
        "memctl prune --threads {threads} {params.args} > {log:q} 2>&1"


rule balanced_subnet:
    input:
        unpack(inputs("balanced_subnet")),
    output:
        **outputs("balanced_subnet"),
    log:
        PLAN.stage("balanced_subnet").log,
    benchmark:
        PLAN.stage("balanced_subnet").benchmark
    wildcard_constraints:
        **constraints("balanced_subnet"),
    conda:
        ENV
    threads: threads("balanced_subnet")
    resources:
        **resources("balanced_subnet"),
    params:
        args=args("balanced_subnet"),
        code=code("balanced_subnet"),
    shell:
        "memctl balanced-subnet --threads {threads} {params.args} > {log:q} 2>&1"


rule csp:
    input:
        unpack(inputs("csp")),
    output:
        **outputs("csp"),
    log:
        PLAN.stage("csp").log,
    benchmark:
        PLAN.stage("csp").benchmark
    wildcard_constraints:
        **constraints("csp"),
    conda:
        ENV
    threads: threads("csp")
    resources:
        **resources("csp"),
    params:
        args=args("csp"),
        code=code("csp"),
    shell:
        "memctl csp --threads {threads} {params.args} > {log:q} 2>&1"


rule masks_report:
    input:
        unpack(inputs("masks_report")),
    output:
        **outputs("masks_report"),
    log:
        PLAN.stage("masks_report").log,
    benchmark:
        PLAN.stage("masks_report").benchmark
    conda:
        ENV
    resources:
        **resources("masks_report"),
    params:
        args=args("masks_report"),
        code=code("masks_report"),
    shell:
        "memctl masks-report {params.args} > {log:q} 2>&1"
