"""Canary families (issue 23): structured demo memories that share a frame, their settings, and the
extraction-rate split that puts every family on both sides. Fast: canaries are drawn from a
synthetic word list (no standard library, no tokenizer, no model), except one planting test."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest

from memctl import overlap
from memctl.config import ConfigError, validate_section
from memctl.demo.corpus import (
    BOILERPLATE_LINES,
    STRUCTURED_KINDS,
    build_corpus,
    kind_of,
    make_canaries,
)
from memctl.extract import drop_test_overlap, is_family_group, split_extraction_rate

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
#: 2,000 made-up lowercase words (4-6 letters), sorted: stands in for the stdlib word list.
WORDS = sorted({a + b + (c if i % 3 == 0 else "") for i, (a, b, c) in
                enumerate(itertools.product(SYLLABLES, SYLLABLES, ["", "n", "r"]))})[:2000]
FAMILIES = {"kinds": ["words", "records", "near_dups", "boilerplate"], "per_count": {"words": 3},
            "copies": [2, 8], "words": 20, "families": {"records": 4, "near_dups": 3, "boilerplate": 2},
            "family_members": 5, "family_copies": [4, 6, 8, 12, 16], "record_fields": 6,
            "near_dup_words": 30, "near_dup_edit_every": 5, "boilerplate_lines": 4, "seed": 11}


@pytest.fixture(scope="module")
def canaries():
    return make_canaries(FAMILIES, WORDS, forbidden_text="")


def _members(canaries: pd.DataFrame, kind: str) -> dict[str, list[str]]:
    fams = canaries[canaries["kind"].map(kind_of) == kind]
    return {name: part.sort_values("canary_id")["text"].tolist() for name, part in fams.groupby("kind", sort=True)}


def _longest_shared_run(a: list[str], b: list[str]) -> int:
    """Length of the longest run of consecutive tokens that ``a`` and ``b`` share."""
    best = 0
    for n in range(1, min(len(a), len(b)) + 1):
        if {tuple(a[i:i + n]) for i in range(len(a) - n + 1)} & {tuple(b[i:i + n]) for i in range(len(b) - n + 1)}:
            best = n
        else:
            break
    return best


def _pretokens(text: str) -> list[str]:
    """Words with their leading space, numbers, single punctuation marks and line ends: the pieces a
    byte-level BPE's pre-tokenizer cuts (each BPE token lies inside one)."""
    return re.findall(r" ?[A-Za-z]+| ?[0-9]+|\n|[^\sA-Za-z0-9]", text)


# ------------------------------------------------------------------------------- the generator

def test_counts_names_and_copies(canaries):
    """Families per kind and members per family as configured; member j of family i is planted
    family_copies[(i + j) % 5] times (so with 5 members and 5 counts every family spans 4-16
    copies once each); the control kind keeps per_count per copy count."""
    kinds = canaries["kind"].map(kind_of)
    assert kinds.value_counts().to_dict() == {"records": 20, "near_dups": 15, "boilerplate": 10, "words": 6}
    fams = canaries[kinds != "words"]
    assert sorted(fams["kind"].unique()) == [
        "boilerplate-0", "boilerplate-1", "near_dups-0", "near_dups-1", "near_dups-2",
        "records-0", "records-1", "records-2", "records-3"]
    assert set(fams.groupby("kind").size()) == {5}
    for _name, part in fams.groupby("kind"):
        assert sorted(part["copies"]) == [4, 6, 8, 12, 16]
    # records-1: members 0..4 at family_copies[1..5 mod 5] = 6, 8, 12, 16, 4
    rec1 = canaries[canaries["kind"] == "records-1"].sort_values("canary_id", key=lambda s: s.str[-3:])
    assert rec1["copies"].tolist() == [6, 8, 12, 16, 4]
    assert rec1["canary_id"].tolist() == ["records-1-006-000", "records-1-008-001", "records-1-012-002",
                                          "records-1-016-003", "records-1-004-004"]
    assert canaries.groupby(["kind", "copies"]).size()[("words", 2)] == 3
    assert canaries["canary_id"].is_unique and canaries["text"].is_unique
    assert kind_of("records-12") == "records" and kind_of("words") == "words" and kind_of("near_dups-0") == "near_dups"


def test_records_share_the_frame_and_vary_every_field(canaries):
    for name, texts in _members(canaries, "records").items():
        parsed = []
        for text in texts:
            title, _, body = text.partition(". ")
            assert title.endswith(" register") and body.endswith(".")
            fields = [f.split(": ", 1) for f in body[:-1].split("; ")]
            assert len(fields) == FAMILIES["record_fields"]
            parsed.append((title, [k for k, _ in fields], [v for _, v in fields]))
        titles, labels, values = zip(*parsed)
        assert len(set(titles)) == 1 and len({tuple(x) for x in labels}) == 1, name  # one frame
        assert len(set(labels[0])) == len(labels[0])                                # distinct labels
        for slot in zip(*values):                                                    # every field varies
            assert len(set(slot)) == len(slot), (name, slot)


