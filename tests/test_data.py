"""Candidate loaders for every supported format, on small files written here."""

import json

import numpy as np
import pandas as pd
import pytest

from memctl.data import (
    DataError,
    build_candidates,
    count_occurrences,
    heldout_texts,
    heldout_windows,
    read_npy_candidates,
)

P, S = 4, 3
BASE = {"source": None, "path": None, "seed": 0, "max_candidates": None}


def settings(**kw):
    return {**BASE, **kw}


def test_jsonl_whole_sequence_ids(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.jsonl"
    rows = [{"id": "a", "tokens": list(range(10, 20))}, {"id": "b", "tokens": [1, 2, 3]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    df, stats = build_candidates(settings(source="jsonl", path=str(path)), tiny_tokenizer, P, S)
    assert df["candidate_id"].tolist() == ["a"]
    assert list(df["prefix_ids"][0]) == [10, 11, 12, 13]
    assert list(df["suffix_ids"][0]) == [14, 15, 16]
    assert stats["dropped"] == {"prefix_too_short": 0, "suffix_too_short": 0, "sequence_too_short": 1}
    assert stats["rows"] == 2 and stats["dropped_total"] == 1 and stats["kept"] == 1


def test_jsonl_text_prefix_suffix_is_tokenized(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.jsonl"
    prefix, suffix = "The quick brown fox jumps", " over the lazy dog. Pack my box"
    path.write_text(json.dumps({"prefix": prefix, "suffix": suffix}) + "\n")
    df, _ = build_candidates(settings(source="jsonl", path=str(path)), tiny_tokenizer, P, S)
    p_ids = tiny_tokenizer(prefix, add_special_tokens=False)["input_ids"]
    s_ids = tiny_tokenizer(suffix, add_special_tokens=False)["input_ids"]
    # Last P prefix tokens, first S suffix tokens.
    assert list(df["prefix_ids"][0]) == p_ids[-P:]
    assert list(df["suffix_ids"][0]) == s_ids[:S]


def test_parquet_with_named_columns(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.parquet"
    pd.DataFrame(
        {"key": [7, 8], "ctx": [[1, 2, 3, 4, 5], [6, 7, 8, 9]], "cont": [[9, 9, 9], [5, 5, 5, 5]], "copies": [3, 1]}
    ).to_parquet(path)
    s = settings(source="parquet", path=str(path), prefix_column="ctx", suffix_column="cont", id_column="key")
    df, _ = build_candidates(s, tiny_tokenizer, P, S)
    assert df["candidate_id"].tolist() == ["7", "8"]
    assert [list(x) for x in df["prefix_ids"]] == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert df["copies"].tolist() == [3, 1]


def test_missing_column_names_the_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(path)
    with pytest.raises(DataError, match=r"c\.parquet.*columns: \['x'\]"):
        build_candidates(settings(source="parquet", path=str(path)), tiny_tokenizer, P, S)
    with pytest.raises(DataError, match="column 'nope'"):
        build_candidates(settings(source="parquet", path=str(path), prefix_column="nope"), tiny_tokenizer, P, S)


def test_npy_benchmark_directory_layout(tmp_path, tiny_tokenizer):
    """LM extraction benchmark: uint16 *_preprefix / *_prefix / *_suffix arrays."""
    rng = np.random.default_rng(0)
    pre = rng.integers(0, 250, size=(5, 6)).astype(np.uint16)
    prefix = rng.integers(0, 250, size=(5, 5)).astype(np.uint16)
    suffix = rng.integers(0, 250, size=(5, 3)).astype(np.uint16)
    for name, arr in [("preprefix", pre), ("prefix", prefix), ("suffix", suffix)]:
        np.save(tmp_path / f"train_{name}.npy", arr)
    df, _ = build_candidates(settings(source="npy", path=str(tmp_path)), tiny_tokenizer, P, S)
    assert len(df) == 5
    np.testing.assert_array_equal(np.stack(df["prefix_ids"]), prefix[:, -P:])
    np.testing.assert_array_equal(np.stack(df["suffix_ids"]), suffix)


def test_npy_single_array(tmp_path):
    arr = np.arange(40, dtype=np.uint16).reshape(4, 10)
    np.save(tmp_path / "train_dataset.npy", arr)
    df = read_npy_candidates(tmp_path / "train_dataset.npy", P, S)
    np.testing.assert_array_equal(np.stack(df["suffix_ids"]), arr[:, -S:])
    np.testing.assert_array_equal(np.stack(df["prefix_ids"]), arr[:, :-S])


def test_npy_errors(tmp_path, tiny_tokenizer):
    np.save(tmp_path / "x_prefix.npy", np.zeros((2, 5), dtype=np.uint16))
    with pytest.raises(DataError, match="x_suffix.npy missing"):
        read_npy_candidates(tmp_path, P, S)


def test_hf_dataset_from_local_folder_and_saved_dataset(tmp_path, tiny_tokenizer):
    import datasets

    rows = {"text": ["The quick brown fox jumps over the lazy dog."] * 3, "id": ["x", "y", "z"]}
    folder = tmp_path / "folder"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "train.parquet")
    df, _ = build_candidates(settings(source="hf", hf_name=str(folder), hf_split="train"), tiny_tokenizer, P, S)
    assert df["candidate_id"].tolist() == ["x", "y", "z"]
    ids = tiny_tokenizer(rows["text"][0], add_special_tokens=False)["input_ids"]
    assert list(df["prefix_ids"][0]) == ids[:P] and list(df["suffix_ids"][0]) == ids[P : P + S]

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).save_to_disk(str(saved))
    df2, _ = build_candidates(settings(source="hf", hf_name=str(saved)), tiny_tokenizer, P, S)
    assert [list(x) for x in df2["suffix_ids"]] == [list(x) for x in df["suffix_ids"]]


def test_max_candidates_is_a_seeded_subsample(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"tokens": list(range(i, i + 8))}) for i in range(50)))
    s = settings(source="jsonl", path=str(path), max_candidates=10, seed=3)
    a, _ = build_candidates(s, tiny_tokenizer, P, S)
    b, _ = build_candidates(s, tiny_tokenizer, P, S)
    assert len(a) == 10 and a["candidate_id"].tolist() == b["candidate_id"].tolist()


