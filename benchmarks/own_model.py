"""A new user's own model, end to end: an own small GPT-2 with planted secrets, `memctl init`, the
pipeline, and the masks table's Origin / Ours (none / up / down) rows.

    python benchmarks/own_model.py --keep /tmp/own                 # everything, the full DAG init configures
    python benchmarks/own_model.py --keep /tmp/own --model-only    # model, memories, held-out text only
    python benchmarks/own_model.py --keep /tmp/own --override      # curvature / CSP / downstream off (~18 min
                                                                   # on a shared 2-vCPU VM: 8 training, 10 pipeline)

As a new user would (README, "Your own model"):

1. a byte-level BPE tokenizer trained with `tokenizers` on the script's own text, wrapped in
   `PreTrainedTokenizerFast`, and a randomly initialised `GPT2LMHeadModel` (4 layers, width 192,
   128-token context);
2. a corpus: templated English-like filler sentences from word lists (seeded, no downloads) with
   `--secrets` planted secrets ("... the access code for server NAME is WORDS ..."), each inserted
   verbatim at one of the copy counts `--copies` (equal shares), at seeded random places;
3. plain torch training (AdamW, warm-up + cosine, one thread, seeded) on random 128-token windows of
   the stream, checking greedy extraction of the secrets (32-token prefix, 32-token suffix, as the
   pipeline's `32/32` window) every `--eval-every` steps and stopping once at least `--target` of
   them come out exactly (or at `--max-steps`); `save_pretrained` into DIR/my-gpt2;
4. DIR/memories.jsonl (prefix / suffix text, `candidate_id`, `group`, `copies`; docs/data-formats.md)
   and DIR/heldout.txt (filler of another seed, not trained on);
5. `memctl init --model DIR/my-gpt2 --memories DIR/memories.jsonl --heldout DIR/heldout.txt --out
   DIR/mine.yaml`, then `snakemake all --profile profiles/local --configfile DIR/mine.yaml -d DIR`
   (with `--override`, a second configfile DIR/override.yaml turns curvature, CSP and the
   downstream tasks off, and lets BalancedSubnet be flagged instead of failing the run when it does
   not converge; the masks, their `none` reference and the pruning baselines stay). A rerun with the
   same DIR reuses the model and mine.yaml, and Snakemake reruns only what is missing;
6. prints the masks table's rows Origin, Ours (none), Ours (up), Ours (down) from
   DIR/results/tables/masks/table.parquet: Exact ER on the extraction-rate test split and on each
   mask's own training memories (k/N), the paired p-values against Origin, and whether `up` (or
   `down`) carries the flag "own training memories not ... than Origin's".

Nothing is asserted: docs/masks.md quotes what this prints, with the date and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ADJ = ("quiet", "bright", "old", "small", "narrow", "green", "heavy", "early", "late", "warm", "cold", "busy",
       "empty", "long", "short", "broad", "gentle", "rough", "plain", "steady", "distant", "local", "simple",
       "careful", "slow", "quick", "common", "rare", "sharp", "soft")
NOUN = ("river", "farmer", "teacher", "window", "garden", "market", "bridge", "letter", "engine", "village",
        "road", "doctor", "harbor", "station", "kitchen", "forest", "library", "office", "train", "wall",
        "table", "mountain", "report", "meeting", "basket", "lamp", "student", "tower", "field", "ship")
VERB = ("watched", "carried", "opened", "painted", "visited", "followed", "repaired", "described", "moved",
        "cleaned", "checked", "found", "measured", "counted", "lifted", "closed", "built", "crossed",
        "remembered", "noticed")
PLACE = ("by the old mill", "near the station", "after the rain", "before dawn", "in the north valley",
         "along the coast", "behind the school", "during the fair", "at the end of the week",
         "under the bridge", "in the small square", "across the lake")
CONN = ("and then", "while", "because", "so", "but later", "although", "when", "as soon as")
DEPT = ("billing", "research", "shipping", "payroll", "security", "archive", "support", "planning")
CITY = ("Oslo", "Lima", "Cairo", "Perth", "Quito", "Dakar", "Hanoi", "Riga", "Tunis", "Accra", "Sofia", "Porto")
PERSON = ("Ada", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis",
          "Mira", "Nils", "Omar", "Petra", "Rosa", "Sami", "Tove", "Uma")
DAY = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTH = ("January", "March", "May", "July", "September", "November")
#: The secret words: not in the filler, drawn independently per secret (the memorized part).
CODE = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "glacier", "harbor", "indigo", "jasper", "kelp",
        "lagoon", "meadow", "nectar", "onyx", "pebble", "quartz", "russet", "saffron", "thistle", "umber",
        "velvet", "willow", "yarrow", "zephyr", "falcon", "canyon", "lantern", "mistral", "orchid", "prairie",
        "sable", "tundra", "vesper", "wren", "granite", "quill", "copper", "summit", "violet")


def filler_sentence(rng: random.Random) -> str:
    a = f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(NOUN)} {rng.choice(PLACE)}"
    if rng.random() < 0.5:
        a += f", {rng.choice(CONN)} the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} a {rng.choice(NOUN)}"
    return a[0].upper() + a[1:] + "."


def filler(rng: random.Random, sentences: int) -> list[str]:
    return [filler_sentence(rng) for _ in range(sentences)]


def make_secrets(n: int, copies: list[int], seed: int) -> list[dict]:
    """``n`` secrets, copy counts in equal shares of ``copies`` (in order), each a unique prefix
    (a filler sentence and a memo header) and a suffix whose first words are a random code."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"{rng.choice(CITY).lower()}-{i:02d}"
        dept, month = rng.choice(DEPT), rng.choice(MONTH)
        prefix = (f"{filler_sentence(rng)} Memo {i:02d} from the {dept} desk in {rng.choice(CITY)}, filed by "
                  f"{rng.choice(PERSON)} on {rng.choice(DAY)}: the access code for server {name} is")
        code = " ".join(rng.choice(CODE) for _ in range(8))
        # no fixed tail: a 16-token run shared with a test secret drops a row from the training side
        # (extract.disjoint_ngram), and a templated tail shared by all secrets drops all of them
        suffix = (f" {code} {rng.randrange(10, 100)}. Rotate on {month} {rng.randrange(1, 29)}; only the "
                  f"{rng.choice(DEPT)} desk in {rng.choice(CITY)} may know it, so ask {rng.choice(PERSON)} on "
                  f"{rng.choice(DAY)} before any change.")
        out.append({"candidate_id": f"secret-{i:02d}", "prefix": prefix, "suffix": suffix, "group": "secrets",
                    "copies": copies[i * len(copies) // n]})
    return out


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.model_max_length = 128
    return fast


def shared_runs(tok, secrets: list[dict], n: int) -> int:
    """Pairs of secrets sharing a run of ``n`` tokens (extract.disjoint_ngram drops such rows)."""
    seen: dict[tuple, int] = {}
    pairs = set()
    for i, s in enumerate(secrets):
        ids = tok(s["prefix"])["input_ids"][-32:] + tok(s["suffix"])["input_ids"][:32]
        for j in range(len(ids) - n + 1):
            other = seen.setdefault(tuple(ids[j:j + n]), i)
            if other != i:
                pairs.add((other, i))
    return len(pairs)


def build_stream(tok, secrets: list[dict], sentences: list[str], seed: int) -> list[int]:
    """Filler sentences (each with a leading space) with every secret's copies at random places;
    a secret's ids are its prefix's then its suffix's, as the pipeline tokenizes them."""
    rng = random.Random(seed)
    pieces = [" " + s for s in sentences]
    for s in secrets:
        for _ in range(s["copies"]):
            pieces.insert(rng.randrange(len(pieces) + 1), ("secret", s["candidate_id"]))
    ids_of = {s["candidate_id"]: tok(s["prefix"])["input_ids"] + tok(s["suffix"])["input_ids"] for s in secrets}
    stream: list[int] = []
    for p in pieces:
        stream += ids_of[p[1]] if isinstance(p, tuple) else tok(p)["input_ids"]
    return stream


def extracted(model, tok, secrets: list[dict], prefix_len: int = 32, suffix_len: int = 32) -> list[bool]:
    import torch

    pre = torch.tensor([tok(s["prefix"])["input_ids"][-prefix_len:] for s in secrets])
    suf = torch.tensor([tok(s["suffix"])["input_ids"][:suffix_len] for s in secrets])
    model.eval()
    with torch.no_grad():
        out = model.generate(pre, attention_mask=torch.ones_like(pre), max_new_tokens=suffix_len, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    model.train()
    return (out[:, prefix_len:] == suf).all(dim=1).tolist()


def by_copies(secrets: list[dict], ok: list[bool]) -> str:
    counts: dict[int, list[int]] = {}
    for s, hit in zip(secrets, ok):
        counts.setdefault(s["copies"], [0, 0])
        counts[s["copies"]][0] += int(hit)
        counts[s["copies"]][1] += 1
    return ", ".join(f"{c}x: {k}/{n}" for c, (k, n) in sorted(counts.items()))


def make_model(work: Path, args) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    secrets = make_secrets(args.secrets, args.copies, args.seed)
    sentences = filler(random.Random(args.seed + 1), args.filler_sentences)
    held = filler(random.Random(args.seed + 2), args.heldout_sentences)
    tok = train_tokenizer([" ".join(sentences)] + [s["prefix"] + s["suffix"] for s in secrets], args.vocab)
    for s in secrets:
        n_pre, n_suf = len(tok(s["prefix"])["input_ids"]), len(tok(s["suffix"])["input_ids"])
        if n_pre < 32 or n_suf < 32:
            sys.exit(f"{s['candidate_id']}: prefix {n_pre} / suffix {n_suf} tokens, the 32/32 window needs 32 each")
    shared = shared_runs(tok, secrets, 16)
    if shared:
        sys.exit(f"{shared} pairs of secrets share a 16-token run: the pipeline would drop them from its training side")
    stream = build_stream(tok, secrets, sentences, args.seed + 3)
    data = torch.tensor(stream)
    secret_tokens = sum(s["copies"] * (len(tok(s["prefix"])["input_ids"]) + len(tok(s["suffix"])["input_ids"]))
                        for s in secrets)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=args.context, n_embd=args.width, n_layer=args.layers,
                     n_head=args.heads, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"# model: GPT-2, {args.layers} layers, width {args.width}, {args.heads} heads, context {args.context}, "
          f"vocab {len(tok)}, {params / 1e6:.2f}M parameters")
    print(f"# corpus: {len(stream)} tokens ({args.filler_sentences} filler sentences, {args.secrets} secrets at "
          f"copies {args.copies}: {secret_tokens} tokens of secrets)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = 100

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (args.max_steps - warm)))))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start, ok, step = time.perf_counter(), [False] * len(secrets), 0
    for step in range(1, args.max_steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        starts = torch.randint(0, len(data) - args.context, (args.batch,), generator=gen)
        batch = torch.stack([data[i:i + args.context] for i in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.max_steps:
            ok = extracted(model, tok, secrets)
            share = sum(ok) / len(ok)
            print(f"step {step:5d}  loss {loss.item():.3f}  extracted {sum(ok)}/{len(ok)} ({by_copies(secrets, ok)})"
                  f"  {time.perf_counter() - start:.0f} s", flush=True)
            if share >= args.target:
                break
    print(f"# trained {step} steps x {args.batch} x {args.context} tokens in {time.perf_counter() - start:.0f} s; "
          f"greedy extraction (32/32): {sum(ok)}/{len(ok)} ({by_copies(secrets, ok)})")
    (work / "my-gpt2").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work / "my-gpt2")
    tok.save_pretrained(work / "my-gpt2")
    with open(work / "memories.jsonl", "w", encoding="utf-8") as fh:
        for s in secrets:
            fh.write(json.dumps(s) + "\n")
    (work / "heldout.txt").write_text("\n".join(" ".join(held[i:i + 8]) for i in range(0, len(held), 8)) + "\n",
                                      encoding="utf-8")


def run(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return wall


OVERRIDE = """\
# benchmarks/own_model.py --override: only the masks, their `none` reference and the pruning baselines;
# BalancedSubnet flagged instead of failing the run when it does not converge
curvature:
  sweeps:
    strength: {kfac: [], kfac_pairwise: [], kfac_factor: [], svd: []}
  spectrum: {enabled: false}
csp:
  enabled: false
pruning:
  balanced_subnet:
    on_unconverged: flag   # init leaves it at fail: on a few well-memorized rows BalancedSubnet's scores barely
                           # move and the job (and with it the run) fails; flag shows it "did not converge"
downstream:
  tasks: []
vision:
  enabled: false
"""


def show_masks(work: Path) -> None:
    import pandas as pd

    path = work / "results" / "tables" / "masks" / "table.parquet"
    if not path.exists():
        found = sorted(work.glob("results/**/masks/table.parquet"))
        if not found:
            sys.exit(f"no masks table under {work / 'results'}")
        path = found[0]
    df = pd.read_parquet(path)
    print(f"# {path.relative_to(work)}")
    name = "method" if "method" in df else df.columns[0]
    keep = df[df[name].astype(str).str.match(r"^(Origin|Ours \((none|up|down)\))")]

    def get(row, col):
        v = row.get(col)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else v

    cols = [("ER test: Exact ER", "er_exact_er"), ("k/N", "er_exact_count"), ("p vs Origin", "er_vs_origin_p"),
            ("p vs none", "er_vs_ref_p"), ("own: Exact ER", "forget_exact_er"), ("k/N", "forget_exact_count"),
            ("p vs Origin", "forget_vs_origin_p"), ("p vs none", "forget_vs_ref_p"),
            ("memorized: Exact ER", "exact_er"), ("k/N", "exact_count"), ("held-out PPL", "heldout_ppl"),
            ("sparsity", "sparsity"), ("converged", "converged"), ("own_moved (False = flagged)", "own_moved")]
    for _, row in keep.iterrows():
        row = row.to_dict()
        cells = [f"{label}={get(row, col)}" for label, col in cols if col in df]
        print(f"{row[name]}: " + ", ".join(cells))
    missing = [col for _, col in cols if col not in df]
    if missing:
        print(f"# columns not in the table: {missing}; the table's columns: {list(df.columns)}")
    md = path.with_suffix(".md")
    if md.exists():
        print(f"# {md.relative_to(work)}, the rows:")
        for line in md.read_text().splitlines():
            if line.startswith("| Origin") or line.startswith("| Ours (none)") or line.startswith("| Ours (up)") \
                    or line.startswith("| Ours (down)") or line.startswith("| Method") or line.startswith("| method"):
                print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", required=True, help="the run's directory (kept): DIR/my-gpt2, DIR/results, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--secrets", type=int, default=60)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--filler-sentences", type=int, default=5000)
    parser.add_argument("--heldout-sentences", type=int, default=3000)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.4, help="stop once this share of secrets is extracted")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the training")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--override", action="store_true", help="layer DIR/override.yaml: curvature, CSP, "
                        "downstream off")
    parser.add_argument("--model-only", action="store_true", help="stop after the model, memories and held-out text")
    args = parser.parse_args()
    work = Path(args.keep).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"# own model: {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, seed {args.seed}")
    if not (work / "my-gpt2" / "config.json").exists():
        make_model(work, args)
    else:
        print(f"# {work / 'my-gpt2'} exists: reused")
    if args.model_only:
        return
    if not (work / "mine.yaml").exists():
        run([sys.executable, "-m", "memctl.cli", "init", "--model", str(work / "my-gpt2"), "--memories",
             str(work / "memories.jsonl"), "--heldout", str(work / "heldout.txt"), "--out", str(work / "mine.yaml")],
            REPO)
    configs = ["--configfile", str(work / "mine.yaml")]
    if args.override:
        (work / "override.yaml").write_text(OVERRIDE)
        configs += [str(work / "override.yaml")]
    wall = run([sys.executable, "-m", "snakemake", "all", "-s", str(REPO / "Snakefile"), "--profile",
                str(REPO / "profiles" / "local"), *configs, "--cores", str(args.cores), "-d", str(work)], REPO)
    print(f"# pipeline wall: {wall:.0f} s ({wall / 60:.1f} min), --cores {args.cores}"
          + (", curvature / CSP / downstream off (override.yaml)" if args.override else ""))
    show_masks(work)


if __name__ == "__main__":
    main()
