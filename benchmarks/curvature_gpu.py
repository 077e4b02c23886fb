"""K-FAC collection at each Gram precision and the decomposition, side by side in one run.

Prints medians of interleaved rounds, so that only ratios measured next to each other are compared:

1. a plain forward+backward (real next-token labels, sum loss, weight gradients) over the tokens;
2. ``memctl`` K-FAC collection of every MLP matrix (sampled labels) with the Gram products at
   ``fp32``, ``tf32`` and ``bf16`` (``curvature.data.precision``), each as a ratio to (1);
3. the decomposition of all collected factors, one layer at a time (``kfac-decompose``), in fp64 and
   in fp32 with the reconstruction check, on the same device.

Shapes (random weights; nothing is downloaded):

- ``--shape pythia-1.4b`` (GPU): GPT-NeoX, 24 layers, d=2048, MLP 8192, vocab 50304, bf16 weights,
  128 windows x 512 tokens, batch 8: the shape of issue 12's table (goal: collection <= 1.5x plain,
  the 96 MLP factors decomposed in <= 60 s).
- ``--shape demo`` (CPU): the demo model's shape, GPT-NeoX, 4 layers, d=256, MLP 1024, vocab 4096,
  fp32 weights, 128 windows x 128 tokens, batch 16. On the CPU ``tf32`` / ``bf16`` round the
  products' inputs as tensor cores do but multiply in fp32 (the same numbers, no speed-up): their
  ratios there show the rounding's cost, not a GPU's.

    python benchmarks/curvature_gpu.py --shape demo --threads 2
    python benchmarks/curvature_gpu.py --shape pythia-1.4b          # on a CUDA machine
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "demo": {"layers": 4, "hidden": 256, "mlp": 1024, "heads": 4, "vocab": 4096, "dtype": "float32",
             "windows": 128, "context": 128, "batch": 16},
    "pythia-1.4b": {"layers": 24, "hidden": 2048, "mlp": 8192, "heads": 16, "vocab": 50304, "dtype": "bfloat16",
                    "windows": 128, "context": 512, "batch": 8},
}


def random_model(shape: dict, device: torch.device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["mlp"],
                        max_position_embeddings=max(2048, shape["context"]))
    model = GPTNeoXForCausalLM(cfg).to(device=device, dtype=getattr(torch, shape["dtype"]))
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_forward_backward(model, windows: torch.Tensor, batch: int) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--windows", type=int, default=None, help="override the shape's window count")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from memctl import architectures as arch
    from memctl.curvature.collect import collect_factors
    from memctl.curvature.decompose import decompose_device, decompose_directory
    from memctl.curvature.store import save_factors

    shape = dict(SHAPES[args.shape])
    if args.windows:
        shape["windows"] = args.windows
    device = decompose_device(args.device)
    model = random_model(shape, device)
    windows = torch.from_numpy(np.random.default_rng(0).integers(0, shape["vocab"], size=(shape["windows"],
                                                                                          shape["context"])))
    windows = windows.to(device)
    targets = arch.linear_targets(model, groups=["mlp"])
    tokens = shape["windows"] * (shape["context"] - 1)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{date.today()}; {card}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"shape {args.shape}: GPT-NeoX {shape['layers']} layers, d={shape['hidden']}, MLP {shape['mlp']}, vocab "
          f"{shape['vocab']}, {shape['dtype']}; {shape['windows']} windows x {shape['context']} tokens, batch "
          f"{shape['batch']}; {len(targets)} MLP matrices; device {device}")

    precisions = [p for p in args.precisions.split(",") if p]
    runners = {"plain forward+backward": lambda: plain_forward_backward(model, windows, shape["batch"])}
    last = {}
    for prec in precisions:
        def collect(prec=prec):
            last[prec] = collect_factors(model, windows, targets, labels="sampled", seed=0,
                                         batch_size=shape["batch"], precision=prec)
        runners[f"collection, {prec} products"] = collect
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up: allocator, kernels
        fn()
        sync(device)
    for r in range(args.rounds):
        for name, fn in runners.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    plain = times["plain forward+backward"]
    print(f"\n| path | median s ({args.rounds} interleaved rounds) | tokens/s | median per-round ratio to plain |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        med = statistics.median(t)
        ratio = statistics.median(c / p for c, p in zip(t, plain))
        print(f"| {name} | {med:.2f} | {tokens / med:,.0f} | {ratio:.2f}x |")

    # relative error of each precision's factors against the fp32 ones (same labels)
    if "fp32" in last:
        for prec, fac in last.items():
            if prec == "fp32":
                continue
            errs = [float((fac.A[k] - last["fp32"].A[k]).norm() / last["fp32"].A[k].norm()) for k in fac.A]
            errs += [float((fac.G[k] - last["fp32"].G[k]).norm() / last["fp32"].G[k].norm()) for k in fac.G]
            print(f"{prec} factors vs fp32: largest relative Frobenius difference {max(errs):.2e}")

    work = Path(tempfile.mkdtemp(prefix="kfac-gpu-bench-"))
    base = last.get("fp32") or next(iter(last.values()))
    save_factors(base, work / "factors")
    n_factors = len(base.A) + len(base.G)
    for prec in ("fp64", "fp32"):
        sync(device)
        start = time.perf_counter()
        decompose_directory(work / "factors", work / f"eigen-{prec}", device, prec)
        sync(device)
        print(f"decomposition of the {n_factors} MLP factors ({prec}{', reconstruction-checked' if prec == 'fp32' else ''}"
              f", one layer at a time, {device}): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
