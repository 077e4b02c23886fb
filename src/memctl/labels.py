"""Row labels the tables give each kind of edit, read from the edit methods' records
(:mod:`memctl.edit_methods`, the one place each label is declared): the plan, the curvature
settings and the config's label check read them. Live read-only mappings: a method registered
later shows here too. Plain data: this module imports only the records."""

from memctl.edit_methods import METHODS, Labels

#: Curvature edit methods -> their row label (an edit without its own ``label``).
CURVATURE_LABELS = Labels("curvature")
#: Pruning-mask modes -> their row label (the weight-pruning paper's "Ours (...)" rows).
MASK_MODE_LABELS = Labels("mask")
#: Pruning baselines -> their row label.
BASELINE_LABELS = Labels("baseline")
#: Labels of rows that are no configurable edit, and what they are.
FIXED_LABELS = {"Origin": "the unedited model",
                **{m.label: m.description for m in METHODS.values() if m.family in ("balanced_subnet", "csp")}}
