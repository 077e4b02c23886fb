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

from memctl.config import ConfigError, parse_settings, validate_section
from memctl.runner import load, model_args, model_name, stage

log = logging.getLogger("memctl")
#: nDCG@k against the unedited model (reference facts: k = 10).
NDCG_K = 10


def cmd_validate_config(args) -> None:
    from memctl.config import load_config

    cfg = load_config(args.config)
    print(json.dumps(cfg, indent=2, sort_keys=True) if args.show else f"{args.config}: valid")


def _model_settings(args) -> dict:
    """``--model-settings`` as given, after checking it against the ``model`` schema (the loaders
    read what was given: a default filled in, such as ``source``, would change what they do)."""
    settings = parse_settings(args.model_settings)
    validate_section("model", settings)
    return settings


def _check_window(prefix_len: int, suffix_len: int, context: int, model: str) -> None:
    if prefix_len + suffix_len > context:
        raise ConfigError(f"extract: prefix_len + suffix_len = {prefix_len} + {suffix_len} = {prefix_len + suffix_len} "
                          f"tokens exceed the context length of the model {model} ({context})")


def cmd_candidates(args) -> None:
    from memctl.config import prefix_suffix_lengths
    from memctl.data import build_candidates
    from memctl.models import load_tokenizer, model_limits
    from memctl.store import write_parquet

    settings = validate_section("candidates", parse_settings(args.settings))
    extract_settings = validate_section("extract", parse_settings(args.extract_settings))
    prefix_len, suffix_len = prefix_suffix_lengths(extract_settings)
    model_settings = _model_settings(args)
    with stage(
        "candidates",
        {"candidates": settings, "prefix_len": prefix_len, "suffix_len": suffix_len},
        {"model": args.model, "corpus": args.corpus, "path": settings.get("path")},
        outputs=[args.out],
    ) as prov:
        tokenizer = load_tokenizer(args.model, model_settings)
        vocab_size, context = model_limits(args.model, model_settings)
        _check_window(prefix_len, suffix_len, context, args.model)
        df, stats = build_candidates(settings, tokenizer, prefix_len, suffix_len, corpus_dir=args.corpus,
                                     vocab_size=vocab_size)
        prov.extra["stats"] = stats
        prov.extra["dropped"] = stats.get("dropped", {})  # rows dropped, by reason (a warning was logged)
        prov.extra["model_limits"] = {"vocab_size": vocab_size, "context_length": context}
        write_parquet(df, args.out, provenance=prov)
    log.info("wrote %d candidates to %s (%s)", len(df), args.out, stats)


def _batch_args(*names: str) -> tuple:
    """Batch sizes change how fast a stage runs, not what it writes: the workflow passes them as
    flags (from the job's resources), outside the settings that key and rerun the stage: one
    ``memctl.arguments.arg`` each."""
    from memctl.arguments import arg

    return tuple(arg(f"--{name.replace('_', '-')}", type=int, default=None,
                     help=f"overrides the settings' {name} (speed and memory only)") for name in names)