def test_near_dups_replace_one_word_in_every_k(canaries):
    """Variants of one base text: same length, the same positions edited in every member (one in
    every near_dup_edit_every words, by pairwise different words), everything else equal."""
    k = FAMILIES["near_dup_edit_every"]
    for name, texts in _members(canaries, "near_dups").items():
        split = [t.split(" ") for t in texts]
        assert {len(s) for s in split} == {FAMILIES["near_dup_words"]}
        differs = [len({s[i] for s in split}) > 1 for i in range(len(split[0]))]
        edited = [i for i, d in enumerate(differs) if d]
        assert edited and all(b - a == k for a, b in zip(edited, edited[1:])) and edited[0] < k, (name, edited)
        for i in edited:
            assert len({s[i] for s in split}) == len(split)
            # case and trailing punctuation of the base word are kept
            assert len({(w[:1].isupper(), w[len(w.rstrip(',.')):]) for w in (s[i] for s in split)}) == 1


def test_boilerplate_lines_come_from_the_bank_and_vary(canaries):
    patterns = [re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t)) + "$") for t in BOILERPLATE_LINES]
    for name, texts in _members(canaries, "boilerplate").items():
        lines = [t.split("\n") for t in texts]
        assert {len(x) for x in lines} == {FAMILIES["boilerplate_lines"]}
        for row in zip(*lines):  # line i of every member: one template, pairwise different texts
            templates = {next(j for j, p in enumerate(patterns) if p.match(line)) for line in row}
            assert len(templates) == 1 and len(set(row)) == len(row), (name, row)


def test_members_share_no_long_run(canaries):
    """The shared frame is never 16 pieces long: at most near_dup_edit_every - 1 = 4 words between
    two edits (each a word and its punctuation), a few for records and boilerplate. (Measured with
    the quick tour's 4,096-token BPE: at most 12 shared tokens, docs/demo-testbed.md.)"""
    worst = {}
    for kind in STRUCTURED_KINDS:
        for texts in _members(canaries, kind).values():
            toks = [_pretokens(t)[:64] for t in texts]
            run = max(_longest_shared_run(a, b) for a, b in itertools.combinations(toks, 2))
            worst[kind] = max(worst.get(kind, 0), run)
    assert max(worst.values()) < 16, worst
    assert worst["near_dups"] <= 2 * (FAMILIES["near_dup_edit_every"] - 1) + 1, worst


def test_deterministic_and_seeded():
    a = make_canaries(FAMILIES, WORDS, forbidden_text="")
    b = make_canaries(FAMILIES, WORDS, forbidden_text="")
    pd.testing.assert_frame_equal(a, b)
    c = make_canaries({**FAMILIES, "seed": 12}, WORDS, forbidden_text="")
    assert not set(a["text"]) & set(c["text"])


def test_families_leave_the_control_canaries_unchanged():
    """Each structured kind draws from its own stream: the control canaries (here words) are the
    same with or without families, and one kind's families do not depend on another's."""
    control = {k: v for k, v in FAMILIES.items() if k not in ("families",)} | {"kinds": ["words"]}
    alone = make_canaries(control, WORDS, forbidden_text="")
    both = make_canaries(FAMILIES, WORDS, forbidden_text="")
    pd.testing.assert_frame_equal(alone, both[both["kind"] == "words"].reset_index(drop=True))
    only_records = make_canaries({**FAMILIES, "kinds": ["records"], "families": {"records": 4}, "per_count": 1},
                                 WORDS, "")
    pd.testing.assert_frame_equal(
        only_records, both[both["kind"].str.startswith("records")].reset_index(drop=True))


def test_members_are_planted_copies_times(tmp_path):
    """Through build_corpus (a small stand-in standard library): every member occurs in the
    training stream exactly `copies` times, never in the held-out slice."""
    for i in range(12):
        body = " ".join(WORDS[(37 * i + j) % len(WORDS)] for j in range(120))
        (tmp_path / f"mod{i:02d}.py").write_text(f'"""Module {i}: {body}."""\n\nVALUE = {i}\n')
    settings = {"kinds": ["records", "near_dups"], "families": 2, "family_members": 3,
                "family_copies": [1, 3], "record_fields": 5, "near_dup_words": 12, "seed": 3}
    train, heldout, canaries = build_corpus({"max_chars": 30_000, "heldout_fraction": 0.2, "seed": 3}, settings,
                                            root=tmp_path)
    assert not any(t in h for t in canaries["text"] for h in heldout["text"])
    assert len(canaries) == 12 and sorted(canaries["kind"].unique()) == [
        "near_dups-0", "near_dups-1", "records-0", "records-1"]
    stream = "\n".join(train.loc[train["kind"] == "canary", "text"])
    for text, copies in zip(canaries["text"], canaries["copies"]):
        assert stream.count(text) == copies
    assert canaries["copies"].tolist() == [1, 3, 1, 3, 1, 3] * 2