def test_count_occurrences_matches_brute_force():
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 4, size=3000)
    windows = [stream[i : i + 5].tolist() for i in (0, 17, 400, 2990)] + [[9, 9, 9, 9, 9]]
    brute = [sum(stream[j : j + 5].tolist() == w for j in range(len(stream) - 4)) for w in windows]
    assert count_occurrences(stream, windows).tolist() == brute


def test_heldout_windows_are_non_overlapping(tmp_path, tiny_tokenizer):
    path = tmp_path / "wiki.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    texts, sep = heldout_texts({"source": "text", "path": str(path)})
    win = heldout_windows(texts, sep, tiny_tokenizer, 16)
    ids = tiny_tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    assert win.shape == (len(ids) // 16, 16)
    np.testing.assert_array_equal(win.reshape(-1), ids[: win.size])
    with pytest.raises(DataError, match="fewer than one window"):
        heldout_windows(["fox"], sep, tiny_tokenizer, 1000)


def test_demo_corpus_windows_avoid_canaries_and_count_copies(tmp_path, tiny_tokenizer):
    """Canary candidates carry their planted copies; corpus windows never overlap a canary."""
    from memctl.corpus_stream import train_token_stream

    canary = "zebra quartz violin mango seventy lantern orbit velvet crimson tundra falcon"
    segments = ["def add(a, b):\n    return a + b\n" * 4, canary, "The quick brown fox. " * 10, canary,
                "Pack my box with five dozen liquor jugs. " * 6, canary]
    pd.DataFrame({"segment": range(len(segments)), "kind": ["doc", "canary"] * 3, "text": segments}).to_parquet(
        tmp_path / "train.parquet")
    pd.DataFrame({"canary_id": ["words-003-000"], "kind": ["words"], "copies": [3], "text": [canary]}).to_parquet(
        tmp_path / "canaries.parquet")
    s = settings(source="demo", demo_windows=1000, demo_duplicated_windows=1000)
    df, _ = build_candidates(s, tiny_tokenizer, 8, 8, corpus_dir=tmp_path)
    can = df[df["group"] == "canary-words"]
    assert can["copies"].tolist() == [3] and can["planted_copies"].tolist() == [3]
    stream, mask = train_token_stream(tmp_path, tiny_tokenizer, return_canary_mask=True)
    windows = df[df["group"].str.startswith("corpus")]
    assert len(windows) > 0
    for cid, copies in zip(windows["candidate_id"], windows["copies"]):
        start = int(cid.split(":")[1])
        assert not mask[start : start + 16].any()
        assert copies == count_occurrences(stream, [stream[start : start + 16].tolist()])[0] >= 1
    assert (df.loc[df["group"] == "corpus-duplicate", "copies"] >= 2).all()


def test_source_tokenizer_retokenizes_id_columns(tmp_path, tiny_tokenizer):
    """Ids written with another tokenizer are decoded with it and re-encoded with the model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    other.train_from_iterator(
        ["lorem ipsum dolor sit amet " * 20],
        trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<eos>").save_pretrained(tmp_path / "src_tok")
    src = PreTrainedTokenizerFast.from_pretrained(tmp_path / "src_tok")

    prefix_text, suffix_text = "def add(a, b):\n    return", " a + b\nThe quick brown fox"
    row = {"prefix": src(prefix_text)["input_ids"], "suffix": src(suffix_text)["input_ids"]}
    target = {k: tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for k, t in
              (("prefix", prefix_text), ("suffix", suffix_text))}
    assert row["prefix"] != target["prefix"]  # the two vocabularies really differ
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n")
    s = settings(source="jsonl", path=str(path), source_tokenizer=str(tmp_path / "src_tok"))
    df, _ = build_candidates(s, tiny_tokenizer, P, S)
    assert list(df["prefix_ids"][0]) == target["prefix"][-P:]
    assert list(df["suffix_ids"][0]) == target["suffix"][:S]


# ------------------------------------------------------------- the examples of docs/data-formats.md

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def test_documented_example_prefix_suffix_text_with_groups_and_copies(tiny_tokenizer):
    """examples/memories.jsonl: text prefix / suffix, candidate_id, group, copies, as documented:
    the last prefix_len prefix tokens and the first suffix_len suffix tokens of the text."""
    rows = [json.loads(line) for line in (EXAMPLES / "memories.jsonl").read_text().splitlines()]
    df, stats = build_candidates(settings(source="jsonl", path=str(EXAMPLES / "memories.jsonl")), tiny_tokenizer, 32, 32)
    assert stats["kept"] == len(rows) == 48 and stats["dropped_total"] == 0
    assert df["candidate_id"].tolist() == [r["candidate_id"] for r in rows]
    assert sorted(set(df["group"])) == ["addresses", "secrets"]
    assert sorted(set(df["copies"])) == [1, 2, 4, 8, 16, 32]
    first = rows[0]
    enc = lambda t: tiny_tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert list(df["prefix_ids"][0]) == enc(first["prefix"])[-32:]
    assert list(df["suffix_ids"][0]) == enc(first["suffix"])[:32]
    # the stratified split of the extraction-rate track: 4 per (group, copies) stratum
    from memctl.extract import split_extraction_rate

    assert len(split_extraction_rate(df, 1 / 15, 42)[1]) == 0  # round(4/15) = 0 per stratum: the documented trap
    assert len(split_extraction_rate(df, 0.25, 42)[1]) == 12


def test_documented_example_whole_text_and_ids(tiny_tokenizer):
    df, _ = build_candidates(settings(source="jsonl", path=str(EXAMPLES / "memories-text.jsonl")), tiny_tokenizer, 32, 32)
    text = json.loads((EXAMPLES / "memories-text.jsonl").read_text().splitlines()[0])
    ids = tiny_tokenizer(text["text"], add_special_tokens=False)["input_ids"]
    assert list(df["prefix_ids"][0]) == ids[:32] and list(df["suffix_ids"][0]) == ids[32:64]
    assert df["copies"].tolist() == [1, 2, 4, 8, 16, 32] and set(df["group"]) == {"journal"}
    df, _ = build_candidates(settings(source="jsonl", path=str(EXAMPLES / "memories-ids.jsonl")), tiny_tokenizer,
                             32, 32, vocab_size=len(tiny_tokenizer))
    row = json.loads((EXAMPLES / "memories-ids.jsonl").read_text().splitlines()[0])
    assert list(df["prefix_ids"][0]) == row["prefix_ids"][-32:] and list(df["suffix_ids"][0]) == row["suffix_ids"][:32]


def test_documented_example_npy_layouts(tmp_path, tiny_tokenizer):
    """examples/lm-extraction-benchmark/: the directory layout (pre-prefix prepended), and the same
    rows as one array (the train_dataset.npy layout: the last suffix_len columns are the suffix)."""
    d = EXAMPLES / "lm-extraction-benchmark"
    pre, prefix, suffix = (np.load(d / f"example_{n}.npy") for n in ("preprefix", "prefix", "suffix"))
    assert prefix.dtype == np.uint16 and prefix.shape == (4, 50) and pre.shape == (4, 10)
    df, _ = build_candidates(settings(source="npy", path=str(d)), tiny_tokenizer, 50, 50, vocab_size=len(tiny_tokenizer))
    assert df["candidate_id"].tolist() == [f"row-{i:07d}" for i in range(4)]
    assert list(df["prefix_ids"][1]) == prefix[1].tolist() and list(df["suffix_ids"][1]) == suffix[1].tolist()
    assert set(df["group"]) == {"all"} and set(df["copies"]) == {-1}
    longer, _ = build_candidates(settings(source="npy", path=str(d)), tiny_tokenizer, 55, 50)
    assert list(longer["prefix_ids"][0]) == pre[0, -5:].tolist() + prefix[0].tolist()
    np.save(tmp_path / "train_dataset.npy", np.concatenate([pre, prefix, suffix], axis=1))
    single, _ = build_candidates(settings(source="npy", path=str(tmp_path / "train_dataset.npy")), tiny_tokenizer,
                                 50, 50)
    assert [list(x) for x in single["suffix_ids"]] == [list(x) for x in df["suffix_ids"]]
    assert [list(x) for x in single["prefix_ids"]] == [list(x) for x in df["prefix_ids"]]


@pytest.mark.parametrize("source", ["text", "jsonl", "parquet"])
def test_documented_example_heldout_text(tmp_path, tiny_tokenizer, source):
    text = (EXAMPLES / "heldout.txt").read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    path = {"text": EXAMPLES / "heldout.txt", "jsonl": tmp_path / "h.jsonl", "parquet": tmp_path / "h.parquet"}[source]
    if source == "jsonl":
        path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    elif source == "parquet":
        pd.DataFrame({"text": paragraphs}).to_parquet(path)
    texts, sep = heldout_texts({"source": source, "path": str(path), "text_column": "text"})
    assert sep == "\n\n" and len(texts) == (1 if source == "text" else len(paragraphs))
    windows = heldout_windows(texts, sep, tiny_tokenizer, 64)
    assert windows.shape[1] == 64 and windows.shape[0] >= 20


def test_group_and_copies_cells(tmp_path, tiny_tokenizer):
    """A row without a group is in 'all' (not 'nan'); a copies value that is not a count is refused."""
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"tokens": list(range(10, 20)), "group": "g", "copies": 3},
        {"tokens": list(range(20, 30)), "copies": None}]))
    df, _ = build_candidates(settings(source="jsonl", path=str(path)), tiny_tokenizer, P, S)
    assert df["group"].tolist() == ["g", "all"] and df["copies"].tolist() == [3, -1]
    path.write_text(json.dumps({"tokens": list(range(10, 20)), "copies": 2.5}))
    with pytest.raises(DataError, match=r"row 0 column 'copies': 2.5 is not a count"):
        build_candidates(settings(source="jsonl", path=str(path)), tiny_tokenizer, P, S)
