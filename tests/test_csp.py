"""CSP, the soft-prompt baseline: the prompt mechanism against a hand-built reference, the delta entry,
training in the requested direction with the weights byte-identical, the command's sidecar (cost)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_architecture_config, tiny_architecture_model

from memctl import soft_prompt
from memctl.cli import main
from memctl.config import ConfigError, load_config
from memctl.edits import applied, apply_delta, load_delta, save_delta, write_edited_model
from memctl.generation import greedy_generate, score_suffixes, window_losses
from memctl.masks.csp import resolve_job, train_soft_prompt
from memctl.masks.data import sequences_from_pairs
from memctl.store import read_sidecar, verify

MODEL_SETTINGS = json.dumps({"source": "local", "dtype": "float32", "device": "cpu"})


def _state_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def _manual_logits(model, prompt, ids):
    """The reference: the prompt's vectors concatenated in front of the token embeddings by hand."""
    embeds = model.get_input_embeddings()(torch.as_tensor([ids]))
    with torch.no_grad():
        return model(inputs_embeds=torch.cat([prompt[None], embeds], 1)).logits[0, prompt.shape[0]:]


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt2"])
def test_attached_prompt_equals_the_hand_built_prompted_input(kind):
    model = tiny_architecture_model(kind)
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    prompts, suffixes = [[5, 6, 7, 8, 9], [10, 11, 12]], [[20, 21, 22], [23, 24, 25]]

    def greedy(p, n):  # one prompt at a time, no cache, no padding
        ids = list(p)
        for _ in range(n):
            ids.append(int(_manual_logits(model, prompt, ids)[-1].argmax()))
        return ids[len(p):]

    expected = [greedy(p, 5) for p in prompts]
    nll = []
    for p, s in zip(prompts, suffixes):
        logp = torch.log_softmax(_manual_logits(model, prompt, p + s), -1)
        nll.append(float(-sum(logp[len(p) - 1 + i, t] for i, t in enumerate(s))))
    windows = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    logp = [torch.log_softmax(_manual_logits(model, prompt, list(w)), -1) for w in windows]
    held = float(sum(-lp[i, w[i + 1]] for lp, w in zip(logp, windows) for i in range(len(w) - 1)))

    before = _state_bytes(model)
    soft_prompt.attach(model, prompt)
    # batched, left-padded, with a KV cache: what the evaluate stage runs
    assert greedy_generate(model, prompts, 5, pad_id=0, batch_size=2, progress=False).tolist() == expected
    scored = score_suffixes(model, prompts, suffixes, pad_id=0, batch_size=2, progress=False)
    np.testing.assert_allclose(scored["nll_sum"], nll, rtol=1e-5)
    total, tokens = window_losses(model, windows, batch_size=2, progress=False)
    assert tokens == 10 and total == pytest.approx(held, rel=1e-5)
    out = model.generate(input_ids=torch.tensor([[0, 0, 10, 11, 12]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]]),
                         max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out[0, 5:].tolist() == expected[1]  # transformers' generate (lm-eval's generation tasks)
    assert soft_prompt.detach(model) is prompt
    assert _state_bytes(model) == before
    plain = model(torch.tensor([prompts[0]])).logits[0]
    assert not torch.allclose(plain, _manual_logits(model, prompt, prompts[0]))  # the prompt did change them


def test_learned_positions_bound_the_prompt():
    model = tiny_architecture_model("gpt2")  # 64 learned positions
    soft_prompt.attach(model, torch.zeros(10, 32))
    with pytest.raises(ValueError, match="exceed the model's 64 learned positions"):
        model(torch.zeros((1, 60), dtype=torch.long))


