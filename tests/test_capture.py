"""memctl.capture against references that use no hooks: target modules' ``forward`` patched to record
their input and add a zero "probe" to their output (d loss / d probe = the output gradient),
explicit matmuls in the orientation of ``architectures.weight``, and autograd's weight gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, tiny_architecture_model
from transformers.activations import ACT2FN

from memctl import architectures as arch
from memctl.capture import Capture, call_arguments

torch.set_num_threads(1)


def _ids(batch=2, length=10, seed=0):
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")


def _reference(model, targets, ids):
    """Per target: input (batch, seq, d_in), output, d loss / d output, from patched forwards."""
    inputs, outputs, probes, originals = {}, {}, {}, {}
    for t in targets:
        mod = arch.module(model, t)
        originals[t.name] = mod.forward

        def forward(x, name=t.name, orig=mod.forward):
            inputs[name] = x.detach().clone()
            out = orig(x)
            outputs[name] = out.detach().clone()
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]

        mod.forward = forward
    try:
        loss = _loss(model, ids)
    finally:
        for t in targets:
            arch.module(model, t).forward = originals[t.name]
    grads = torch.autograd.grad(loss, [probes[t.name] for t in targets])
    return inputs, outputs, {t.name: g for t, g in zip(targets, grads)}


def _captured(model, targets, ids, **kwargs):
    got_in, got_g = {}, {}

    def on_input(t, x):
        assert t.name not in got_in
        got_in[t.name] = x.clone()

    def on_grad(t, g):
        assert t.name not in got_g
        got_g[t.name] = g.clone()

    with Capture(model, targets, on_input=on_input, on_output_grad=on_grad, **kwargs):
        _loss(model, ids).backward()
    return got_in, got_g


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_inputs_and_output_gradients_equal_the_hook_free_reference(kind):
    model = tiny_architecture_model(kind)
    targets = arch.linear_targets(model)  # fused QKV (Linear / Conv1D), separate q/k/v, gate/up/down
    ids = _ids()
    ref_in, ref_out, ref_g = _reference(model, targets, ids)
    model.zero_grad(set_to_none=True)
    got_in, got_g = _captured(model, targets, ids, per_input_key=False)
    assert set(got_in) == set(got_g) == {t.name for t in targets}
    for t in targets:
        x, g = got_in[t.name], got_g[t.name]
        assert x.shape == (ids.numel(), t.d_in) and g.shape == (ids.numel(), t.d_out)
        torch.testing.assert_close(x, ref_in[t.name].reshape(-1, t.d_in), rtol=0, atol=0)
        torch.testing.assert_close(g, ref_g[t.name].reshape(-1, t.d_out), rtol=1e-5, atol=1e-6)
        # the orientation of architectures.weight: y = W a (+ b)
        w, bias = arch.weight(model, t), arch.module(model, t).bias
        y = x @ w.detach().T + (0 if bias is None else bias.detach())
        torch.testing.assert_close(y, ref_out[t.name].reshape(-1, t.d_out), rtol=1e-5, atol=1e-5)
        # autograd's weight gradient is sum_t g_t a_t^T
        wg = arch.module(model, t).weight.grad
        torch.testing.assert_close(g.T @ x, wg.T if t.transposed else wg, rtol=1e-4, atol=1e-5)


def test_gpt2_inputs_by_explicit_matmuls():
    """Conv1D, fused c_attn: layer-0 input is ln_1(wte + wpe); the MLP's down input is gelu(W_fc a + b)."""
    model = tiny_architecture_model("gpt2")
    targets = arch.linear_targets(model, layers=[0])
    ids = _ids()
    with torch.no_grad():
        got = {}
        with Capture(model, targets, on_input=lambda t, x: got.__setitem__(t.name, x.clone()), per_input_key=False):
            model(input_ids=ids, use_cache=False)
        tr = model.transformer
        emb = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))[None]
        by_name = {t.role: t for t in targets}
        torch.testing.assert_close(got[by_name["qkv"].name], tr.h[0].ln_1(emb).reshape(-1, 32), rtol=0, atol=0)
        up, down = by_name["up"], by_name["down"]
        hidden = ACT2FN[model.config.activation_function](
            got[up.name] @ arch.weight(model, up).T + arch.module(model, up).bias)
        torch.testing.assert_close(got[down.name], hidden, rtol=1e-5, atol=1e-6)


