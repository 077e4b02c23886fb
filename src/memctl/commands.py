"""The core stage commands: config check, candidates, extraction, held-out and calibration text,
the reference top-k, evaluation, the report, and ``memctl verify``.

:func:`register` adds them to the main ``memctl`` parser, like the stage families' ``cli``
modules. Every command writes atomically, with a provenance sidecar for every artifact.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from memctl.config import ConfigError, parse_settings
from memctl.runner import load, model_args, model_name, stage

log = logging.getLogger("memctl")
#: nDCG@k against the unedited model (reference facts: k = 10).
NDCG_K = 10


def cmd_validate_config(args) -> None:
    from memctl.config import load_config

    cfg = load_config(args.config)
    print(json.dumps(cfg, indent=2, sort_keys=True) if args.show else f"{args.config}: valid")


def cmd_candidates(args) -> None:
    from memctl.config import prefix_suffix_lengths
    from memctl.data import build_candidates
    from memctl.models import load_tokenizer
    from memctl.store import write_parquet

    settings = parse_settings(args.settings)
    extract_settings = parse_settings(args.extract_settings)
    prefix_len, suffix_len = prefix_suffix_lengths(extract_settings)
    with stage(
        "candidates",
        {"candidates": settings, "prefix_len": prefix_len, "suffix_len": suffix_len},
        {"model": args.model, "corpus": args.corpus, "path": settings.get("path")},
        outputs=[args.out],
    ) as prov:
        tokenizer = load_tokenizer(args.model, parse_settings(args.model_settings))
        df, stats = build_candidates(settings, tokenizer, prefix_len, suffix_len, corpus_dir=args.corpus)
        prov.extra["stats"] = stats
        write_parquet(df, args.out, provenance=prov)
    log.info("wrote %d candidates to %s (%s)", len(df), args.out, stats)


def _batch_args(p, *names: str) -> None:
    """Batch sizes change how fast a stage runs, not what it writes: the workflow passes them as
    flags (from the job's resources), outside the settings that key and rerun the stage."""
    for name in names:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"overrides the settings' {name} (speed and memory only)")