def test_prompt_delta_round_trip_leaves_the_weights_byte_identical(tiny_model_dir, tmp_path):
    from memctl.models import load_model

    model = load_model(tiny_model_dir, {"source": "local", "dtype": "float32", "device": "cpu"})
    width = model.get_input_embeddings().embedding_dim
    prompt = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    path = save_delta(tmp_path / "delta.safetensors", prompt=prompt, metadata={"method": "csp"})
    delta = load_delta(path)
    assert torch.equal(delta.prompt, prompt) and delta.params == [] and delta.metadata == {"method": "csp"}
    before = _state_bytes(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    plain = model(ids).logits
    with applied(model, path) as edited:
        assert torch.equal(soft_prompt.attached(edited), prompt)
        assert _state_bytes(edited) == before
        assert not torch.allclose(edited(ids).logits, plain)
    assert soft_prompt.attached(model) is None and torch.equal(model(ids).logits, plain)
    # a prompt of the wrong width fails before anything is attached
    bad = save_delta(tmp_path / "bad.safetensors", prompt=torch.zeros(2, width + 1))
    with pytest.raises(ValueError, match="input embeddings are 32 wide"):
        apply_delta(model, bad)
    assert soft_prompt.attached(model) is None
    with pytest.raises(ValueError, match="changes no weights"):
        write_edited_model(tiny_model_dir, {"source": "local"}, path, tmp_path / "dir")


def _pairs(n=8, seed=0):
    gen = np.random.default_rng(seed)
    return gen.integers(1, 250, size=(n, 8)).tolist(), gen.integers(1, 250, size=(n, 8)).tolist()


def _suffix_loss(model, prefixes, suffixes, delta=None) -> float:
    with applied(model, delta):
        s = score_suffixes(model, prefixes, suffixes, pad_id=0, progress=False)
    return float(s["nll_sum"].sum() / s["n_tokens"].sum())


@pytest.fixture(scope="module")
def responsive_model():
    """A tiny random GPT-NeoX whose weights are drawn 10x wider than usual (std 0.2): at the usual 0.02
    its outputs are near-uniform whatever the input, and no prompt moves the loss by more than ~0.02
    nats in 30 steps (measured); at 0.2, 30 steps move it by ~0.5 either way."""
    from transformers import AutoModelForCausalLM

    config = tiny_architecture_config("gpt_neox")
    config.initializer_range = 0.2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("mode", ["up", "down"])
def test_csp_moves_the_memorized_suffix_loss_in_the_requested_direction(responsive_model, mode, tmp_path):
    tiny_model = responsive_model
    prefixes, suffixes = _pairs()
    base = _suffix_loss(tiny_model, prefixes, suffixes)  # 6.58 nats (measured)
    before = _state_bytes(tiny_model)
    settings = resolve_job({"mode": mode, "prompt_length": 4, "steps": 30, "batch_size": 4, "lr": 0.3,
                            "theta": base + 1.0, "log_every": 10})
    result = train_soft_prompt(tiny_model, sequences_from_pairs(prefixes, suffixes, "suffix"), settings, progress=False)
    assert _state_bytes(tiny_model) == before and soft_prompt.attached(tiny_model) is None
    assert not any(p.grad is not None for p in tiny_model.parameters())
    path = save_delta(tmp_path / "delta.safetensors", prompt=result.prompt)
    edited = _suffix_loss(tiny_model, prefixes, suffixes, path)
    if mode == "up":
        assert edited < base - 0.3, (base, edited)
        assert result.stats["ascent_steps"] == 0
    else:  # ascent while below theta = base + 1: the loss climbs towards theta
        assert edited > base + 0.3, (base, edited)
        assert result.stats["ascent_steps"] > 0 and result.stats["theta"] == pytest.approx(base + 1.0)
    assert _state_bytes(tiny_model) == before
    again = train_soft_prompt(tiny_model, sequences_from_pairs(prefixes, suffixes, "suffix"), settings, progress=False)
    assert torch.equal(again.prompt, result.prompt)  # same settings + seed, same prompt


def test_csp_command_writes_the_prompt_delta_and_its_cost(tiny_model_dir, tmp_path):
    prefixes, suffixes = _pairs(6)
    table = tmp_path / "er_train.parquet"
    pd.DataFrame({"prefix_ids": prefixes, "suffix_ids": suffixes}).to_parquet(table)
    out = tmp_path / "edit"
    main(["csp", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
          "--memorized", str(table), "--settings", resolve_job({"mode": "up", "prompt_length": 3, "steps": 5,
                                                                 "batch_size": 4, "log_every": 2}).to_json(),
          "--label", "CSP (up)", "--out", str(out / "delta.safetensors"), "--log", str(out / "train_log.parquet")])
    assert verify(out / "delta.safetensors") == []
    delta = load_delta(out / "delta.safetensors")
    assert tuple(delta.prompt.shape) == (3, 32) and not delta.replace and not delta.masks
    assert delta.metadata["method"] == "csp" and delta.metadata["mode"] == "up" and "theta" not in delta.metadata
    side = read_sidecar(out / "delta.safetensors")
    # 5 iterations x 4 sequences x 16 tokens (no padding: every sequence is 8 + 8 tokens)
    assert side["cost"] == {"tokens_processed": 5 * 4 * 16, "forward_calls": 5}
    assert side["wall_time_s"] > 0 and side["model_loaded"]["device"] == "cpu"
    log = pd.read_parquet(out / "train_log.parquet")
    assert log["iteration"].tolist() == [1, 2, 4, 5]


def test_bad_csp_settings_name_the_key(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"csp.lr: -1 is less than or equal to the minimum of 0"):
        resolve_job({"mode": "down", "lr": -1})
    with pytest.raises(SystemExit):
        main(["csp", "--model", str(tiny_model_dir), "--memorized", str(tmp_path / "none.parquet"),
              "--settings", json.dumps({"mode": "sideways"}), "--out", str(tmp_path / "d"), "--log", str(tmp_path / "l")])
    assert "csp.mode" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="csp.prompt_length"):
        load_config({"extends": "tests/tiny_config.yaml", "csp": {"prompt_length": 0}})


