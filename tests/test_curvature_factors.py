"""K-FAC factors against a brute-force computation from per-token gradients, and their algebra.

The brute force runs the model in fp64, one window at a time, with a zero "probe" added to the
target's output: d(loss)/d(probe) is the per-token output gradient g_t, the captured input is a_t,
and A, G are explicit sums of outer products. The probe gradients are themselves checked against
autograd's weight gradient (sum_t g_t a_t^T), so the reference does not rest on hooks alone.
"""

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_architecture_model
from memctl import architectures as arch
from memctl.curvature.collect import collect_factors, sample_labels, window_uniforms
from memctl.curvature.decompose import decompose, eigh_descending
from memctl.data import DataError

torch.set_num_threads(1)
VOCAB = 300  # tiny_architecture_config's vocabulary


def _windows(n=5, length=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(1, VOCAB, size=(n, length)))


def _sampled_labels(logits64: torch.Tensor, seed: int, window: int) -> torch.Tensor:
    """Independent inverse-CDF draw in fp64 numpy from the documented per-window uniforms."""
    u = window_uniforms(seed, torch.tensor([window]), logits64.shape[0])[0].double().numpy()
    probs = torch.softmax(logits64, -1).numpy()
    cdf = np.cumsum(probs, axis=-1)
    return torch.tensor([int(np.argmax(c >= ui * c[-1])) for c, ui in zip(cdf, u)])


def brute_force(model, windows, targets, labels: str, seed: int = 0):
    model64 = copy.deepcopy(model).double()
    for p in model64.parameters():
        p.requires_grad_(True)
    A = {t.input_key: torch.zeros(t.d_in, t.d_in, dtype=torch.float64) for t in targets}
    G = {t.name: torch.zeros(t.d_out, t.d_out, dtype=torch.float64) for t in targets}
    for w in range(windows.shape[0]):
        ids = windows[w : w + 1]
        acts, probes, handles = {}, {}, []
        for t in targets:
            mod = model64.get_submodule(t.name)

            def pre(m, args, name=t.name, acts=acts):
                acts[name] = args[0][0].detach()

            def post(m, args, out, name=t.name, probes=probes):
                probes[name] = torch.zeros_like(out, requires_grad=True)
                return out + probes[name]

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        logits = model64(input_ids=ids, use_cache=False).logits[0, :-1]
        for h in handles:
            h.remove()
        y = ids[0, 1:] if labels == "empirical" else _sampled_labels(logits.detach(), seed, w)
        logp = torch.log_softmax(logits, -1)
        loss = -sum(logp[t, y[t]] for t in range(len(y)))  # sum reduction, token by token
        weights = [arch.module(model64, t).weight for t in targets]
        grads = torch.autograd.grad(loss, [probes[t.name] for t in targets] + weights)
        for t, g, wg in zip(targets, grads[: len(targets)], grads[len(targets):]):
            g, a = g[0, :-1], acts[t.name][:-1]  # positions that predict a token
            wg = wg.T if t.transposed else wg
            torch.testing.assert_close(sum(torch.outer(g[i], a[i]) for i in range(len(a))), wg)
            for i in range(len(a)):
                G[t.name] += torch.outer(g[i], g[i])
            if t.input_key in A:
                A[t.input_key] += sum(torch.outer(a[i], a[i]) for i in range(len(a)))
    # inputs shared by several targets were added once per target above: undo the repeats
    for key in A:
        A[key] /= sum(1 for t in targets if t.input_key == key)
    return A, G


