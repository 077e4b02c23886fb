"""Extraction outputs: memorized splits are seeded, disjoint and complete; rates by copies."""

import numpy as np
import pandas as pd
import pytest

from memctl.extract import rates_by_copies, run_extraction, split_memorized
from memctl.generation import greedy_generate


def fake_extraction(n=40):
    rng = np.random.default_rng(0)
    frac = rng.choice([0.0, 0.5, 1.0], size=n)
    return pd.DataFrame(
        {
            "candidate_id": [f"c{i}" for i in range(n)],
            "prefix_ids": [list(range(i, i + 4)) for i in range(n)],
            "suffix_ids": [[1, 1, 1, 1] if i % 5 == 0 else [i + 10, i + 11, i + 12, i + 13] for i in range(n)],
            "frac_match": frac,
            "exact_match": frac == 1.0,
            "n_match": (frac * 4).astype(int),
            "n_suffix": 4,
            "levenshtein_sim": frac,
            "group": ["g"] * n,
            "copies": [1 + i % 3 for i in range(n)],
        }
    )


def test_split_is_seeded_disjoint_and_complete():
    ext = fake_extraction()
    settings = {"memorized_threshold": 1.0, "test_fraction": 0.25, "split_seed": 42}
    a, b = split_memorized(ext, settings), split_memorized(ext, settings)
    mem = set(a["memorized"]["candidate_id"])
    assert mem == set(ext.loc[ext["exact_match"], "candidate_id"])
    assert set(a["nonmemorized"]["candidate_id"]) == set(ext["candidate_id"]) - mem
    train, test = set(a["memorized_train"]["candidate_id"]), set(a["memorized_test"]["candidate_id"])
    val = set(a["memorized_val"]["candidate_id"])
    assert train.isdisjoint(test) and val.isdisjoint(train | test) and train | val | test == mem
    assert len(test) == round(0.25 * len(mem))
    assert a["memorized_test"]["candidate_id"].tolist() == b["memorized_test"]["candidate_id"].tolist()
    c = split_memorized(ext, {**settings, "split_seed": 7})
    assert c["memorized_test"]["candidate_id"].tolist() != a["memorized_test"]["candidate_id"].tolist()


def test_threshold_and_diversity_filter():
    ext = fake_extraction()
    half = split_memorized(ext, {"memorized_threshold": 0.5})
    assert set(half["memorized"]["candidate_id"]) == set(ext.loc[ext["frac_match"] >= 0.5, "candidate_id"])
    diverse = split_memorized(ext, {"memorized_threshold": 0.5, "min_unique_tokens": 6})
    # Every 5th candidate has suffix [1,1,1,1]: too few unique tokens, dropped from both sets.
    dropped = {f"c{i}" for i in range(0, 40, 5)}
    kept = set(diverse["memorized"]["candidate_id"]) | set(diverse["nonmemorized"]["candidate_id"])
    assert kept.isdisjoint(dropped) and len(kept) == 40 - len(dropped)


def test_rates_by_copies():
    ext = fake_extraction(9)
    table = rates_by_copies(ext)
    for rec in table.to_dict("records"):
        part = ext[ext["copies"] == rec["copies"]]
        assert rec["n"] == len(part)
        assert rec["exact_er"] == pytest.approx(part["exact_match"].mean())


def test_run_extraction_marks_the_models_own_continuations_as_memorized(tiny_model, tiny_tokenizer):
    """A suffix equal to the model's greedy continuation is extracted; a different one is not."""
    pad = tiny_tokenizer.pad_token_id
    prefixes = [[5, 6, 7, 8], [20, 21, 22, 23]]
    own = greedy_generate(tiny_model, prefixes, 4, pad, progress=False)
    other = [[(t + 1) % 250 for t in own[1]]]
    cands = pd.DataFrame(
        {"candidate_id": ["own", "other"], "prefix_ids": prefixes, "suffix_ids": [own[0].tolist(), other[0]]}
    )
    ext = run_extraction(tiny_model, cands, pad, batch_size=2, progress=False)
    assert ext["exact_match"].tolist() == [True, False]
    assert ext["frac_match"].tolist() == [1.0, 0.0]
    assert ext["levenshtein"].tolist()[0] == 0


