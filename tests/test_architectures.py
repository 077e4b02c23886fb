"""Every hub architecture exposes its attention / MLP matrices the same way, in y = W a layout."""

import pytest
import torch

from conftest import ARCHITECTURES, tiny_architecture_model
from memctl import architectures as arch

# (attention roles, MLP roles) each architecture has per layer
EXPECTED = {
    "gpt_neox": ({"qkv", "o"}, {"up", "down"}),
    "gpt_neo": ({"q", "k", "v", "o"}, {"up", "down"}),
    "gpt2": ({"qkv", "o"}, {"up", "down"}),
    "olmo2": ({"q", "k", "v", "o"}, {"gate", "up", "down"}),
}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_targets_and_weight_layout_match_the_forward_pass(kind):
    model = tiny_architecture_model(kind)
    targets = arch.linear_targets(model)
    attn, mlp = EXPECTED[kind]
    for layer in (0, 1):
        assert {t.role for t in targets if t.layer == layer and t.group == "attention"} == attn
        assert {t.role for t in targets if t.layer == layer and t.group == "mlp"} == mlp
    # y = W a (+ b) for every matrix, whatever its storage layout (Conv1D is transposed)
    for t in targets:
        mod = arch.module(model, t)
        a = torch.randn(3, t.d_in)
        w = arch.weight(model, t)
        assert w.shape == (t.d_out, t.d_in)
        bias = mod.bias if getattr(mod, "bias", None) is not None else 0
        torch.testing.assert_close(mod(a), a @ w.T + bias)


def test_filters_and_shared_inputs():
    model = tiny_architecture_model("olmo2")
    mlp1 = arch.linear_targets(model, groups=["mlp"], layers=[-1])
    assert [t.role for t in mlp1] == ["gate", "up", "down"] and {t.layer for t in mlp1} == {1}
    gate, up, down = mlp1
    assert gate.input_key == up.input_key != down.input_key  # gate/up read the same activation
    assert [t.role for t in arch.linear_targets(model, roles=["down"])] == ["down", "down"]
    with pytest.raises(ValueError, match="out of range"):
        arch.linear_targets(model, layers=[2])
    with pytest.raises(ValueError, match="unknown"):
        arch.linear_targets(model, roles=["fc1"])


def test_set_weight_round_trip_on_conv1d():
    model = tiny_architecture_model("gpt2")
    t = arch.linear_targets(model, roles=["qkv"], layers=[0])[0]
    new = torch.arange(t.d_out * t.d_in, dtype=torch.float32).reshape(t.d_out, t.d_in)
    arch.set_weight(model, t, new)
    torch.testing.assert_close(arch.weight(model, t), new)
    with pytest.raises(ValueError, match="shape"):
        arch.set_weight(model, t, new.T)


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt_neo", "gpt2", "llama", "olmo2", "qwen2", "mistral"])
def test_each_family_record_matches_a_real_model_of_it(kind):
    """memctl.architectures.FAMILIES is the one place a family's facts live: checked against a real
    (tiny, random) model of each family: its position table, fused q/k/v, gated MLP, tied embeddings,
    the soft prompt's position limit and the dimension estimate's parameter count."""
    from conftest import tiny_architecture_model

    from memctl import lab
    from memctl.architectures import family, linear_targets
    from memctl.soft_prompt import _position_limit

    model = tiny_architecture_model(kind)
    fam, dims = family(kind), lab.model_dims(model.config)
    roles = {t.role for t in linear_targets(model)}
    tables = [name for name, p in model.named_parameters()
              if p.ndim == 2 and p.shape[0] == 64 and any(k in name for k in ("wpe", "position", "pos_emb"))]
    assert (fam.positions_key is not None) == bool(tables) == dims.learned_positions, (kind, tables)
    assert _position_limit(model) == (64 if tables else None)
    assert fam.fused_qkv == ("qkv" in roles) == dims.fused_qkv
    assert fam.gated_mlp == ("gate" in roles) == dims.gated_mlp
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert dims.tied_embeddings == tied
    # the estimate counts every matrix, embedding and position table; biases and norms approximately
    actual = sum(p.numel() for p in model.parameters())
    assert abs(dims.num_parameters - actual) <= 0.05 * actual, (dims.num_parameters, actual)
