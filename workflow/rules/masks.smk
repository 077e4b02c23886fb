# masks stages: rules are added as the stage lands (see common.smk: register_edit, EXTRA_OUTPUTS).
