"""Pruning baselines: rules by hand, SparseGPT against the closed-form OBS update and magnitude,
sparsity on every architecture, sequential statistics against a full forward pass, BalancedSubnet."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, tiny_architecture_model

from memctl import architectures as arch
from memctl.masks.balanced_subnet import lowest_fraction_mask, train_balanced_subnet
from memctl.masks.data import sequences_from_pairs, sequences_from_windows
from memctl.masks.settings import resolve_prune_job
from memctl.pruning import runner
from memctl.pruning.methods import magnitude_mask, sparsegpt_prune, wanda_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_magnitude_by_hand():
    w = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    keep = magnitude_mask(w, 0.5)  # drop the 3 smallest |w|: 0.1, -0.2, 0.5
    assert keep.tolist() == [[False, True, False], [True, False, True]]


def test_wanda_by_hand_differs_from_magnitude():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    sq = torch.tensor([16.0, 1.0])  # ||X_0|| = 4, ||X_1|| = 1 -> scores [[4, 2], [12, 0.5]]
    assert wanda_mask(w, sq, 0.5).tolist() == [[True, False], [True, False]]
    assert magnitude_mask(w, 0.5).tolist() == [[False, True], [True, False]]


def _correlated_inputs(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=gen) @ mix


def test_sparsegpt_first_column_equals_the_closed_form_obs_update():
    # One row, prune exactly one weight (25% of 4 columns in one block), the first column: the
    # optimal-brain-surgeon update is w - w_0 / [H^-1]_00 * H^-1[0, :].
    x = _correlated_inputs(64, 4)
    h = x.T @ x
    w = torch.tensor([[0.01, 1.0, -2.0, 0.5]])
    new, keep = sparsegpt_prune(w, h, 0.25, block_size=4, damp=0.01)
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(4, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    expected = w.double() - w[0, 0].double() / hinv[0, 0] * hinv[0]
    assert keep.tolist() == [[False, True, True, True]]
    torch.testing.assert_close(new.double(), expected, rtol=1e-4, atol=1e-6)
    assert new[0, 0] == 0


def test_sparsegpt_reconstructs_the_layer_better_than_magnitude():
    torch.manual_seed(0)
    x = _correlated_inputs(512, 48)
    w = torch.randn(32, 48)
    new, keep = sparsegpt_prune(w, x.T @ x, 0.5, block_size=16)
    assert (new == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(new == 0, ~keep)
    mag = w * magnitude_mask(w, 0.5)

    def error(v):
        return ((x @ w.T - x @ v.T) ** 2).sum().item()

    assert error(new) < 0.7 * error(mag)
    # with nothing to prune, SparseGPT leaves the weights alone
    same, _ = sparsegpt_prune(w, x.T @ x, 0.0, block_size=16)
    torch.testing.assert_close(same, w)


def _settings(method, form="sequential", sparsity=0.3, **extra):
    return resolve_prune_job({"method": method, "form": form, "sparsity": sparsity, "block_size": 16, **extra})


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_baseline_reaches_its_sparsity_on_every_architecture(kind, method):
    model = tiny_architecture_model(kind)
    windows = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(0))
    result = runner.prune_model(model, _settings(method, sparsity=0.4), windows, progress=False)
    assert abs(result.stats["sparsity"] - 0.4) <= 0.01
    touched = {**result.masks, **result.replace}
    assert set(touched) == {t.param_name for t in arch.linear_targets(model)}
    params = dict(model.named_parameters())
    for name, value in touched.items():
        assert value.shape == params[name].shape  # storage layout (Conv1D transposed)
        pruned = ~value if value.dtype == torch.bool else value == 0
        assert torch.all(params[name][pruned] == 0)  # the model was pruned in place too
        if method == "wanda":  # per output row: Conv1D rows are columns of the stored weight
            per_row = pruned.float().mean(0 if kind == "gpt2" else 1)
            assert torch.allclose(per_row, per_row[0].expand_as(per_row))


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt2", "olmo2"])
def test_sequential_statistics_come_from_the_partially_pruned_model(kind):
    """The moments the sequential pass gathers for block 1 equal those of a full forward pass of
    the model whose block 0 is already pruned (and differ from the unpruned model's)."""
    model = tiny_architecture_model(kind)
    unpruned = copy.deepcopy(model)
    windows = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(1))
    seen = []

    def prune_block(block_targets, moments):
        if block_targets[0].layer == 1:
            full = runner.one_pass_moments(model, block_targets, windows, 3, full=True, progress=False)
            dense = runner.one_pass_moments(unpruned, block_targets, windows, 3, full=True, progress=False)
            for key in moments.sums:
                torch.testing.assert_close(moments.sums[key], full.sums[key], rtol=1e-4, atol=1e-3)
                assert not torch.allclose(moments.sums[key], dense.sums[key], rtol=1e-3)
            seen.append(sorted(moments.sums))
        for t in block_targets:
            w = arch.weight(model, t)
            arch.set_weight(model, t, w * magnitude_mask(w, 0.5))

    targets = arch.linear_targets(model)
    runner.sequential(model, targets, windows, 3, True, prune_block, progress=False)
    assert seen and {"layer1.attn_in", "layer1.mlp_in"} <= set(seen[0])


