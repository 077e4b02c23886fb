"""``memctl`` subcommands of the masks stages: train-mask, prune, balanced-subnet, csp, masks-report.

Each writes its edit as a ``delta.safetensors`` (bit-packed keep-masks, SparseGPT's updated
weights, or CSP's soft prompt) with a provenance sidecar (which records the training cost: wall time,
device, tokens processed), so ``memctl evaluate --delta`` scores it like every other edit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from memctl.runner import count_tokens, load, model_args, stage

log = logging.getLogger("memctl.masks")


def _public_stats(stats: dict) -> dict:
    """Stats small enough for the delta's header (per-matrix detail goes to the sidecar)."""
    return {k: v for k, v in stats.items() if k != "per_matrix_sparsity"}


def cmd_train_mask(args) -> None:
    from memctl.config import parse_settings
    from memctl.edits import save_delta
    from memctl.masks.data import load_windows, sequences_from_table
    from memctl.masks.settings import MaskJob
    from memctl.masks.training import train_mask
    from memctl.store import write_parquet

    # the planner resolved the job (memctl.masks.settings.resolve_mask_job); here it is only read back
    job = MaskJob.from_json(args.settings)
    if job.mode != "none" and not args.memorized:
        raise FileNotFoundError(f"mode {job.mode!r} needs --memorized (the memorized training split)")
    with stage(
        "train_mask",
        {"masks": job.to_dict(), "model": parse_settings(args.model_settings)},
        {"model": args.model, "calibration": args.calibration, "memorized": args.memorized},
        outputs=[args.out, args.log],
    ) as prov:
        calibration = load_windows(args.calibration)
        memorized = sequences_from_table(args.memorized, job.mem_loss_tokens) if job.mode != "none" else None
        model, _ = load(args, prov)
        work_dir = Path(args.work_dir or Path(args.out).parent)
        work_dir.mkdir(parents=True, exist_ok=True)
        # Fails (NotConvergedError, a ConfigError: one message, exit status 2) when the mask did not reach
        # its target and on_unconverged is 'fail'; with 'flag' the delta says converged: false.
        # The sidecar's training cost is the whole job's: a resumed run adds what its checkpoint says
        # the earlier segments cost (tokens, forward calls, wall time) to its own.
        result = train_mask(model, calibration, memorized, job, work_dir=work_dir, started=prov.started)
        prov.extra["cost"] = {k: result.cost[k] for k in ("tokens_processed", "forward_calls", "segments",
                                                          "devices", "resumed_at_iteration")}
        prov.extra["wall_time_s"] = round(result.cost["earlier_wall_time_s"] + time.time() - prov.started, 3)
        # steps / lr as trained (null = one pass over the windows / sized to the run: derived here)
        resolved = {**job.to_dict(), "steps": result.stats["steps"], "lr": result.stats["lr"]}
        meta = {"method": "mask", "label": args.label, "mode": job.mode, "settings": resolved,
                **_public_stats(result.stats)}
        prov.extra["stats"] = result.stats
        prov.extra["resolved_settings"] = resolved
        save_delta(args.out, masks=result.masks, metadata=meta, provenance=prov)
        write_parquet(result.log, args.log, provenance=prov)
    target = "none: lambda_s 0" if result.stats["target_sparsity"] is None else f"{job.sparsity:.3f}"
    log.info("%s mask: sparsity %.4f (target %s, %s); %d iterations (%s), lr %.4g (%s); final calibration "
             "loss %.4f%s", job.mode, result.stats["sparsity"], target,
             result.stats["mask_rule"], result.stats["steps"], result.stats["steps_rule"], result.stats["lr"],
             result.stats["lr_rule"], result.log["calib_loss"].iloc[-1],
             "" if result.stats["converged"] else "; DID NOT CONVERGE: " + result.stats["unconverged_reason"])


def cmd_sample_memories(args) -> None:
    """The forget track's rows: a seeded sample of the masks' training memories (``er_train``),
    scored by the evaluation of every edit trained on them, of the `none` masks and of Origin."""
    import pandas as pd

    from memctl.masks.data import sample_rows
    from memctl.masks.settings import OwnMemories
    from memctl.store import write_parquet

    own = OwnMemories.from_json(args.settings)  # resolved by the planner (resolve_own_memories)
    with stage("sample_memories", {"own_memories": own.to_dict()}, {"table": args.table}, outputs=[args.out]) as prov:
        table = pd.read_parquet(args.table)
        sample = sample_rows(table, own.rows, own.seed)
        prov.extra["rows"] = {"available": int(len(table)), "kept": int(len(sample))}
        write_parquet(sample, args.out, provenance=prov)
    log.info("own training memories: %d of the %d rows of %s", len(sample), len(table), args.table)


