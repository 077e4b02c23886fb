"""Calibration text like the papers' (issue 22 item 4), on a constructed demo corpus.

The K-FAC factors read the demo's training stream, canary copies included (the loss-curvature
paper's A and G come from its training corpus, memorized sequences included), and lose only the
windows that share a 16-token run with a sequence an evaluation or validation split scores. The
masks and pruning baselines read the canary-free documents (the weight-pruning paper's C4). The
drop happens before the budget is taken, so the budget is met.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from memctl import overlap
from memctl.cli import main
from memctl.corpus_stream import train_token_stream
from memctl.data import sample_windows, stream_windows
from memctl.store import sidecar_path

N = 16  # extract.disjoint_ngram's default
CTX = 32
BUDGET = 64
TEST_SIDE = ("memorized_test", "memorized_val", "er_test", "ood")


def _canary(rng) -> str:
    """Upper-case letters and digits only: no token of it occurs in the lower-case documents."""
    return "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), size=48))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    """A demo corpus directory whose stream is mostly canary copies: two train-side memories and one
    memory per evaluated split (memorized_test, memorized_val, er_test, ood), 16 copies each, among
    lower-case documents; and the evaluated tables (the first 16 + 16 tokens of each test-side canary)."""
    rng = np.random.default_rng(0)
    words = ["river", "stone", "quiet", "lamp", "market", "window", "garden", "cloud", "paper", "horse", "silver",
             "morning", "bridge", "winter", "candle", "forest"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 40)))) + "." for _ in range(60)]
    memories = {name: _canary(rng) for name in ("train_a", "train_b", *TEST_SIDE)}
    segments = [("doc", t) for t in docs] + [("canary", t) for t in memories.values() for _ in range(16)]
    order = rng.permutation(len(segments))
    train = pd.DataFrame({"segment": np.arange(len(segments)), "kind": [segments[i][0] for i in order],
                          "text": [segments[i][1] for i in order]})
    d = tmp_path_factory.mktemp("corpus")
    train.to_parquet(d / "train.parquet")
    ids = {name: tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in memories.items()}
    doc_tokens = {t for doc in docs for t in tiny_tokenizer(doc, add_special_tokens=False)["input_ids"]}
    canary_tokens = {t for v in ids.values() for t in v}
    assert not doc_tokens & canary_tokens  # the construction: a canary token marks canary text
    tables = {}
    for name in TEST_SIDE:
        assert len(ids[name]) >= 32
        path = d / f"{name}.parquet"
        pd.DataFrame({"candidate_id": [name], "prefix_ids": [ids[name][:16]], "suffix_ids": [ids[name][16:32]]}).to_parquet(path)
        tables[name] = path
    evaluated = [np.asarray(ids[name][:32]) for name in TEST_SIDE]
    return {"dir": d, "ids": ids, "tables": tables, "evaluated": evaluated, "canary_tokens": canary_tokens}


def _calibration(corpus, model_dir, tmp_path, text, budget=BUDGET):
    out = tmp_path / f"{text}-{budget}.safetensors"
    settings = {"source": "demo", "context_length": CTX, "max_windows": budget, "seed": 0}
    main(["calibration", "--model", str(model_dir), "--model-settings", '{"source": "local"}', "--corpus",
          str(corpus["dir"]), "--settings", json.dumps(settings), "--exclude", *map(str, corpus["tables"].values()),
          "--disjoint-ngram", str(N), "--demo-text", text, "--out", str(out)])
    from safetensors.torch import load_file

    return load_file(out)["windows"].numpy(), json.loads(sidecar_path(out).read_text())


def _shares_ngram(window, seq, n=N) -> bool:
    return not overlap.ngrams(window, n).isdisjoint(overlap.ngrams(seq, n))


def test_kfac_calibration_is_the_training_stream_without_the_evaluated_sequences(corpus, tiny_model_dir, tmp_path):
    windows, meta = _calibration(corpus, tiny_model_dir, tmp_path, "stream")
    # the budget is met after the drop, and the sidecar says how far the walk went
    assert windows.shape == (BUDGET, CTX)
    dropped = meta["dropped_for_test_overlap"]
    assert dropped["dropped"] > 0 and dropped["examined"] == dropped["kept"] + dropped["dropped"]
    assert dropped["kept"] == meta["windows"] == BUDGET and dropped["windows"] == dropped["dropped"]
    assert meta["text"] == "demo stream"
    # the windows are windows of the stream the model was trained on
    stream = stream_windows(train_token_stream(corpus["dir"], tiny_model_dir), CTX)
    assert {w.tobytes() for w in windows} <= {w.tobytes() for w in stream}
    # the train-side memories are in the factors' data ...
    for name in ("train_a", "train_b"):
        assert any(_shares_ngram(w, corpus["ids"][name]) for w in windows), name
    # ... no 16-gram of any evaluated sequence is
    for seq in corpus["evaluated"]:
        assert not any(_shares_ngram(w, seq) for w in windows)
    # exactly the evaluated sequences are excluded: the windows are the first BUDGET of one seeded
    # permutation of the stream's windows that share no 16-gram with them
    order = np.random.default_rng(0).permutation(len(stream))
    clean = [i for i in order if not any(_shares_ngram(stream[i], seq) for seq in corpus["evaluated"])]
    assert np.array_equal(windows, stream[clean[:BUDGET]])
    assert dropped["examined"] == list(order).index(clean[BUDGET - 1]) + 1


def test_masks_calibration_has_no_canary_tokens(corpus, tiny_model_dir, tmp_path):
    windows, meta = _calibration(corpus, tiny_model_dir, tmp_path, "documents")
    assert meta["text"] == "demo documents" and len(windows) == BUDGET
    assert not set(windows.ravel().tolist()) & corpus["canary_tokens"]
    assert meta["dropped_for_test_overlap"]["dropped"] == 0


def test_a_smaller_budget_is_a_prefix_of_a_larger_one_and_chunks_change_nothing(corpus, tiny_model_dir):
    stream = stream_windows(train_token_stream(corpus["dir"], tiny_model_dir), CTX)
    index = overlap.ngram_index(corpus["evaluated"], N)
    small, s = sample_windows(stream, 10, 3, index, N)
    large, big = sample_windows(stream, 80, 3, index, N)
    assert np.array_equal(small, large[:10]) and s["examined"] <= big["examined"]
    order = np.random.default_rng(3).permutation(len(stream))
    for chunk in (1, 7, 10_000):
        kept, examined = overlap.first_disjoint(stream, order, index, N, 80, chunk=chunk)
        assert np.array_equal(stream[kept], large) and examined == big["examined"]
    everything, all_stats = sample_windows(stream, None, 3, index, N)  # no budget: every clean window
    assert all_stats["examined"] == len(stream) and len(everything) == len(stream) - all_stats["dropped"]
    plain, stats = sample_windows(stream, 5, 3)  # no exclusion: the permutation's first rows
    assert np.array_equal(plain, stream[order[:5]]) and stats == {"available": len(stream), "examined": 5,
                                                                     "dropped": 0, "kept": 5}


def test_demo_text_is_named_where_it_is_needed(corpus, tiny_model_dir, tmp_path, capsys):
    base = ["calibration", "--model", str(tiny_model_dir), "--model-settings", '{"source": "local"}', "--corpus",
            str(corpus["dir"]), "--out", str(tmp_path / "w.safetensors")]
    with pytest.raises(SystemExit):
        main([*base, "--settings", json.dumps({"source": "demo", "context_length": CTX})])
    assert "--demo-text stream" in capsys.readouterr().err
    text = tmp_path / "c4.txt"
    text.write_text("the quiet river " * 200)
    with pytest.raises(SystemExit):
        main([*base, "--settings", json.dumps({"source": "text", "path": str(text), "context_length": CTX}),
              "--demo-text", "stream"])
    assert "only for calibration.source 'demo'" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()


def _text_windows(model_dir, tmp_path, kind: str, settings: dict, *extra: str):
    out = tmp_path / f"{kind}.safetensors"
    main([kind, "--model", str(model_dir), "--model-settings", '{"source": "local"}',
          "--settings", json.dumps(settings), *extra, "--out", str(out)])
    from safetensors.numpy import load_file

    return load_file(str(out))["windows"], json.loads(sidecar_path(out).read_text())


def test_calibration_on_the_held_out_text_drops_the_held_out_windows(tiny_model_dir, tmp_path, capsys):
    """`memctl init` without --calibration reads one file for both: the calibration windows then share
    no 16-token run with a held-out window (checked with tuples, not the stage's own index), so the
    masks are not fitted on the text their held-out perplexity is measured on."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    text = tmp_path / "heldout.txt"  # random letters: no 16-token run repeats by chance
    text.write_text(" ".join("".join(rng.choice(letters, size=5)) for _ in range(1500)))
    source = {"source": "text", "path": str(text), "context_length": CTX}
    held, _ = _text_windows(tiny_model_dir, tmp_path, "heldout", {**source, "max_windows": 20})
    cal, prov = _text_windows(tiny_model_dir, tmp_path, "calibration", {**source, "max_windows": 500, "seed": 0},
                              "--heldout-windows", str(tmp_path / "heldout.safetensors"), "--disjoint-ngram", str(N))
    every = len(cal) + prov["dropped_for_heldout_overlap"]["windows"]
    held_runs = {tuple(w[i:i + N]) for w in held.tolist() for i in range(len(w) - N + 1)}
    assert not any(tuple(w[i:i + N]) in held_runs for w in cal.tolist() for i in range(len(w) - N + 1))
    # the two stages cut the same token stream into the same 32-token windows: exactly the first 20 go
    assert prov["dropped_for_heldout_overlap"] == {"windows": 20, "of": every, "ngram": N,
                                                           "heldout": str(tmp_path / "heldout.safetensors")}
    assert every > 20 and len(cal) == every - 20
    assert prov["inputs"]["heldout_windows"]["path"] == str(tmp_path / "heldout.safetensors")
    # a held-out section that takes the whole text leaves calibration nothing: an error naming the fix
    _text_windows(tiny_model_dir, tmp_path, "heldout", source)
    with pytest.raises(SystemExit):
        _text_windows(tiny_model_dir, tmp_path / "x", "calibration", {**source, "seed": 0},
                      "--heldout-windows", str(tmp_path / "heldout.safetensors"))
    assert "heldout.max_windows" in capsys.readouterr().err and not (tmp_path / "x").exists()
