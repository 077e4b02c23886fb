# Curvature edits (the loss-curvature paper; docs/curvature.md): K-FAC factors collected and
# decomposed once per calibration text (the ablation's chain beside the main one), one apply_edit
# job per edit, the spectrum analysis and the report.


rule collect_kfac:
    input:
        unpack(inputs("collect_kfac")),
    output:
        **outputs("collect_kfac"),
    log:
        PLAN.stage("collect_kfac").log,
    wildcard_constraints:
        **constraints("collect_kfac"),
    cache: True
    conda:
        ENV
    threads: threads("collect_kfac")
    resources:
        **resources("collect_kfac"),
    params:
        args=args("collect_kfac"),
        code=code("collect_kfac"),
    shell:
        "memctl kfac-collect --threads {threads} {params.args} > {log:q} 2>&1"


if "merge_kfac" in PLAN.stages:

    rule merge_kfac:
        input:
            unpack(inputs("merge_kfac")),
        output:
            **outputs("merge_kfac"),
        log:
            PLAN.stage("merge_kfac").log,
        benchmark:
            PLAN.stage("merge_kfac").benchmark
        wildcard_constraints:
            **constraints("merge_kfac"),
        conda:
            ENV
        resources:
            **resources("merge_kfac"),
        params:
            args=args("merge_kfac"),
            code=code("merge_kfac"),
        shell:
            "memctl kfac-merge {params.args} > {log:q} 2>&1"


rule decompose_kfac:
    input:
        unpack(inputs("decompose_kfac")),
    output:
        **outputs("decompose_kfac"),
    log:
        PLAN.stage("decompose_kfac").log,
    wildcard_constraints:
        **constraints("decompose_kfac"),
    cache: True
    conda:
        ENV
    threads: threads("decompose_kfac")
    resources:
        **resources("decompose_kfac"),
    params:
        args=args("decompose_kfac"),
        code=code("decompose_kfac"),
    shell:
        "memctl kfac-decompose --threads {threads} {params.args} > {log:q} 2>&1"


rule apply_edit:
    input:
        unpack(inputs("apply_edit")),
    output:
        **outputs("apply_edit"),
    log:
        PLAN.stage("apply_edit").log,
    benchmark:
        PLAN.stage("apply_edit").benchmark
    wildcard_constraints:
        **constraints("apply_edit"),
    conda:
        ENV
    threads: threads("apply_edit")
    resources:
        **resources("apply_edit"),
    params:
        args=args("apply_edit"),
        code=code("apply_edit"),
    shell:
        "memctl curvature-edit --threads {threads} {params.args} > {log:q} 2>&1"


rule kfac_spectrum:
    input:
        unpack(inputs("kfac_spectrum")),
    output:
        **outputs("kfac_spectrum"),
    log:
        PLAN.stage("kfac_spectrum").log,
    benchmark:
        PLAN.stage("kfac_spectrum").benchmark
    conda:
        ENV
    threads: threads("kfac_spectrum")
    resources:
        **resources("kfac_spectrum"),
    params:
        args=args("kfac_spectrum"),
        code=code("kfac_spectrum"),
    shell:
        "memctl kfac-spectrum --threads {threads} {params.args} > {log:q} 2>&1"


rule curvature_report:
    input:
        unpack(inputs("curvature_report")),
    output:
        **outputs("curvature_report"),
    log:
        PLAN.stage("curvature_report").log,
    benchmark:
        PLAN.stage("curvature_report").benchmark
    conda:
        ENV
    resources:
        **resources("curvature_report"),
    params:
        args=args("curvature_report"),
        code=code("curvature_report"),
    shell:
        "memctl curvature-report {params.args} > {log:q} 2>&1"