def cmd_prune(args) -> None:
    from memctl.config import parse_settings
    from memctl.edit_methods import baseline
    from memctl.edits import save_delta
    from memctl.masks.data import load_windows
    from memctl.masks.settings import PruneJob
    from memctl.pruning.runner import prune_model

    job = PruneJob.from_json(args.settings)  # resolved by the planner (resolve_prune_job), read back
    reads_data = baseline(job.method).reads_data  # calibration statistics (memctl.edit_methods)
    if job.second_moments == "kfac" and reads_data and not args.factors:
        raise FileNotFoundError("pruning.second_moments is 'kfac' but no --factors file was given")
    settings = job.to_dict()  # prune_model (memctl.pruning.runner) and the delta's metadata take plain settings
    with stage(
        "prune_baseline",
        {"pruning": settings, "model": parse_settings(args.model_settings)},
        {"model": args.model, "calibration": args.calibration, "factors": args.factors},
        outputs=[args.out],
    ) as prov:
        calibration = None
        if reads_data and job.second_moments == "calibration":
            if not args.calibration:
                raise FileNotFoundError(f"{job.method} needs --calibration windows")
            calibration = load_windows(args.calibration, job.calibration_windows)
        factors = _load_factors(args.factors) if job.second_moments == "kfac" and args.factors else None
        model, _ = load(args, prov)
        result = prune_model(model, settings, calibration, factors)
        # layer-wise passes bypass the model's forward: the calibration tokens it pruned with
        prov.extra["cost"] = {"tokens_processed": int(result.stats.get("calibration_tokens", 0))}
        meta = {"method": job.method, "label": args.label, "form": result.stats["form"],
                "settings": settings, **_public_stats(result.stats)}
        prov.extra["stats"] = result.stats
        save_delta(args.out, replace=result.replace, masks=result.masks, metadata=meta, provenance=prov)
    log.info("%s (%s): sparsity %.4f (target %.3f)", job.method, result.stats["form"],
             result.stats["sparsity"], job.sparsity)


def _load_factors(path):
    """K-FAC A factors by input key (``layer3.mlp_in``): the curvature stage's factors directory
    (``layer-NNN.safetensors`` files), or one safetensors file with ``A/<input_key>`` tensors."""
    if Path(path).is_dir():
        from memctl.curvature.store import load_factors

        return load_factors(path).A
    from safetensors.torch import load_file

    factors = {k[2:]: v for k, v in load_file(str(path)).items() if k.startswith("A/")}
    if not factors:
        raise FileNotFoundError(f"{path}: no A/<input_key> factors found")
    return factors


def cmd_balanced_subnet(args) -> None:
    from memctl.config import parse_settings
    from memctl.edits import save_delta
    from memctl.masks.balanced_subnet import train_balanced_subnet
    from memctl.masks.data import (
        load_windows,
        sequences_from_table,
        sequences_from_windows,
    )
    from memctl.masks.settings import BalancedSubnetJob
    from memctl.store import write_parquet

    job = BalancedSubnetJob.from_json(args.settings)  # resolved by the planner (resolve_balanced_subnet), read back
    settings = job.to_dict()  # the provenance and the delta's metadata take plain settings
    with stage(
        "balanced_subnet",
        {"balanced_subnet": settings, "model": parse_settings(args.model_settings)},
        {"model": args.model, "forget": args.forget, "retain": args.retain},
        outputs=[args.out, args.log],
    ) as prov:
        forget = sequences_from_table(args.forget, job.loss_tokens)
        if str(args.retain).endswith(".safetensors"):
            retain = sequences_from_windows(load_windows(args.retain))
        else:
            retain = sequences_from_table(args.retain, job.loss_tokens)
        model, _ = load(args, prov)
        # Fails (NotConvergedError: one message, exit status 2) when the final mask is (almost) the initial
        # one and on_unconverged is 'fail'; with 'flag' the delta says converged: false.
        with count_tokens(model) as cost:
            result = train_balanced_subnet(model, forget, retain, job)  # a resolved job: not resolved again
        prov.extra["cost"] = {"tokens_processed": cost["tokens"], "forward_calls": cost["forward_calls"]}
        meta = {"method": "balanced_subnet", "label": args.label, "settings": settings,
                **_public_stats(result.stats)}
        prov.extra["stats"] = result.stats
        save_delta(args.out, masks=result.masks, metadata=meta, provenance=prov)
        write_parquet(result.log, args.log, provenance=prov)
    log.info("balanced subnet: sparsity %.4f of %d MLP weights; %.1f%% of the pruned weights moved from the "
             "initial pruning%s", result.stats["sparsity"], result.stats["gated_weights"],
             100 * result.stats["convergence"]["changed_share"],
             "" if result.stats["converged"] else "; DID NOT CONVERGE: " + result.stats["unconverged_reason"])