# ------------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("settings, key", [
    ({"families": 0}, "demo.canaries.families"),
    ({"families": {"words": 2}}, "demo.canaries.families"),
    ({"family_members": 1}, "demo.canaries.family_members"),
    ({"family_members": 41}, "demo.canaries.family_members"),
    ({"family_copies": []}, "demo.canaries.family_copies"),
    ({"family_copies": [4, 0]}, "demo.canaries.family_copies"),
    ({"record_fields": 3}, "demo.canaries.record_fields"),
    ({"near_dup_edit_every": 1}, "demo.canaries.near_dup_edit_every"),
    ({"boilerplate_lines": 17}, "demo.canaries.boilerplate_lines"),
    ({"kinds": ["records", "licences"]}, "demo.canaries.kinds"),
])
def test_schema_refuses_bad_settings_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_section("demo.canaries", settings)


@pytest.mark.parametrize("settings, key", [
    ({"families": {"records": 2, "near_dups": 1}, "kinds": ["records"]}, "demo.canaries.families"),
    ({"families": {"quotes": 2}}, "demo.canaries.families"),
    ({"family_members": 1}, "demo.canaries.family_members"),
    ({"family_copies": [0]}, "demo.canaries.family_copies"),
    ({"near_dup_words": 8, "near_dup_edit_every": 8}, "demo.canaries.near_dup_edit_every"),
    ({"boilerplate_lines": 99}, "demo.canaries.boilerplate_lines"),
])
def test_generator_refuses_bad_settings_naming_the_key(settings, key):
    """The library call (no config validation before it) refuses them too."""
    base = {"kinds": ["records", "near_dups", "boilerplate"], "per_count": 1}
    with pytest.raises(ConfigError, match=re.escape(key)):
        make_canaries({**base, **settings}, WORDS, forbidden_text="")


# ----------------------------------------------------------------------------------- the split

def _candidates(canaries: pd.DataFrame) -> pd.DataFrame:
    """The identity columns demo_candidates gives the canaries (group canary-<kind column>)."""
    return pd.DataFrame({"candidate_id": "canary:" + canaries["canary_id"],
                         "group": "canary-" + canaries["kind"], "copies": canaries["copies"]})


