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