def test_extraction_rate_split_does_not_depend_on_what_the_model_extracts():
    """The extraction-rate track: the same candidates give the same split whatever the model
    generates; strata (group, copies) keep their share; the memorized track is unaffected."""
    import numpy as np
    import pandas as pd

    from memctl.extract import split_memorized

    rng = np.random.default_rng(0)
    n = 450
    ext = pd.DataFrame({
        "candidate_id": [f"c{i:03d}" for i in range(n)],
        "group": np.where(np.arange(n) % 3 == 0, "canary-words", "corpus-window"),
        "copies": rng.choice([1, 2, 4, 16], size=n),
        "prefix_ids": [np.arange(4)] * n, "suffix_ids": [np.arange(4)] * n,
    })
    splits = []
    for outcome_seed in (1, 2):
        frac = np.random.default_rng(outcome_seed).random(n)
        table = ext.assign(frac_match=(frac > 0.5).astype(float), exact_match=frac > 0.5, n_match=(frac > 0.5) * 4, n_suffix=4)
        splits.append(split_memorized(table, {"split_seed": 42, "er_test_fraction": 1 / 15}))
    a, b = splits
    assert list(a["er_test"]["candidate_id"]) == list(b["er_test"]["candidate_id"])
    assert list(a["memorized_test"]["candidate_id"]) != list(b["memorized_test"]["candidate_id"])
    assert len(a["er_test"]) + len(a["er_train"]) == n and not set(a["er_test"]["candidate_id"]) & set(a["er_train"]["candidate_id"])
    for (group, copies), part in ext.groupby(["group", "copies"]):
        test = a["er_test"][(a["er_test"]["group"] == group) & (a["er_test"]["copies"] == copies)]
        assert len(test) == round(len(part) / 15)
    # another seed, another split
    other = split_memorized(ext.assign(frac_match=0.0, exact_match=False, n_match=0, n_suffix=4),
                            {"split_seed": 7, "er_test_fraction": 1 / 15})
    assert set(other["er_test"]["candidate_id"]) != set(a["er_test"]["candidate_id"])


def test_the_validation_slice_comes_off_the_train_side_and_leaves_the_test_split_alone():
    ext = fake_extraction(80)
    base = {"memorized_threshold": 1.0, "test_fraction": 0.25, "split_seed": 42}
    none = split_memorized(ext, {**base, "validation_fraction": 0.0})
    some = split_memorized(ext, {**base, "validation_fraction": 0.2})
    ids = {k: set(some[k]["candidate_id"]) for k in ("memorized_train", "memorized_val", "memorized_test")}
    mem = set(some["memorized"]["candidate_id"])
    assert len(ids["memorized_val"]) == round(0.2 * len(mem)) and len(none["memorized_val"]) == 0
    assert ids["memorized_val"].isdisjoint(ids["memorized_train"] | ids["memorized_test"])
    assert ids["memorized_train"] | ids["memorized_val"] | ids["memorized_test"] == mem
    # the same test split whatever the validation share: choosing strengths never moves the test set
    assert some["memorized_test"]["candidate_id"].tolist() == none["memorized_test"]["candidate_id"].tolist()
    assert set(none["memorized_train"]["candidate_id"]) == ids["memorized_train"] | ids["memorized_val"]


def test_the_out_of_domain_group_is_held_out_of_every_table_and_cut_to_a_short_suffix():
    ext = fake_extraction(60)
    ext["group"] = ["quotes" if i % 6 == 0 else "g" for i in range(60)]
    settings = {"memorized_threshold": 1.0, "test_fraction": 0.25, "split_seed": 42, "ood_group": "quotes",
                "ood_suffix_len": 2, "disjoint_ngram": 0}
    out = split_memorized(ext, settings)
    quotes = set(ext.loc[ext["group"] == "quotes", "candidate_id"])
    assert set(out["ood"]["candidate_id"]) == quotes and len(quotes) == 10
    for name in ("memorized", "nonmemorized", "memorized_train", "memorized_val", "memorized_test", "er_train", "er_test"):
        assert quotes.isdisjoint(out[name]["candidate_id"]), name
    first = ext.loc[ext["candidate_id"] == "c6", "suffix_ids"].iloc[0]
    row = out["ood"].set_index("candidate_id").loc["c6"]
    assert list(row["suffix_ids"]) == list(first[:2]) and "exact_match" not in out["ood"]
    # without generations nothing is known to be memorized
    assert not out["ood"]["memorized"].any()
    # a group that is not there, or a suffix longer than the group's, fails naming the key
    with pytest.raises(ValueError, match="extract.ood_group: .* no group 'poems'"):
        split_memorized(ext, {**settings, "ood_group": "poems"})
    with pytest.raises(ValueError, match="extract.ood_suffix_len: 9 exceeds the 4-token suffixes"):
        split_memorized(ext, {**settings, "ood_suffix_len": 9})
    assert len(split_memorized(ext, {**settings, "ood_group": None})["ood"]) == 0