# ------------------------------------------------------------------------ plan and masks report


def _tiny_plan(change=None):
    import yaml

    from memctl import lab
    from memctl.config import validate_config
    from memctl.plan import build_plan

    raw = yaml.safe_load((Path(__file__).with_name("tiny_config.yaml")).read_text(encoding="utf-8"))
    if change:
        change(raw)
    cfg = validate_config(raw)
    return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")


def test_plan_has_one_csp_edit_per_mode_and_the_theta_sweep_joins_the_threshold_ablation():
    plan = _tiny_plan()
    csp = {e.label: e for e in plan.edits.values() if e.stage == "csp"}
    assert sorted(csp) == ["CSP (down)", "CSP (up)"]
    job = plan.stage("csp").jobs[csp["CSP (down)"].id]
    assert job.inputs["memorized"].endswith("/er_train.parquet")  # the masks' training side
    assert job.settings["theta"] == 4.0 and "theta" not in plan.stage("csp").jobs[csp["CSP (up)"].id].settings
    assert all(e.id in plan.stage("evaluate").jobs for e in csp.values())
    swept = _tiny_plan(lambda c: c["csp"].update(sweep={"thetas": [2.0, 6.0]}))
    labels = sorted(e.label for e in swept.edits.values() if e.stage == "csp")
    assert labels == ["CSP (down)", "CSP (down), theta=2", "CSP (down), theta=6", "CSP (up)"]
    spec = json.loads(swept.stage("masks_report").jobs[""].args[swept.stage("masks_report").jobs[""].args.index("--spec") + 1])
    threshold = sorted(e["threshold"] for e in spec["edits"] if e["family"] == "csp" and "threshold" in e["tables"])
    assert threshold == [2.0, 4.0, 6.0]  # the main point is on the ablation's curve too
    off = _tiny_plan(lambda c: c["csp"].update(enabled=False))
    assert not off.stage("csp").jobs and len(off.edits) == len(plan.edits) - 2


def test_a_changed_csp_setting_reruns_only_csp_and_what_reads_it():
    def keyed(plan):
        return {(j.stage, j.key): (dict(j.outputs), j.args) for j in plan.jobs()}

    a, b = keyed(_tiny_plan()), keyed(_tiny_plan(lambda c: c["csp"].update(theta=5.0)))
    touched = sorted({s for s, _ in a.keys() ^ b.keys()} | {s for s, k in a.keys() & b.keys() if a[s, k] != b[s, k]})
    assert touched == ["csp", "evaluate", "masks_report", "report"]
    assert sum(1 for s, _ in a.keys() - b.keys() if s == "csp") == 1  # theta moves the down prompt only


