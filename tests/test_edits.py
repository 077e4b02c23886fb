"""Deltas store only the edited matrices (masks as bits) and patch the base model exactly."""

import numpy as np
import pytest
import torch

from conftest import tiny_architecture_model
from memctl import architectures as arch
from memctl.edits import apply_delta, load_delta, pack_mask, save_delta, unpack_mask


def test_mask_bits_round_trip_and_size():
    mask = torch.rand(37, 11) > 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == int(np.ceil(37 * 11 / 8))
    assert torch.equal(unpack_mask(packed, (37, 11)), mask)


def test_delta_patches_replaced_and_masked_matrices(tmp_path):
    model = tiny_architecture_model("gpt2")
    up, down = arch.linear_targets(model, groups=["mlp"], layers=[0])
    new_up = torch.randn(up.d_out, up.d_in)
    keep = torch.rand_like(arch.module(model, down).weight) > 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_delta(
        tmp_path / "delta.safetensors",
        replace={up.param_name: arch.to_storage(up, new_up)},
        masks={down.param_name: keep},
        metadata={"method": "test"},
    )
    delta = load_delta(path)
    assert delta.metadata == {"method": "test"} and delta.params == sorted([up.param_name, down.param_name])
    apply_delta(model, path)
    torch.testing.assert_close(arch.weight(model, up), new_up)
    torch.testing.assert_close(model.get_parameter(down.param_name), before[down.param_name] * keep)
    untouched = [k for k in before if k not in (up.param_name, down.param_name)]
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in untouched)


def test_delta_for_another_model_fails_before_changing_anything(tmp_path):
    model = tiny_architecture_model("gpt_neox")
    other = tiny_architecture_model("gpt2")
    t = arch.linear_targets(other, roles=["up"], layers=[0])[0]
    good = arch.linear_targets(model, roles=["up"], layers=[0])[0]
    path = save_delta(tmp_path / "d.safetensors", replace={
        good.param_name: torch.zeros(good.d_out, good.d_in), t.param_name: torch.zeros(3)})
    before = model.get_parameter(good.param_name).clone()
    with pytest.raises(ValueError, match="does not have"):
        apply_delta(model, path)
    assert torch.equal(model.get_parameter(good.param_name), before)


@pytest.mark.slow  # starts fresh Python processes (torch imports)
def test_same_delta_gives_the_same_bytes_in_every_process(tmp_path):
    """Determinism across processes: safetensors orders several metadata keys at random."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from memctl.edits import save_delta; "
        "save_delta(sys.argv[1], replace={'a.weight': torch.ones(2, 3)}, masks={'b.weight': torch.eye(4) > 0}, "
        "metadata={'method': 'x', 'settings': {'z': 1, 'a': 2}, 'edit_id': 'e'})"
    )
    digests = set()
    for i in range(3):
        out = tmp_path / f"d{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True)
        digests.add(out.read_bytes())
    assert len(digests) == 1