def _assert_factors_close(fac, ref_A, ref_G):
    for key, ref in ref_A.items():
        torch.testing.assert_close(fac.A[key].double(), ref, rtol=2e-4, atol=2e-4 * float(ref.abs().max()))
    for key, ref in ref_G.items():
        torch.testing.assert_close(fac.G[key].double(), ref, rtol=2e-4, atol=2e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt2", "olmo2", "gpt_neo"])
@pytest.mark.parametrize("labels", ["empirical", "sampled"])
def test_factors_equal_brute_force_per_token_gradients(kind, labels):
    model = tiny_architecture_model(kind)
    targets = arch.linear_targets(model)  # attention (fused QKV / Conv1D / q,k,v) and MLP, every layer
    windows = _windows()
    fac = collect_factors(model, windows, targets, labels=labels, seed=7, batch_size=2)
    ref_A, ref_G = brute_force(model, windows, targets, labels, seed=7)
    assert fac.tokens == 5 * 11
    assert set(fac.A) == {t.input_key for t in targets}  # one A per shared input
    _assert_factors_close(fac, ref_A, ref_G)
    assert all(p.requires_grad for p in model.parameters())  # parameters handed back as they were


def test_shared_inputs_store_one_A():
    model = tiny_architecture_model("olmo2")
    targets = arch.linear_targets(model, groups=["mlp"], layers=[1])
    gate, up, down = targets
    assert gate.input_key == up.input_key != down.input_key
    fac = collect_factors(model, _windows(3), targets, labels="empirical")
    assert sorted(fac.A) == sorted({gate.input_key, down.input_key})


def test_sampled_labels_differ_from_real_tokens_and_follow_the_seed():
    model = tiny_architecture_model("gpt_neox")
    targets = arch.linear_targets(model, groups=["mlp"], layers=[0])
    w = _windows(4)
    emp = collect_factors(model, w, targets, labels="empirical")
    s1 = collect_factors(model, w, targets, labels="sampled", seed=1)
    s1b = collect_factors(model, w, targets, labels="sampled", seed=1, batch_size=3)
    s2 = collect_factors(model, w, targets, labels="sampled", seed=2)
    g = targets[0].name
    torch.testing.assert_close(s1.G[g], s1b.G[g], rtol=1e-5, atol=1e-6 * float(s1.G[g].abs().max()))
    assert not torch.allclose(s1.G[g], s2.G[g], rtol=1e-3)
    assert not torch.allclose(s1.G[g], emp.G[g], rtol=1e-3)
    torch.testing.assert_close(s1.A, emp.A)  # A does not depend on labels


def test_inverse_cdf_sampler_matches_the_softmax_distribution():
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0, 0.5])
    probs = torch.softmax(logits, 0).numpy()
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    labels = sample_labels(logits.expand(n, -1), u).numpy()
    freq = np.bincount(labels, minlength=6) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-12)
    assert freq[4] == 0.0  # probability ~1e-14 never drawn
    edge = sample_labels(logits[None], torch.tensor([1.0]))  # u = 1 stays inside the vocabulary
    assert 0 <= int(edge) < 6


def test_two_halves_merge_by_addition_into_the_full_factors():
    model = tiny_architecture_model("gpt2")
    targets = arch.linear_targets(model)
    w = _windows(6)
    full = collect_factors(model, w, targets, labels="sampled", seed=3, batch_size=4)
    first = collect_factors(model, w[:2], targets, labels="sampled", seed=3, batch_size=4)
    second = collect_factors(model, w[2:], targets, labels="sampled", seed=3, batch_size=4, window_offset=2)
    merged = first.merged(second)
    assert merged.tokens == full.tokens == first.tokens + second.tokens
    for part in ("A", "G"):
        for key, ref in getattr(full, part).items():
            torch.testing.assert_close(getattr(merged, part)[key], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # without the offset the second half draws other labels: the merge would not be the full factors
    wrong = first.merged(collect_factors(model, w[2:], targets, labels="sampled", seed=3, batch_size=4))
    g = targets[0].name
    assert not torch.allclose(wrong.G[g], full.G[g], rtol=1e-3)


def test_decomposition_reconstructs_sorted_clamped_and_sign_fixed():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 7))).float()
    mat = (x.T @ x)  # rank 7 of 7
    mat[:, 0] = mat[0, :] = 0  # rank-deficient: an exact zero eigenvalue (rounding may make it negative)
    eig, jitter = eigh_descending(mat, "test", tokens=40)
    assert jitter == 0.0
    v = eig.values
    assert torch.all(v[:-1] >= v[1:]) and torch.all(v >= 0)
    U = eig.vectors.double()
    torch.testing.assert_close(U @ torch.diag(v) @ U.T, mat.double() / 40, rtol=1e-5, atol=1e-5)
    pivots = U.abs().argmax(0)
    assert torch.all(U[pivots, torch.arange(7)] > 0)


def test_non_finite_factor_fails_naming_the_module():
    model = tiny_architecture_model("gpt_neox")
    targets = arch.linear_targets(model, groups=["mlp"])
    fac = collect_factors(model, _windows(2), targets, labels="empirical")
    bad = targets[3]
    fac.G[bad.name][2, 2] = float("nan")
    with pytest.raises(DataError, match=f"G of {bad.name}.*non-finite"):
        decompose(fac)
