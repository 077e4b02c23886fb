"""The pruning family: the methods the masks are compared with in the weight-pruning paper's
tables — pruning baselines (magnitude, Wanda, SparseGPT; stage prune_baseline), BalancedSubnet
(balanced_subnet) and CSP soft prompts (csp). Each function gives the :class:`Point` (one edit:
its settings, hash, inputs and arguments) of one entry of a table; :mod:`memctl.planning.masks`
lays the points out in the tables (main, sweeps) beside the masks and folds them into stages, since
one table, one edit order and one report hold them all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memctl.config import ConfigError, settings_hash
from memctl.edit_methods import baseline
from memctl.planning.context import Calibration, Context


@dataclass(frozen=True)
class Sources:
    """What every point of the masks' tables may read: the context, the masks' calibration text
    (:func:`memctl.planning.data.calibration_windows` for ``masks``) and the sample of the masks'
    own training memories (the forget track, scored by every edit trained on them)."""

    ctx: Context
    calibration: Calibration
    forget: str


@dataclass(frozen=True)
class Point:
    """One entry of a masks table: an edit, the stage that writes it and the table it shows in."""

    stage: str  #: train_mask, prune_baseline, balanced_subnet or csp
    edit: str
    settings: Mapping[str, Any]  #: the job's resolved settings (``--settings``)
    label: str
    series: str  #: the row's method in the tables
    table: str  #: main, sparsity, threshold or ablations
    inputs: Mapping[str, str]
    args: tuple[str, ...]  #: the method's own arguments (model, settings, label and outputs are added)
    info: Mapping[str, Any]  #: the edit's record (family, method, mode, sparsity ...)
    calibration: tuple[Calibration, ...] = field(default=())  #: the calibration text it reads


def baseline_point(src: Sources, method: str, form: str, sparsity: float, table: str, label: str | None = None) -> Point:
    """A pruning baseline (``pruning.methods``) at ``sparsity``; ``form``: one_pass or sequential."""
    from memctl.masks import settings as mask_settings

    ctx = src.ctx
    cfg, pruning = ctx.config, ctx.config["pruning"]
    record = baseline(method)  # its statistics and settings (memctl.edit_methods)
    job = {"method": method, "sparsity": sparsity, "groups": pruning["groups"]}
    if record.reads_data:
        job.update({k: pruning[k] for k in record.setting_keys}, form=form)
    kfac = job.get("second_moments") == "kfac"
    job = mask_settings.resolve_prune_job(job).to_dict()  # resolved once: --settings is PruneJob.to_json()
    inputs, args, upstream, calibration = {}, (), [], ()
    if record.reads_data:  # statistics: the K-FAC factors' A, or the masks' calibration windows
        if kfac:
            factors = ctx.exports["kfac_factors"]
            name, path, upstream = "factors", factors, [factors]
        else:
            name, path, upstream = "calibration", src.calibration.path, [src.calibration.hash]
            calibration = (src.calibration,)
        inputs, args = {name: path}, (f"--{name}", path)
    h = settings_hash(ctx.model.key, cfg["model"], ctx.base.gpu, upstream, job)
    tag = "-onepass" if form == "one_pass" and record.reads_data else ""
    series = record.label + (" (one-pass)" if tag else "")
    return Point("prune_baseline", f"{method}{tag}-{h}", job, label or series, series, table, inputs, args,
                 dict(family="baseline", method=method, form=form if record.reads_data else "none",
                      sparsity=sparsity), calibration)


def balanced_subnet_point(src: Sources) -> Point:
    """BalancedSubnet (``pruning.balanced_subnet``): trained to forget memorized_train, retaining the
    nonmemorized table or the masks' calibration text; scored on its forget set too."""
    from memctl.masks import settings as mask_settings

    ctx = src.ctx
    data = ctx.data
    bsn = mask_settings.resolve_balanced_subnet(  # resolved once: --settings is BalancedSubnetJob.to_json()
        {k: v for k, v in ctx.config["pruning"]["balanced_subnet"].items() if k != "enabled"}).to_dict()
    calibration: tuple[Calibration, ...] = ()
    if bsn["retain"] == "nonmemorized":
        retain, retain_hash = data.tables["nonmemorized"], data.extract_hash
    else:
        retain, retain_hash = src.calibration.path, [data.extract_hash, src.calibration.hash]
        calibration = (src.calibration,)
    h = settings_hash(ctx.model.key, ctx.config["model"], ctx.base.gpu, retain_hash, bsn)
    forget = data.tables["memorized_train"]
    return Point("balanced_subnet", f"bsn-{h}", bsn, "BalancedSubnet", "BalancedSubnet", "main",
                 {"forget": forget, "retain": retain}, ("--forget", forget, "--retain", retain),
                 dict(family="baseline", method="balanced_subnet", sparsity=bsn["ratio"], forget=forget), calibration)


def _check_csp_fits(ctx: Context) -> None:
    """With a position table the prompt must fit in it: held-out windows leave the prompt room
    (the data family's heldout stage); the sequences have their fixed length."""
    cfg, dims = ctx.config["csp"], ctx.base.dims
    if getattr(dims, "learned_positions", False):
        ext = ctx.config["extract"]
        longest = int(ext["prefix_len"]) + int(ext["suffix_len"])
        if cfg["prompt_length"] + longest > dims.context_length:
            raise ConfigError(
                f"csp.prompt_length: {cfg['prompt_length']} prompt vectors + {longest}-token sequences "
                f"(extract prefix + suffix) exceed the model's {dims.context_length} learned positions; "
                f"shorten the prompt (csp.prompt_length: {dims.context_length - longest} or less), "
                f"or set csp.enabled: false")


def csp_points(src: Sources) -> list[Point]:
    """CSP soft prompts (config section ``csp``): one per mode for the main table, and mode down at
    every ``csp.sweep.thetas`` value for the learning-threshold ablation ([] when off)."""
    from memctl.masks.csp import resolve_job

    ctx = src.ctx
    cfg = ctx.config["csp"]
    if not cfg["enabled"]:
        return []
    _check_csp_fits(ctx)
    base = {k: v for k, v in cfg.items() if k not in ("enabled", "modes", "sweep")}
    points = [(mode, cfg["theta"], "main") for mode in cfg["modes"]]
    points += [("down", t, "threshold") for t in cfg["sweep"]["thetas"]]
    if cfg["sweep"]["thetas"] and "down" in cfg["modes"]:
        points.append(("down", cfg["theta"], "threshold"))  # the main-table point on the ablation's curve
    er_train = ctx.data.tables["er_train"]
    planned = []
    for mode, theta, table in points:
        job = resolve_job({**base, "mode": mode, "theta": theta}).to_dict()  # --settings: CspJob.to_json()
        h = settings_hash(ctx.model.key, ctx.config["model"], ctx.base.gpu, ctx.data.extract_hash, job)
        series = f"CSP ({mode})"
        label = series if table == "main" or theta == cfg["theta"] else f"{series}, theta={theta:g}"
        planned.append(Point("csp", f"csp-{mode}-{h}", job, label, series, table, {"memorized": er_train},
                             ("--memorized", er_train),
                             dict(family="csp", method="csp", mode=mode, sparsity=None,
                                  threshold=theta if mode == "down" else None, forget=src.forget)))
    return planned
