# The vision track (memctl.vision; docs/vision.md): a ViT trained on images with noised labels, K-FAC
# and SVD edits of its MLP blocks, their accuracies, the band analysis and the report. Planned only
# when vision.enabled (config/vision.yaml, config/paper.yaml).


if "vision_data" in PLAN.stages:

    rule vision_data:
        input:
            unpack(inputs("vision_data")),
        output:
            **outputs("vision_data"),
        log:
            PLAN.stage("vision_data").log,
        benchmark:
            PLAN.stage("vision_data").benchmark
        conda:
            ENV
        resources:
            **vision_resources("vision_data"),
        params:
            args=args("vision_data"),
            code=code("vision_data"),
        shell:
            "memctl vision-data {params.args} > {log:q} 2>&1"

    rule vision_train:
        input:
            unpack(inputs("vision_train")),
        output:
            **outputs("vision_train"),
        log:
            PLAN.stage("vision_train").log,
        benchmark:
            PLAN.stage("vision_train").benchmark
        conda:
            ENV
        threads: threads("vision_train")
        resources:
            **vision_resources("vision_train"),
        params:
            args=args("vision_train"),
            code=code("vision_train"),
        shell:
            "memctl vision-train --threads {threads} {params.args} > {log:q} 2>&1"

    rule vision_kfac:
        input:
            unpack(inputs("vision_kfac")),
        output:
            **outputs("vision_kfac"),
        log:
            PLAN.stage("vision_kfac").log,
        benchmark:
            PLAN.stage("vision_kfac").benchmark
        conda:
            ENV
        threads: threads("vision_kfac")
        resources:
            **vision_resources("vision_kfac"),
        params:
            args=args("vision_kfac"),
            code=code("vision_kfac"),
        shell:
            "memctl vision-kfac --threads {threads} {params.args} > {log:q} 2>&1"

    rule vision_edit:
        input:
            unpack(inputs("vision_edit")),
        output:
            **outputs("vision_edit"),
        log:
            PLAN.stage("vision_edit").log,
        benchmark:
            PLAN.stage("vision_edit").benchmark
        wildcard_constraints:
            **constraints("vision_edit"),
        conda:
            ENV
        threads: threads("vision_edit")
        resources:
            **vision_resources("vision_edit"),
        params:
            args=args("vision_edit"),
            code=code("vision_edit"),
        shell:
            "memctl vision-edit --threads {threads} {params.args} > {log:q} 2>&1"

    rule vision_evaluate:
        input:
            unpack(inputs("vision_evaluate")),
        output:
            **outputs("vision_evaluate"),
        log:
            PLAN.stage("vision_evaluate").log,
        benchmark:
            PLAN.stage("vision_evaluate").benchmark
        conda:
            ENV
        threads: threads("vision_evaluate")
        resources:
            **vision_resources("vision_evaluate"),
        params:
            args=args("vision_evaluate"),
            code=code("vision_evaluate"),
        shell:
            "memctl vision-evaluate --threads {threads} {params.args} > {log:q} 2>&1"

    rule vision_spectrum:
        input:
            unpack(inputs("vision_spectrum")),
        output:
            **outputs("vision_spectrum"),
        log:
            PLAN.stage("vision_spectrum").log,
        benchmark:
            PLAN.stage("vision_spectrum").benchmark
        conda:
            ENV
        threads: threads("vision_spectrum")
        resources:
            **vision_resources("vision_spectrum"),
        params:
            args=args("vision_spectrum"),
            code=code("vision_spectrum"),
        shell:
            "memctl vision-spectrum --threads {threads} {params.args} > {log:q} 2>&1"

    rule vision_report:
        input:
            unpack(inputs("vision_report")),
        output:
            **outputs("vision_report"),
        log:
            PLAN.stage("vision_report").log,
        benchmark:
            PLAN.stage("vision_report").benchmark
        conda:
            ENV
        resources:
            **vision_resources("vision_report"),
        params:
            args=args("vision_report"),
            code=code("vision_report"),
        shell:
            "memctl vision-report {params.args} > {log:q} 2>&1"