def test_masks_report_has_the_csp_rows_and_the_cost_columns(tmp_path):
    from memctl.store import Provenance

    rows, paths, edits = [], [], [{"edit": "none", "series": "Origin", "family": "origin", "delta": None,
                                   "tables": ["main"]}]
    for edit, series, cost in (("csp-down", "CSP (down)", 2560), ("csp-up", "CSP (up)", 1280)):
        prov = Provenance("csp", {}, {})
        prov.extra.update(model_loaded={"device": "cpu"}, cost={"tokens_processed": cost})
        save_delta(tmp_path / f"{edit}.safetensors", prompt=torch.zeros(2, 4), provenance=prov)
        edits.append({"edit": edit, "series": series, "family": "csp", "mode": series[5:-1], "sparsity": None,
                      "threshold": 4.0 if "down" in edit else None, "delta": str(tmp_path / f"{edit}.safetensors"),
                      "tables": ["main", "threshold"] if "down" in edit else ["main"]})
    (tmp_path / "metrics").mkdir()  # not beside the deltas: the store refuses a file without sidecar there
    for i, edit in enumerate(["none", "csp-up", "csp-down"]):
        # memorized track: Exact ER 1.0 (Origin, by construction), 0.9, 0.8; extraction-rate track 0.4, 0.3, 0.2
        rows.append({"model": "m", "edit": edit, "method": edit, "n_examples": 10, "exact_er": 1.0 - 0.1 * i,
                     "fractional_er": 0.6, "mem_loss": 1.0 + i, "mem_ppl": 2.0, "heldout_loss": 3.0, "heldout_ppl": 20.0,
                     "er_n_examples": 30, "er_exact_er": 0.4 - 0.1 * i, "er_fractional_er": 0.5})
        paths.append(str(tmp_path / "metrics" / f"{edit}.parquet"))
        pd.DataFrame([rows[-1]]).to_parquet(paths[-1])
    out = tmp_path / "out"
    main(["masks-report", "--metrics", *paths, "--spec", json.dumps({"title": "T", "edits": edits}), "--out-dir", str(out)])
    table = pd.read_parquet(out / "table.parquet")
    assert list(table["method"]) == ["Origin", "CSP (down)", "CSP (up)"]
    assert list(table["sparsity"]) == [0.0, 0.0, 0.0]  # a prompt edits no weight
    assert list(table["tokens_processed"])[1:] == [2560, 1280] and list(table["device"])[1:] == ["cpu", "cpu"]
    md = (out / "table.md").read_text()
    assert "| Wall time (s) | Device | Tokens |" in md
    # Fractional / Exact ER of the extraction-rate track, then the memorized track's, mem. loss 1 + 2, PPL, sparsity
    assert "| CSP (down) | 3.000 | 20.00 | 0.500 | 0.200 | 0.600 | 0.800 | 3.000 | 2.000 | 0.000 |" in md
    assert "| Origin | 3.000 | 20.00 | 0.500 | 0.400 | 0.600 | 1.000 | 1.000 | 2.000 | 0.000 |" in md
    assert "| 0.000 | - | - | - |" in md  # Origin: nothing trained
    assert "| cpu | 2,560 |" in md and "| cpu | 1,280 |" in md
    assert "- CSP (down): soft prompt, no weight edited (sparsity 0); threshold theta 4" in md
    ablation = (out / "ablation_threshold.md").read_text()  # csp.sweep.thetas: the masks' threshold ablation
    assert "| CSP (down) | 4.00 | 3.000 | 20.00 | 0.500 | 0.200 | 0.600 | 0.800 |" in ablation
    assert "t is CSP's theta" in ablation and "`er_test`, N=30" in ablation


