"""``memctl demo-corpus``, ``memctl demo-tokenizer``, ``memctl demo-pretrain``.

:func:`register` adds the three subcommands to the main ``memctl`` parser. Each writes its outputs
atomically with a provenance sidecar (``<output>.meta.json``) next to each of them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd

from memctl.config import parse_settings
from memctl.demo import resolve_settings
from memctl.runner import stage, write_dir
from memctl.store import write_parquet

#: Output file names of the corpus stage.
TRAIN_FILE, HELDOUT_FILE, CANARIES_FILE = "train.parquet", "heldout.parquet", "canaries.parquet"
#: Extraction windows (prefix + suffix tokens) a canary should cover: the 32/32 and 50/50 presets.
WINDOW_NEEDS = {"32/32": 64, "50/50": 100}


def register(subparsers) -> None:
    """Add the demo subcommands to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    # imported here, not at the top: register() shapes no output, so it stays out of the stages' code hash
    # (memctl.stages.code_hash hashes the entry module's top-level imports and assignments)
    from memctl.arguments import arg, command, settings_arg, threads_arg

    command(subparsers, "demo-corpus", cmd_corpus, "build the offline demo corpus (stdlib sources + planted canaries)",
            settings_arg("demo.corpus settings: JSON or @file", default="{}"),
            arg("--canary-settings", default="{}", help="demo.canaries settings: JSON or @file"),
            arg("--out-dir", required=True, type=Path, help="output directory"),
            description="Write DIR/train.parquet, DIR/heldout.parquet and DIR/canaries.parquet.")

    command(subparsers, "demo-tokenizer", cmd_tokenizer,
            "train the demo byte-level BPE tokenizer on the demo training stream",
            arg("--corpus", required=True, type=Path, help="demo corpus directory"),
            settings_arg("demo.tokenizer settings: JSON or @file", default="{}"),
            arg("--out", required=True, type=Path, help="output tokenizer directory"))

    command(subparsers, "demo-pretrain", cmd_pretrain, "pretrain the demo GPT-NeoX from scratch on the CPU",
            arg("--corpus", required=True, type=Path, help="demo corpus directory"),
            arg("--tokenizer", required=True, type=Path, help="demo tokenizer directory"),
            arg("--arch-settings", default="{}", help="demo.architecture settings: JSON or @file"),
            settings_arg("demo.train settings: JSON or @file", default="{}"),
            arg("--out", required=True, type=Path, help="output model directory"),
            threads_arg("torch threads when demo.train.threads is 0 (Snakemake passes the job's threads)"),
            arg("--no-progress", action="store_true", help="no progress bar"))


def cmd_corpus(args: argparse.Namespace) -> int:
    from memctl.demo.corpus import build_corpus

    corpus = resolve_settings("corpus", parse_settings(args.settings))
    canaries = resolve_settings("canaries", parse_settings(args.canary_settings))
    out_dir = Path(args.out_dir)
    outputs = [out_dir / TRAIN_FILE, out_dir / HELDOUT_FILE, out_dir / CANARIES_FILE]
    with stage("demo_corpus", {"corpus": corpus, "canaries": canaries}, outputs=outputs) as prov:
        train_df, heldout_df, canaries_df, stats = build_corpus(corpus, canaries, return_stats=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        prov.extra["stats"] = stats
        for df, path in zip((train_df, heldout_df, canaries_df), outputs):
            write_parquet(df, path, provenance=prov)
    print(
        f"demo-corpus: {stats['docs_train']} train docs, {stats['docs_heldout']} held-out docs, "
        f"{stats['canaries']} canaries x copies = {stats['canary_insertions']} insertions -> {out_dir}"
    )
    return 0


def _length_summary(canaries: pd.DataFrame, lengths: list[int]) -> dict:
    from memctl.demo.corpus import kind_of

    # families (kind ``records-3``) are summarised by their kind (``records``)
    df = canaries.assign(n_tokens=lengths, kind=canaries["kind"].map(kind_of))
    summary: dict = {}
    for kind, grp in df.groupby("kind", sort=True):
        vals = grp["n_tokens"].tolist()
        summary[str(kind)] = {"min": int(min(vals)), "median": float(statistics.median(vals)), "max": int(max(vals))}
    shortest = int(min(lengths)) if lengths else 0
    summary["covers"] = {name: shortest >= need for name, need in WINDOW_NEEDS.items()}
    return summary


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from memctl.demo.tokenizer import canary_token_lengths, train_tokenizer

    settings = resolve_settings("tokenizer", parse_settings(args.settings))
    corpus, out = Path(args.corpus), Path(args.out)
    with stage("demo_tokenizer", settings, inputs={"train": corpus / TRAIN_FILE}, outputs=[out]) as prov:
        train = pd.read_parquet(corpus / TRAIN_FILE, columns=["segment", "text"]).sort_values("segment")
        tokenizer = train_tokenizer(train["text"].tolist(), settings)
        prov.extra.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        canary_path = corpus / CANARIES_FILE
        if canary_path.exists():
            canaries = pd.read_parquet(canary_path)
            lengths = canary_token_lengths(tokenizer, canaries["text"].tolist())
            prov.extra["canary_tokens"] = _length_summary(canaries, lengths)
            short = [name for name, ok in prov.extra["canary_tokens"]["covers"].items() if not ok]
            if short:
                print(
                    f"demo-tokenizer: note: the shortest canary has {min(lengths)} tokens, too short for the "
                    f"{', '.join(short)} preset(s); lengthen demo.canaries.words / digits to use them"
                )
        write_dir(out, tokenizer.save_pretrained, provenance=prov)
    print(f"demo-tokenizer: {len(tokenizer)} tokens -> {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from memctl.demo.pretrain import pretrain, save_model, train_token_stream

    arch = resolve_settings("architecture", parse_settings(args.arch_settings))
    train_settings = resolve_settings("train", parse_settings(args.settings))
    if not train_settings["threads"] and args.threads:
        train_settings["threads"] = int(args.threads)
    corpus, tok_dir, out = Path(args.corpus), Path(args.tokenizer), Path(args.out)
    with stage(
        "demo_pretrain",
        {"architecture": arch, "train": train_settings},
        inputs={"train": corpus / TRAIN_FILE, "tokenizer": tok_dir},
        outputs=[out],
    ) as prov:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        stream = train_token_stream(corpus, tokenizer)
        model, log_df = pretrain(stream, tokenizer, arch, train_settings, progress=not args.no_progress)
        a = log_df.attrs
        prov.extra.update({
            "final_loss": a["final_loss"],
            "tokens_per_s": a["tokens_per_s"],
            "train_wall_time_s": a["wall_time_s"],
            "train_summary": dict(a),
        })
        write_dir(out, lambda tmp: save_model(model, tokenizer, log_df, tmp), provenance=prov)
    print(
        f"demo-pretrain: final loss {a['final_loss']:.3f}, {a['tokens_per_s']:,.0f} tokens/s, "
        f"{a['wall_time_s']:.0f} s -> {out}"
    )
    return 0


__all__ = ["cmd_corpus", "cmd_pretrain", "cmd_tokenizer", "register"]
