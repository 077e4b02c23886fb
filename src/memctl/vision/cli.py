"""``memctl`` subcommands of the vision stages: data, train, kfac, edit, evaluate, spectrum, report.

Each reads its config subsection as JSON (``--settings``, checked against the ``vision`` schema so
a command run by hand gets the workflow's checks) and writes atomically with provenance sidecars.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from memctl.runner import set_threads, stage, write_dir

log = logging.getLogger("memctl.vision")


def _settings(args, section: str) -> dict:
    from memctl.config import parse_settings, validate_section

    return validate_section(f"vision.{section}", parse_settings(args.settings))


def _device(args) -> str:
    from memctl.models import resolve_device

    return str(resolve_device(args.device, what="--device"))


def _model_provenance(prov, model, path) -> None:
    import torch

    param = next(model.parameters())
    prov.extra["model_loaded"] = {"ref": str(path), "device": str(param.device),
                                  "dtype": str(param.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads()}


def cmd_data(args) -> None:
    from safetensors.torch import save_file

    from memctl.vision.data import build

    settings = _settings(args, "data")
    out = Path(args.out_dir)
    with stage("vision_data", settings, {"data": settings.get("path")},
               outputs=[out / "labels.parquet", out / "info.json", out / "images.safetensors"]) as prov:
        images, table, info = build(settings)
        prov.extra.update({k: info[k] for k in ("counts", "noised", "n_classes")})

        def write(tmp: Path) -> None:
            table.to_parquet(tmp / "labels.parquet", index=False)
            (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
            if images is not None:
                save_file({"images": images.contiguous()}, str(tmp / "images.safetensors"))

        write_dir(out, write, provenance=prov)
    log.info("%d images (%s), %d noised training labels -> %s", len(table), info["counts"], info["noised"], out)


def cmd_train(args) -> None:
    from memctl.config import parse_settings, validate_section
    from memctl.store import write_parquet
    from memctl.vision.data import ImageSet
    from memctl.vision.model import train_vit

    settings = parse_settings(args.settings)
    if set(settings) != {"model", "train"}:
        raise ValueError(f"vision-train --settings: expected {{\"model\": vision.model, \"train\": vision.train}}, "
                         f"got keys {sorted(settings)}")
    arch = validate_section("vision.model", settings["model"])
    train = validate_section("vision.train", settings["train"])
    set_threads(args.threads)
    out = Path(args.out_dir)
    with stage("vision_train", {"model": arch, "train": train, "device": args.device}, {"data": args.data},
               outputs=[out / "model", out / "train_log.parquet"]) as prov:
        images = ImageSet(args.data)
        model, history = train_vit(images, arch, {**train, "device": _device(args)}, progress=True)
        last = history.dropna().iloc[-1].to_dict() if history.dropna().shape[0] else {}
        prov.extra.update({"final": last, "parameters": int(sum(p.numel() for p in model.parameters()))})
        write_dir(out / "model", lambda tmp: model.save_pretrained(tmp), provenance=prov)
        write_parquet(history, out / "train_log.parquet", provenance=prov)
    log.info("ViT trained: %s -> %s", last, out)


def _load(args, prov):
    from memctl.vision.model import load_vit

    model = load_vit(args.model, _device(args))
    _model_provenance(prov, model, args.model)
    return model


def cmd_kfac(args) -> None:
    from memctl import architectures as arch
    from memctl.curvature.decompose import decompose, eigen_summary
    from memctl.curvature.store import save_eigen, save_factors
    from memctl.store import write_parquet
    from memctl.vision import curvature
    from memctl.vision.data import ImageSet

    settings = _settings(args, "kfac")
    set_threads(args.threads)
    out = Path(args.out_dir)
    with stage("vision_kfac", settings, {"model": args.model, "data": args.data},
               outputs=[out / "factors", out / "eigen", out / "summary.parquet"]) as prov:
        images = ImageSet(args.data)
        model = _load(args, prov)
        targets = arch.linear_targets(model, groups=["mlp"], roles=settings["roles"])
        factors = curvature.collect(model, images, targets, settings, progress=True)
        eig, jitter = decompose(factors)
        prov.extra.update({"tokens": factors.tokens, "images": factors.meta["images"],
                           "modules": [t.name for t in targets], "jitter": {k: v for k, v in jitter.items() if v}})
        write_dir(out / "factors", lambda tmp: save_factors(factors, tmp), provenance=prov)
        write_dir(out / "eigen", lambda tmp: save_eigen(eig, tmp), provenance=prov)
        write_parquet(eigen_summary(factors, eig, jitter), out / "summary.parquet", provenance=prov)
    log.info("K-FAC factors and eigenbases of %d ViT matrices over %d tokens -> %s", len(targets), factors.tokens, out)


def cmd_edit(args) -> None:
    import pandas as pd

    from memctl.curvature.edit import make_edit
    from memctl.curvature.store import load_eigen
    from memctl.edits import save_delta
    from memctl.store import write_parquet
    from memctl.vision import curvature

    settings = _settings(args, "edits")
    method = args.method
    if method not in settings["strengths"] or not settings["strengths"][method]:
        raise ValueError(f"vision-edit --method {method}: vision.edits.strengths has no {method} values")
    if method != "svd" and not args.eigen:
        raise ValueError(f"vision-edit --method {method} needs --eigen")
    set_threads(args.threads)
    out = Path(args.out_dir)
    with stage("vision_edit", {"edits": settings, "method": method}, {"model": args.model, "eigen": args.eigen},
               outputs=[out / "deltas", out / "edits.parquet"]) as prov:
        from memctl.vision.model import load_vit

        model = load_vit(args.model, "cpu")
        _model_provenance(prov, model, args.model)
        eig = load_eigen(args.eigen) if method != "svd" else None
        specs = curvature.edit_specs(settings, method, model.config.num_hidden_layers)
        rows, deltas = [], {}
        for spec in specs:
            edit = curvature.spec_id(spec)
            replace, stats = make_edit(model, spec, eig)
            deltas[edit] = (replace, {"method": method, "edit_id": edit, "spec": spec, "stats": stats})
            rows.append({"edit": edit, "method": method, "label": spec["label"], "unit": spec["unit"],
                         "layers": spec["layers"], "roles": spec["roles"], "strength": spec["strength"],
                         "relative_change": float(sum(s["relative_change"] for s in stats) / len(stats)),
                         "delta": f"deltas/{edit}.safetensors"})

        def write(tmp: Path) -> None:
            for edit, (replace, meta) in deltas.items():
                save_delta(tmp / f"{edit}.safetensors", replace=replace, metadata=meta)

        write_dir(out / "deltas", write, provenance=prov)
        write_parquet(pd.DataFrame(rows), out / "edits.parquet", provenance=prov)
    log.info("%d %s edits -> %s", len(rows), method, out)


def cmd_evaluate(args) -> None:
    import pandas as pd

    from memctl.edits import apply_delta, load_delta
    from memctl.store import write_parquet
    from memctl.vision import curvature
    from memctl.vision.data import ImageSet
    from memctl.vision.model import accuracies, hits, predict, score_rows

    settings = _settings(args, "evaluate")
    set_threads(args.threads)
    inputs = {"model": args.model, "data": args.data, **{f"edits[{i}]": e for i, e in enumerate(args.edits)}}
    with stage("vision_evaluate", {**settings, "batch_size": args.batch_size}, inputs, outputs=[args.out]) as prov:
        images = ImageSet(args.data)
        model = _load(args, prov)
        scored = score_rows(images.labels, settings["max_per_group"], settings["seed"])
        labels = images.labels.iloc[scored]
        prov.extra["images_scored"] = int(len(scored))

        def score() -> dict:  # the accuracies and, for the report's paired tests, each image's outcome
            pred = predict(model, images, scored, args.batch_size)
            return {**accuracies(pred, labels), **{f"hits_{k}": v for k, v in hits(pred, labels).items()}}

        rows = [{"edit": "none", "method": "none", "label": "Origin", "unit": "none", "layers": [], "roles": [],
                 "strength": float("nan"), "relative_change": 0.0, **score()}]
        for edit_dir in args.edits:
            table = pd.read_parquet(Path(edit_dir) / "edits.parquet")
            for rec in table.to_dict("records"):
                delta = load_delta(Path(edit_dir) / rec["delta"])
                params = dict(model.named_parameters())
                saved = {name: params[name].detach().clone() for name in delta.params if name in params}
                apply_delta(model, delta)  # any memctl delta: replaced matrices or keep-masks
                try:
                    acc = score()
                finally:
                    curvature.apply_replace(model, saved)
                rows.append({**{k: rec[k] for k in ("edit", "method", "label", "unit", "strength", "relative_change")},
                             "layers": list(rec["layers"]), "roles": list(rec["roles"]), **acc})
        write_parquet(pd.DataFrame(rows), args.out, provenance=prov)
    base = rows[0]
    log.info("unedited: memorization %.3f, recovery %.3f, validation %.3f; %d edits scored -> %s",
             base["memorization"], base["recovery"], base["validation"], len(rows) - 1, args.out)


def cmd_spectrum(args) -> None:
    from memctl.curvature.store import load_eigen
    from memctl.store import write_parquet
    from memctl.vision import curvature
    from memctl.vision.data import ImageSet
    from memctl.vision.model import predict

    settings = _settings(args, "spectrum")
    set_threads(args.threads)
    with stage("vision_spectrum", settings, {"model": args.model, "data": args.data, "eigen": args.eigen},
               outputs=[args.out]) as prov:
        images = ImageSet(args.data)
        model = _load(args, prov)
        eig = load_eigen(args.eigen)
        targets = [t for t in eig.targets if t.role in settings["roles"]]
        if not targets:
            raise ValueError(f"vision.spectrum.roles {settings['roles']}: none of the collected matrices "
                             f"({sorted({t.role for t in eig.targets})}) has these roles; add them to vision.kfac.roles")
        table = curvature.spectrum_table(model, eig, targets, images, predict(model, images), settings)
        write_parquet(table, args.out, provenance=prov)
    log.info("band analysis of %d matrices -> %s", len(targets), args.out)


def cmd_report(args) -> None:
    import pandas as pd

    from memctl.curvature.spectrum import plot_spectrum
    from memctl.report import markdown_html
    from memctl.store import write_parquet, write_text
    from memctl.vision import report

    settings = _settings(args, "report")
    inputs = {"metrics": args.metrics, "spectrum": args.spectrum, "data": args.data,
              "model": args.train_dir and str(Path(args.train_dir) / "model"), "kfac_summary": args.kfac_summary}
    out = Path(args.out_dir)
    with stage("vision_report", settings, inputs, outputs=[out]) as prov:
        table = report.edit_table(pd.read_parquet(args.metrics))
        best = report.best_per_unit(table)
        pairs = report.best_pairs(best)
        spectrum = pd.read_parquet(args.spectrum) if args.spectrum else None
        info = _run_info(args)
        text = report.vision_markdown(table, best, pairs, spectrum, info, settings["tolerance"])
        base = table[table["edit"] == "none"].iloc[0].to_dict()
        write_text(out / "vision.md", text, provenance=prov)
        write_text(out / "vision.html", markdown_html(text, "Vision track: ViT label-noise memorization"),
                   provenance=prov)
        write_parquet(table, out / "vision_edits.parquet", provenance=prov)
        write_parquet(pd.concat([best, pairs.assign(unit="best pair"),
                                 report.tradeoff(table, settings["tolerance"]).assign(unit="trade-off")],
                                ignore_index=True),
                      out / "vision_best.parquet", provenance=prov)
        report.plot_blocks(best, pairs, base, out / "vision_blocks.png", provenance=prov)  # PNG + SVG
        if spectrum is not None:
            plot_spectrum(spectrum, out / "vision_spectrum.png", provenance=prov)
    print(text)


def _run_info(args) -> dict:
    """One-line descriptions of the data, model, training and factors behind the tables."""
    import pandas as pd

    info = {}
    data = json.loads((Path(args.data) / "info.json").read_text(encoding="utf-8"))
    info["data"] = (f"{data['source']} at {data['image_size']}x{data['image_size']}, {data['n_classes']} classes, "
                    f"splits {data['counts']}, {data['noised']} noised training labels")
    if args.train_dir:
        cfg = json.loads((Path(args.train_dir) / "model" / "config.json").read_text(encoding="utf-8"))
        info["model"] = (f"ViT, {cfg['num_hidden_layers']} blocks, width {cfg['hidden_size']}, MLP "
                         f"{cfg['intermediate_size']}, patch {cfg['patch_size']}")
        log_path = Path(args.train_dir) / "train_log.parquet"
        if log_path.exists():
            hist = pd.read_parquet(log_path).dropna()
            if len(hist):
                last = hist.iloc[-1]
                info["train"] = (f"epoch {int(last['epoch'])}: loss {last['loss']:.4f}, accuracy on noised images "
                                 f"w.r.t. noised labels {last['train_acc_noised']:.3f}, clean {last['train_acc_clean']:.3f}")
    if args.kfac_summary:
        summary = pd.read_parquet(args.kfac_summary)
        info["kfac"] = f"{int(summary['tokens'].iloc[0])} token positions, matrices {', '.join(summary['short'])}"
    return info


def register(subparsers) -> None:
    """Add the vision family's subcommands to the main parser."""
    # imported here, not at the top: register() shapes no output, so it stays out of the stages' code hash
    # (memctl.stages.code_hash hashes the entry module's top-level imports and assignments)
    from memctl.arguments import OUT_DIR, arg, command, device_arg, out_arg, settings_arg, threads_arg

    # the device and threads of the commands that run the ViT
    device = (device_arg("cpu, cuda or auto (cuda when visible)"), threads_arg("torch threads (0 = torch default)"))

    command(subparsers, "vision-data", cmd_data, "image set with a share of noised training labels",
            settings_arg("vision.data (JSON)"), OUT_DIR)

    command(subparsers, "vision-train", cmd_train, "train a ViT on the noised labels",
            arg("--data", required=True, help="the vision-data output directory"),
            settings_arg('{"model": vision.model, "train": vision.train} (JSON)'), OUT_DIR, device)

    command(subparsers, "vision-kfac", cmd_kfac, "K-FAC factors and eigenbases of the ViT's MLP matrices",
            arg("--model", required=True, help="the trained ViT (model/ of vision-train)"), arg("--data", required=True),
            settings_arg("vision.kfac (JSON)"), OUT_DIR, device)

    command(subparsers, "vision-edit", cmd_edit, "K-FAC or SVD edits of every MLP block and block pair",
            arg("--model", required=True), arg("--eigen", default=None, help="eigen/ of vision-kfac (K-FAC methods)"),
            arg("--method", required=True, choices=["kfac", "kfac_factor", "kfac_pairwise", "svd"]),
            settings_arg("vision.edits (JSON)"), OUT_DIR, threads_arg())

    command(subparsers, "vision-evaluate", cmd_evaluate, "the five accuracies of the ViT and of every edit",
            arg("--model", required=True), arg("--data", required=True),
            arg("--edits", nargs="*", default=[], help="vision-edit output directories"),
            settings_arg("vision.evaluate (JSON)", default="{}"),
            arg("--batch-size", type=int, default=256, help="images per forward pass (speed only)"),
            out_arg("metrics.parquet"), device)

    command(subparsers, "vision-spectrum", cmd_spectrum, "memorized vs clean images per curvature band (Fig. 2)",
            arg("--model", required=True), arg("--data", required=True), arg("--eigen", required=True),
            settings_arg("vision.spectrum (JSON)"), out_arg("spectrum.parquet"), device)

    command(subparsers, "vision-report", cmd_report, "per-block / best-pair tables and plots (Fig. 2, Fig. 4)",
            arg("--metrics", required=True), arg("--spectrum", default=None), arg("--data", required=True),
            arg("--train-dir", default=None, help="the vision-train output directory (model config, train log)"),
            arg("--kfac-summary", default=None), settings_arg("vision.report (JSON)", default="{}"), OUT_DIR)