def cmd_csp(args) -> None:
    from memctl.config import parse_settings
    from memctl.edits import save_delta
    from memctl.masks.csp import CspJob, train_soft_prompt
    from memctl.masks.data import sequences_from_table
    from memctl.store import write_parquet

    job = CspJob.from_json(args.settings)  # resolved by the planner (memctl.masks.csp.resolve_job), read back
    settings = job.to_dict()  # mode up: no theta key
    with stage(
        "csp",
        {"csp": settings, "model": parse_settings(args.model_settings)},
        {"model": args.model, "memorized": args.memorized},
        outputs=[args.out, args.log],
    ) as prov:
        sequences = sequences_from_table(args.memorized, "suffix")  # CSP's loss: suffix tokens only
        model, _ = load(args, prov)
        with count_tokens(model) as cost:
            result = train_soft_prompt(model, sequences, job)
        prov.extra["cost"] = {"tokens_processed": cost["tokens"], "forward_calls": cost["forward_calls"]}
        prov.extra["stats"] = result.stats
        meta = {"method": "csp", "label": args.label, "mode": job.mode, "settings": settings, **result.stats}
        save_delta(args.out, prompt=result.prompt, metadata=meta, provenance=prov)
        write_parquet(result.log, args.log, provenance=prov)
    log.info("csp (%s): %d prompt vectors, %d iterations; train suffix loss %.4f -> %.4f%s", job.mode,
             job.prompt_length, job.steps, result.stats["initial_suffix_loss"],
             result.stats["final_suffix_loss"], f" (theta {job.theta:g})" if job.theta is not None else "")


def cmd_report(args) -> None:
    import pandas as pd

    from memctl.config import parse_settings
    from memctl.masks import report
    from memctl.report import markdown_html
    from memctl.store import write_parquet, write_text

    spec = parse_settings(args.spec)
    entries = spec.get("edits", [])
    out = Path(args.out_dir)
    title = spec.get("title", "Masks and pruning baselines")
    inputs = {f"metrics[{i}]": m for i, m in enumerate(args.metrics)}
    # per-example scores for the paired tests: the evaluate stage writes them beside each metrics file
    for i, m in enumerate(args.metrics):
        if Path(m).name == "metrics.parquet" and Path(m).with_name("scores.parquet").exists():
            inputs[f"scores[{i}]"] = str(Path(m).with_name("scores.parquet"))
    with stage("masks_report", spec, inputs, outputs=[out]) as prov:
        metrics = pd.concat([pd.read_parquet(m) for m in args.metrics], ignore_index=True)
        scores = report.scores_beside(args.metrics)
        for entry in entries:
            entry["measured_sparsity"], meta = report.delta_info(entry.get("delta"))
            entry["mask_rule"] = meta.get("mask_rule")
            entry["converged"] = meta.get("converged")  # false: trained with on_unconverged: flag
            entry["unconverged_reason"] = meta.get("unconverged_reason")
            entry.update(report.delta_cost(entry.get("delta")))  # wall time, device, tokens (its sidecar)
            # the unpruned model's L_mem on the mask's training memories, measured by its job
            entry["unpruned_mem_loss"] = meta.get("unpruned_mem_loss")

        def tested(df, references):
            df = report.with_tests(df, scores, references)
            df = report.mark_unpaired(df, report.pairing(df, references, entries))
            return report.with_own_flags(df)

        main = report.main_table(metrics, entries)
        main = tested(main, report.none_reference(main, entries))
        text = (report.markdown(main, title, trail=report.COST_COLUMNS) + "\n" + report.columns_note(main) + "\n"
                + report.COST_NOTE + report.notes(main))
        if scores:
            text += "\n" + report.TESTS_NOTE
            power = report.power_note(report.power_rows(scores, entries))
            text += ("\n" + power) if power else ""
        write_text(out / "table.md", text, provenance=prov)
        write_parquet(main, out / "table.parquet", provenance=prov)
        pages = [text]
        origin = main[main["method"] == "Origin"].iloc[0].to_dict() if (main["method"] == "Origin").any() else None
        for table, x, panels, heading in [
            ("sparsity", "target_sparsity", report.SPARSITY_PANELS, "Sparsity ablation"),
            ("threshold", "threshold", report.THRESHOLD_PANELS, "Learning-threshold ablation (mode down)"),
        ]:
            df = report.ablation_table(metrics, entries, table)
            if df.empty:
                continue
            df = tested(df, report.none_reference(df, entries))
            lead = [("target_sparsity", "Target", "{:.2f}")] if table == "sparsity" else [("threshold", "t", "{:.2f}")]
            page = (report.markdown(df, heading, lead) + "\n" + report.columns_note(df)
                    + ("\n" + report.TESTS_NOTE if scores else ""))
            vlines = []
            unpruned = report.unpruned_loss(df) if table == "threshold" else None
            if unpruned is not None:
                page += "\n" + unpruned[1]
                vlines = [(unpruned[0], f"unpruned L_mem on the training memories ({unpruned[0]:.2f})")]
            if table == "threshold" and (df["family"] == "csp").any():
                page += "\n" + report.CSP_THRESHOLD_NOTE
            write_text(out / f"ablation_{table}.md", page, provenance=prov)
            write_parquet(df, out / f"ablation_{table}.parquet", provenance=prov)
            report.plot_ablation(df, x, panels, out / f"ablation_{table}.png", heading, origin, vlines,
                                 provenance=prov)  # PNG + SVG
            pages.append(page)
        if spec.get("ablations"):  # masks.ablations: paper Table 5, appendices A and D
            df = report.ablations_table(metrics, entries, spec["ablations"])
            df = report.with_own_flags(report.with_tests(df, scores, report.ablation_reference(df)))
            page = report.markdown(df, "Ablations (paper Table 5, appendices A and D)",
                                   [("ablation", "Ablation", "{}"), ("target_sparsity", "Target", "{:.2f}")])
            page += ("\n" + report.ABLATIONS_NOTE + report.notes(df) + "\n" + report.columns_note(df)
                     + ("\n" + report.TESTS_NOTE if scores else ""))
            write_text(out / "ablations.md", page, provenance=prov)
            write_parquet(df, out / "ablations.parquet", provenance=prov)
            pages.append(page)
        write_text(out / "table.html", markdown_html("\n".join(pages), title), provenance=prov)
    print(text)


