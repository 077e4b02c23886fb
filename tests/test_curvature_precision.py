"""The fast Gram products (``curvature.data.precision: tf32 / bf16``) against an fp64 reference.

The reference is computed here, independently of :func:`memctl.curvature.collect.collect_factors`:
an fp64 copy of the model, :class:`memctl.capture.Capture` hooks that add explicit fp64 outer
products, and the same sampled labels (:func:`window_uniforms`, inverse CDF of the fp64 logits).
On the CPU the fast precisions round the products' inputs exactly as tensor cores do (bf16: 7
mantissa bits, TF32: 10) and multiply in fp32, so the error measured here is the GPU path's.

Bounds (issue 12): relative Frobenius error of every mean factor <= 1e-2, and at strength 0.8 the
kept directions of both K-FAC selection forms (``kfac``: pairs by product energy; ``kfac_factor``:
energy per factor) within one of the reference's count, their subspace overlap >= 0.99.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from memctl import architectures as arch
from memctl.capture import Capture
from memctl.curvature.collect import (
    collect_factors,
    resolve_precision,
    round_to_tf32,
    sample_labels,
    window_uniforms,
)
from memctl.curvature.decompose import eigh_descending
from memctl.curvature.edit import energy_rank, product_energy_counts

STRENGTH = 0.8
SEED = 5


def small_model():
    """A random GPT-NeoX of half the demo's width (d=128, MLP 512, vocab 1024; the demo: 256, 1024,
    4096), 2 layers: 4 MLP matrices, factors 128- and 512-wide."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg).eval()


def fp64_reference(model, windows: torch.Tensor, targets, seed: int):
    """Summed A (per input key) and G (per matrix) in fp64, one window at a time."""
    m64 = copy.deepcopy(model).double()
    for p in m64.parameters():
        p.requires_grad_(False)
    A = {t.input_key: torch.zeros(t.d_in, t.d_in, dtype=torch.float64) for t in targets}
    G = {t.name: torch.zeros(t.d_out, t.d_out, dtype=torch.float64) for t in targets}

    def add_a(t, a):
        A[t.input_key] += a.double().T @ a.double()

    def add_g(t, g):
        G[t.name] += g.double().T @ g.double()

    with Capture(m64, targets, on_input=add_a, on_output_grad=add_g, positions=slice(0, -1)), torch.enable_grad():
        for w in range(windows.shape[0]):
            ids = windows[w : w + 1]
            logits = m64(input_ids=ids, use_cache=False).logits[0, :-1]
            u = window_uniforms(seed, torch.tensor([w]), ids.shape[1] - 1)[0]
            y = sample_labels(logits.detach(), u)
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    return A, G


@pytest.fixture(scope="module")
def collections():
    torch.set_num_threads(2)
    model = small_model()
    windows = torch.from_numpy(np.random.default_rng(0).integers(0, 1024, size=(12, 64)))
    targets = arch.linear_targets(model, groups=["mlp"])
    ref_A, ref_G = fp64_reference(model, windows, targets, SEED)
    fast = {p: collect_factors(model, windows, targets, seed=SEED, batch_size=4, precision=p)
            for p in ("fp32", "tf32", "bf16")}
    return targets, ref_A, ref_G, fast


@pytest.fixture(scope="module")
def eigenbases(collections):
    """(reference, tf32, bf16) eigenbases of the mean factors, per factor name."""
    targets, ref_A, ref_G, fast = collections
    n = fast["fp32"].tokens

    def bases(A, G):
        out = {f"A/{k}": eigh_descending(v, k, n)[0] for k, v in A.items()}
        return out | {f"G/{k}": eigh_descending(v, k, n)[0] for k, v in G.items()}

    return {"ref": bases(ref_A, ref_G), **{p: bases(fast[p].A, fast[p].G) for p in ("tf32", "bf16")}}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-5), ("tf32", 1e-2), ("bf16", 1e-2)])
def test_every_mean_factor_within_the_bound(collections, precision, bound):
    targets, ref_A, ref_G, fast = collections
    fac = fast[precision]
    assert fac.meta["precision"] == precision
    errors = {f"A/{k}": _rel(fac.A[k], v) for k, v in ref_A.items()}
    errors |= {f"G/{k}": _rel(fac.G[k], v) for k, v in ref_G.items()}
    assert max(errors.values()) <= bound, errors
    if precision != "fp32":  # the rounding is real: the fast path is not secretly exact
        assert max(errors.values()) > 1e-6, errors