def test_olmo2_shared_inputs_by_explicit_matmuls_and_handed_over_once():
    """q/k/v and gate/up read one tensor: layer-0 attention input is the embedding (post-norm model),
    the down input is silu(W_gate a) * (W_up a); per input key, the first listed target gets it."""
    model = tiny_architecture_model("olmo2")
    targets = arch.linear_targets(model)
    ids = _ids()
    calls = []
    per_target = {}
    with torch.no_grad():
        with Capture(model, targets, on_input=lambda t, x: calls.append((t, x.clone()))):
            model(input_ids=ids, use_cache=False)
        with Capture(model, targets, on_input=lambda t, x: per_target.__setitem__(t.name, x.clone()),
                     per_input_key=False):
            model(input_ids=ids, use_cache=False)
        keys = list(dict.fromkeys(t.input_key for t in targets))
        assert sorted(t.input_key for t, _ in calls) == sorted(keys)  # once per distinct input
        first = {k: next(t for t in targets if t.input_key == k) for k in keys}
        for t, _x in calls:
            assert t == first[t.input_key]
        role = {(t.layer, t.role): t for t in targets}
        for layer in (0, 1):
            q, k, v = (per_target[role[layer, r].name] for r in "qkv")
            assert torch.equal(q, k) and torch.equal(q, v)
            assert torch.equal(per_target[role[layer, "gate"].name], per_target[role[layer, "up"].name])
            a = per_target[role[layer, "up"].name]
            hidden = torch.nn.functional.silu(a @ arch.weight(model, role[layer, "gate"]).T) * (
                a @ arch.weight(model, role[layer, "up"]).T)
            torch.testing.assert_close(per_target[role[layer, "down"].name], hidden, rtol=1e-5, atol=1e-6)
        emb = model.model.embed_tokens(ids).reshape(-1, 32)
        torch.testing.assert_close(per_target[role[0, "q"].name], emb, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gpt2", "olmo2"])
def test_frozen_parameters_give_the_same_gradients_and_no_weight_gradients(kind):
    model = tiny_architecture_model(kind)
    targets = arch.linear_targets(model)
    ids = _ids(seed=1)
    _, ref_g = _captured(model, targets, ids)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    got_in, got_g = _captured(model, targets, ids, positions=slice(0, -1))
    assert all(p.grad is None for p in model.parameters())
    for t in targets:
        expected = ref_g[t.name].reshape(ids.shape[0], ids.shape[1], -1)[:, :-1].reshape(-1, t.d_out)
        torch.testing.assert_close(got_g[t.name], expected, rtol=1e-5, atol=1e-6)
    assert {t.input_key for t in targets} == {t.input_key for t in targets if t.name in got_in}


def test_positions_pick_sequence_positions_batch_major():
    model = tiny_architecture_model("gpt_neox")
    targets = arch.linear_targets(model, groups=["mlp"])
    ids = _ids(batch=3, length=8)
    full, part = {}, {}
    with torch.no_grad():
        with Capture(model, targets, on_input=lambda t, x: full.__setitem__(t.name, x.clone())):
            model(input_ids=ids, use_cache=False)
        with Capture(model, targets, on_input=lambda t, x: part.__setitem__(t.name, x.clone()), positions=slice(2, 5)):
            model(input_ids=ids, use_cache=False)
    for t in targets:
        assert torch.equal(part[t.name], full[t.name].reshape(3, 8, -1)[:, 2:5].reshape(-1, t.d_in))


def test_hooks_are_gone_after_exit_also_on_an_exception():
    model = tiny_architecture_model("gpt2")
    targets = arch.linear_targets(model)
    before = _hook_count(model)
    seen = []
    capture = Capture(model, targets, on_input=lambda t, x: seen.append(t), on_output_grad=lambda t, g: seen.append(t))
    with capture:
        assert _hook_count(model) > before
        loss = _loss(model, _ids())  # graph built inside, backward after exit
    assert _hook_count(model) == before
    n = len(seen)
    loss.backward()
    assert len(seen) == n  # gradient hooks on tensors of that graph are disarmed
    with pytest.raises(ZeroDivisionError):
        with Capture(model, targets, on_input=lambda t, x: seen.append(t)):
            model(input_ids=_ids(), use_cache=False)
            raise ZeroDivisionError("in the body")
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        def fail(t, x):
            raise RuntimeError("boom")

        with Capture(model, targets, on_input=fail):
            model(input_ids=_ids(), use_cache=False)
    assert _hook_count(model) == before
    with pytest.raises(ValueError):
        Capture(model, targets)


def test_call_arguments_stops_at_the_module_and_removes_its_hook():
    model = tiny_architecture_model("gpt_neox")
    ids = _ids()
    before = _hook_count(model)
    later = []
    handle = model.gpt_neox.final_layer_norm.register_forward_hook(lambda *a: later.append(1))
    block = model.gpt_neox.layers[0]
    args, kwargs = call_arguments(block, lambda: model(input_ids=ids, use_cache=False))
    handle.remove()
    hidden = args[0] if args else kwargs["hidden_states"]
    torch.testing.assert_close(hidden, model.gpt_neox.embed_in(ids), rtol=0, atol=0)
    assert not later and _hook_count(model) == before
    with pytest.raises(RuntimeError, match="never called"):
        call_arguments(block, lambda: None)
    assert _hook_count(model) == before
