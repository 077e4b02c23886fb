"""``memctl`` subcommands of the curvature stages: collect, merge, decompose, edit, spectrum, report.

Each command reads its settings as JSON (the rule's params) and writes atomically, with a
provenance sidecar for every artifact.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from memctl.runner import load, model_args, set_threads, stage, write_dir

log = logging.getLogger("memctl.curvature")


def _load_model(args, prov, device: str | None = None):
    model, _ = load(args, prov, device=device)
    return model


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like INDEX/COUNT (e.g. 0/2), got {text!r}") from err
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= INDEX < COUNT")
    return i, n


def select_windows(windows, max_tokens: int | None, shard: tuple[int, int] = (0, 1)):
    """The first ceil(max_tokens / context) windows (all when null), then this shard's slice of them.

    Returns (windows, global index of the first one, windows requested, windows available).
    """
    available, ctx = int(windows.shape[0]), int(windows.shape[1])
    wanted = available if max_tokens is None else max(1, math.ceil(int(max_tokens) / ctx))
    n = min(wanted, available)
    i, count = shard
    lo, hi = i * n // count, (i + 1) * n // count
    return windows[lo:hi], lo, wanted, available


# ---------------------------------------------------------------------------------- commands


def cmd_collect(args) -> None:
    from safetensors.torch import load_file

    from memctl import architectures as arch
    from memctl.config import ConfigError, parse_settings, validate_section
    from memctl.curvature.collect import collect_factors
    from memctl.curvature.store import factor_summary, save_factors
    from memctl.store import write_parquet

    settings = parse_settings(args.settings)
    if set(settings) - {"data", "modules"}:
        raise ConfigError(f"kfac-collect --settings: unexpected keys {sorted(set(settings) - {'data', 'modules'})}; "
                          f"expected {{\"data\": curvature.data, \"modules\": curvature.modules}}")
    data = validate_section("curvature.data", settings.get("data", {}))
    modules = validate_section("curvature.modules", settings.get("modules", {}))
    settings = {"data": data, "modules": modules}
    shard = _parse_shard(args.shard)
    out = Path(args.out_dir)
    with stage("collect_kfac", {**settings, "shard": list(shard)}, {"model": args.model, "windows": args.windows},
               outputs=[out / "factors", out / "summary.parquet"]) as prov:
        all_windows = load_file(args.windows)["windows"]
        windows, offset, wanted, available = select_windows(all_windows, data["max_tokens"], shard)
        if wanted > available:
            log.warning("curvature.data.max_tokens asks for %d windows; the calibration file has %d: using all",
                        wanted, available)
        model = _load_model(args, prov)
        try:
            targets = arch.linear_targets(model, groups=modules["groups"], layers=modules["layers"],
                                          roles=modules["roles"])
        except ValueError as err:
            raise ConfigError(f"curvature.modules: {err}") from err
        factors = collect_factors(
            model, windows, targets, labels=data["labels"], seed=int(data["seed"]),  # validated: defaults filled
            batch_size=int(data["batch_size"]), window_offset=offset, progress=True, precision=data["precision"],
        )
        prov.extra.update({
            "precision": factors.meta["precision"],
            "tokens": factors.tokens, "windows": int(windows.shape[0]), "window_offset": offset,
            "windows_requested": wanted, "windows_available": available, "modules": [t.name for t in targets],
        })
        write_dir(out / "factors", lambda tmp: save_factors(factors, tmp), provenance=prov)
        write_parquet(factor_summary(factors), out / "summary.parquet", provenance=prov)
    log.info("K-FAC factors of %d modules over %d tokens -> %s", len(targets), factors.tokens, out)


def cmd_merge(args) -> None:
    import pandas as pd

    from memctl.curvature.store import factor_summary, load_factors, save_factors
    from memctl.store import write_parquet

    from memctl.curvature.decompose import factor_layers

    out = Path(args.out_dir)
    with stage("merge_kfac", {}, {f"shard[{i}]": p for i, p in enumerate(args.inputs)},
               outputs=[out / "factors", out / "summary.parquet"]) as prov:
        tables, tokens = [], None

        def write(tmp):  # one layer at a time: every shard's file of the layer, summed, written, freed
            nonlocal tokens
            for layer in factor_layers(Path(args.inputs[0]) / "factors"):
                merged = None
                for path in args.inputs:
                    f = load_factors(Path(path) / "factors", layers=[layer])
                    merged = f if merged is None else merged.merged(f)
                save_factors(merged, tmp)
                tables.append(factor_summary(merged))
                tokens = merged.tokens

        write_dir(out / "factors", write, provenance=prov)
        prov.extra["tokens"] = tokens
        write_parquet(pd.concat(tables, ignore_index=True), out / "summary.parquet", provenance=prov)
    log.info("merged %d collections: %d tokens -> %s", len(args.inputs), tokens, out)


def cmd_decompose(args) -> None:
    from memctl.curvature.decompose import decompose_device, decompose_directory
    from memctl.store import write_parquet

    set_threads(args.threads)
    out = Path(args.out_dir)
    device = decompose_device(args.device)
    settings = {"eigh": f"{args.precision}, symmetrized, clamped at 0, descending", "device": device.type}
    with stage("decompose_kfac", settings, {"factors": args.factors},
               outputs=[out / "eigen", out / "summary.parquet"]) as prov:
        result = {}

        def write(tmp):  # one layer file at a time: load, decompose, write, free
            result["summary"], result["jitter"] = decompose_directory(args.factors, tmp, device, args.precision)

        created = not out.exists()
        try:
            write_dir(out / "eigen", write, provenance=prov)
        except BaseException:  # e.g. a non-finite factor: leave no empty output directory behind
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            raise
        prov.extra["jitter"] = {k: v for k, v in result["jitter"].items() if v}
        write_parquet(result["summary"], out / "summary.parquet", provenance=prov)
    log.info("eigenbases of %d modules (%s, %s) -> %s", len(result["summary"]), args.precision, device, out)


def cmd_edit(args) -> None:
    from memctl.config import parse_settings
    from memctl.curvature.edit import make_edit
    from memctl.curvature.store import load_eigen
    from memctl.edits import save_delta, write_edited_model

    from memctl.curvature.settings import validate_spec

    spec = validate_spec(parse_settings(args.settings))
    with stage("apply_edit", {"edit": spec, "edit_id": args.edit_id}, {"model": args.model, "eigen": args.eigen},
               outputs=[args.out, args.model_out]) as prov:
        if spec["method"] != "svd" and not args.eigen:
            raise ValueError(f"method {spec['method']} needs --eigen")
        eig = load_eigen(args.eigen, layers=spec["layers"]) if spec["method"] != "svd" else None
        model = _load_model(args, prov, device="cpu")
        replace, stats = make_edit(model, spec, eig)
        meta = {"method": spec["method"], "edit_id": args.edit_id, "spec": spec, "stats": stats}
        prov.extra["stats"] = stats
        save_delta(args.out, replace=replace, metadata=meta, provenance=prov)
        if args.model_out:
            write_edited_model(args.model, parse_settings(args.model_settings), args.out, args.model_out,
                               provenance=prov)
    log.info("%s edit %s of %d matrices -> %s", spec["method"], args.edit_id, len(stats), args.out)


def cmd_spectrum(args) -> None:
    import pandas as pd

    from memctl.config import parse_settings, validate_section
    from memctl.curvature.spectrum import spectrum_table
    from memctl.curvature.store import load_eigen
    from memctl.store import write_parquet

    settings = validate_section("curvature.spectrum", parse_settings(args.settings))
    inputs = {"model": args.model, "eigen": args.eigen, "memorized": args.memorized, "nonmemorized": args.nonmemorized}
    with stage("kfac_spectrum", settings, inputs, outputs=[args.out]) as prov:
        eig = load_eigen(args.eigen, layers=settings.get("layers"))
        roles = settings.get("roles")
        targets = [t for t in eig.targets if roles is None or t.role in roles]
        if not targets:
            raise ValueError(f"curvature.spectrum.roles {roles}: none of the collected matrices has these roles")
        model = _load_model(args, prov)
        table = spectrum_table(model, eig, targets, pd.read_parquet(args.memorized),
                               pd.read_parquet(args.nonmemorized), settings)
        write_parquet(table, args.out, provenance=prov)
    log.info("spectrum bands of %d matrices -> %s", len(targets), args.out)


def cmd_report(args) -> None:
    import pandas as pd

    from memctl.config import parse_settings, validate_section
    from memctl.curvature import report
    from memctl.curvature.spectrum import plot_spectrum
    from memctl.report import markdown_html
    from memctl.store import write_parquet, write_text

    settings = validate_section("curvature.report", parse_settings(args.settings))
    report.selection.Rule.from_settings(settings)  # the declared rule, checked before any input is read
    inputs = {
        **{f"metrics[{i}]": m for i, m in enumerate(args.metrics)},
        **{f"scores[{i}]": m for i, m in enumerate(args.scores or [])}, "memorized": args.memorized,
        "model": args.model,
        **{f"delta[{i}]": d for i, d in enumerate(args.deltas or [])}, "spectrum": args.spectrum,
    }
    out = Path(args.out_dir)
    with stage("curvature_report", settings, inputs, outputs=[out]) as prov:
        metrics = pd.concat([pd.read_parquet(m) for m in args.metrics], ignore_index=True)
        specs = report.read_specs(args.deltas or [])
        spectrum = pd.read_parquet(args.spectrum) if args.spectrum else None
        table = report.edit_table(metrics, specs)
        scores = None
        if args.scores:
            if len(args.scores) != len(args.metrics):
                raise SystemExit(f"--scores: {len(args.scores)} files for {len(args.metrics)} --metrics files")
            scores = {edit: pd.read_parquet(path) for edit, path in zip(metrics["edit"], args.scores)}
            table = report.add_tests(table, metrics, scores)  # exact intervals, paired tests vs unedited
        prepared = report.prepare(table, scores, settings)  # the declared rule: validation slice only
        table, _, choice, _ = prepared
        examples_md = ""
        shown_edits = choice.edits()  # the chosen K-FAC and SVD edits (appendix D)
        if args.scores and args.memorized and args.model and shown_edits:
            from memctl.models import load_tokenizer

            tokenizer = load_tokenizer(args.model, parse_settings(args.model_settings))
            decode = lambda ids: tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)  # noqa: E731
            shown = report.examples(shown_edits, scores, pd.read_parquet(args.memorized), decode,
                                    int(settings.get("examples", 5)))
            examples_md = report.examples_markdown(shown, shown_edits)
        text = report.curvature_markdown(table, settings, spectrum, examples_md, scores, prepared=prepared)
        write_text(out / "curvature.md", text, provenance=prov)
        write_text(out / "curvature.html", markdown_html(text, "Curvature edits (K-FAC vs SVD)"), provenance=prov)
        write_parquet(table, out / "curvature_edits.parquet", provenance=prov)
        # the frontier per track, chosen and paper points marked (PNG + SVG, memctl.plots.save)
        report.plot_frontier(table, choice, out / "curvature_sweep.png", provenance=prov)
        if spectrum is not None:
            plot_spectrum(spectrum, out / "curvature_spectrum.png", provenance=prov)
    print(text)


def register(subparsers) -> None:
    """Add this stage family's subcommands to the main parser."""
    # imported here, not at the top: register() shapes no output, so it stays out of the stages' code hash
    # (memctl.stages.code_hash hashes the entry module's top-level imports and assignments)
    from memctl.arguments import OUT_DIR, arg, command, device_arg, out_arg, settings_arg, threads_arg

    command(subparsers, "kfac-collect", cmd_collect, "K-FAC factors A, G of the target matrices in one data pass",
            model_args, arg("--windows", required=True, help="calibration windows (.safetensors with 'windows')"),
            settings_arg('{"data": curvature.data, "modules": curvature.modules} (JSON)'),
            arg("--shard", default=None, help="INDEX/COUNT: collect only this share of the windows"), OUT_DIR)

    command(subparsers, "kfac-merge", cmd_merge, "add K-FAC collections over disjoint windows",
            arg("--inputs", nargs="+", required=True, help="kfac-collect output directories"), OUT_DIR)

    command(subparsers, "kfac-decompose", cmd_decompose, "eigenbases of the K-FAC factors, one layer at a time",
            arg("--factors", required=True, help="the factors/ directory of kfac-collect"), threads_arg(),
            device_arg("auto (the GPU when one is visible), cpu or cuda[:N]"),
            arg("--precision", choices=("fp64", "fp32"), default="fp64",
                help="fp64, or fp32 accepted when it reconstructs each factor to 1e-5 (else fp64)"),
            OUT_DIR)

    command(subparsers, "curvature-edit", cmd_edit, "one K-FAC or SVD edit as a delta",
            model_args, arg("--eigen", default=None, help="the eigen/ directory of kfac-decompose (K-FAC methods)"),
            settings_arg("the resolved edit spec (JSON)"), arg("--edit-id", default="edit"),
            out_arg("delta.safetensors"),
            arg("--model-out", default=None, help="also write the edited model as a HF directory"))

    command(subparsers, "kfac-spectrum", cmd_spectrum, "memorized vs non-memorized inputs per curvature band",
            model_args, arg("--eigen", required=True), arg("--memorized", required=True),
            arg("--nonmemorized", required=True), settings_arg("curvature.spectrum (JSON)"),
            out_arg("spectrum.parquet"))

    command(subparsers, "curvature-report", cmd_report,
            "tables, the declared K-FAC vs SVD choice and the frontier plot of the curvature edits",
            arg("--metrics", nargs="+", required=True, help="metrics.parquet of the unedited model and each edit"),
            arg("--scores", nargs="*", default=[],
                help="scores.parquet of each --metrics file, in its order (bootstrap intervals)"),
            arg("--memorized", default=None, help="memorized_test.parquet: the examples' prefixes and suffixes"),
            arg("--model", default=None, help="the model whose tokenizer decodes the examples"),
            arg("--model-settings", default="{}", help="the config's `model` subsection (JSON)"),
            arg("--deltas", nargs="*", default=[], help="the edits' delta files (their specs)"),
            arg("--spectrum", default=None), settings_arg("curvature.report (JSON): the selection rule", default="{}"),
            OUT_DIR)
