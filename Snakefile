# memctl: find what a language model has memorized verbatim, then suppress or amplify it.
#
#   snakemake --profile profiles/local all                                # the demo (config/config.yaml)
#   snakemake all --profile profiles/slurm --configfile my.yaml           # your own config, complete by
#                                                                         # itself or `extends:` another
#
# The config is validated (memctl.config, schema in workflow/schemas/) and planned (memctl.plan)
# before any job is scheduled; see workflow/rules/common.smk and docs/architecture.md.
import os

# envs/memctl.post-deploy.sh installs memctl into a conda-deployed env from this checkout.
os.environ.setdefault("MEMCTL_SRC", workflow.basedir)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/text.smk"
include: "workflow/rules/curvature.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/downstream.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/vision.smk"


onstart:
    # A lab shares one store: this run's files are group-writable, and it claims its outputs
    # before any job starts, so two runs never write the same artifact.
    from memctl.store import claim_workflow, share_with_group

    share_with_group()
    claim_workflow(workflow, PLAN.root)


onsuccess:
    # the first thing a newcomer wants after the run: where to look
    from memctl.plan import results_summary

    print(results_summary(PLAN))


rule all:
    default_target: True
    input:
        PLAN.targets,
        PLAN.artifacts(),  # every artifact the tables need: a removed or killed one is rebuilt