def _overlap(U: torch.Tensor, k: int, V: torch.Tensor, kv: int) -> float:
    """Mean squared cosine of the principal angles between span(U[:, :k]) and span(V[:, :kv]),
    over the smaller of the two (1 = one subspace contains the other)."""
    if min(k, kv) == 0:
        return 1.0
    M = U[:, :k].double().T @ V[:, :kv].double()
    return float((M**2).sum()) / min(k, kv)


def _kept(method: str, eigA, eigG) -> tuple[int, int]:
    """(kA, kG): leading A and G directions the projector edit keeps at STRENGTH."""
    if method == "kfac_factor":
        return energy_rank(eigA.values, STRENGTH), energy_rank(eigG.values, STRENGTH)
    counts, _ = product_energy_counts(eigG.values, eigA.values, STRENGTH)
    used = torch.nonzero(counts > 0).flatten()
    return int(counts.max()), int(used.max()) + 1


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("method", ["kfac", "kfac_factor"])
def test_kept_directions_match_the_fp64_reference(collections, eigenbases, precision, method):
    targets = collections[0]
    ref, fast = eigenbases["ref"], eigenbases[precision]
    checked = 0
    for t in targets:
        rA, rG = ref[f"A/{t.input_key}"], ref[f"G/{t.name}"]
        fA, fG = fast[f"A/{t.input_key}"], fast[f"G/{t.name}"]
        (rkA, rkG), (fkA, fkG) = _kept(method, rA, rG), _kept(method, fA, fG)
        assert abs(rkA - fkA) <= 1 and abs(rkG - fkG) <= 1, (t.short, (rkA, rkG), (fkA, fkG))
        assert 1 < rkA < t.d_in and 1 < rkG < t.d_out, (t.short, rkA, rkG)  # a real cut, not all or one
        assert _overlap(rA.vectors, rkA, fA.vectors, fkA) >= 0.99, t.short
        assert _overlap(rG.vectors, rkG, fG.vectors, fkG) >= 0.99, t.short
        checked += 1
    assert checked == len(targets) == 4


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-11), 3.0e38, float("inf"), float("nan")])
    r = round_to_tf32(x)
    # 1 + 2^-11 is a tie: away from zero; 1 + 2^-12 rounds down; -(1 + 3 * 2^-11) -> -(1 + 2^-9)
    assert r[:5].tolist() == [1.0, 1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-9)]
    assert r[5] == 3.0e38 or abs(float(r[5]) / 3.0e38 - 1) < 2**-10
    assert torch.isinf(r[6]) and torch.isnan(r[7])


def test_auto_precision_is_fast_on_cuda_exact_elsewhere():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", torch.device("cuda:1")) == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("tf32", "cpu") == "tf32"
    with pytest.raises(ValueError, match="curvature.data.precision"):
        resolve_precision("fp16", "cpu")


def test_label_uniforms_are_uniform_and_independent_of_batching():
    u = window_uniforms(3, torch.arange(2000), 63)
    assert u.dtype == torch.float32 and u.shape == (2000, 63)
    assert 0 < float(u.min()) and float(u.max()) < 1
    flat = u.double().flatten().numpy()
    # 126,000 draws: mean 1/2 and variance 1/12 within 5 standard errors; 20 bins chi-square
    assert abs(flat.mean() - 0.5) < 5 * np.sqrt(1 / 12 / flat.size)
    assert abs(flat.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / flat.size)
    counts, _ = np.histogram(flat, bins=20, range=(0, 1))
    expected = flat.size / 20
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi2(19): p ~ 0.0007
    # neighbours (next position, next window) are uncorrelated
    assert abs(np.corrcoef(u[:, :-1].flatten(), u[:, 1:].flatten())[0, 1]) < 0.02
    assert abs(np.corrcoef(u[:-1].flatten(), u[1:].flatten())[0, 1]) < 0.02
    # any split of the windows draws the same numbers; another seed draws others
    assert torch.equal(window_uniforms(3, torch.arange(700, 900), 63), u[700:900])
    assert not torch.equal(window_uniforms(4, torch.arange(10), 63), u[:10])