def _with_batches(settings: dict, args) -> dict:
    """``settings`` with the batch sizes given as flags (:func:`_batch_args`)."""
    for name in ("batch_size", "heldout_batch_size"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: {value} is less than 1")
            settings = {**settings, name: value}
    return settings


def cmd_extract(args) -> None:
    import pandas as pd

    from memctl.extract import run_extraction, split_memorized, write_outputs

    settings = _with_batches(parse_settings(args.settings), args)
    with stage(
        "extract",
        {"extract": settings, "model": parse_settings(args.model_settings)},
        {"model": args.model, "candidates": args.candidates},
        outputs=[args.out_dir],
    ) as prov:
        candidates = pd.read_parquet(args.candidates)
        model, tokenizer = load(args, prov)
        extraction = run_extraction(
            model, candidates, tokenizer.pad_token_id, batch_size=int(settings.get("batch_size", 64))
        )
        splits = split_memorized(extraction, settings)
        write_outputs(Path(args.out_dir), extraction, splits, prov)
    log.info(
        "extracted %d / %d candidates exactly; memorized train/test = %d/%d",
        int(extraction["exact_match"].sum()), len(extraction),
        len(splits["memorized_train"]), len(splits["memorized_test"]),
    )


def _write_windows(args, kind: str) -> None:
    """Held-out or calibration text as ``windows.safetensors`` (int64 [n_windows, context])."""
    import torch
    from safetensors.torch import save_file

    from memctl.data import calibration_windows, heldout_windows, text_documents
    from memctl.models import context_length, load_config, load_tokenizer
    from memctl.store import atomic_path

    settings = parse_settings(args.settings)
    inputs = {"model": args.model, "corpus": args.corpus, "path": settings.get("path")}
    with stage(kind, settings, inputs, outputs=[args.out]) as prov:
        model_settings = parse_settings(args.model_settings)
        tokenizer = load_tokenizer(args.model, model_settings)
        ctx = int(settings.get("context_length") or context_length(load_config(args.model, model_settings)))
        if kind == "heldout":
            texts, sep = text_documents(settings, args.corpus, "heldout", demo_split="heldout")
            windows = heldout_windows(texts, sep, tokenizer, ctx, settings.get("max_windows"))
        else:
            texts, sep = text_documents(settings, args.corpus, "calibration", demo_split="train")
            windows = calibration_windows(
                texts, sep, tokenizer, ctx, settings.get("max_windows"), int(settings.get("seed", 0))
            )
        prov.extra.update(windows=int(windows.shape[0]), context_length=ctx)
        with atomic_path(args.out, provenance=prov) as tmp:
            save_file({"windows": torch.from_numpy(windows)}, str(tmp), metadata={"context_length": str(ctx)})
    log.info("wrote %d %s windows of %d tokens to %s", windows.shape[0], kind, ctx, args.out)


def cmd_heldout(args) -> None:
    _write_windows(args, "heldout")


def cmd_calibration(args) -> None:
    _write_windows(args, "calibration")


def cmd_reference_topk(args) -> None:
    """The unedited model's top-k next tokens on held-out text: the nDCG@10 reference."""
    from safetensors.torch import load_file, save_file

    from memctl.generation import window_topk
    from memctl.store import atomic_path

    settings = _with_batches(parse_settings(args.settings), args)
    n = int(settings.get("ndcg_windows", 16))
    with stage(
        "reference_topk",
        {"ndcg_windows": n, "k": NDCG_K, "model": parse_settings(args.model_settings)},
        {"model": args.model, "heldout": args.heldout},
        outputs=[args.out],
    ) as prov:
        windows = load_file(args.heldout)["windows"][:n].contiguous()
        model, _ = load(args, prov)
        topk = window_topk(model, windows.numpy(), NDCG_K, batch_size=int(settings.get("heldout_batch_size", 4)))
        prov.extra["positions"] = int(topk.shape[0] * topk.shape[1])
        with atomic_path(args.out, provenance=prov) as tmp:
            save_file({"topk": topk, "windows": windows}, str(tmp))
    log.info("wrote the top-%d reference of %d windows to %s", NDCG_K, len(windows), args.out)


def cmd_evaluate(args) -> None:
    import pandas as pd
    from safetensors.torch import load_file

    from memctl.evaluate import evaluate_model
    from memctl.store import write_parquet

    settings = _with_batches(parse_settings(args.settings), args)
    out_dir = Path(args.out_dir)
    with stage(
        "evaluate",
        {"evaluate": settings, "model": parse_settings(args.model_settings), "edit": args.edit},
        {"model": args.model, "memorized": args.memorized, "heldout": args.heldout, "delta": args.delta,
         "reference": args.reference},
        outputs=[out_dir / "scores.parquet", out_dir / "metrics.parquet"],
    ) as prov:
        memorized = pd.read_parquet(args.memorized)
        heldout = load_file(args.heldout)["windows"].numpy()
        model, tokenizer = load(args, prov)
        if args.delta:
            from memctl.edits import apply_delta, load_delta

            delta = load_delta(args.delta)
            apply_delta(model, delta)
            prov.extra["edit"] = delta.metadata
        table, scores = evaluate_model(
            model, memorized, heldout, tokenizer.pad_token_id, settings,
            model_name=model_name(args), edit=args.edit, method=args.method,
        )
        table["ndcg10"] = _ndcg(model, args.reference, settings) if args.reference else float("nan")
        write_parquet(scores, out_dir / "scores.parquet", provenance=prov)
        write_parquet(table, out_dir / "metrics.parquet", provenance=prov)
    log.info("metrics: %s", table.iloc[0].to_dict())


def _ndcg(model, reference_path: str, settings) -> float:
    from safetensors.torch import load_file

    from memctl.generation import window_topk
    from memctl.metrics import ndcg_at_k

    reference = load_file(reference_path)
    edited = window_topk(model, reference["windows"].numpy(), NDCG_K, int(settings.get("heldout_batch_size", 4)))
    return float(ndcg_at_k(reference["topk"].numpy(), edited.numpy()).mean())


def cmd_report(args) -> None:
    import pandas as pd

    from memctl import report
    from memctl.store import atomic_path, write_parquet, write_text

    out = Path(args.out_dir)
    with stage("report", {}, {f"metrics[{i}]": m for i, m in enumerate(args.metrics)}, outputs=[out]) as prov:
        metrics = pd.concat([pd.read_parquet(m) for m in args.metrics], ignore_index=True)
        write_text(out / "results.md", report.results_markdown(metrics), provenance=prov)
        write_parquet(metrics, out / "results.parquet", provenance=prov)
        write_text(out / "results.html", report.results_html(metrics), provenance=prov)
        if args.by_copies:
            by_copies = report.bucket_copies(pd.read_parquet(args.by_copies))
            write_text(out / "extraction_by_copies.md", report.extraction_markdown(by_copies), provenance=prov)
            with atomic_path(out / "extraction_by_copies.png", provenance=prov) as tmp:
                report.plot_extraction(by_copies, tmp)
    print(report.results_markdown(metrics))


def cmd_verify(args) -> None:
    """One line per problem (corrupt, incomplete, leftover of a killed write), naming the path;
    exit status 1 when there is any. Writes in progress on this host are noted on stderr."""
    from memctl.store import verify_paths

    report = verify_paths(args.paths)
    for note in report.notes:
        print(note, file=sys.stderr)
    for problem in report.problems:
        print(problem)
    print(f"checked {report.checked} artifacts: {len(report.problems)} problems")
    if report.problems:
        raise SystemExit(1)


def register(subparsers) -> None:
    """Add the core subcommands to the main parser."""
    p = subparsers.add_parser("validate-config", help="validate a config file against the schema")
    p.add_argument("config")
    p.add_argument("--show", action="store_true", help="print the config with defaults filled in")
    p.set_defaults(func=cmd_validate_config)

    p = subparsers.add_parser("candidates", help="build the candidate table (prefix/suffix token ids)")
    model_args(p)
    p.add_argument("--corpus", default=None, help="demo corpus directory (source 'demo')")
    p.add_argument("--settings", required=True, help="the `candidates` subsection (JSON)")
    p.add_argument("--extract-settings", required=True, help="the `extract` subsection (for lengths)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_candidates)

    p = subparsers.add_parser("extract", help="greedy extraction and memorized / non-memorized splits")
    model_args(p)
    p.add_argument("--candidates", required=True)
    p.add_argument("--settings", required=True, help="the `extract` subsection (JSON)")
    _batch_args(p, "batch_size")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_extract)

    p = subparsers.add_parser("heldout", help="held-out text as non-overlapping context windows")
    model_args(p)
    p.add_argument("--corpus", default=None)
    p.add_argument("--settings", required=True, help="the `heldout` subsection (JSON)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_heldout)

    p = subparsers.add_parser("calibration", help="calibration text (K-FAC, masks, pruning) as random full windows")
    model_args(p)
    p.add_argument("--corpus", default=None)
    p.add_argument("--settings", required=True, help="the `calibration` subsection (JSON)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_calibration)

    p = subparsers.add_parser("reference-topk", help="the unedited model's top-10 next tokens on held-out text")
    model_args(p)
    p.add_argument("--heldout", required=True, help="held-out windows (.safetensors)")
    p.add_argument("--settings", required=True, help="the `evaluate` subsection (JSON)")
    _batch_args(p, "heldout_batch_size")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_reference_topk)

    p = subparsers.add_parser("evaluate", help="memorization and utility metrics of one (model, edit)")
    model_args(p)
    p.add_argument("--edit", default="none")
    p.add_argument("--method", default="Origin", help="row label in the results table")
    p.add_argument("--delta", default=None, help="edit to apply to the model (delta.safetensors)")
    p.add_argument("--reference", default=None, help="the unedited model's top-10 (reference-topk) for nDCG@10")
    p.add_argument("--memorized", required=True, help="memorized_test.parquet")
    p.add_argument("--heldout", required=True, help="held-out windows (.safetensors)")
    p.add_argument("--settings", required=True, help="the `evaluate` subsection (JSON)")
    _batch_args(p, "batch_size", "heldout_batch_size")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("report", help="results tables and plots")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--by-copies", default=None, help="by_copies.parquet of the extraction stage")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("verify", help="check artifacts against their provenance checksums")
    p.add_argument(
        "paths", nargs="+",
        help="artifacts, or directories to check whole (missing or stray sidecars, leftovers of killed writes)",
    )
    p.set_defaults(func=cmd_verify)