def test_a_prompt_that_does_not_fit_a_learned_position_table_fails_at_plan_time():
    import yaml

    from memctl.config import validate_config
    from memctl.lab import ModelDims
    from memctl.plan import build_plan

    raw = yaml.safe_load(Path(__file__).with_name("tiny_config.yaml").read_text(encoding="utf-8"))
    cfg = validate_config(raw)
    seq = int(cfg["extract"]["prefix_len"]) + int(cfg["extract"]["suffix_len"])
    dims = ModelDims(vocab_size=400, hidden_size=64, num_layers=2, intermediate_size=128, num_heads=2,
                     context_length=seq + 3, model_type="gpt2", learned_positions=True)
    with pytest.raises(ConfigError, match=rf"csp.prompt_length: 4 prompt vectors \+ {seq}-token sequences .* exceed "
                                          rf"the model's {seq + 3} learned positions.*csp.prompt_length: 3 or less"):
        build_plan(cfg, dims, python_version="3.11")
    raw["csp"]["prompt_length"] = 3  # room for the prompt: planned
    assert len(build_plan(validate_config(raw), dims, python_version="3.11").stage("csp").jobs) == 2


def test_held_out_windows_leave_the_soft_prompt_room_for_every_row(tiny_model_dir, tmp_path):
    """With CSP on, every row scores held-out windows of context - prompt_length tokens, so CSP's
    prompt + window stays within the context; with CSP off the windows fill the context."""
    on, off = _tiny_plan(), _tiny_plan(lambda c: c["csp"].update(enabled=False))
    held_on, held_off = on.stage("heldout").jobs[""], off.stage("heldout").jobs[""]
    assert held_on.args[held_on.args.index("--reserve-positions") + 1] == "4"
    assert "--reserve-positions" not in held_off.args and held_on.outputs != held_off.outputs
    # every evaluation (CSP rows and the others) reads the same windows
    assert {j.inputs["heldout"] for j in on.stage("evaluate").jobs.values()} == {held_on.outputs["windows"]}

    (tmp_path / "data").mkdir()
    text = tmp_path / "data" / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 0123456789 " * 200, encoding="utf-8")
    settings = json.dumps({"source": "text", "path": str(text)})
    model = ["--model", str(tiny_model_dir), "--model-settings", json.dumps({"source": "local"})]
    main(["heldout", *model, "--settings", settings, "--reserve-positions", "20", "--out", str(tmp_path / "out" / "a.safetensors")])
    main(["heldout", *model, "--settings", settings, "--out", str(tmp_path / "out" / "b.safetensors")])
    from safetensors.torch import load_file

    short, full = (load_file(tmp_path / "out" / f"{x}.safetensors")["windows"] for x in "ab")
    assert full.shape[1] == 64 and short.shape[1] == 64 - 20  # tiny model: 64 positions
    assert read_sidecar(tmp_path / "out" / "a.safetensors")["reserved_positions"] == 20
    # the same text, cut shorter: the windows are consecutive runs of the same token stream
    assert torch.equal(short.flatten()[: full.numel() // 2], full.flatten()[: full.numel() // 2])


def test_count_tokens_counts_non_padding_inputs_of_every_forward_functional_calls_included():
    from memctl.runner import count_tokens

    model = tiny_architecture_model("gpt_neox")
    params = dict(model.named_parameters())
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with count_tokens(model) as cost:
        model(torch.ones((2, 4), dtype=torch.long), attention_mask=mask)  # 5 real tokens
        model(input_ids=torch.ones((3, 2), dtype=torch.long))  # no mask: 6 positions
        torch.func.functional_call(model, params, args=(), kwargs={"input_ids": torch.ones((1, 7), dtype=torch.long)})
        soft_prompt.attach(model, torch.zeros(5, 32))  # the prompt's vectors are not data
        model(torch.ones((1, 3), dtype=torch.long))
        soft_prompt.detach(model)
    assert cost == {"tokens": 5 + 6 + 7 + 3, "forward_calls": 4}
    model(torch.ones((1, 3), dtype=torch.long))  # the hook is gone after the block
    assert cost["tokens"] == 21
