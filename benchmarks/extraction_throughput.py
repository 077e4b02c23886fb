"""Extraction throughput: memctl's extraction stage vs a bare batched ``model.generate`` loop.

Measured side by side in one run, interleaved, on the same model, prompts and batch size:

  A  memctl.extract.run_extraction (greedy decoding with KV cache + scoring)
  B  a bare loop of ``model.generate(do_sample=False, max_new_tokens=n, min_new_tokens=n)``
  C  memctl greedy decoding one prompt at a time (batch size 1), on a subset

Prints sequences/s for each and the ratios A/B (goal >= 0.9) and A/C. Not a test: the host's
speed swings, so read the ratios of medians, measured in the same run.

    python benchmarks/extraction_throughput.py --model results/demo/model-<hash> \
        --candidates results/demo-<hash>/candidates-<hash>/candidates.parquet
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import numpy as np
import pandas as pd
import torch
from transformers import GenerationConfig

from memctl.extract import run_extraction
from memctl.generation import greedy_generate
from memctl.models import load_model, load_tokenizer


def newest(pattern: str) -> str | None:
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def bare_generate(model, prompts: np.ndarray, n_new: int, pad_id: int, batch_size: int) -> np.ndarray:
    cfg = GenerationConfig(
        do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad_id
    )
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids = torch.as_tensor(prompts[i : i + batch_size])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            out.append(gen[:, ids.shape[1] :].numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=newest("results/demo/model-*"))
    ap.add_argument("--candidates", default=newest("results/*/candidates-*/candidates.parquet"))
    ap.add_argument("--n", type=int, default=512, help="prompts per measurement")
    ap.add_argument("--single-n", type=int, default=32, help="prompts for one-at-a-time decoding")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.model is None:
        raise SystemExit("no model: run the demo first or pass --model")
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = {"source": "local", "dtype": args.dtype, "device": "auto"}
    model, tok = load_model(args.model, settings), load_tokenizer(args.model, settings)
    if args.candidates:
        cands = pd.read_parquet(args.candidates).head(args.n).reset_index(drop=True)
    else:  # random prompts of the model's vocabulary
        rng = np.random.default_rng(0)
        ids = rng.integers(0, model.config.vocab_size, size=(args.n, 64))
        cands = pd.DataFrame(
            {"candidate_id": range(args.n), "prefix_ids": list(ids[:, :32]), "suffix_ids": list(ids[:, 32:])}
        )
    prompts = np.stack([np.asarray(p, dtype=np.int64) for p in cands["prefix_ids"]])
    n_new = len(cands["suffix_ids"][0])
    pad = tok.pad_token_id
    print(f"model={args.model} dtype={args.dtype} prompts={len(prompts)}x{prompts.shape[1]} "
          f"new_tokens={n_new} batch={args.batch_size} threads={torch.get_num_threads()}")

    # Warm up both paths once.
    run_extraction(model, cands.head(args.batch_size), pad, args.batch_size, progress=False)
    bare_generate(model, prompts[: args.batch_size], n_new, pad, args.batch_size)

    times = {"A memctl extract": [], "B bare generate": [], "C one-at-a-time": []}
    agree = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        ext = run_extraction(model, cands, pad, args.batch_size, progress=False)
        times["A memctl extract"].append(len(prompts) / (time.perf_counter() - t))
        t = time.perf_counter()
        ref = bare_generate(model, prompts, n_new, pad, args.batch_size)
        times["B bare generate"].append(len(prompts) / (time.perf_counter() - t))
        t = time.perf_counter()
        greedy_generate(model, list(prompts[: args.single_n]), n_new, pad, batch_size=1, progress=False)
        times["C one-at-a-time"].append(args.single_n / (time.perf_counter() - t))
        agree = float((np.stack(ext["generated_ids"]) == ref).all(axis=1).mean())

    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:20s} {v:8.1f} sequences/s   (runs: {', '.join(f'{x:.1f}' for x in times[k])})")
    print(f"ratio A/B (memctl vs bare generate): {med['A memctl extract'] / med['B bare generate']:.2f}  (goal >= 0.9)")
    print(f"ratio A/C (batched vs one-at-a-time): {med['A memctl extract'] / med['C one-at-a-time']:.1f}x")
    print(f"sequences with identical tokens A vs B: {agree:.3f} "
          "(B suppresses EOS via min_new_tokens; A is plain argmax)")


if __name__ == "__main__":
    main()