def test_one_pass_from_factors_equals_one_pass_from_calibration():
    model = tiny_architecture_model("gpt_neox")
    windows = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(2))
    targets = arch.linear_targets(model)
    moments = runner.one_pass_moments(copy.deepcopy(model), targets, windows, 3, full=True, progress=False)
    # K-FAC A factors carry a bias coordinate on some layers: it must be ignored
    factors = {k: torch.nn.functional.pad(v, (0, 1, 0, 1)) for k, v in moments.sums.items()}
    for method in ("wanda", "sparsegpt"):
        a = runner.prune_model(copy.deepcopy(model), _settings(method, "one_pass"), windows, progress=False)
        b = runner.prune_model(copy.deepcopy(model), _settings(method, "one_pass", second_moments="kfac"),
                               factors=factors, progress=False)
        for name in {**a.masks, **a.replace}:
            left, right = a.masks.get(name, a.replace.get(name)), b.masks.get(name, b.replace.get(name))
            if left.dtype == torch.bool:
                assert torch.equal(left, right), (method, name)
            else:
                torch.testing.assert_close(left, right, rtol=1e-3, atol=1e-4)


def test_sequential_and_one_pass_differ_but_both_hit_the_target():
    model = tiny_architecture_model("gpt_neox")
    windows = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(3))
    seq = runner.prune_model(copy.deepcopy(model), _settings("wanda"), windows, progress=False)
    one = runner.prune_model(copy.deepcopy(model), _settings("wanda", "one_pass"), windows, progress=False)
    layer0 = [t.param_name for t in arch.linear_targets(model, layers=[0])]
    layer1 = [t.param_name for t in arch.linear_targets(model, layers=[1])]
    assert all(torch.equal(seq.masks[n], one.masks[n]) for n in layer0)  # same inputs below block 0
    assert any(not torch.equal(seq.masks[n], one.masks[n]) for n in layer1)
    assert seq.stats["form"] == "sequential" and one.stats["form"] == "one_pass"


def test_kfac_second_moments_only_in_one_pass_form():
    from memctl.config import ConfigError

    with pytest.raises(ConfigError, match="pruning.second_moments"):
        resolve_prune_job({"method": "wanda", "form": "sequential", "second_moments": "kfac"})
    with pytest.raises(ConfigError, match=r"pruning\.damp"):
        resolve_prune_job({"method": "sparsegpt", "damp": 0})


# --------------------------------------------------------------------------- BalancedSubnet


def test_lowest_fraction_mask_by_hand():
    scores = torch.tensor([[0.3, -0.1, 2.0], [-5.0, 0.05, 1.0]])
    assert lowest_fraction_mask(scores, 1 / 3).tolist() == [[True, False, True], [True, False, True]]


def test_balanced_subnet_prunes_its_ratio_of_every_mlp_matrix():
    model = tiny_architecture_model("olmo2")  # gate, up and down projections
    gen = torch.Generator().manual_seed(4)
    forget = sequences_from_pairs(torch.randint(0, 300, (8, 12), generator=gen).tolist(),
                                  torch.randint(0, 300, (8, 12), generator=gen).tolist())
    retain = sequences_from_windows(torch.randint(0, 300, (8, 24), generator=gen))
    result = train_balanced_subnet(model, forget, retain, {"ratio": 0.05, "epochs": 6, "batch_size": 4, "lr": 5.0},
                                   progress=False)
    mlp = {t.param_name for t in arch.linear_targets(model, groups=["mlp"])}
    assert set(result.masks) == mlp and len(mlp) == 6
    for mask in result.masks.values():
        assert int((~mask).sum()) == round(0.05 * mask.numel())
    assert len(result.log) == 12 and result.stats["steps"] == 12  # 6 epochs x 2 batches of 4
