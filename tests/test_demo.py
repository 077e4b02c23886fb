"""The embedded demo: corpus, canaries, tokenizer and tiny pretraining (small settings, fast)."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from memctl.config import ConfigError
from memctl.corpus_stream import tokenize_segments, train_token_stream
from memctl.demo import resolve_settings, section_defaults
from memctl.demo.corpus import build_corpus, dedup_key, split_document
from memctl.demo.pretrain import lr_at, pretrain, save_model
from memctl.demo.tokenizer import train_tokenizer
from memctl.store import sidecar_path, verify

CORPUS = {"max_chars": 50_000, "heldout_fraction": 0.1, "min_doc_chars": 200, "seed": 3}
CANARIES = {"copies": [1, 2, 5], "per_count": 2, "kinds": ["words", "digits"], "words": 16, "digits": 32, "seed": 7}
TOKENIZER = {"vocab_size": 600, "min_frequency": 2}
ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "context_length": 32}
# fp32: bf16 autocast is emulated (several times slower) on CPUs without avx512_bf16 / amx_bf16;
# the bf16 path is trained (twice, and compared) by the slow determinism test.
TRAIN = {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "min_lr_ratio": 0.1, "bf16": False, "seed": 0}


@pytest.fixture(scope="module")
def corpus():
    train, heldout, canaries, stats = build_corpus(CORPUS, CANARIES, return_stats=True)
    return train, heldout, canaries, stats


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus[0]["text"].tolist(), TOKENIZER)


@pytest.fixture(scope="module")
def trained(corpus, tokenizer):
    stream = tokenize_segments(corpus[0]["text"].tolist(), tokenizer)
    model, log = pretrain(stream, tokenizer, ARCH, TRAIN, progress=False)
    return stream, model, log


# --------------------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seed_dependent(corpus):
    train, heldout, canaries = build_corpus(CORPUS, CANARIES)
    pd.testing.assert_frame_equal(train, corpus[0])
    pd.testing.assert_frame_equal(heldout, corpus[1])
    pd.testing.assert_frame_equal(canaries, corpus[2])
    other = build_corpus(dict(CORPUS, seed=4), CANARIES)[0]
    assert set(other["doc_id"].dropna()) != set(train["doc_id"].dropna())


def test_corpus_schema_and_cap(corpus):
    train, heldout, canaries, stats = corpus
    assert list(train.columns) == ["segment", "kind", "doc_id", "canary_id", "source", "text"]
    assert list(heldout.columns) == ["doc_id", "source", "text"]
    assert list(canaries.columns) == ["canary_id", "kind", "copies", "text", "n_chars"]
    assert train["segment"].tolist() == list(range(len(train)))
    assert set(train["kind"]) == {"doc", "canary"}
    docs = train[train["kind"] == "doc"]
    plants = train[train["kind"] == "canary"]
    assert docs["canary_id"].isna().all() and docs["doc_id"].notna().all()
    assert plants["doc_id"].isna().all() and plants["canary_id"].notna().all()
    assert (plants["source"] == "canary").all()
    assert all(src.endswith(".py") and not src.startswith("/") for src in docs["source"])
    doc_chars = docs["text"].str.len().sum() + heldout["text"].str.len().sum()
    assert doc_chars <= CORPUS["max_chars"]
    assert (docs["text"].str.len() >= CORPUS["min_doc_chars"]).all()
    assert stats["docs_train"] == len(docs) and stats["docs_heldout"] == len(heldout)
    assert stats["canary_insertions"] == len(plants)


def test_no_duplicate_documents(corpus):
    train, heldout, _, _ = corpus
    texts = train.loc[train["kind"] == "doc", "text"].tolist() + heldout["text"].tolist()
    keys = [dedup_key(t) for t in texts]
    assert len(set(keys)) == len(keys)
    ids = train["doc_id"].dropna().tolist() + heldout["doc_id"].tolist()
    assert len(set(ids)) == len(ids)


def test_sources_skip_tests_and_dedupe(tmp_path):
    body = "def helper(value):\n    '''Return the value unchanged.'''\n    return value\n" * 8
    files = {
        "a.py": body,
        "b.py": body.replace("    ", "\t") + "\n\n",  # same text up to whitespace: a duplicate
        "c.py": "x = 1\n",  # shorter than min_doc_chars
        "pkg/d.py": "import os\n" + "print(os.sep, 'separator of the path')\n" * 12,
        "test/test_a.py": "assert True\n" * 50,
        "pkg/tests/t.py": "assert True\n" * 50,
        "site-packages/x.py": "import sys\n" * 50,
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    settings = {"max_chars": 10_000, "heldout_fraction": 0.4, "min_doc_chars": 100, "seed": 0}
    train, heldout, _, stats = build_corpus(
        settings, {"copies": [2], "per_count": 1, "kinds": ["words"], "words": 8}, root=tmp_path, return_stats=True
    )
    sources = set(train["source"]) | set(heldout["source"])
    assert sources == {"a.py", "pkg/d.py", "canary"}
    assert stats["dropped_duplicates"] == 1 and stats["dropped_short"] == 1 and stats["files"] == 4
    assert len(heldout) == 1 and (train["kind"] == "canary").sum() == 2


def test_heldout_is_disjoint_fixed_fraction(corpus):
    train, heldout, _, _ = corpus
    train_ids = set(train["doc_id"].dropna())
    assert heldout["doc_id"].isin(train_ids).sum() == 0
    n = len(train_ids) + len(heldout)
    assert len(heldout) == max(1, round(CORPUS["heldout_fraction"] * n))
    train_texts = set(train["text"])
    assert not any(t in train_texts for t in heldout["text"])


def test_canaries_planted_exactly_copies_times(corpus):
    train, heldout, canaries, _ = corpus
    expected = len(CANARIES["kinds"]) * len(CANARIES["copies"]) * CANARIES["per_count"]
    assert len(canaries) == expected and canaries["canary_id"].is_unique
    stream = "\n".join(train["text"])
    held = "\n".join(heldout["text"])
    doc_text = "\n".join(train.loc[train["kind"] == "doc", "text"])
    for row in canaries.itertuples():
        assert re.fullmatch(rf"{row.kind}-{row.copies:03d}-\d{{3}}", row.canary_id)
        assert row.n_chars == len(row.text)
        assert (train["canary_id"] == row.canary_id).sum() == row.copies
        assert stream.count(row.text) == row.copies
        assert row.text not in held and row.text not in doc_text
        if row.kind == "words":
            assert len(row.text.split()) == CANARIES["words"] and row.text.endswith(".")
        else:
            assert sum(c.isdigit() for c in row.text) == CANARIES["digits"]
            assert set(row.text) <= set("0123456789 ")
    # different canaries of the same copy count are different texts
    assert canaries["text"].is_unique


def test_copies_land_in_distinct_gaps(corpus):
    train = corpus[0]
    # a canary's copies sit between different documents (there are more gaps than copies)
    gap = (train["kind"] == "doc").cumsum()
    plants = train.assign(gap=gap)[train["kind"] == "canary"]
    assert not plants.duplicated(["canary_id", "gap"]).any()


def test_split_document_bounds_and_content():
    text = "\n\n".join(f"def f{i}():\n" + "    x = 1\n" * (i % 40 + 1) for i in range(300))
    parts = split_document(text, max_chars=1000)
    assert len(parts) > 1 and all(len(p) <= 1000 for p in parts)
    assert "".join(p.replace("\n", "") for p in parts) == text.replace("\n", "")
    assert split_document("short", max_chars=1000) == ["short"]


def test_settings_defaults_and_unknown_keys():
    assert resolve_settings("train", {"steps": 5})["steps"] == 5
    assert resolve_settings("train", {})["lr"] == section_defaults("train")["lr"]
    with pytest.raises(ConfigError, match="stepz"):
        resolve_settings("train", {"stepz": 5})


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_autotokenizer(tokenizer, corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tokenizer) <= TOKENIZER["vocab_size"]
    eot = "<|endoftext|>"
    for tok in (tokenizer, loaded):
        assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == eot
        assert tok.eos_token_id == tok.convert_tokens_to_ids(eot)
    samples = [corpus[0]["text"].iloc[0], corpus[2]["text"].iloc[0], "  x = {'ü': 1}\t# naïve 🙂\n\n"]
    for text in samples:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded(text)["input_ids"] == ids  # no bos/eos added implicitly
        assert loaded.decode(ids) == text


def test_tokenizer_is_deterministic_and_copy_blind(tokenizer, corpus):
    texts = corpus[0]["text"].tolist()
    again = train_tokenizer(texts, TOKENIZER)
    assert again.get_vocab() == tokenizer.get_vocab()
    # each distinct text counts once: repeating texts does not change the merges
    assert train_tokenizer(texts + texts[:50] * 20, TOKENIZER).get_vocab() == tokenizer.get_vocab()


# ------------------------------------------------------------------------------------- pretrain


def test_train_token_stream(corpus, tokenizer, tmp_path):
    train, _, canaries, _ = corpus
    train.to_parquet(tmp_path / "train.parquet")
    stream = train_token_stream(tmp_path, tokenizer)
    assert stream.dtype == np.int32
    eos = tokenizer.eos_token_id
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in train["text"]]
    assert len(stream) == sum(lengths) + len(train)
    assert int((stream == eos).sum()) == len(train) and stream[-1] == eos
    # a canary copy has exactly the ids of the canary text tokenized alone
    row = canaries.iloc[-1]
    ids = np.asarray(tokenizer(row["text"], add_special_tokens=False)["input_ids"], dtype=np.int32)
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(ids))
    assert int((windows == ids).all(axis=1).sum()) == row["copies"]


def test_lr_schedule():
    kw = {"steps": 100, "lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}
    lrs = [lr_at(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_tiny_pretrain_lowers_loss_and_reloads(trained, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stream, model, log = trained
    assert list(log.columns) == ["step", "loss", "lr", "tokens_per_s"]
    assert log["step"].tolist() == list(range(TRAIN["steps"]))
    assert log["loss"].tail(5).mean() < log["loss"].head(5).mean() - 0.5
    assert log.attrs["final_loss"] < log.attrs["first_loss"] and log.attrs["tokens_per_s"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.max_position_embeddings == ARCH["context_length"]
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25

    save_model(model, tokenizer, log, tmp_path / "model")
    saved = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_log.parquet"} <= saved
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    assert tok.get_vocab() == tokenizer.get_vocab()
    x = torch.from_numpy(stream[: 2 * ARCH["context_length"]].astype(np.int64)).view(2, -1)
    with torch.no_grad():
        a = model(input_ids=x, use_cache=False).logits
        b = reloaded(input_ids=x, use_cache=False).logits
    assert torch.equal(a, b)
    assert pd.read_parquet(tmp_path / "model" / "train_log.parquet")["loss"].tolist() == log["loss"].tolist()


@pytest.mark.slow  # three more pretraining runs, two of them with (possibly emulated) bf16 autocast
def test_tiny_pretrain_is_deterministic(trained, tokenizer):
    stream, model, log = trained
    model2, log2 = pretrain(stream, tokenizer, ARCH, TRAIN, progress=False)
    assert log2["loss"].tolist() == log["loss"].tolist()
    assert log2["lr"].tolist() == log["lr"].tolist()
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n
    _, log3 = pretrain(stream, tokenizer, ARCH, dict(TRAIN, steps=10, seed=1), progress=False)
    assert log3["loss"].tolist() != log["loss"].head(10).tolist()
    # bf16 autocast: deterministic too, lowers the loss, and is not the fp32 run
    bf16 = dict(TRAIN, steps=10, bf16=True)
    (m_a, log_a), (m_b, log_b) = (pretrain(stream, tokenizer, ARCH, bf16, progress=False) for _ in range(2))
    assert log_a["loss"].tolist() == log_b["loss"].tolist() and log_a["loss"].iloc[-1] < log_a["loss"].iloc[0]
    assert log_a["loss"].tolist() != log["loss"].head(10).tolist()
    for (n, p), (_, q) in zip(m_a.state_dict().items(), m_b.state_dict().items()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    from memctl.demo.cli import register

    parser = argparse.ArgumentParser(prog="memctl")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0

    corpus_dir, tok_dir, model_dir = tmp_path / "corpus", tmp_path / "tok", tmp_path / "model"
    run("demo-corpus", "--settings", json.dumps(CORPUS), "--canary-settings", json.dumps(CANARIES),
        "--out-dir", str(corpus_dir))
    for name in ("train.parquet", "heldout.parquet", "canaries.parquet"):
        assert verify(corpus_dir / name) == []
    meta = json.loads(sidecar_path(corpus_dir / "train.parquet").read_text())
    assert meta["stats"]["docs_train"] > 0 and meta["settings"]["canaries"]["copies"] == CANARIES["copies"]

    run("demo-tokenizer", "--corpus", str(corpus_dir), "--settings", json.dumps(TOKENIZER), "--out", str(tok_dir))
    assert verify(tok_dir) == []
    meta = json.loads(sidecar_path(tok_dir).read_text())
    assert meta["canary_tokens"]["words"]["min"] > 0

    run("demo-pretrain", "--corpus", str(corpus_dir), "--tokenizer", str(tok_dir),
        "--arch-settings", json.dumps(ARCH), "--settings", json.dumps(dict(TRAIN, steps=5)),
        "--out", str(model_dir), "--no-progress")
    assert verify(model_dir) == []
    meta = json.loads(sidecar_path(model_dir).read_text())
    assert meta["final_loss"] > 0 and meta["tokens_per_s"] > 0 and meta["train_wall_time_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.num_hidden_layers == ARCH["num_hidden_layers"]
    assert len(pd.read_parquet(model_dir / "train_log.parquet")) == 5


def test_quote_canaries_have_their_own_vocabulary_and_count_per_kind():
    """The out-of-domain family (quotes) shares no word with the word canaries; per_count can be
    given per kind; each canary occurs in the training stream exactly `copies` times."""
    import re

    settings = {"copies": [1, 3], "per_count": {"words": 2, "quotes": 3}, "kinds": ["words", "quotes"],
                "words": 16, "quote_words": 12, "seed": 7}
    train, _, canaries = build_corpus(CORPUS, settings)
    counts = canaries.groupby(["kind", "copies"]).size().to_dict()
    assert counts == {("quotes", 1): 3, ("quotes", 3): 3, ("words", 1): 2, ("words", 3): 2}
    words = {w.lower() for t in canaries.loc[canaries["kind"] == "words", "text"] for w in re.findall(r"[A-Za-z]+", t)}
    quotes = canaries.loc[canaries["kind"] == "quotes", "text"]
    assert all(re.fullmatch(r'"[^"]+" -- [A-Z][a-z]+ [A-Z][a-z]+', t) for t in quotes)
    body = {w.lower() for t in quotes for w in re.findall(r"[A-Za-z]+", t.split(" -- ")[0])}
    assert not body & words
    stream = "\n".join(train["text"])
    for text, copies in zip(canaries["text"], canaries["copies"]):
        assert stream.count(text) == copies