def _with_batches(settings: dict, args) -> dict:
    """``settings`` with the batch sizes given as flags (:func:`_batch_args`)."""
    for name in ("batch_size", "heldout_batch_size"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: {value} is less than 1")
            settings = {**settings, name: value}
    return settings


def _model_limits(model) -> tuple[int, int]:
    """(embedding rows, context length) of a loaded model: what every token id and sequence must fit."""
    from memctl.models import context_length

    return int(model.get_input_embeddings().num_embeddings), context_length(model.config)


def _check_candidates(table, path, model, allow_empty: bool = False) -> None:
    """A candidate table (candidates, a memorized split) a command is handed, against the model:
    integer ids inside its vocabulary, prefix + suffix within its context
    (:func:`memctl.data.check_candidate_table`); errors name the file and row."""
    from memctl.data import check_candidate_table

    check_candidate_table(table, str(path), *_model_limits(model), allow_empty=allow_empty)


def _check_windows(windows, path, model) -> None:
    """Held-out / calibration windows (int64 [n, length]) a command is handed, against the model."""
    from memctl.data import DataError

    vocab, context = _model_limits(model)
    if windows.ndim != 2:
        raise DataError(f"{path}: windows must be a 2-D array (windows x tokens), got shape {tuple(windows.shape)}")
    if windows.shape[1] > context:
        raise DataError(f"{path}: windows of {windows.shape[1]} tokens exceed the model's context length of {context}")
    if windows.size and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
        import numpy as np

        r, c = (int(x) for x in np.argwhere((windows < 0) | (windows >= vocab))[0])
        raise DataError(f"{path} window {r} position {c}: token id {int(windows[r, c])} is outside the model's "
                        f"vocabulary of {vocab} ids")


def cmd_extract(args) -> None:
    from memctl.data import read_parquet_file
    from memctl.data import DataError
    from memctl.extract import check_ood_group, run_extraction, split_memorized, write_outputs

    settings = validate_section("extract", _with_batches(parse_settings(args.settings), args))
    with stage(
        "extract",
        {"extract": settings, "model": _model_settings(args)},
        {"model": args.model, "candidates": args.candidates},
        outputs=[args.out_dir],
    ) as prov:
        candidates = read_parquet_file(args.candidates, "candidate table")  # a bad file fails before the model loads
        try:
            check_ood_group(candidates, settings, args.candidates)
        except ValueError as err:
            raise DataError(str(err)) from None
        model, tokenizer = load(args, prov)
        _check_candidates(candidates, args.candidates, model)
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
    from memctl.overlap import DEFAULT_N
    from memctl.splits import overlap_warnings, split_warnings

    sizes = {k: len(v) for k, v in splits.items() if k != "dropped"}
    for line in split_warnings(sizes):
        log.warning("extract: %s", line)  # also at the top of results.md (memctl.report.warnings_markdown)
    for line in overlap_warnings(splits.get("dropped", {}), sizes, int(settings.get("disjoint_ngram", DEFAULT_N))):
        log.warning("extract: %s", line)


def _write_windows(args, kind: str) -> None:
    """Held-out or calibration text as ``windows.safetensors`` (int64 [n_windows, context])."""
    import torch
    from safetensors.torch import save_file

    from memctl.data import DataError, heldout_windows, text_documents
    from memctl.models import load_tokenizer, model_limits
    from memctl.store import atomic_path

    settings = validate_section(kind, parse_settings(args.settings))
    if kind == "calibration":
        _check_demo_text(settings, getattr(args, "demo_text", None))
    model_settings = _model_settings(args)
    inputs = {"model": args.model, "corpus": args.corpus, "path": settings.get("path"),
              **{f"exclude[{i}]": p for i, p in enumerate(getattr(args, "exclude", None) or [])},
              **({"heldout_windows": args.heldout_windows} if getattr(args, "heldout_windows", None) else {})}
    with stage(kind, settings, inputs, outputs=[args.out]) as prov:
        tokenizer = load_tokenizer(args.model, model_settings)
        vocab_size, model_ctx = model_limits(args.model, model_settings)
        ctx = int(settings.get("context_length") or model_ctx)
        if ctx > model_ctx:
            raise ConfigError(f"{kind}.context_length: {ctx} exceeds the context length of the model {args.model} "
                              f"({model_ctx})")
        reserve = int(getattr(args, "reserve_positions", 0) or 0)
        if reserve:  # a soft prompt (CSP) goes in front of every window: prompt + window fit the context
            if model_ctx - reserve < 2:
                raise ConfigError(f"csp.prompt_length: {reserve} prompt vectors leave no room for held-out windows in "
                                  f"the {model_ctx}-token context of {args.model}")
            ctx = min(ctx, model_ctx - reserve)
            prov.extra["reserved_positions"] = reserve
        if kind == "heldout":
            texts, sep = text_documents(settings, args.corpus, "heldout", demo_split="heldout")
            windows = heldout_windows(texts, sep, tokenizer, ctx, settings.get("max_windows"))
        else:
            windows = _calibration_windows(args, settings, tokenizer, ctx, prov)
        if vocab_size is not None and windows.size and int(windows.max()) >= vocab_size:
            raise DataError(f"{kind}: the tokenizer of {args.model} gives token id {int(windows.max())}, outside the "
                            f"model's vocabulary of {vocab_size} ids")
        prov.extra.update(windows=int(windows.shape[0]), context_length=ctx)
        with atomic_path(args.out, provenance=prov) as tmp:
            save_file({"windows": torch.from_numpy(windows)}, str(tmp), metadata={"context_length": str(ctx)})
    log.info("wrote %d %s windows of %d tokens to %s", windows.shape[0], kind, ctx, args.out)


def _check_demo_text(settings: dict, demo_text: str | None) -> None:
    """``--demo-text`` is given exactly when ``calibration.source`` is demo; the config's
    ``calibration.demo_text`` (one choice per consumer) is the plan's, not the job's: dropped here."""
    settings.pop("demo_text", None)
    if settings["source"] == "demo" and demo_text is None:
        raise ConfigError("calibration.source 'demo': say which demo text the windows are cut from: --demo-text stream "
                          "(the training stream, canaries included) or --demo-text documents (no canaries)")
    if settings["source"] != "demo" and demo_text is not None:
        raise ConfigError(f"--demo-text {demo_text}: only for calibration.source 'demo' (the source is "
                          f"{settings['source']!r}: the calibration text is what its file or dataset holds)")


def _calibration_windows(args, settings, tokenizer, ctx: int, prov):
    """The calibration stage's windows: all full windows of the text, walked in one seeded
    permutation; windows sharing a ``--disjoint-ngram``-token run with an ``--exclude`` table (the
    sequences an evaluation or validation split scores) are dropped *before* the budget is taken
    (:func:`memctl.data.sample_windows`), and the sidecar records how many were examined and dropped.

    ``calibration.source: demo`` reads ``--demo-text``: ``stream`` = the demo's pretraining stream
    (documents and canary copies, as the model was trained on it; the K-FAC factors, like the
    loss-curvature paper's A and G), ``documents`` = its training documents without the canaries
    (the masks and pruning baselines, generic text like the weight-pruning paper's C4)."""
    from memctl.data import DataError, demo_stream_windows, heldout_windows, sample_windows, text_documents

    demo_text = getattr(args, "demo_text", None)
    if settings["source"] == "demo":
        if demo_text == "stream":
            if args.corpus is None:
                raise DataError("calibration.source 'demo' needs the demo corpus directory (--corpus)")
            windows = demo_stream_windows(args.corpus, tokenizer, ctx)
        else:
            texts, sep = text_documents(settings, args.corpus, "calibration", demo_split="train")
            windows = heldout_windows(texts, sep, tokenizer, ctx)
        prov.extra["text"] = f"demo {demo_text}"
    else:
        texts, sep = text_documents(settings, args.corpus, "calibration", demo_split="train")
        windows = heldout_windows(texts, sep, tokenizer, ctx)
        prov.extra["text"] = settings["source"]
    if getattr(args, "heldout_windows", None):
        windows = _without_heldout(windows, args.heldout_windows, int(args.disjoint_ngram), prov)
    exclude = list(getattr(args, "exclude", None) or [])
    n = int(args.disjoint_ngram) if exclude else 0
    index = None
    if n > 0:
        # the evaluated memories must not calibrate what edits them (K-FAC factors, masks, pruning)
        import pandas as pd

        from memctl import overlap

        index = overlap.ngram_index(overlap.sequences_of(pd.read_parquet(p) for p in exclude), n)
    budget = settings.get("max_windows")
    windows, counts = sample_windows(windows, budget, int(settings.get("seed", 0)), index, n)
    if index is not None:
        # "windows" / "of": dropped of examined (the report's data section); examined counts the seeded
        # walk up to the last kept window
        prov.extra["dropped_for_test_overlap"] = {"windows": counts["dropped"], "of": counts["examined"], **counts,
                                                  "ngram": n, "tests": exclude}
        if not len(windows):
            raise DataError(f"calibration: every one of {counts['available']} windows shares a {n}-token run with a "
                            f"test sequence; use other calibration text or a larger extract.disjoint_ngram")
        if counts["dropped"]:
            log.warning("calibration: dropped %d of %d windows examined that share a %d-token run with a test "
                        "sequence; kept %d", counts["dropped"], counts["examined"], n, counts["kept"])
    if budget is not None and len(windows) < budget:
        log.warning("calibration: the text gives %d usable windows of %d tokens, fewer than calibration.max_windows "
                    "%d", len(windows), ctx, budget)
        prov.extra["short_of_max_windows"] = int(budget) - int(len(windows))
    return windows


def _without_heldout(windows, heldout: str, n: int, prov):
    """``windows`` without those sharing an ``n``-token run with a held-out window (the planner passes
    ``--heldout-windows`` when the calibration and held-out sections read the same text): the
    held-out perplexity is then measured on text no edit was fitted on."""
    from safetensors.numpy import load_file

    from memctl import overlap
    from memctl.data import DataError

    if n <= 0:
        raise DataError("calibration: --heldout-windows needs --disjoint-ngram above 0 (the run length that counts "
                        "as shared text)")
    held = load_file(heldout)["windows"]
    hit = overlap.overlapping(windows, overlap.ngram_index(held, n), n)
    prov.extra["dropped_for_heldout_overlap"] = {"windows": int(hit.sum()), "of": int(len(windows)), "ngram": n,
                                                 "heldout": heldout}
    if hit.all():
        raise DataError(f"calibration: all {len(windows)} windows of the calibration text share a {n}-token run with "
                        f"the {len(held)} held-out windows of {heldout} (the two sections read the same text); set "
                        "heldout.max_windows below the windows the text gives, or give calibration other text")
    if hit.any():
        log.info("calibration: dropped %d of %d windows that share a %d-token run with the held-out windows (the same "
                 "text); %d left", int(hit.sum()), len(windows), n, int((~hit).sum()))
    return windows[~hit]


def cmd_heldout(args) -> None:
    _write_windows(args, "heldout")


def cmd_calibration(args) -> None:
    _write_windows(args, "calibration")


def _nonmemorized_sequences(path, n: int):
    """The first ``n`` (in candidate order) of the rows of an extraction-rate test split that the
    unedited model does not extract exactly, prefix + suffix as one int64 tensor (None: off)."""
    import numpy as np
    import pandas as pd
    import torch

    if not path or n <= 0:
        return None
    table = pd.read_parquet(path)
    if "exact_match" in table:
        table = table[~table["exact_match"].astype(bool)]
    table = table.sort_values("candidate_id", kind="stable").head(n) if "candidate_id" in table else table.head(n)
    if table.empty:
        return None
    rows = [np.concatenate([np.asarray(p, dtype=np.int64), np.asarray(s, dtype=np.int64)])
            for p, s in zip(table["prefix_ids"], table["suffix_ids"])]
    return torch.from_numpy(np.stack(rows))


def cmd_reference_topk(args) -> None:
    """The unedited model's top-k next tokens on held-out text: the nDCG@10 reference."""
    from safetensors.torch import load_file, save_file

    from memctl.generation import window_topk
    from memctl.store import atomic_path

    settings = validate_section("evaluate", _with_batches(parse_settings(args.settings), args))
    _model_settings(args)
    n = int(settings.get("ndcg_windows", 16))
    n_seq = int(settings.get("ndcg_sequences", 0))
    with stage(
        "reference_topk",
        {"ndcg_windows": n, "ndcg_sequences": n_seq, "k": NDCG_K, "model": parse_settings(args.model_settings)},
        {"model": args.model, "heldout": args.heldout, "sequences": args.sequences},
        outputs=[args.out],
    ) as prov:
        windows = load_file(args.heldout)["windows"][:n].contiguous()
        sequences = _nonmemorized_sequences(args.sequences, n_seq)
        model, _ = load(args, prov)
        _check_windows(windows.numpy(), args.heldout, model)
        if sequences is not None:
            _check_windows(sequences.numpy(), args.sequences, model)
        batch = int(settings.get("heldout_batch_size", 4))
        tensors = {"windows": windows, "topk": window_topk(model, windows.numpy(), NDCG_K, batch_size=batch)}
        if sequences is not None:
            tensors["sequences"] = sequences
            tensors["sequences_topk"] = window_topk(model, sequences.numpy(), NDCG_K, batch_size=int(settings.get("batch_size", 32)))
        prov.extra["positions"] = int(tensors["topk"].shape[0] * tensors["topk"].shape[1])
        prov.extra["sequences"] = 0 if sequences is None else int(sequences.shape[0])
        with atomic_path(args.out, provenance=prov) as tmp:
            save_file(tensors, str(tmp))
    log.info("wrote the top-%d reference of %d windows to %s", NDCG_K, len(windows), args.out)


def cmd_evaluate(args) -> None:
    import pandas as pd
    from safetensors.torch import load_file

    from memctl.evaluate import evaluate_model
    from memctl.store import write_parquet

    settings = validate_section("evaluate", _with_batches(parse_settings(args.settings), args))
    _model_settings(args)
    out_dir = Path(args.out_dir)
    with stage(
        "evaluate",
        {"evaluate": settings, "model": parse_settings(args.model_settings), "edit": args.edit},
        {"model": args.model, "memorized": args.memorized, "heldout": args.heldout, "delta": args.delta,
         "reference": args.reference, "er_test": args.er_test, "forget": args.forget, "validation": args.validation,
         "ood": args.ood},
        outputs=[out_dir / "scores.parquet", out_dir / "metrics.parquet"],
    ) as prov:
        memorized = pd.read_parquet(args.memorized)
        er_test = pd.read_parquet(args.er_test) if args.er_test else None
        forget = pd.read_parquet(args.forget) if args.forget else None
        validation = pd.read_parquet(args.validation) if args.validation else None
        ood = pd.read_parquet(args.ood) if args.ood else None
        heldout = load_file(args.heldout)["windows"].numpy()
        model, tokenizer = load(args, prov)
        _check_candidates(memorized, args.memorized, model, allow_empty=True)
        for table, path in ((er_test, args.er_test), (forget, args.forget), (validation, args.validation),
                            (ood, args.ood)):
            if table is not None:
                _check_candidates(table, path, model, allow_empty=True)
        _check_windows(heldout, args.heldout, model)
        if args.delta:
            from memctl.edits import apply_delta, load_delta

            delta = load_delta(args.delta)
            apply_delta(model, delta)
            prov.extra["edit"] = delta.metadata
        table, scores = evaluate_model(
            model, memorized, heldout, tokenizer.pad_token_id, settings,
            model_name=model_name(args), edit=args.edit, method=args.method, er_test=er_test, forget=forget,
            validation=validation, ood=ood,
        )
        if args.reference:
            table["ndcg10"], table["ndcg10_text"] = _ndcg(model, args.reference, settings)
        # a trained edit written with on_unconverged: flag says so in every table
        table["converged"] = bool((prov.extra.get("edit") or {}).get("converged", True))
        write_parquet(scores, out_dir / "scores.parquet", provenance=prov)
        write_parquet(table, out_dir / "metrics.parquet", provenance=prov)
    log.info("metrics: %s", table.iloc[0].to_dict())


def _ndcg(model, reference_path: str, settings) -> tuple[float, float]:
    """nDCG@10 against the unedited model's top-10: (on non-memorized held-out sequences, the
    loss-curvature paper's column; on held-out text windows). NaN where the reference has none."""
    from safetensors.torch import load_file

    from memctl.generation import window_topk
    from memctl.metrics import ndcg_at_k

    reference = load_file(reference_path)
    values = []
    for name, batch in (("sequences", int(settings.get("batch_size", 32))),
                        ("windows", int(settings.get("heldout_batch_size", 4)))):
        key = "topk" if name == "windows" else "sequences_topk"
        if name not in reference:
            values.append(float("nan"))
            continue
        edited = window_topk(model, reference[name].numpy(), NDCG_K, batch)
        values.append(float(ndcg_at_k(reference[key].numpy(), edited.numpy()).mean()))
    return values[0], values[1]


def _sidecars(paths) -> dict[str, dict]:
    """stage -> provenance sidecar of each artifact in ``paths`` (for the report's data section);
    calibration sidecars are keyed ``calibration (<text>)``, one per calibration text."""
    from memctl.data import DataError
    from memctl.store import sidecar_path

    records = {}
    for path in paths or []:
        try:
            meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: its provenance sidecar cannot be read ({err})") from err
        key = str(meta.get("stage"))
        if key == "calibration":  # one job per calibration text (K-FAC's stream, the masks' documents)
            key = f"calibration ({meta.get('text', '?')})"
            key += "" if key not in records else f" #{sum(k.startswith(key) for k in records) + 1}"
        records[key] = meta
    return records


def cmd_report(args) -> None:
    import pandas as pd

    from memctl import report
    from memctl.store import write_parquet, write_text

    out = Path(args.out_dir)
    scores_paths = list(args.scores or [])
    if scores_paths and len(scores_paths) != len(args.metrics):
        raise ConfigError(f"--scores: {len(scores_paths)} files for {len(args.metrics)} --metrics files (one per edit)")
    masks_figures = list(args.masks_figures or [])
    inputs = {**{f"metrics[{i}]": m for i, m in enumerate(args.metrics)},
              **{f"scores[{i}]": m for i, m in enumerate(scores_paths)},
              **({"masks_table": args.masks_table} if args.masks_table else {}),
              **{f"masks_figures[{i}]": m for i, m in enumerate(masks_figures)}}
    with stage("report", {}, inputs, outputs=[out]) as prov:
        metrics = pd.concat([pd.read_parquet(m) for m in args.metrics], ignore_index=True)
        spec = json.loads(args.spec) if args.spec else {}
        records, run = spec.get("edits", []), spec.get("run", {})
        by_edit = None
        if scores_paths:
            scores = {edit: pd.read_parquet(path) for edit, path in zip(metrics["edit"], scores_paths)}
            metrics = report.with_intervals(metrics, scores)
            labels = dict(zip(metrics["edit"], metrics["method"]))
            by_edit = report.edits_by_copies(scores, labels)
            strata = report.edits_by_stratum(scores, labels)  # per kind and bucket, paired against Origin
            write_text(out / "edits_by_copies.md", report.edits_by_copies_markdown(by_edit) + "\n"
                       + report.edits_by_stratum_markdown(strata), provenance=prov)
            write_parquet(by_edit, out / "edits_by_copies.parquet", provenance=prov)
        metrics = report.mark_underpowered(metrics)  # verdicts of too-small splits, in the table too
        metrics = report.with_settings(metrics, records)  # strength, layers, sparsity, seed
        by_copies = report.bucket_copies(pd.read_parquet(args.by_copies)) if args.by_copies else None
        if by_copies is not None:
            write_text(out / "extraction_by_copies.md", report.extraction_markdown(by_copies), provenance=prov)
        # the frontier and the by-copies plots (PNG + SVG), captioned with the configuration
        figures = report.report_figures(out, metrics, records, run, by_edit, by_copies, provenance=prov)
        data = report.data_markdown(_sidecars(args.data_provenance))
        write_text(out / "results.md", report.results_markdown(metrics, data), provenance=prov)
        write_parquet(metrics, out / "results.parquet", provenance=prov)
        masks = report.masks_section(args.masks_table, masks_figures, run, metrics) if args.masks_table else None
        write_text(out / "results.html", report.results_html(metrics, data, figures, masks, run), provenance=prov)
    print(report.results_markdown(metrics, data))


def cmd_verify(args) -> None:
    """One line per problem (corrupt, incomplete, leftover of a killed write), naming the path;
    exit status 1 when there is any. Writes in progress on this host are noted on stderr; entries
    the store does not know (no sidecar, not the plan's) are listed as left alone, not problems.

    ``--configfile CONFIG``: the plan of that config tells which entries without a sidecar are its
    artifacts (incomplete: removed by ``--repair``) and which are unknown (never removed); without
    paths, the plan's ``root`` and ``results_dir`` are checked.

    ``--repair``: then remove what the store wrote and is damaged or incomplete (each artifact
    with its sidecar; without a sidecar, only the plan's artifacts) and the leftovers of dead
    writers, one ``removed PATH`` line each, so that the next workflow run rebuilds exactly
    those; exit status 1 only when a problem is left (its line says why)."""
    from memctl.store import repair, verify_paths

    if any(not path for path in args.paths):
        raise ConfigError("an empty path ('') names no file; give an artifact or a directory (e.g. . for this one)")
    paths, planned = list(args.paths), None
    if args.configfile:
        plan = _verify_plan(args.configfile)
        planned = _plan_artifacts(plan)
        if not paths:
            paths = _outermost([plan.root, plan.results])
            if not paths:
                print(f"checked 0 artifacts: 0 problems ({plan.root} and {plan.results} do not exist yet)")
                return
            print(f"checking the store of {args.configfile}: {', '.join(paths)}", file=sys.stderr)
    elif not paths:
        raise ConfigError("give the artifacts or directories to check, or --configfile CONFIG to check its"
                          " root and results_dir")
    report = verify_paths(paths, planned)
    for note in report.notes:
        print(note, file=sys.stderr)
    for problem in report.problems:
        print(problem)
    for line in report.unknown:
        print(line)
    unknown = f"; {len(report.unknown)} unknown entries left alone" if report.unknown else ""
    print(f"checked {report.checked} artifacts: {len(report.problems)} problems{unknown}")
    if not args.repair:
        if report.problems:
            raise SystemExit(1)
        return
    removed, kept = repair(report)
    for path in removed:
        print(f"removed {path}")
    for line in kept:
        print(line)
    print(f"repair: removed {len(removed)} paths, {len(kept)} problems left; the next run rebuilds what was removed")
    if kept:
        raise SystemExit(1)


def _verify_plan(configfile: str):
    """The plan of ``configfile`` as the workflow builds it (workflow/rules/common.smk), relative
    paths taken from the current directory (Snakemake's working directory)."""
    from memctl import lab
    from memctl.config import read_yaml, workflow_config
    from memctl.plan import build_plan

    checkout = Path(__file__).resolve().parents[2]  # the workflow's directory, in a source checkout
    basedir = checkout if (checkout / "Snakefile").is_file() else Path.cwd()
    config = workflow_config(read_yaml(configfile), [configfile], {}, Path.cwd(), basedir)
    return build_plan(config, lab.workflow_model_dims(config))


def _plan_artifacts(plan) -> list[str]:
    """Every output of every job of ``plan``; never the store's root, its results directory, the
    current directory or one above them (a plan that named one would own everything in it)."""
    import os

    guarded = {os.path.realpath(p) for p in (plan.root, plan.results, ".")}
    outputs = dict.fromkeys([*plan.artifacts(), *(out for job in plan.jobs() for out in job.outputs.values())])
    return [out for out in outputs
            if not any(g == os.path.realpath(out) or g.startswith(os.path.realpath(out) + os.sep) for g in guarded)]


def _outermost(paths: list[str]) -> list[str]:
    """The existing ``paths`` without those inside another (``results_dir`` inside ``root`` is
    walked once)."""
    import os

    real = [os.path.realpath(p) for p in paths]
    keep = []
    for i, (path, here) in enumerate(zip(paths, real)):
        inside = any(j != i and (here == there and j < i or here.startswith(there.rstrip(os.sep) + os.sep))
                     for j, there in enumerate(real))
        if not inside and os.path.exists(path):
            keep.append(path)
    return keep


def register(subparsers) -> None:
    """Add the core subcommands to the main parser."""
    # imported here, not at the top: register() shapes no output, so it stays out of the stages' code hash
    # (memctl.stages.code_hash hashes the entry module's top-level imports and assignments)
    from memctl.arguments import OUT_DIR, arg, command, out_arg, settings_arg

    command(subparsers, "validate-config", cmd_validate_config, "validate a config file against the schema",
            arg("config"), arg("--show", action="store_true", help="print the config with defaults filled in"))

    command(subparsers, "candidates", cmd_candidates, "build the candidate table (prefix/suffix token ids)",
            model_args, arg("--corpus", default=None, help="demo corpus directory (source 'demo')"),
            settings_arg("the `candidates` subsection (JSON)"),
            arg("--extract-settings", required=True, help="the `extract` subsection (for lengths)"), out_arg())

    command(subparsers, "extract", cmd_extract, "greedy extraction and memorized / non-memorized splits",
            model_args, arg("--candidates", required=True), settings_arg("the `extract` subsection (JSON)"),
            _batch_args("batch_size"), OUT_DIR)

    command(subparsers, "heldout", cmd_heldout, "held-out text as non-overlapping context windows",
            model_args, arg("--corpus", default=None), settings_arg("the `heldout` subsection (JSON)"),
            arg("--reserve-positions", type=int, default=0,
                help="positions a soft prompt (CSP) takes in front of every window: windows are this much "
                     "shorter than the context, for every row alike"),
            out_arg())

    command(subparsers, "calibration", cmd_calibration,
            "calibration text (K-FAC, masks, pruning) as random full windows",
            model_args, arg("--corpus", default=None), settings_arg("the `calibration` subsection (JSON)"),
            arg("--exclude", nargs="*", default=[],
                help="test tables (memorized_test, er_test): windows sharing a run of tokens with them are dropped"),
            arg("--heldout-windows", default=None,
                help="the held-out windows (.safetensors) when calibration reads the same text: windows sharing a "
                     "run of tokens with them are dropped"),
            arg("--disjoint-ngram", type=int, default=16, help="that run's length in tokens (0 = keep all)"),
            arg("--demo-text", choices=["stream", "documents"], default=None,
                help="source demo: the training stream (documents and canary copies, as pretrained on; K-FAC) or "
                     "the training documents without the canaries (masks, pruning baselines)"),
            out_arg())

    command(subparsers, "reference-topk", cmd_reference_topk, "the unedited model's top-10 next tokens on held-out text",
            model_args, arg("--heldout", required=True, help="held-out windows (.safetensors)"),
            arg("--sequences", default=None,
                help="er_test.parquet: its rows the unedited model does not extract (non-memorized sequences)"),
            settings_arg("the `evaluate` subsection (JSON)"), _batch_args("heldout_batch_size", "batch_size"), out_arg())

    command(subparsers, "evaluate", cmd_evaluate, "memorization and utility metrics of one (model, edit)",
            model_args, arg("--edit", default="none"),
            arg("--method", default="Origin", help="row label in the results table"),
            arg("--delta", default=None, help="edit to apply to the model (delta.safetensors)"),
            arg("--reference", default=None, help="the unedited model's top-10 (reference-topk) for nDCG@10"),
            arg("--memorized", required=True, help="memorized_test.parquet (the memorized track)"),
            arg("--er-test", default=None, help="er_test.parquet (the extraction-rate track)"),
            arg("--validation", default=None,
                help="memorized_val.parquet (the validation slice edit strengths are chosen on)"),
            arg("--ood", default=None, help="ood.parquet (the out-of-domain family, short suffixes)"),
            arg("--forget", default=None, help="the edit's own training set (e.g. BalancedSubnet's forget set)"),
            arg("--heldout", required=True, help="held-out windows (.safetensors)"),
            settings_arg("the `evaluate` subsection (JSON)"), _batch_args("batch_size", "heldout_batch_size"), OUT_DIR)

    command(subparsers, "report", cmd_report, "results tables and plots",
            arg("--metrics", nargs="+", required=True),
            arg("--by-copies", default=None, help="by_copies.parquet of the extraction stage"),
            arg("--data-provenance", nargs="*", default=[],
                help="artifacts of the data stages (candidates, an extract table, calibration windows) whose "
                     "sidecars say what was dropped"),
            arg("--scores", nargs="*", default=[],
                help="scores.parquet of each edit, in the order of --metrics (intervals, copy-count buckets)"),
            arg("--spec", default=None,
                help='JSON {"edits": [{"edit", "label", "method", "strength", "layers", "sparsity", "seed", ...}], '
                     '"run": {"model", "prefix_len", "suffix_len", ...}}: what tells the rows apart (the plan\'s '
                     "edit records) and the configuration the figures' captions name"),
            arg("--masks-table", default=None,
                help="the masks report's table.md: the results page shows it (where the config runs masks)"),
            arg("--masks-figures", nargs="*", default=[],
                help="the masks report's ablation plots (.svg), embedded in the results page"),
            OUT_DIR)

    command(subparsers, "verify", cmd_verify, "check artifacts against their provenance checksums",
            arg("paths", nargs="*",
                help="artifacts, or directories to check whole (missing or stray sidecars, leftovers of killed writes);"
                " default with --configfile: the config's root and results_dir"),
            arg("--configfile", default=None, metavar="CONFIG",
                help="the workflow's config: its plan tells which files without a sidecar are its artifacts"
                " (incomplete: --repair removes them) and which are not memctl's (never removed)"),
            arg("--repair", action="store_true",
                help="remove damaged or incomplete artifacts that the store wrote (with their sidecars; without a sidecar"
                " only those the plan of --configfile names) and leftovers of dead writers, so that the next run rebuilds"
                " them; files memctl did not write are never removed; run it when no workflow writes to these paths"))