def test_out_of_domain_rows_say_whether_the_unedited_model_extracts_their_short_suffix():
    """The paper's out-of-domain set is memorized quotes (8-token suffixes): a quote is memorized
    when the first ``ood_suffix_len`` generated tokens match, whatever the rest of its long suffix
    does. Cases worked by hand on 4-token suffixes cut to 2."""
    suffix = [7, 8, 9, 10]
    generated = {  # candidate -> the unedited model's greedy 4 tokens
        "q0": [7, 8, 9, 10],   # all match: memorized
        "q1": [7, 8, 0, 0],    # the first 2 match, the rest not: memorized on the short suffix
        "q2": [7, 0, 9, 10],   # second token wrong: not
        "q3": [0, 8, 9, 10],   # first token wrong: not
    }
    ext = pd.DataFrame({
        "candidate_id": list(generated) + ["g0", "g1"],
        "prefix_ids": [[1, 2, 3, 4]] * 6,
        "suffix_ids": [suffix] * 6,
        "generated_ids": [np.asarray(g) for g in generated.values()] + [np.asarray(suffix)] * 2,
        "frac_match": [1.0, 0.5, 0.75, 0.75, 1.0, 1.0], "exact_match": [True, False, False, False, True, True],
        "n_match": [4, 2, 3, 3, 4, 4], "n_suffix": 4, "levenshtein_sim": 1.0,
        "group": ["quotes"] * 4 + ["g"] * 2, "copies": 1,
    })
    settings = {"memorized_threshold": 1.0, "ood_group": "quotes", "ood_suffix_len": 2, "disjoint_ngram": 0}
    ood = split_memorized(ext, settings)["ood"].set_index("candidate_id")
    assert ood["memorized"].to_dict() == {"q0": True, "q1": True, "q2": False, "q3": False}
    # a looser threshold (half of the short suffix) takes in q2 and q3 too: each matches 1 of 2 tokens
    loose = split_memorized(ext, {**settings, "memorized_threshold": 0.5})["ood"].set_index("candidate_id")
    assert loose["memorized"].to_dict() == {"q0": True, "q1": True, "q2": True, "q3": True}


def test_evaluation_scores_memorized_quotes_as_the_ood_track_and_the_others_apart(tiny_model, tiny_tokenizer):
    """The OOD columns count memorized quotes only (the paper's 125 memorized quotes); the others
    are scored in their own columns and track, each with its N."""
    from memctl.evaluate import evaluate_model

    rng = np.random.default_rng(0)
    pad = tiny_tokenizer.pad_token_id
    prefixes = [rng.integers(5, 200, size=6).tolist() for _ in range(5)]
    greedy = greedy_generate(tiny_model, prefixes, 3, pad, batch_size=8, progress=False)
    # the first three carry the model's own greedy continuation (memorized by construction), the
    # last two a continuation it does not produce
    suffixes = [list(map(int, g)) for g in greedy[:3]] + [[int(g[0]) + 1, int(g[1]), int(g[2])] for g in greedy[3:]]
    ood = pd.DataFrame({"candidate_id": [f"q{i}" for i in range(5)], "group": "quotes", "copies": 1,
                        "prefix_ids": prefixes, "suffix_ids": suffixes,
                        "memorized": [True, True, True, False, False]})
    memorized = pd.DataFrame({"candidate_id": ["m0"], "prefix_ids": [prefixes[0]], "suffix_ids": [suffixes[0]]})
    heldout = rng.integers(5, 200, size=(2, 16))
    row, scores = evaluate_model(tiny_model, memorized, heldout, pad, {"batch_size": 8}, "tiny", ood=ood,
                                 progress=False)
    row = row.iloc[0]
    assert row["ood_n_examples"] == 3 and row["ood_exact_er"] == 1.0
    assert row["ood_nonmem_n_examples"] == 2 and row["ood_nonmem_exact_er"] == 0.0
    assert set(scores.loc[scores["track"] == "ood", "candidate_id"]) == {"q0", "q1", "q2"}
    assert set(scores.loc[scores["track"] == "ood_nonmemorized", "candidate_id"]) == {"q3", "q4"}


def test_a_training_side_emptied_by_the_overlap_filter_is_said_at_extraction():
    from memctl.extract import drop_test_overlap
    from memctl.splits import overlap_warnings

    # every memory ends with the same 20-token sentence (the new user's templated secrets): every
    # training row shares a 16-token run with the test rows and is dropped
    closing = list(range(100, 120))

    def rows(start, n):
        return pd.DataFrame({"prefix_ids": [np.arange(start + 10 * i, start + 10 * i + 8) for i in range(n)],
                             "suffix_ids": [np.array(closing) for _ in range(n)]})

    empty = rows(0, 0)
    splits = {"memorized_test": rows(0, 2), "er_test": rows(50, 2), "memorized_train": rows(500, 3),
              "memorized_val": rows(900, 1), "er_train": pd.concat([rows(1000, 2), pd.DataFrame(
                  {"prefix_ids": [np.arange(3000, 3008)], "suffix_ids": [np.arange(4000, 4020)]})],
                  ignore_index=True), "ood": empty}
    out = drop_test_overlap(splits, 16)
    assert out["dropped"] == {"memorized_train": 3, "memorized_val": 1, "er_train": 2}
    kept = {k: len(v) for k, v in out.items() if k != "dropped"}
    lines = overlap_warnings(out["dropped"], kept, 16)
    assert len(lines) == 3  # memorized_train and memorized_val emptied, er_train lost 2 of 3 (more than half)
    train = next(line for line in lines if line.startswith("memorized_train"))
    assert "all rows dropped" in train and "nothing is left to train on" in train and "extract.disjoint_ngram: 16" in train
    assert next(line for line in lines if line.startswith("er_train")).startswith("er_train (the masks' and CSP's "
                                                                                  "memorization data): 2 of 3 rows")
    # a few rows lost is the filter doing its job: no warning
    assert overlap_warnings({"er_train": 1}, {"er_train": 99}, 16) == []