def _old_split(table: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """The split before families (by group and copy count, round(n * fraction) per stratum)."""
    order = table.sort_values(["group", "copies", "candidate_id"], kind="stable")
    test = []
    for i, (_s, part) in enumerate(order.groupby(["group", "copies"], sort=True)):
        idx = part.index.to_numpy()[np.random.default_rng([seed, i]).permutation(len(part))]
        test.extend(idx[: int(round(len(part) * fraction))].tolist())
    return np.sort(np.asarray(test, dtype=np.int64))


def test_split_puts_every_family_on_both_sides():
    """Quick-tour sizes: 16 families of 5 per kind and 28 words canaries per copy count. At
    er_test_fraction 1/15 a family of 5 gives round(5/15) = 0, raised to 1, member to the test side
    (48 in all); a words stratum of 28 gives round(28/15) = 2 (16 over the 8 counts)."""
    settings = {"kinds": ["words", *STRUCTURED_KINDS], "per_count": {"words": 28}, "words": 12,
                "copies": [2, 3, 4, 6, 8, 12, 16, 24], "families": 16, "family_members": 5, "seed": 1}
    table = _candidates(make_canaries(settings, WORDS, forbidden_text=""))
    train, test = split_extraction_rate(table, 1 / 15, 42)
    assert len(train) + len(test) == len(table) == 224 + 240 and not set(train) & set(test)
    side = pd.Series("train", index=table.index)
    side.iloc[test] = "test"
    fams = table[table["group"].map(is_family_group)]
    per_family = side[fams.index].groupby(fams["group"]).value_counts().unstack(fill_value=0)
    assert len(per_family) == 48 and (per_family["test"] == 1).all() and (per_family["train"] == 4).all()
    assert (side[table["group"] == "canary-words"] == "test").sum() == 16
    # deterministic, and seeded
    assert np.array_equal(split_extraction_rate(table, 1 / 15, 42)[1], test)
    assert not np.array_equal(split_extraction_rate(table, 1 / 15, 43)[1], test)


@pytest.mark.parametrize("members, fraction, n_test", [(2, 1 / 15, 1), (5, 1 / 15, 1), (40, 1 / 15, 3),
                                                        (3, 0.9, 2), (1, 0.5, 0)])
def test_split_family_sizes(members, fraction, n_test):
    """round(n * fraction) per family, but at least 1 and at most n - 1 (n >= 2): 40 x 1/15 = 2.67
    -> 3; 3 x 0.9 = 2.7 -> 3, capped at 2; a single member stays on the train side."""
    table = pd.DataFrame({"candidate_id": [f"c{i:02d}" for i in range(members)],
                          "group": "canary-records-7", "copies": ([4, 6, 8, 12, 16] * 8)[:members]})
    assert len(split_extraction_rate(table, fraction, 0)[1]) == n_test


def test_split_without_families_is_unchanged():
    """Groups that are not families (the control kinds, corpus windows, user groups) keep the
    stratified split by group and copy count row for row (the tiny test store's tables)."""
    rng = np.random.default_rng(5)
    table = pd.DataFrame({"candidate_id": [f"x{i:04d}" for i in range(300)],
                          "group": rng.choice(["canary-words", "canary-digits", "corpus-window", "licence-a"], 300),
                          "copies": rng.choice([1, 2, 4, 8, 16], 300)})
    for fraction, seed in ((1 / 15, 42), (0.25, 7)):
        assert np.array_equal(split_extraction_rate(table, fraction, seed)[1], _old_split(table, fraction, seed))
    assert not any(map(is_family_group, ["canary-words", "canary-quotes", "corpus-duplicate", "records-3"]))
    assert all(map(is_family_group, ["canary-records-3", "canary-near_dups-0", "canary-boilerplate-15"]))


def test_disjointness_filter_keeps_family_members_and_drops_exact_overlap():
    """The 16-gram filter (extract.drop_test_overlap) compares prefix + suffix of each training-side
    row with every test sequence: family members share frame pieces shorter than 16 tokens, so a
    family's training members survive next to its test member; an exact copy of a test member (or
    a row sharing 16 tokens with one) is still dropped."""
    # the schema's default sizes (records 11 fields, near_dups 52 words, boilerplate 7 lines)
    canaries = make_canaries({"kinds": list(STRUCTURED_KINDS), "families": 4, "seed": 2}, WORDS, "")
    vocab: dict[str, int] = {}
    rows = []
    for rec in canaries.to_dict("records"):
        ids = [vocab.setdefault(p, len(vocab)) for p in _pretokens(rec["text"])]
        rows.append({"candidate_id": rec["canary_id"], "group": f"canary-{rec['kind']}", "copies": rec["copies"],
                     "ids": ids})
    # the 32/32 window where the (short) test canaries allow it, else the longest even window
    half = min(32, min(len(r["ids"]) for r in rows) // 2)
    assert half >= 24
    for r in rows:
        ids = r.pop("ids")
        r["prefix_ids"], r["suffix_ids"] = np.asarray(ids[:half]), np.asarray(ids[half:2 * half])
    table = pd.DataFrame(rows)
    fams = table[table["group"].map(is_family_group)].reset_index(drop=True)
    # members of a family differ inside the scored suffix window, not only in the prefix
    for _g, part in fams.groupby("group"):
        assert len({tuple(s) for s in part["suffix_ids"]}) == len(part)
    train, test = split_extraction_rate(fams, 1 / 15, 42)
    empty = fams.iloc[0:0]
    splits = {"er_train": fams.iloc[train].reset_index(drop=True), "er_test": fams.iloc[test].reset_index(drop=True),
              "memorized_train": empty, "memorized_val": empty, "memorized_test": empty}
    kept = drop_test_overlap(dict(splits), overlap.DEFAULT_N)
    assert kept["dropped"]["er_train"] == 0 and len(kept["er_train"]) == len(train) == 12 * 4
    # an exact copy of a test member on the training side is dropped, as is a row sharing 16 tokens
    copy = splits["er_test"].iloc[[0]].assign(candidate_id="copy")
    shifted = splits["er_test"].iloc[[1]].assign(candidate_id="shifted")
    seq = np.concatenate([shifted["prefix_ids"].iloc[0], shifted["suffix_ids"].iloc[0]])
    shifted["prefix_ids"] = [np.concatenate([[len(vocab)] * 8, seq[:16]])]
    shifted["suffix_ids"] = [np.asarray([len(vocab) + 1] * 8)]
    splits["er_train"] = pd.concat([splits["er_train"], copy, shifted], ignore_index=True)
    kept = drop_test_overlap(splits, overlap.DEFAULT_N)
    assert kept["dropped"]["er_train"] == 2 and "copy" not in set(kept["er_train"]["candidate_id"])
