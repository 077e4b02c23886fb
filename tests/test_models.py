"""The loading and decoding code serves the hub architectures (Pythia / GPT-NeoX, GPT-Neo, GPT-2,
OLMo-2), tested on tiny local models of each written here with random weights."""

import numpy as np
import pytest
import torch

from memctl.generation import greedy_generate, score_suffixes
from conftest import ARCHITECTURES, tiny_architecture_config as _config
from memctl.models import context_length, load_config, load_model, load_tokenizer, model_tag

@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request, tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param))
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
    return request.param, out


def test_batched_decoding_matches_single_for_each_architecture(arch_dir):
    kind, path = arch_dir
    settings = {"source": "local", "dtype": "float32", "device": "cpu"}
    model, tok = load_model(path, settings), load_tokenizer(path, settings)
    if kind == "gpt_neo":
        assert model.config._attn_implementation == "eager"
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21], [30, 31, 32, 33]]
    batched = greedy_generate(model, prompts, 8, tok.pad_token_id, batch_size=3, progress=False)
    single = np.stack([greedy_generate(model, [p], 8, tok.pad_token_id, progress=False)[0] for p in prompts])
    np.testing.assert_array_equal(batched, single)
    scores = score_suffixes(model, prompts, [[1, 2, 3]] * 3, tok.pad_token_id, progress=False)
    alone = score_suffixes(model, prompts[1:2], [[1, 2, 3]], tok.pad_token_id, progress=False)
    assert scores["nll_sum"][1] == pytest.approx(alone["nll_sum"][0], rel=1e-4)
    assert context_length(load_config(path)) == 64


def test_dtype_setting_and_eval_mode(arch_dir):
    _, path = arch_dir
    model = load_model(path, {"source": "local", "dtype": "bfloat16", "device": "cpu"})
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training


def test_model_tags():
    assert model_tag({"source": "hub", "name_or_path": "EleutherAI/pythia-70m"}) == "EleutherAI__pythia-70m"
    assert model_tag({"source": "hub", "name_or_path": "allenai/OLMo-2-0425-1B", "revision": "stage1/step1000"}) \
        == "allenai__OLMo-2-0425-1B@stage1_step1000"
    assert model_tag({"source": "local", "name_or_path": "/models/my-run/"}) == "my-run"
    assert model_tag({"source": "hub", "name_or_path": "x/y", "tag": "short"}) == "short"


def test_missing_local_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "absent", {"source": "local"})


def test_a_named_device_must_exist(monkeypatch):
    """``cuda`` (what the workflow passes with resources.gpu) never falls back to the CPU silently."""
    from memctl.config import ConfigError
    from memctl.models import resolve_device, torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"model.device: '{name}', but this job sees no usable CUDA GPU"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="model.dtype: unknown dtype 'fp8'"):
        torch_dtype("fp8")
