"""Batched greedy decoding equals one-at-a-time decoding and HF generate; scoring is exact."""

import numpy as np
import pytest
import torch

from memctl.generation import greedy_generate, score_suffixes, window_losses

PROMPTS = [
    [5, 17, 33, 2, 90, 41, 7, 8],
    [11, 12],
    [200, 3, 4, 150, 66],
    [9],
    [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
]


def test_batched_equals_one_at_a_time_with_ragged_prompts(tiny_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    batched = greedy_generate(tiny_model, PROMPTS, 12, pad, batch_size=5, progress=False)
    single = np.stack([greedy_generate(tiny_model, [p], 12, pad, batch_size=1, progress=False)[0] for p in PROMPTS])
    assert batched.shape == (5, 12)
    np.testing.assert_array_equal(batched, single)


def test_batch_size_does_not_change_tokens(tiny_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    a = greedy_generate(tiny_model, PROMPTS, 6, pad, batch_size=2, progress=False)
    b = greedy_generate(tiny_model, PROMPTS, 6, pad, batch_size=64, progress=False)
    np.testing.assert_array_equal(a, b)


def test_matches_hf_generate(tiny_model, tiny_tokenizer):
    """An independent reference: transformers' own greedy search with EOS stopping disabled."""
    from transformers import GenerationConfig

    prompts = [p[:5] for p in PROMPTS if len(p) >= 5]
    pad = tiny_tokenizer.pad_token_id
    ours = greedy_generate(tiny_model, prompts, 10, pad, progress=False)
    ids = torch.tensor(prompts)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=pad)
    ref = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    np.testing.assert_array_equal(ours, ref[:, 5:].numpy())


def test_exactly_n_new_tokens_even_through_eos(tiny_model, tiny_tokenizer):
    """The scored slice never shifts: decoding runs n argmax steps whatever is generated.

    A token the model emits mid-continuation plays EOS: HF generate stops there, ours goes on and
    matches generate with stopping disabled, token for token (no EOS suppression either).
    """
    from transformers import GenerationConfig

    pad = tiny_tokenizer.pad_token_id
    prompt = PROMPTS[0]
    ours = greedy_generate(tiny_model, [prompt], 12, pad, progress=False)[0]
    eos = int(ours[3])
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    stop = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    stopped = tiny_model.generate(ids, attention_mask=mask, generation_config=stop)[0, len(prompt):]
    assert len(stopped) <= 4 and int(stopped[-1]) == eos
    nostop = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=pad)
    full = tiny_model.generate(ids, attention_mask=mask, generation_config=nostop)[0, len(prompt):]
    assert len(ours) == 12
    np.testing.assert_array_equal(ours, full.numpy())


def test_score_suffixes_matches_unpadded_forward(tiny_model, tiny_tokenizer):
    prefixes = [[5, 17, 33, 2], [11, 12, 13, 14, 15, 16]]
    suffixes = [[90, 41, 7], [8, 9, 10]]
    got = score_suffixes(tiny_model, prefixes, suffixes, tiny_tokenizer.pad_token_id, progress=False)
    for i, (p, s) in enumerate(zip(prefixes, suffixes)):
        ids = torch.tensor([p + s])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(ids).logits[0].double(), -1)
        nll = -sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(s))
        hits = np.mean([logp[len(p) - 1 + k].argmax().item() == tok for k, tok in enumerate(s)])
        assert got["nll_sum"][i] == pytest.approx(nll, rel=1e-4)
        assert got["argmax_match"][i] == pytest.approx(hits)
        assert got["n_tokens"][i] == len(s)


def test_window_losses_match_hf_loss(tiny_model):
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 200, size=(3, 16))
    total, n = window_losses(tiny_model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        ids = torch.as_tensor(windows)
        ref = tiny_model(input_ids=ids, labels=ids).loss.item()
    assert n == 3 * 15
    assert total / n == pytest.approx(ref, rel=1e-5)
