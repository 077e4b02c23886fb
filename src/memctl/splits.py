"""The evaluated splits whose sizes are checked, and the sentences that say which are too small.

Read by the extract stage (its log warns as soon as the splits exist) and by the report (the same
sentences at the top of results.md; the verdicts of a too-small track marked underpowered). Kept out
of :mod:`memctl.report` so that the extract stage's code (its hash) does not change with the report's.
"""

from __future__ import annotations

import math

from memctl import stats

#: The splits whose size the report and the extract log check: (table, metrics column of its size,
#: verdict prefix of its track or None, what it is).
SPLITS = (
    ("er_test", "er_n_examples", "er_", "extraction-rate test split (er_test)"),
    ("memorized_test", "n_examples", "", "memorized test split (memorized_test)"),
    ("ood", "ood_n_examples", "ood_", "out-of-domain family (ood)"),
    ("memorized_val", "val_n_examples", None, "validation slice (memorized_val)"),
)
UNDERPOWERED = "underpowered"


def split_warnings(sizes: dict[str, int]) -> list[str]:
    """One sentence per split that is too small for its purpose (``sizes``: table name -> rows,
    :data:`SPLITS`): a test track below :func:`memctl.stats.min_n_for_width` (its exact 95%
    interval cannot be narrower than :data:`memctl.stats.TARGET_WIDTH`), the validation slice below
    :func:`memctl.stats.min_n_zero_below`. An absent out-of-domain family (0 rows) is not one."""
    need = stats.min_n_for_width()
    out = []
    for table, _, prefix, what in SPLITS:
        if table not in sizes or sizes[table] is None or (isinstance(sizes[table], float) and math.isnan(sizes[table])):
            continue
        n = int(sizes[table])
        if table == "ood" and n == 0:
            continue
        if prefix is None:
            val_min = stats.min_n_zero_below()
            if n < val_min:
                out.append(f"Small {what}: N={n}. Edit strengths and layers are chosen on it; it needs {val_min} "
                           f"sequences for a clean 0/N to rule out a rate of {stats.VALIDATION_BOUND:g} at 95% "
                           f"(0/{n} rules out only {stats.zero_upper_bound(n):.3f}). Raise "
                           f"extract.validation_fraction or add memories.")
            continue
        if n < need:
            out.append(f"Underpowered {what}: N={n}. An exact 95% interval of a rate is narrower than "
                       f"{stats.TARGET_WIDTH:g} only from {need} examples (worst case, a rate of 0.5); at N={n} it "
                       f"can be {stats.worst_case_width(n):.2f} wide. Its 'no evidence of a difference' verdicts are marked '{UNDERPOWERED}' (a significant one "
                       f"stands at any N). "
                       + ("Raise extract.er_test_fraction or add candidates (memctl init sizes it from the data)."
                          if table == "er_test" else "Add candidates or raise extract.test_fraction."
                          if table == "memorized_test" else "Add candidates to that group."))
    return out


#: The training sides the disjointness filter prunes (``memctl.extract.drop_test_overlap``), and what trains on them.
TRAINING_SIDES = {
    "er_train": "the masks' and CSP's memorization data",
    "memorized_train": "BalancedSubnet's forget set",
    "memorized_val": "the validation slice edit strengths are chosen on",
}


def overlap_warnings(dropped: dict[str, int], kept: dict[str, int], ngram: int) -> list[str]:
    """One sentence per training side the test-overlap filter emptied or more than halved
    (``dropped`` / ``kept``: rows per table after the filter): the rows shared an ``ngram``-token
    run with a test sequence, as memories do that share boilerplate (a template's fixed sentence, a
    licence header); said at extraction, before a stage that trains on the side finds it empty."""
    out = []
    for table, what in TRAINING_SIDES.items():
        lost, left = int(dropped.get(table, 0)), int(kept.get(table, 0))
        if lost == 0 or lost < left:
            continue
        share = "all" if left == 0 else f"{lost} of {lost + left}"
        out.append(f"{table} ({what}): {share} rows dropped for sharing a {ngram}-token run with a test sequence "
                   f"(extract.disjoint_ngram: {ngram}){'; nothing is left to train on' if left == 0 else ''}. "
                   f"Memories that share text (a template's fixed sentence, boilerplate) overlap across the split: "
                   f"vary that text, or raise extract.disjoint_ngram above the shared run's length (0 turns the check off).")
    return out
