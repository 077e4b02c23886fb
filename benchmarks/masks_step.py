"""Mask-training step vs a plain fine-tuning step of the same model and batch, and memory per gated weight.

Times, side by side in one run (interleaved rounds, medians):

- fine-tune: forward + CLM loss + backward + AdamW over every parameter;
- mask (none): gate sample of every attention / MLP matrix + forward through ``functional_call`` +
  CLM loss + ``lambda_s R_s`` + backward + AdamW over the gate logits (memctl's train_mask step);
- mask (up): the same plus the memorized-batch forward (two forward passes per step).

Memory (each in a fresh subprocess; the peak during three steps above what is resident before them:
VmHWM after resetting it through /proc/self/clear_refs on CPU, ``max_memory_allocated`` on CUDA): a floor
run (forward + backward through the whole network with almost nothing trainable), the fine-tuning
run and the mask run; the mask run's excess over the floor, divided by the number of gated weights,
is the peak memory per gated weight. The persistent part (logits, their gradient, AdamW's two
moments) is also counted exactly from the tensors.

    python benchmarks/masks_step.py                      # random demo-sized GPT-NeoX
    python benchmarks/masks_step.py --model results/demo/model-<h>
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build_model(path: str | None, device: str):
    if path:
        from memctl.models import load_model

        return load_model(path, {"source": "local", "dtype": "float32", "device": device})
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(cfg).to(device).eval()


class Steps:
    """The three step kinds on one model and one batch."""

    def __init__(self, model, batch: int, context: int, device: str):
        from memctl.architectures import linear_targets
        from memctl.masks.training import MaskGates

        self.model = model
        vocab = model.get_output_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
        self.mem = torch.randint(0, vocab, (batch, 64), generator=gen).to(device)
        self.params = dict(model.named_parameters())
        model.requires_grad_(False)
        self.gates = MaskGates(model, linear_targets(model))
        self.mask_opt = torch.optim.AdamW(self.gates.parameters(), lr=1e-3, weight_decay=1e-3)
        self.ft_opt = None
        self.seed = 0

    def _loss(self, logits, ids):
        from memctl.masks.data import window_loss

        return window_loss(logits, ids)

    def finetune(self):
        self.model.requires_grad_(True)  # every call: the mask steps in between freeze the weights
        if self.ft_opt is None:
            self.ft_opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        loss = self._loss(self.model(input_ids=self.ids, use_cache=False).logits, self.ids)
        self.ft_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.ft_opt.step()

    def mask(self, up: bool = False):
        from memctl.masks.regularizers import sparsity_regularizer

        self.model.requires_grad_(False)
        self.seed += 1
        masked, kept = self.gates.sample(self.params, self.seed, "gumbel", 0.4, 3.0)
        fwd = torch.func.functional_call
        loss = self._loss(fwd(self.model, masked, args=(), kwargs={"input_ids": self.ids, "use_cache": False}).logits,
                          self.ids)
        loss = loss + 160 * sparsity_regularizer(kept, self.gates.total, 0.3).float()
        if up:
            loss = loss + self._loss(
                fwd(self.model, masked, args=(), kwargs={"input_ids": self.mem, "use_cache": False}).logits, self.mem)
        self.mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.mask_opt.step()

    def floor(self):
        """Forward + backward through every layer, (almost) nothing trainable: the shared floor."""
        self.model.requires_grad_(False)
        emb = self.model.get_input_embeddings().weight
        emb.requires_grad_(True)  # gradients flow back through every block to the embeddings
        loss = self._loss(self.model(input_ids=self.ids, use_cache=False).logits, self.ids)
        loss.backward()
        emb.grad = None


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_probe(args) -> None:
    """Subprocess entry: run one kind of step three times and print its peak memory as JSON."""
    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device)
    steps = Steps(model, args.batch, args.context, args.device)
    fn = {"floor": steps.floor, "finetune": steps.finetune, "mask": steps.mask}[args.probe]
    # Peak during the steps only, above what is resident once the model and the gate logits exist
    # (the process-lifetime peak is set by loading, the same for every probe).
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _proc_status_kib("VmRSS") * 1024
    for _ in range(3):
        fn()
    sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _proc_status_kib("VmHWM") * 1024 - before
    persistent = sum(p.numel() * 4 * 4 for p in steps.gates.parameters())  # logit, grad, exp_avg, exp_avg_sq
    print(json.dumps({"peak_bytes": peak, "gated": steps.gates.total, "params": sum(p.numel() for p in model.parameters()),
                      "persistent_bytes": persistent}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: random demo-sized GPT-NeoX)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        return memory_probe(args)
    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device)
    steps = Steps(model, args.batch, args.context, args.device)
    kinds = {"fine-tune": steps.finetune, "mask (none)": steps.mask, "mask (up)": lambda: steps.mask(up=True)}
    for fn in kinds.values():  # warm-up
        fn()
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, fn in kinds.items():
            times[name].append(timed(fn, args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {args.device}, threads {args.threads}, batch {args.batch} x {args.context} tokens, "
          f"{steps.gates.total:,} gated weights of {sum(q.numel() for q in model.parameters()):,} parameters; "
          f"medians of {args.rounds} interleaved rounds")
    print("| step | s/step | ratio to fine-tune |\n|---|---:|---:|")
    for name, value in med.items():
        print(f"| {name} | {value:.4f} | {value / med['fine-tune']:.2f} |")

    base = [sys.executable, __file__, "--batch", str(args.batch), "--context", str(args.context),
            "--threads", str(args.threads), "--device", args.device] + (["--model", args.model] if args.model else [])
    probes = {}
    for probe in ("floor", "finetune", "mask"):
        out = subprocess.run([*base, "--probe", probe], capture_output=True, text=True, check=True).stdout
        probes[probe] = json.loads(out.strip().splitlines()[-1])
    gated, params = probes["mask"]["gated"], probes["mask"]["params"]
    excess_mask = probes["mask"]["peak_bytes"] - probes["floor"]["peak_bytes"]
    excess_ft = probes["finetune"]["peak_bytes"] - probes["floor"]["peak_bytes"]
    logit = 4  # the fp32 gate logits exist before the measured steps in every probe
    print("\n| run | peak MiB during 3 steps (above model + logits) | per gated weight (mask) / per parameter "
          "(fine-tune), above the floor |\n|---|---:|---:|")
    print(f"| floor (fwd+bwd, nothing trainable) | {probes['floor']['peak_bytes'] / 2**20:.0f} | - |")
    print(f"| fine-tune | {probes['finetune']['peak_bytes'] / 2**20:.0f} | {excess_ft / params:.1f} B |")
    print(f"| mask | {probes['mask']['peak_bytes'] / 2**20:.0f} | {excess_mask / gated + logit:.1f} B (incl. the 4 B logit) |")
    print(f"persistent mask state (logit + grad + AdamW moments): {probes['mask']['persistent_bytes'] / gated:.0f} B "
          "per gated weight")


if __name__ == "__main__":
    main()
