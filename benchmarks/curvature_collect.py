"""K-FAC collection cost, side by side in one run, and the cost of one more edit strength.

Prints medians of interleaved rounds (this host's speed swings up to 3x within a minute, so only
ratios measured side by side mean anything):

1. a plain forward+backward (real next-token labels, sum loss, weight gradients) over the tokens;
2. ``memctl`` K-FAC collection (sampled labels, every MLP matrix, factors saved to disk);
3. kronfluence's ``fit_covariance_matrices`` on the same model copy, tokens, modules and batch
   (its documented LM task: ``torch.multinomial`` sampled labels, sum loss), when importable;

then the one-off eigendecomposition and the time of one extra rho point once eigenbases exist
(load eigenbases + pairwise edit of layers 0-2 + write the delta).

kronfluence is not a memctl dependency: give it its own environment that sees memctl's, e.g.

    python -m venv /work/bench-venv
    echo "import site; site.addsitedir('$(python -c 'import site; print(site.getsitepackages()[0])')')" \
        > /work/bench-venv/lib/python3.11/site-packages/memctl-venv.pth
    /work/bench-venv/bin/pip install --no-deps kronfluence einconv einops opt_einsum
    /work/bench-venv/bin/python benchmarks/curvature_collect.py

(``--no-deps``: kronfluence pulls torchvision, whose newest build replaces torch.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def demo_like_model(seed: int = 0):
    """A random model of the demo's shape (GPT-NeoX, 4 layers, d=256, MLP 1024, vocab 4096)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128)
    return GPTNeoXForCausalLM(cfg).eval()


def plain_forward_backward(model, windows: torch.Tensor, batch: int) -> None:
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)


def memctl_collect(model, windows, targets, batch: int, out: Path) -> None:
    from memctl.curvature.collect import collect_factors
    from memctl.curvature.store import save_factors

    factors = collect_factors(model, windows, targets, labels="sampled", seed=0, batch_size=batch)
    save_factors(factors, out)


def kronfluence_runner(model, windows, module_names, batch: int, workdir: Path):
    try:
        import torch.nn.functional as F
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task
    except ImportError:
        return None

    class LanguageModelingTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1].float()
            logits = logits.reshape(-1, logits.size(-1))
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            else:
                labels = batch["input_ids"][:, 1:].reshape(-1)
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(module_names)

        def get_attention_mask(self, batch):
            return None

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            return {"input_ids": windows[i]}

    task = LanguageModelingTask()
    model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, output_dir=str(workdir),
                        disable_tqdm=True, cpu=True, disable_model_save=True)
    args = FactorArguments(strategy="kfac")  # fp32 covariances, sampled labels (true Fisher)
    count = iter(range(10**6))

    def run():
        analyzer.fit_covariance_matrices(factors_name=f"run{next(count)}", dataset=Windows(), factor_args=args,
                                         per_device_batch_size=batch, overwrite_output_dir=True)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: a random demo-shaped GPT-NeoX)")
    ap.add_argument("--windows", default=None, help="calibration windows .safetensors (default: random ids)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from memctl import architectures as arch

    if args.model:
        from memctl.models import load_model

        model = load_model(args.model, {"source": "local", "dtype": "float32", "device": "cpu"})
    else:
        model = demo_like_model()
    if args.windows:
        from safetensors.torch import load_file

        windows = load_file(args.windows)["windows"][: max(1, args.tokens // args.context)]
    else:
        vocab = model.get_output_embeddings().weight.shape[0]
        n = max(1, args.tokens // args.context)
        windows = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(n, args.context)))
    targets = arch.linear_targets(model, groups=["mlp"])
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    print(f"model: {args.model or 'random demo-shaped GPT-NeoX'}; {len(targets)} MLP matrices; "
          f"{windows.shape[0]} windows x {windows.shape[1]} = {windows.numel()} tokens; batch {args.batch}; "
          f"{args.threads} threads; torch {torch.__version__}")

    work = Path(tempfile.mkdtemp(prefix="kfac-bench-"))
    runners = {
        "plain forward+backward": lambda: plain_forward_backward(model, windows, args.batch),
        "memctl K-FAC collection": lambda: memctl_collect(model, windows, targets, args.batch, work / "memctl"),
    }
    kf = kronfluence_runner(model, windows, [t.name for t in targets], args.batch, work / "kronfluence")
    if kf is not None:
        runners["kronfluence fit_covariance_matrices"] = kf
    else:
        print("kronfluence not importable here: run this script with a Python that has it (see the docstring)")
    times: dict[str, list[float]] = {k: [] for k in runners}
    for name, fn in runners.items():  # warm-up (allocators, kronfluence's module wrapping)
        start = time.perf_counter()
        fn()
        print(f"warm-up: {name} {time.perf_counter() - start:.2f} s", flush=True)
    for r in range(args.rounds):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med["memctl K-FAC collection"]
    print(f"\n| path | median s ({args.rounds} interleaved rounds) | tokens/s | ratio |")
    print("|---|---:|---:|---|")
    for name, t in med.items():
        if name == "memctl K-FAC collection":
            ratio = f"collection / plain = {ours / med['plain forward+backward']:.2f}x (goal <= 1.3x)"
        elif name.startswith("kronfluence"):
            ratio = f"kronfluence / memctl = {t / ours:.2f}x (goal >= 2x)"
        else:
            ratio = "1.00"
        print(f"| {name} | {t:.2f} | {tokens / t:,.0f} | {ratio} |")
    print("all rounds (s):", {k: [round(x, 2) for x in v] for k, v in times.items()})
    # Contention changes within minutes: the ratio inside each round (adjacent runs) is the robust one.
    plain, coll = times["plain forward+backward"], times["memctl K-FAC collection"]
    print(f"median of per-round ratios: collection / plain = "
          f"{statistics.median(c / p for c, p in zip(coll, plain)):.2f}x", end="")
    if "kronfluence fit_covariance_matrices" in times:
        kron = times["kronfluence fit_covariance_matrices"]
        print(f"; kronfluence / memctl = {statistics.median(k / c for k, c in zip(kron, coll)):.2f}x", end="")
    print()

    # one-off decomposition, then the cost of one more rho point
    from memctl.curvature.cli import make_edit
    from memctl.curvature.decompose import decompose
    from memctl.curvature.store import load_eigen, load_factors, save_eigen
    from memctl.edits import save_delta

    start = time.perf_counter()
    eig, _ = decompose(load_factors(work / "memctl"))
    save_eigen(eig, work / "eigen")
    t_eig = time.perf_counter() - start
    layers = sorted({t.layer for t in targets})[:3]
    point_times = []
    for rho in (0.3, 0.5, 0.7):
        start = time.perf_counter()
        spec = {"method": "kfac_pairwise", "layers": layers, "roles": None, "groups": ["mlp"], "strength": rho}
        replace, _ = make_edit(model, spec, load_eigen(work / "eigen", layers=layers))
        save_delta(work / f"delta-{rho}.safetensors", replace=replace, metadata={"spec": spec})
        point_times.append(time.perf_counter() - start)
    print(f"\neigendecomposition of all {len(targets)} MLP factor pairs (fp64, once): {t_eig:.2f} s")
    print(f"one extra rho point (load eigenbases of layers {layers}, pairwise edit of {2 * len(layers)} matrices, "
          f"write delta): median {statistics.median(point_times):.2f} s over {len(point_times)} points")


if __name__ == "__main__":
    main()
