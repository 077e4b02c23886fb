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


# ------------------------------------------------------------------ decomposition on the GPU


def test_bf16_products_add_in_fp32_on_every_backend():
    """bf16 inputs give an fp32 product (mm(out_dtype=float32) on CUDA; on a backend without it,
    the fp32 product of the rounded inputs): the accumulator is never rounded to bf16."""
    from memctl.curvature.collect import _add_product_

    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)).bfloat16()
    acc = torch.full((24, 24), 1.0e4)
    _add_product_(acc, x.T, x)
    want = 1.0e4 + x.double().T @ x.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, rtol=1e-6, atol=1e-3)


def test_decomposition_device_choice(monkeypatch):
    from memctl.config import ConfigError
    from memctl.curvature.decompose import decompose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decompose_device("auto") == torch.device("cpu") == decompose_device("cpu")
    with pytest.raises(ConfigError, match="--device: 'cuda', but this job sees no usable CUDA GPU.*Use --device auto or cpu"):
        decompose_device("cuda")
    with pytest.raises(ConfigError, match="--device: 'mps'"):
        decompose_device("mps")
    with pytest.raises(ConfigError, match="--device: 'gpu0' is not a device"):
        decompose_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decompose_device("auto") == torch.device("cuda")


def _psd(n: int, seed: int = 0) -> torch.Tensor:
    """A PSD matrix with a power-law spectrum (1 / i), as K-FAC factors have."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * (1.0 / torch.arange(1, n + 1, dtype=torch.float64))) @ Q.T


def test_fp32_eigh_is_kept_when_it_reconstructs_the_factor():
    from memctl.curvature.decompose import reconstruction_error

    m = _psd(96) * 500  # a sum over 500 tokens
    e64, _ = eigh_descending(m, "m", 500)
    e32, _ = eigh_descending(m, "m", 500, device="cpu", precision="fp32")
    assert e32.values.dtype == torch.float64 and e32.vectors.dtype == torch.float32
    assert reconstruction_error(m / 500, e32.values, e32.vectors) <= 1e-5
    torch.testing.assert_close(e32.values, e64.values, rtol=0, atol=1e-6)
    # well-separated leading directions agree (signs are fixed the same way)
    torch.testing.assert_close(e32.vectors[:, :10], e64.vectors[:, :10], rtol=0, atol=1e-3)


def test_fp32_eigh_that_misses_the_tolerance_falls_back_to_fp64(monkeypatch, caplog):
    from memctl.curvature import decompose as dec

    m = _psd(64, seed=1)
    e64, _ = eigh_descending(m, "m", 1)
    monkeypatch.setattr(dec, "FP32_RECONSTRUCTION_TOL", 0.0)
    with caplog.at_level("WARNING"):
        e, _ = eigh_descending(m, "G of layer 3", 1, precision="fp32")
    assert "fp32 eigh of G of layer 3 reconstructs it to" in caplog.text and "decomposing in fp64" in caplog.text
    assert torch.equal(e.values, e64.values) and torch.equal(e.vectors, e64.vectors)


def test_decomposition_works_one_layer_at_a_time(tmp_path, collections):
    from memctl.curvature.decompose import decompose, decompose_directory, eigen_summary
    from memctl.curvature.store import load_eigen, save_factors

    fac = collections[3]["fp32"]
    save_factors(fac, tmp_path / "factors")
    seen = []
    summary, jitter = decompose_directory(tmp_path / "factors", tmp_path / "eigen", "cpu",
                                          on_layer=lambda layer, f: seen.append((layer, {t.layer for t in f.targets})))
    assert seen == [(0, {0}), (1, {1})]  # each layer loaded alone
    whole, whole_jitter = decompose(fac)
    stored = load_eigen(tmp_path / "eigen")
    for key, e in whole.A.items():
        assert torch.equal(stored.A[key].values, e.values) and torch.equal(stored.A[key].vectors, e.vectors)
    for key, e in whole.G.items():
        assert torch.equal(stored.G[key].values, e.values) and torch.equal(stored.G[key].vectors, e.vectors)
    assert jitter == whole_jitter
    want = eigen_summary(fac, whole, whole_jitter)
    assert list(summary["module"]) == list(want["module"])
    np.testing.assert_allclose(summary["trace_G"], want["trace_G"], rtol=1e-12)


def test_decompose_command_records_device_and_precision(tmp_path, collections):
    import json

    from memctl.cli import main
    from memctl.curvature.store import load_eigen, save_factors

    save_factors(collections[3]["fp32"], tmp_path / "factors")
    main(["kfac-decompose", "--factors", str(tmp_path / "factors"), "--device", "cpu", "--precision", "fp32",
          "--out-dir", str(tmp_path / "out")])
    eig = load_eigen(tmp_path / "out" / "eigen")
    assert len(eig.targets) == 4
    sidecar = json.loads((tmp_path / "out" / "eigen.meta.json").read_text())
    assert "fp32" in json.dumps(sidecar) and '"device": "cpu"' in json.dumps(sidecar)


def test_tf32_and_fp32_set_the_cuda_matmul_precision_only_inside_the_collection():
    from memctl.curvature.collect import matmul_precision

    before = torch.get_float32_matmul_precision()
    with matmul_precision("cuda", "tf32"):
        assert torch.get_float32_matmul_precision() == "high"  # TF32 tensor cores for fp32 matmuls
    with matmul_precision(torch.device("cuda:0"), "fp32"):
        assert torch.get_float32_matmul_precision() == "highest"
    with matmul_precision("cpu", "tf32"), matmul_precision("cuda", "bf16"):
        assert torch.get_float32_matmul_precision() == before  # nothing to set on the CPU / for bf16
    assert torch.get_float32_matmul_precision() == before


def test_a_bad_precision_is_refused_naming_the_key_before_loading(tmp_path, capsys):
    import json

    from memctl.cli import main

    settings = {"data": {"precision": "fp16"}, "modules": {}}
    with pytest.raises(SystemExit) as exc:
        main(["kfac-collect", "--model", str(tmp_path / "absent"), "--windows", str(tmp_path / "absent.safetensors"),
              "--settings", json.dumps(settings), "--out-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "curvature.data" in err and "precision" in err and "fp16" in err
    assert not (tmp_path / "out").exists()
