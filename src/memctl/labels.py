"""Row labels the tables give each kind of edit (one place: the plan, the curvature settings and
the config's label check all read them). Plain data: this module imports nothing."""

#: Curvature edit methods -> their row label (an edit without its own ``label``).
CURVATURE_LABELS = {"kfac": "K-FAC", "kfac_factor": "K-FAC (per factor)", "kfac_pairwise": "K-FAC (pairwise)",
                    "svd": "SVD"}
#: Pruning-mask modes -> their row label (the weight-pruning paper's "Ours (...)" rows).
MASK_MODE_LABELS = {"none": "Ours (none)", "up": "Ours (up)", "down": "Ours (down)", "reciprocal": "Ours (reciprocal)"}
#: Pruning baselines -> their row label.
BASELINE_LABELS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
#: Labels of rows that are no configurable edit, and what they are.
FIXED_LABELS = {"Origin": "the unedited model", "BalancedSubnet": "the BalancedSubnet baseline",
                "CSP (down)": "the CSP baseline", "CSP (up)": "the CSP baseline"}
