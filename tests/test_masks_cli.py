"""The masks commands end to end on the tiny model: deltas, logs, provenance, determinism, report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from memctl.cli import main
from memctl.config import ConfigError
from memctl.edits import apply_delta, load_delta
from memctl.masks import report
from memctl.masks.settings import resolve_balanced_subnet, resolve_mask_job, resolve_own_memories, resolve_prune_job
from memctl.masks.training import schedule_sum
from memctl.store import hash_path, read_sidecar, verify

MODEL_SETTINGS = json.dumps({"source": "local", "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks_data")
    gen = np.random.default_rng(0)
    save_file({"windows": torch.from_numpy(gen.integers(1, 250, size=(16, 24)))}, str(root / "calibration.safetensors"))
    for name, n in (("memorized_train", 6), ("nonmemorized", 6)):
        pd.DataFrame({
            "candidate_id": [f"{name}{i}" for i in range(n)],
            "prefix_ids": list(gen.integers(1, 250, size=(n, 8))),
            "suffix_ids": list(gen.integers(1, 250, size=(n, 8))),
        }).to_parquet(root / f"{name}.parquet")
    return root


def _run(*args):
    main(list(args))


def _train(tiny_model_dir, data, out, settings):
    """``memctl train-mask`` with ``settings`` resolved as the planner resolves them (a dict; or the
    ``--settings`` text itself)."""
    text = settings if isinstance(settings, str) else resolve_mask_job(settings).to_json()
    _run("train-mask", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
         "--calibration", str(data / "calibration.safetensors"), "--memorized", str(data / "memorized_train.parquet"),
         "--settings", text, "--label", "Ours (up)", "--out", str(out / "delta.safetensors"),
         "--log", str(out / "train_log.parquet"))


# 60 iterations at lr null (sized to them) train this tiny random model's mask to its target (measured:
# expected sampled sparsity 0.299; 20 do not, 30-40 end at 0.303-0.307); one pass (16 windows at batch 4)
# would be 4 iterations.
SETTINGS = {"mode": "up", "lambda_s": 240, "steps": 60, "batch_size": 4, "mem_batch_size": 3,
            "log_every": 20, "checkpoint_every": 30}


def test_train_mask_writes_a_sound_deterministic_delta(tiny_model_dir, tiny_model, data, tmp_path):
    _train(tiny_model_dir, data, tmp_path / "a", SETTINGS)
    _train(tiny_model_dir, data, tmp_path / "b", SETTINGS)
    for name in ("delta.safetensors", "train_log.parquet"):
        assert verify(tmp_path / "a" / name) == []
        assert hash_path(tmp_path / "a" / name) == hash_path(tmp_path / "b" / name)  # same settings + seed
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    delta = load_delta(tmp_path / "a" / "delta.safetensors")
    assert delta.metadata["mode"] == "up" and delta.metadata["label"] == "Ours (up)"
    assert abs(delta.metadata["sparsity"] - 0.3) <= 0.01 and not delta.replace
    assert delta.metadata["converged"] is True and "unconverged_reason" not in delta.metadata
    # lr: null is recorded as trained, in the delta and its sidecar
    lr = delta.metadata["settings"]["lr"]
    assert lr == delta.metadata["lr"] == pytest.approx(12.0 / schedule_sum(60)) and delta.metadata["lr_rule"] != "set"
    sidecar = json.dumps(read_sidecar(tmp_path / "a" / "delta.safetensors"))
    assert '"resolved_settings"' in sidecar and json.dumps(lr) in sidecar
    kept = sum(int(m.sum()) for m in delta.masks.values())
    assert 1 - kept / sum(m.numel() for m in delta.masks.values()) == pytest.approx(delta.metadata["sparsity"])
    log = pd.read_parquet(tmp_path / "a" / "train_log.parquet")
    assert list(log["iteration"]) == [1, 20, 40, 60] and log["mem_loss"].notna().all()
    # the delta applies through the shared edit path: masked weights become exact zeros
    import copy

    edited = apply_delta(copy.deepcopy(tiny_model), delta)
    params = dict(edited.named_parameters())
    for name, mask in delta.masks.items():
        assert torch.all(params[name][~mask] == 0) and torch.all(params[name][mask] != 0)


def test_bad_settings_exit_early_naming_the_key(tiny_model_dir, data, tmp_path, capsys):
    # the command reads the planned job back (MaskJob.from_json): a wrong type, an unknown key or a
    # missing key fails before any model is loaded, naming it; limits are the planner's (resolve_mask_job)
    planned = json.loads(resolve_mask_job(SETTINGS).to_json())
    unplanned = {k: v for k, v in planned.items() if k != "offset"}
    for settings, named in (({**planned, "tau": "0.4"}, "masks.tau: '0.4' is not of type number"),
                            ({**planned, "tua": 0.4}, "masks.tua: unknown key"),
                            (unplanned, "masks: missing key offset")):
        with pytest.raises(SystemExit) as err:
            _train(tiny_model_dir, data, tmp_path, json.dumps(settings))
        assert err.value.code == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "delta.safetensors").exists()
    with pytest.raises(ConfigError, match=r"masks\.tau"):
        resolve_mask_job({**SETTINGS, "tau": -1})  # at plan time


def test_the_command_does_not_resolve_the_job_again(tiny_model_dir, data, tmp_path, monkeypatch):
    """``memctl train-mask`` trains on the planned job as it reads back: neither the command nor
    train_mask calls resolve_mask_job (the planner did, once)."""
    from memctl.masks import settings as mask_settings
    from memctl.masks import training

    planned = resolve_mask_job({**SETTINGS, "steps": 4, "on_unconverged": "flag"}).to_json()

    def refuse(*_a, **_k):
        raise AssertionError("resolve_mask_job called by the command")

    monkeypatch.setattr(mask_settings, "resolve_mask_job", refuse)
    monkeypatch.setattr(training, "resolve_mask_job", refuse)
    _train(tiny_model_dir, data, tmp_path, planned)
    meta = load_delta(tmp_path / "delta.safetensors").metadata
    assert {**meta["settings"], "lr": None} == json.loads(planned)  # lr: null derived from the run, recorded
    assert meta["lr_rule"] != "set" and meta["steps"] == 4


def test_an_unconverged_mask_fails_the_job_naming_steps_and_lr(tiny_model_dir, data, tmp_path, capsys):
    # The new user's run: 60 iterations at the paper's lr 2e-3 (mode down, other settings default).
    short = {"mode": "down", "lambda_s": 160, "threshold": 4.0, "steps": 60, "lr": 0.002, "batch_size": 4,
             "mem_batch_size": 3}
    with pytest.raises(SystemExit) as err:
        _train(tiny_model_dir, data, tmp_path, short)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert "memctl train-mask: error: the down mask did not converge after 60 iterations (lr 0.002" in stderr
    assert "training sparsity ended at 0.000" in stderr and "raise masks.lr to >=" in stderr
    assert "masks.steps (now 60; one pass over the 16 calibration windows at batch_size 4 is 4)" in stderr
    assert not (tmp_path / "delta.safetensors").exists() and not (tmp_path / "checkpoint").exists()

    # on_unconverged: flag writes it, marked in the delta; the masks table and plot mark it too
    _train(tiny_model_dir, data, tmp_path, {**short, "on_unconverged": "flag"})
    _, meta = report.delta_info(tmp_path / "delta.safetensors")
    assert meta["converged"] is False and "training sparsity 0.000 vs target 0.300" in meta["unconverged_reason"]
    assert meta["mask_rule"] == "topk (threshold missed target)" and meta["convergence"]["crossed_share_of_cut"] == 0


def test_steps_default_to_one_pass_over_the_calibration_windows(tiny_model_dir, data, tmp_path):
    settings = {"mode": "up", "lambda_s": 240, "batch_size": 4, "mem_batch_size": 3, "on_unconverged": "flag"}
    _train(tiny_model_dir, data, tmp_path, settings)  # 4 iterations cannot converge here: flagged
    meta = load_delta(tmp_path / "delta.safetensors").metadata
    assert meta["settings"]["steps"] == meta["steps"] == 4  # ceil(16 windows / 4)
    assert meta["steps_rule"] == "one pass over 16 calibration windows at batch_size 4"
    assert list(pd.read_parquet(tmp_path / "train_log.parquet")["iteration"])[-1] == 4


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_command(tiny_model_dir, data, tmp_path, method):
    settings = resolve_prune_job({"method": method, "form": "sequential", "sparsity": 0.3, "block_size": 16,
                                  "calibration_windows": 8})  # as the planner resolves it
    args = ["prune", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
            "--settings", settings.to_json(), "--label", method, "--out", str(tmp_path / "delta.safetensors")]
    if method != "magnitude":
        args += ["--calibration", str(data / "calibration.safetensors")]
    _run(*args)
    assert verify(tmp_path / "delta.safetensors") == []
    sparsity, meta = report.delta_info(tmp_path / "delta.safetensors")
    assert abs(sparsity - 0.3) <= 0.01 and meta["method"] == method
    delta = load_delta(tmp_path / "delta.safetensors")
    assert bool(delta.replace) == (method == "sparsegpt") and bool(delta.masks) == (method != "sparsegpt")


def test_prune_needs_calibration(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run("prune", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--settings",
             resolve_prune_job({"method": "wanda", "sparsity": 0.3}).to_json(), "--out", str(tmp_path / "d.safetensors"))
    assert "needs --calibration" in capsys.readouterr().err


def test_balanced_subnet_that_did_not_move_fails(tiny_model_dir, data, tmp_path, capsys):
    args = ["balanced-subnet", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
            "--forget", str(data / "memorized_train.parquet"), "--retain", str(data / "nonmemorized.parquet"),
            "--out", str(tmp_path / "delta.safetensors"), "--log", str(tmp_path / "log.parquet")]
    settings = {"epochs": 2, "batch_size": 3, "ratio": 0.05}  # reference lr 0.1: 0.5% of the cut moves
    with pytest.raises(SystemExit) as err:  # the settings as the planner resolves them
        _run(*args, "--settings", resolve_balanced_subnet(settings).to_json())
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert "BalancedSubnet did not converge" in stderr and "pruning.balanced_subnet.lr (now 0.1)" in stderr
    assert not (tmp_path / "delta.safetensors").exists()
    _run(*args, "--settings", resolve_balanced_subnet({**settings, "on_unconverged": "flag"}).to_json())
    assert report.delta_info(tmp_path / "delta.safetensors")[1]["converged"] is False


def test_balanced_subnet_command(tiny_model_dir, data, tmp_path):
    _run("balanced-subnet", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
         "--forget", str(data / "memorized_train.parquet"), "--retain", str(data / "nonmemorized.parquet"),
         "--settings", resolve_balanced_subnet({"epochs": 2, "batch_size": 3, "ratio": 0.05, "lr": 10.0}).to_json(),
         "--out", str(tmp_path / "delta.safetensors"), "--log", str(tmp_path / "log.parquet"))
    sparsity, meta = report.delta_info(tmp_path / "delta.safetensors")
    assert sparsity == pytest.approx(0.05, abs=1e-3) and meta["method"] == "balanced_subnet"
    assert meta["converged"] is True and meta["convergence"]["changed_share"] >= 0.01
    assert len(pd.read_parquet(tmp_path / "log.parquet")) == 4
    assert all(".mlp." in name for name in load_delta(tmp_path / "delta.safetensors").masks)


# ----------------------------------------------------------------------------------- report


def _metrics(edit, exact, ppl, er_exact, **given):
    """One metrics row as the evaluate stage writes it: ``exact`` on the memorized track (10 examples
    the unedited model extracts), ``er_exact`` on the extraction-rate track (40 examples of the
    unfiltered split); each track's Fractional ER is its Exact ER + 0.2 (capped at 1); ``given``
    overrides any column."""
    return {"model": "m", "edit": edit, "method": edit, "n_examples": 10, "exact_er": exact,
            "fractional_er": min(exact + 0.2, 1.0), "mem_loss": 1 - exact, "mem_ppl": np.exp(1 - exact),
            "heldout_loss": np.log(ppl), "heldout_ppl": ppl, "er_n_examples": 40, "er_exact_er": er_exact,
            "er_fractional_er": min(er_exact + 0.2, 1.0), **given}


def test_masks_report_tables_and_plots(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from memctl.edits import save_delta

    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[:3] = False  # 30% pruned
    save_delta(tmp_path / "up.safetensors", masks={"w": mask}, metadata={"mask_rule": "threshold"})
    replaced = torch.ones(4, 5)
    replaced[0] = 0  # 5 of 20 weights: 25% zeros
    save_delta(tmp_path / "sgpt.safetensors", replace={"w": replaced})
    # a down mask written with on_unconverged: flag (its delta says so), in the main table and an ablation
    save_delta(tmp_path / "down.safetensors", masks={"w": mask},
               metadata={"mask_rule": "topk (threshold missed target)", "converged": False,
                         "unconverged_reason": "training sparsity 0.000 vs target 0.300"})
    # (edit, memorized-track Exact ER, held-out PPL, extraction-rate-track Exact ER): Origin extracts every
    # memorized sequence by construction, and 0.4 of the unfiltered split (the paper's Origin rows: 0.17-0.50)
    rows = [_metrics("none", 1.0, 20.0, 0.4), _metrics("up", 0.95, 22.0, 0.55), _metrics("up4", 0.9, 25.0, 0.5),
            _metrics("sgpt", 0.5, 21.0, 0.2), _metrics("down", 0.0, 150.0, 0.0), _metrics("up5", 0.5, 40.0, 0.1)]
    paths = []
    (tmp_path / "metrics").mkdir()  # not beside the deltas: the store refuses a file without sidecar there
    for row in rows:
        paths.append(tmp_path / "metrics" / f"{row['edit']}.parquet")
        pd.DataFrame([row]).to_parquet(paths[-1])
    spec = {"title": "T", "edits": [
        {"edit": "up", "series": "Ours (up)", "family": "ours", "mode": "up", "sparsity": 0.3,
         "delta": str(tmp_path / "up.safetensors"), "tables": ["main", "sparsity"]},
        {"edit": "none", "series": "Origin", "family": "origin", "delta": None, "tables": ["main"]},
        {"edit": "up4", "series": "Ours (up)", "family": "ours", "mode": "up", "sparsity": 0.4,
         "delta": str(tmp_path / "up.safetensors"), "tables": ["sparsity"]},
        {"edit": "sgpt", "series": "SparseGPT", "family": "baseline", "form": "sequential", "sparsity": 0.3,
         "delta": str(tmp_path / "sgpt.safetensors"), "tables": ["main"]},
        {"edit": "down", "series": "Ours (down)", "family": "ours", "mode": "down", "sparsity": 0.3, "threshold": 4.0,
         "delta": str(tmp_path / "down.safetensors"), "tables": ["main"]},
        {"edit": "up5", "series": "Ours (up)", "family": "ours", "mode": "up", "sparsity": 0.5,
         "delta": str(tmp_path / "down.safetensors"), "tables": ["sparsity"]},
    ]}
    figures = []  # the ablation plot as drawn (its axes, lines and labels) before it is written
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    out = tmp_path / "out"
    _run("masks-report", "--metrics", *map(str, paths), "--spec", json.dumps(spec), "--out-dir", str(out))
    table = pd.read_parquet(out / "table.parquet")
    assert list(table["method"]) == ["Origin", "SparseGPT", "Ours (up)", "Ours (down)"]  # the paper's row order
    assert list(table["sparsity"]) == pytest.approx([0.0, 0.25, 0.3, 0.3])  # measured on the deltas
    assert [None if c is None else bool(c) for c in table["converged"]] == [None, None, None, False]
    # both tracks, under the metrics' names: er_ = the extraction-rate track, unprefixed = memorized
    assert list(table["er_exact_er"]) == [0.4, 0.2, 0.55, 0.0] and list(table["exact_er"]) == [1.0, 0.5, 0.95, 0.0]
    assert list(table["er_n_examples"]) == [40] * 4 and list(table["n_examples"]) == [10] * 4
    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header == ("| Method | Held-out loss | Held-out PPL | Fractional ER | Exact ER | Fractional ER (memorized) | "
                      "Exact ER (memorized) | Mem. loss | Mem. PPL | Sparsity | Wall time (s) | Device | Tokens |")
    # by hand: Origin's held-out loss ln 20 = 2.996; the paper's columns read the unfiltered split (0.6, 0.4),
    # the memorized track (1.0 by construction) has its own; mem. loss 1 - 1 = 0, PPL e^0 = 1
    assert "| Origin | 2.996 | 20.00 | 0.600 | 0.400 | 1.000 | 1.000 | 0.000 | 1.000 | 0.000 |" in md
    # ln 22 = 3.091; Fractional ER 0.55 + 0.2; memorized 0.95 (its Fractional ER capped at 1); e^0.05 = 1.051
    assert "| Ours (up) | 3.091 | 22.00 | 0.750 | 0.550 | 1.000 | 0.950 | 0.050 | 1.051 | 0.300 |" in md
    assert "| SparseGPT | 3.045 | 21.00 | 0.400 | 0.200 | 0.700 | 0.500 | 0.500 | 1.649 | 0.250 |" in md
    assert "`er_test`, N=40" in md and "`memorized_test`, N=10" in md and "Origin is 1 there by construction" in md
    assert "Mem. loss / Mem. PPL: teacher-forced loss and perplexity on the suffix tokens of the memorized" in md
    assert "SparseGPT: form: sequential" in md and "Ours (up): final mask: threshold" in md
    # the unconverged mask: marked in its row and in the notes, with the reason
    assert "| Ours (down) (did not converge) | 5.011 | 150.00 | 0.200 | 0.000 | 0.200 | 0.000 |" in md
    assert ("- Ours (down) (did not converge): **did not converge** (training sparsity 0.000 vs target 0.300)"
            in md)
    assert md.count("did not converge") == 3  # the row and the note (twice); no other row
    ablation = pd.read_parquet(out / "ablation_sparsity.parquet")
    assert list(ablation["target_sparsity"]) == [0.3, 0.4, 0.5]
    assert list(ablation["er_exact_er"]) == [0.55, 0.5, 0.1] and list(ablation["exact_er"]) == [0.95, 0.9, 0.5]
    ablation_md = (out / "ablation_sparsity.md").read_text()
    assert "| Ours (up) (did not converge) | 0.50 | 3.689 | 40.00 | 0.300 | 0.100 | 0.700 | 0.500 |" in ablation_md
    assert "`er_test`, N=40" in ablation_md
    assert (out / "ablation_sparsity.png").stat().st_size > 5000
    # the plot (paper Fig. 3) draws the extraction-rate track, labelled, with Origin's rate on it as the line
    (fig,) = figures
    exact, frac, ppl = fig.axes
    assert exact.get_ylabel() == "Exact ER (extraction-rate split), N=40"
    assert frac.get_ylabel() == "Fractional ER (extraction-rate split), N=40" and ppl.get_ylabel() == "held-out PPL"
    up, origin = (line for line in exact.get_lines() if line.get_label() in ("Ours (up) (did not converge: x)", "Origin"))
    assert list(up.get_xdata()) == [0.3, 0.4, 0.5] and list(up.get_ydata()) == pytest.approx([0.55, 0.5, 0.1])
    assert list(origin.get_ydata()) == pytest.approx([0.4, 0.4])  # not the memorized track's 1.0
    assert [float(y) for y in next(iter(frac.get_lines())).get_ydata()] == pytest.approx([0.75, 0.7, 0.3])
    assert not (out / "ablation_threshold.md").exists()
    assert verify(out / "table.md") == [] and verify(out / "ablation_sparsity.png") == []
    page = (out / "table.html").read_text()  # what `snakemake --report` shows: main and ablation tables
    assert "<td>Ours (up)</td><td>3.091</td><td>22.00</td><td>0.750</td><td>0.550</td>" in page
    assert "Sparsity ablation" in page


def test_masks_report_reads_the_scores_beside_each_metrics_file(tmp_path):
    """As the pipeline lays them out (evaluate/<edit>/metrics.parquet and scores.parquet): the
    report pairs the rows on their examples and writes the verdicts, on the extraction-rate track in
    the Exact / Fractional ER columns. 12 examples per track. Extraction-rate track (unfiltered):
    Origin extracts 7, the down mask none: 7 discordant pairs, exact McNemar p = 2 / 2^7 = 0.016.
    Memorized track: Origin extracts all 12 (by construction), the down mask 9: 3 discordant pairs,
    p = 2 / 2^3 = 0.25. The down mask's held-out windows are 0.1 nats/token worse."""
    def scores(er, mem, shift):
        def track(name, exact):
            return pd.DataFrame({"track": name, "candidate_id": [f"c{i}" for i in range(12)],
                                 "exact_match": [bool(e) for e in exact], "n_match": [4 * e for e in exact],
                                 "n_suffix": 4, "levenshtein_norm": [1.0 - e for e in exact],
                                 "levenshtein_sim": [float(e) for e in exact]})
        held = pd.DataFrame({"track": "heldout", "window": range(8), "nll_sum": [100.0 + i + shift for i in range(8)],
                             "n_tokens": 63})
        return pd.concat([track("extraction_rate", er), track("memorized", mem), held], ignore_index=True)

    paths = []
    for edit, er, mem, shift in (("none", [1] * 7 + [0] * 5, [1] * 12, 0.0),
                                 ("down", [0] * 12, [1] * 9 + [0] * 3, 6.3)):
        d = tmp_path / "evaluate" / edit
        d.mkdir(parents=True)
        # the metrics the evaluate stage computes from these scores: 12 examples a track, every suffix
        # either matched whole or not at all (Fractional ER = Exact ER), held-out PPL 20 x e^(shift / 63)
        mem_er, er_er = sum(mem) / 12, sum(er) / 12
        row = _metrics(edit, mem_er, 20.0 * np.exp(shift / 63), er_er, n_examples=12, er_n_examples=12,
                       fractional_er=mem_er, er_fractional_er=er_er)
        pd.DataFrame([row]).to_parquet(d / "metrics.parquet")
        scores(er, mem, shift).to_parquet(d / "scores.parquet")
        paths.append(str(d / "metrics.parquet"))
    spec = {"title": "T", "edits": [
        {"edit": "none", "series": "Origin", "family": "origin", "delta": None, "tables": ["main"]},
        {"edit": "down", "series": "Ours (down)", "family": "ours", "mode": "down", "sparsity": 0.3, "delta": None,
         "tables": ["main"]}]}
    out = tmp_path / "out"
    _run("masks-report", "--metrics", *paths, "--spec", json.dumps(spec), "--out-dir", str(out))
    table = pd.read_parquet(out / "table.parquet").set_index("method")
    down, origin = table.loc["Ours (down)"], table.loc["Origin"]
    # the extraction-rate track: Origin 7/12 with its exact interval (beta quantiles 0.277, 0.848)
    assert origin["er_exact_count"] == "7/12" and origin["er_exact_ci"] == "[0.277, 0.848]"
    assert down["er_exact_count"] == "0/12" and down["er_exact_ci"] == "[0.000, 0.265]"  # 1 - 0.025^(1/12)
    assert down["er_vs_origin"] == "lower (p=0.016)" and down["er_vs_origin_p"] == pytest.approx(2 / 2**7)
    assert down["er_frac_vs_origin"].startswith("lower (p")  # 28 of 48 matched tokens -> 0
    # the memorized track, tested the same way on its own examples: 12/12 -> 9/12, p = 0.25
    assert origin["exact_count"] == "12/12" and origin["exact_ci"] == "[0.735, 1.000]"  # 0.025^(1/12)
    assert down["exact_count"] == "9/12" and down["vs_origin"] == "no evidence of a difference (p=0.25)"
    assert down["vs_origin_p"] == pytest.approx(2 / 2**3)
    assert down["ppl_vs_origin"] == "higher (p<0.001)"
    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert ("| Held-out PPL | vs Origin (PPL) | Fractional ER | 95% CI | vs Origin (Fractional ER) | "
            "vs `none` mask (Fractional ER) | Exact ER | k/N | 95% CI | vs Origin (Exact ER) | vs `none` mask (Exact ER) | "
            "Fractional ER (memorized) | Exact ER (memorized) | k/N (memorized) | 95% CI (memorized) | Mem. loss |") in header
    # Origin's row reads as the paper's: Exact ER 7/12 = 0.583, the memorized track's 1.000 apart
    assert "| 0.583 | 7/12 | [0.277, 0.848] | - | - | 1.000 | 1.000 | 12/12 | [0.735, 1.000] |" in md
    # down: held-out PPL 20 e^0.1 = 22.10; 0/12 on the paper's split; memorized 9/12 = 0.750, exact
    # interval [0.428, 0.945] (beta quantiles 0.025 of Beta(9, 4), 0.975 of Beta(10, 3))
    assert "| Ours (down) | 3.096 | 22.10 | higher (p<0.001) | 0.000 |" in md
    assert "| 0.000 | 0/12 | [0.000, 0.265] | lower (p=0.016) | - | 0.750 | 0.750 | 9/12 | [0.428, 0.945] |" in md
    assert "`er_test`, N=12" in md and "`memorized_test`, N=12" in md
    assert "exact McNemar test" in md and "Tests are on the extraction-rate track" in md
    assert read_sidecar(out / "table.md")["inputs"].keys() >= {"scores[0]", "scores[1]"}


