"""Extraction: greedy-decode every candidate's prefix, score the suffix, split memorized data.

Outputs (one directory per model + candidates + settings):
- ``extraction.parquet``: one row per candidate with prefix, suffix and generated ids, exact match,
  matching positions, token Levenshtein distance;
- ``memorized.parquet`` / ``nonmemorized.parquet``: the split by ``memorized_threshold``;
- ``memorized_train.parquet`` / ``memorized_val.parquet`` / ``memorized_test.parquet``: a seeded
  split of the memorized set (the memorized track, loss-curvature paper Sec. 4.2: what the unedited
  model extracts exactly); the validation slice comes off the train side and is what edit strengths
  and the best K-FAC / SVD pair are chosen on, never the test split;
- ``er_train.parquet`` / ``er_test.parquet``: the extraction-rate track (weight-pruning paper
  Sec. 4.1): a seeded split of ALL candidates, stratified by group and copy count, that does not
  depend on what the model extracts (the unedited model's Exact ER on it is a measurement, not 1
  by construction);
- ``ood.parquet``: the out-of-domain family (``extract.ood_group``, the demo's quotes): its
  candidates with the suffix cut to ``extract.ood_suffix_len`` tokens (the loss-curvature paper's
  quotes: 8) and a ``memorized`` column (the unedited model extracts that short suffix; the paper's
  set is memorized quotes only, so the evaluation scores the others apart), held out of every
  other table, so nothing an edit trains on or is tuned on contains them (calibration windows
  overlapping them are dropped too);
- ``by_copies.parquet``: extraction rates by group and exposure count (all candidates).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memctl import metrics, overlap
from memctl.generation import greedy_generate

OUTPUT_FILES = (
    "extraction.parquet",
    "memorized.parquet",
    "nonmemorized.parquet",
    "memorized_train.parquet",
    "memorized_val.parquet",
    "memorized_test.parquet",
    "er_train.parquet",
    "er_test.parquet",
    "ood.parquet",
    "by_copies.parquet",
)
#: Columns of the extraction table that the extraction-rate split must never read.
OUTCOME_COLUMNS = ("generated_ids", "exact_match", "n_match", "n_suffix", "match_positions", "levenshtein",
                   "levenshtein_norm", "levenshtein_sim", "frac_match")


def run_extraction(
    model, candidates: pd.DataFrame, pad_id: int, batch_size: int = 64, progress: bool = True
) -> pd.DataFrame:
    """Per-candidate generations and scores (the candidates' columns plus the score columns)."""
    prefixes = [list(map(int, p)) for p in candidates["prefix_ids"]]
    suffixes = [list(map(int, s)) for s in candidates["suffix_ids"]]
    lengths = {len(s) for s in suffixes}
    if len(lengths) != 1:
        raise ValueError(f"candidates have suffixes of several lengths {sorted(lengths)}; expected one")
    n_new = lengths.pop()
    generated = greedy_generate(model, prefixes, n_new, pad_id, batch_size=batch_size, progress=progress)
    scores = metrics.score_generations(generated, suffixes)
    out = candidates.reset_index(drop=True).copy()
    out["generated_ids"] = [row.astype(np.int64) for row in generated]
    return pd.concat([out, scores], axis=1)


def split_memorized(
    extraction: pd.DataFrame, settings: Mapping[str, Any]
) -> dict[str, pd.DataFrame]:
    """Memorized / non-memorized sets, the seeded train/validation/test split of the memorized set,
    the extraction-rate split of all candidates and the out-of-domain table."""
    ood = ood_table(extraction, settings)
    if len(ood):
        extraction = extraction[extraction["group"] != settings["ood_group"]].reset_index(drop=True)
    threshold = float(settings.get("memorized_threshold", 1.0))
    min_unique = int(settings.get("min_unique_tokens", 0))
    diverse = pd.Series(True, index=extraction.index)
    if min_unique:
        diverse = [
            len(set(map(int, p)) | set(map(int, s))) >= min_unique
            for p, s in zip(extraction["prefix_ids"], extraction["suffix_ids"])
        ]
        diverse = pd.Series(diverse, index=extraction.index)
    is_mem = (extraction["frac_match"] >= threshold) & diverse
    memorized = extraction[is_mem].reset_index(drop=True)
    nonmemorized = extraction[~is_mem & diverse].reset_index(drop=True)
    rng = np.random.default_rng(int(settings.get("split_seed", 42)))
    perm = rng.permutation(len(memorized))
    n_test = int(round(len(memorized) * float(settings.get("test_fraction", 0.25))))
    if len(memorized) >= 2:
        n_test = min(max(n_test, 1), len(memorized) - 1)
    if len(memorized) < 2:
        warnings.warn(
            f"only {len(memorized)} memorized candidate(s): the memorized test split is "
            f"{'empty' if n_test == 0 else 'everything'}; evaluation metrics will be NaN or trivial",
            stacklevel=2,
        )
    # the test split is the permutation's head whatever the validation share; validation comes next
    n_val = int(round(len(memorized) * float(settings.get("validation_fraction", 0.1))))
    n_val = max(0, min(n_val, len(memorized) - n_test - 1))
    test_idx = np.sort(perm[:n_test])
    val_idx, train_idx = np.sort(perm[n_test:n_test + n_val]), np.sort(perm[n_test + n_val:])
    usable = extraction[diverse].reset_index(drop=True)
    er_train, er_test = split_extraction_rate(
        usable.drop(columns=[c for c in OUTCOME_COLUMNS if c in usable.columns]),
        float(settings.get("er_test_fraction", 1 / 15)), int(settings.get("split_seed", 42)),
    )
    splits = {
        "memorized": memorized,
        "nonmemorized": nonmemorized,
        "memorized_train": memorized.iloc[train_idx].reset_index(drop=True),
        "memorized_val": memorized.iloc[val_idx].reset_index(drop=True),
        "memorized_test": memorized.iloc[test_idx].reset_index(drop=True),
        "er_train": usable.iloc[er_train].reset_index(drop=True),
        "er_test": usable.iloc[er_test].reset_index(drop=True),
        "ood": ood,
    }
    return drop_test_overlap(splits, int(settings.get("disjoint_ngram", overlap.DEFAULT_N)))


def check_ood_group(candidates: pd.DataFrame, settings: Mapping[str, Any], where: str = "candidates") -> None:
    """``extract.ood_group`` must name a group of the candidates (checked before any model loads)."""
    group = settings.get("ood_group")
    if not group:
        return
    groups = sorted(map(str, candidates["group"].unique())) if "group" in candidates else []
    if group not in groups:
        raise ValueError(f"extract.ood_group: {where} have no group {group!r} (groups: {', '.join(groups) or 'none'})")
    suffix = int(settings.get("ood_suffix_len", 8))
    shortest = min(len(s) for s in candidates.loc[candidates["group"] == group, "suffix_ids"])
    if suffix > shortest:
        raise ValueError(f"extract.ood_suffix_len: {suffix} exceeds the {shortest}-token suffixes of group {group!r}")


def ood_table(extraction: pd.DataFrame, settings: Mapping[str, Any]) -> pd.DataFrame:
    """The ``extract.ood_group`` candidates as an evaluation table: identity columns, the prefix,
    the first ``ood_suffix_len`` suffix tokens, and ``memorized``: whether the unedited model
    extracts that short suffix (its matching share of the first ``ood_suffix_len`` generated
    tokens reaches ``extract.memorized_threshold``; greedy decoding is deterministic, so the first
    k tokens of the full-suffix generation are the k-token generation). The loss-curvature paper's
    out-of-domain set is 125 *memorized* quotes: the evaluation scores the memorized rows as the
    ``ood`` track and the others apart (``ood_nonmemorized``), with their counts."""
    group = settings.get("ood_group")
    keep = [c for c in ("candidate_id", "group", "copies", "prefix_ids", "suffix_ids") if c in extraction.columns]
    if not group:
        return pd.DataFrame(columns=[*keep, "memorized"])
    check_ood_group(extraction, settings, "the extraction table")
    rows = extraction["group"] == group
    table = extraction.loc[rows, keep].reset_index(drop=True)
    k = int(settings.get("ood_suffix_len", 8))
    table["suffix_ids"] = [np.asarray(s, dtype=np.int64)[:k] for s in table["suffix_ids"]]
    threshold = float(settings.get("memorized_threshold", 1.0))
    if "generated_ids" in extraction.columns:
        generated = extraction.loc[rows, "generated_ids"].reset_index(drop=True)
        share = [float(np.mean(np.asarray(g, dtype=np.int64)[:k] == s)) if len(s) else 0.0
                 for g, s in zip(generated, table["suffix_ids"])]
        table["memorized"] = np.asarray(share) >= threshold
    else:  # candidates without an extraction outcome (unit use): nothing is known to be memorized
        table["memorized"] = False
    return table


def drop_test_overlap(splits: dict[str, pd.DataFrame], n: int) -> dict[str, pd.DataFrame]:
    """Drop from the training sides (``memorized_train``: BalancedSubnet's forget set;
    ``er_train``: the masks' memorization data) and from the validation slice every row sharing a
    run of ``n`` tokens with a test sequence of either track (0 = off). ``splits['dropped']``
    counts them per table."""
    dropped = {}
    if n > 0:
        tests = [splits["memorized_test"], splits["er_test"], splits.get("ood", splits["er_test"].iloc[0:0])]
        index = overlap.ngram_index(overlap.sequences_of(tests), n)
        for name in ("memorized_train", "memorized_val", "er_train"):
            table = splits[name]
            hit = overlap.overlapping(overlap.sequences_of([table]), index, n)
            dropped[name] = int(hit.sum())
            splits[name] = table[~hit].reset_index(drop=True)
    splits["dropped"] = dropped  # type: ignore[assignment]
    return splits


#: Groups that are families of related memories (the demo's ``canary-records-3``, ...:
#: ``canary-<kind>-<family>``): split within the family, never by copy count.
FAMILY_GROUP = re.compile(r"^canary-[a-z_]+-\d+$")


def is_family_group(group: str) -> bool:
    """Is ``group`` a family of related memories (:data:`FAMILY_GROUP`)?"""
    return bool(FAMILY_GROUP.match(str(group)))


def family_kind(group: str) -> str:
    """The group a family is reported under: ``canary-records-3`` -> ``canary-records``; any other
    group is itself."""
    return str(group).rpartition("-")[0] if is_family_group(group) else str(group)


def split_extraction_rate(candidates: pd.DataFrame, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of the extraction-rate track: within each stratum (group, copy
    count; one stratum per group where counts are unknown) a seeded permutation of the rows in
    ``candidate_id`` order puts ``round(n * test_fraction)`` of them on the test side. Reads the
    candidates' identity columns only, never an extraction outcome.

    A family group (:func:`is_family_group`: the demo's structured canaries, members sharing a
    frame) is one stratum whatever its members' copy counts, and a family of ``n >= 2`` members
    puts ``round(n * test_fraction)`` of them on the test side but at least one and at most
    ``n - 1``: its members sit on both sides, so what a mask learns from a family's training
    members can be measured on the family's held-out members (at 1/15 a family of 5 gives 1 of
    5 to the test side, a larger share than the other groups'). A one-member family stays on the
    train side."""
    cols = [c for c in ("candidate_id", "group", "copies") if c in candidates.columns]
    table = candidates[cols].reset_index(drop=True)
    if "group" not in table:
        table["group"] = "all"
    copies = table["copies"] if "copies" in table else pd.Series(-1, index=table.index)
    table["stratum_copies"] = copies.fillna(-1).astype(np.int64)
    family = table["group"].map(is_family_group).astype(bool)
    table.loc[family, "stratum_copies"] = -1
    order = table.sort_values(["group", "stratum_copies", "candidate_id"] if "candidate_id" in table
                              else ["group", "stratum_copies"], kind="stable")
    test: list[int] = []
    for i, (stratum, part) in enumerate(order.groupby(["group", "stratum_copies"], sort=True)):
        rng = np.random.default_rng([int(seed), i])
        idx = part.index.to_numpy()[rng.permutation(len(part))]
        n_test = int(round(len(part) * float(test_fraction)))
        if is_family_group(stratum[0]) and len(part) >= 2:
            n_test = min(max(n_test, 1), len(part) - 1)
        test.extend(idx[:n_test].tolist())
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(table)), test_idx)
    return train_idx, test_idx


def rates_by_copies(extraction: pd.DataFrame) -> pd.DataFrame:
    """Exact and fractional extraction by group and exposure count (the memorization curve)."""
    rows = []
    for (group, copies), part in extraction.groupby(["group", "copies"], sort=True):
        rows.append(
            {
                "group": group,
                "copies": int(copies),
                "n": int(len(part)),
                "exact_er": metrics.exact_er(part),
                "fractional_er": metrics.fractional_er(part),
                "loose_accuracy": metrics.loose_accuracy(part),
            }
        )
    return pd.DataFrame(rows)


def write_outputs(out_dir: Path, extraction: pd.DataFrame, splits: dict[str, pd.DataFrame], prov) -> None:
    from memctl.store import write_parquet

    splits = dict(splits)
    dropped = splits.pop("dropped", {})
    prov.extra.update(
        counts={k: int(len(v)) for k, v in splits.items()},
        exact_er_all_candidates=metrics.exact_er(extraction),
        dropped_for_test_overlap=dropped,
    )
    tables = {"extraction": extraction, **splits, "by_copies": rates_by_copies(extraction)}
    for name, df in tables.items():  # each sidecar lands before its table: never one without
        write_parquet(df, out_dir / f"{name}.parquet", provenance=prov)