def register(subparsers) -> None:
    """Add this stage family's subcommands to the main parser."""
    # imported here, not at the top: register() shapes no output, so it stays out of the stages' code hash
    # (memctl.stages.code_hash hashes the entry module's top-level imports and assignments)
    from memctl.arguments import OUT_DIR, arg, command, out_arg, settings_arg

    label = arg("--label", default=None)  # the edit's row label in the tables, recorded in its delta
    command(subparsers, "train-mask", cmd_train_mask, "train a pruning mask that suppresses or amplifies memorization",
            model_args, arg("--calibration", required=True, help="calibration windows (.safetensors)"),
            arg("--memorized", default=None, help="memorized_train.parquet (modes up, down, reciprocal)"),
            settings_arg("the job's `masks` settings (JSON): mode, sparsity, lambda_s ..."),
            arg("--label", default=None, help="table label recorded in the delta"), out_arg("delta.safetensors to write"),
            arg("--log", required=True, help="train_log.parquet to write"),
            arg("--work-dir", default=None, help="checkpoint directory (default: next to --out)"))

    command(subparsers, "sample-memories", cmd_sample_memories,
            "a seeded sample of the masks' training memories (forget track)",
            arg("--table", required=True, help="er_train.parquet (the masks' and CSP's training memories)"),
            settings_arg("the `masks.own_memories` settings (JSON): rows, seed"),
            out_arg("parquet to write (the rows kept, in the table's order)"))

    command(subparsers, "prune", cmd_prune, "pruning baseline: magnitude, Wanda or SparseGPT",
            model_args,
            arg("--calibration", default=None, help="calibration windows (.safetensors); not needed by magnitude"),
            arg("--factors", default=None, help="K-FAC factors (curvature stage directory) for second_moments 'kfac'"),
            settings_arg("the job's `pruning` settings (JSON): method, form, sparsity ..."), label,
            out_arg("delta.safetensors to write"))

    command(subparsers, "balanced-subnet", cmd_balanced_subnet,
            "BalancedSubnet baseline (forget memorized, retain other text)",
            model_args, arg("--forget", required=True, help="memorized_train.parquet"),
            arg("--retain", required=True, help="nonmemorized.parquet, or calibration windows (.safetensors)"),
            settings_arg("the `pruning.balanced_subnet` settings (JSON)"), label, out_arg(),
            arg("--log", required=True))

    command(subparsers, "csp", cmd_csp, "CSP baseline: a soft prompt trained with the model frozen (suffix loss)",
            model_args, arg("--memorized", required=True, help="er_train.parquet (prefix_ids, suffix_ids)"),
            settings_arg("the job's `csp` settings (JSON): mode, prompt_length, theta ..."), label,
            out_arg("delta.safetensors to write (a prompt/embeddings entry)"),
            arg("--log", required=True, help="train_log.parquet to write"))

    command(subparsers, "masks-report", cmd_report, "paper-style masks tables and ablation plots",
            arg("--metrics", nargs="+", required=True, help="metrics.parquet of Origin and every masks edit"),
            arg("--spec", required=True, help="JSON: {title, edits: [{edit, series, family, tables, delta, ...}]}"),
            OUT_DIR)