def test_sample_memories_keeps_a_seeded_sample_in_the_tables_order(data, tmp_path, capsys):
    from memctl.masks.data import sample_rows

    table = pd.read_parquet(data / "memorized_train.parquet")
    out = tmp_path / "sample.parquet"
    _run("sample-memories", "--table", str(data / "memorized_train.parquet"),
         "--settings", resolve_own_memories({"rows": 4, "seed": 5}).to_json(), "--out", str(out))
    sample = pd.read_parquet(out)
    # by hand: numpy's seeded choice of 4 of 6 rows, sorted back into the table's order
    keep = sorted(np.random.default_rng(5).choice(6, size=4, replace=False))
    assert list(sample["candidate_id"]) == [f"memorized_train{i}" for i in keep]
    assert [list(p) for p in sample["prefix_ids"]] == [list(table["prefix_ids"][i]) for i in keep]
    assert read_sidecar(out)["rows"] == {"available": 6, "kept": 4} and verify(out) == []
    # the same settings, the same rows; rows >= the table (or null): all of it
    assert sample_rows(table, 4, 5)["candidate_id"].tolist() == sample["candidate_id"].tolist()
    assert len(sample_rows(table, 99, 5)) == len(sample_rows(table, None, 0)) == 6
    with pytest.raises(SystemExit) as err:  # a bad job fails before reading anything, naming the key
        _run("sample-memories", "--table", str(tmp_path / "missing.parquet"), "--settings",
             json.dumps({"rows": "4", "seed": 5}), "--out", str(tmp_path / "x.parquet"))
    assert err.value.code == 2 and "masks.own_memories.rows: '4' is not of type integer or null" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"masks\.own_memories\.rows"):
        resolve_own_memories({"rows": 0})  # limits: at plan time
