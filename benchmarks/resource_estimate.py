"""``memctl estimate-resources`` against the measured peak memory of the same jobs (CPU RSS).

Writes a random GPT-NeoX of the chosen shape as a local HF directory (with a word-level tokenizer),
random calibration windows, then runs ``memctl kfac-collect``, ``memctl kfac-decompose`` and
``memctl curvature-edit`` as separate processes and reads each one's peak resident set size
(``os.wait4``'s ``ru_maxrss``). Prints, per stage, the host-memory estimate of
:func:`memctl.lab.estimate_memory` (what the rules request from SLURM) next to the measured peak.
GPU peaks are not measured here (no GPU on the development machines).

    python benchmarks/resource_estimate.py --shape medium --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

SHAPES = {
    "demo": {"layers": 4, "hidden": 256, "mlp": 1024, "heads": 4, "vocab": 4096},
    "medium": {"layers": 6, "hidden": 512, "mlp": 2048, "heads": 8, "vocab": 8192},
}


def write_model(shape: dict, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["mlp"],
                        max_position_embeddings=512, eos_token_id=0, bos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, shape["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(out)


def run(cmd: list[str]) -> float:
    """Peak RSS (MB) of one command run as its own process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 1024  # KB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from safetensors.numpy import save_file

    from memctl import lab

    shape = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp(prefix="mem-estimate-"))
    write_model(shape, work / "model")
    windows = np.random.default_rng(0).integers(1, shape["vocab"], size=(args.windows, args.context)).astype(np.int64)
    save_file({"windows": windows}, str(work / "windows.safetensors"))
    memctl = [sys.executable, "-m", "memctl.cli"]
    model = ["--model", str(work / "model"), "--model-settings", json.dumps({"source": "local", "device": "cpu"}),
             "--threads", str(args.threads)]
    data = {"max_tokens": None, "batch_size": 8, "labels": "sampled", "seed": 0, "precision": "fp32"}
    modules = {"groups": ["mlp"], "layers": None, "roles": None}
    spec = {"method": "kfac", "layers": list(range(shape["layers"])), "roles": None, "groups": ["mlp"], "strength": 0.8}
    jobs = {
        "collect_kfac": [*memctl, "kfac-collect", *model, "--windows", str(work / "windows.safetensors"),
                         "--settings", json.dumps({"data": data, "modules": modules}), "--out-dir", str(work / "kfac")],
        "decompose_kfac": [*memctl, "kfac-decompose", "--factors", str(work / "kfac" / "factors"), "--threads",
                           str(args.threads), "--device", "cpu", "--out-dir", str(work / "eig")],
        "apply_edit": [*memctl, "curvature-edit", *model, "--eigen", str(work / "eig" / "eigen"), "--settings",
                       json.dumps(spec), "--out", str(work / "delta.safetensors")],
    }
    config = {"curvature": {"data": {**data, "max_tokens": args.windows * args.context}, "modules": modules},
              "calibration": {"context_length": args.context}, "heldout": {"context_length": args.context}}
    dims = lab.model_dims(work / "model")
    factor_mb = lab.kfac_factor_bytes(dims, groups=["mlp"]) / 2**20
    print(f"{date.today()}; CPU, {args.threads} threads; shape {args.shape}: GPT-NeoX {shape['layers']} layers, "
          f"d={shape['hidden']}, MLP {shape['mlp']}, vocab {shape['vocab']}; {args.windows} windows x {args.context} "
          f"tokens; MLP factors {factor_mb:.0f} MB (fp32)")
    print("\n| stage | estimate (host MB, what the rule requests) | measured peak RSS (MB) | estimate / measured |")
    print("|---|---:|---:|---:|")
    for stage, cmd in jobs.items():
        peak = run(cmd)
        est = lab.estimate_memory(dims, stage, config, gpu=False).host_mb
        print(f"| {stage} | {est:,} | {peak:,.0f} | {est / peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
