# memctl: find what a language model memorized verbatim, then suppress or amplify it.
#
#   snakemake --profile profiles/local all     # the embedded demo, on a laptop
#   snakemake --profile profiles/slurm all     # a cluster
#
# The config is validated against workflow/schemas/config.schema.yaml (with defaults filled in)
# before any job is scheduled; see workflow/rules/common.smk.


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/text.smk"
include: "workflow/rules/common_curvature.smk"
include: "workflow/rules/curvature.smk"
include: "workflow/rules/common_masks.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
