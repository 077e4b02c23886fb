"""The workflow's plan: every stage's jobs, artifact paths, hashes and labels, from the config.

:func:`build_plan` is a pure function of the validated config (:func:`memctl.config.load_config`)
and the model's dimensions (:func:`memctl.lab.workflow_model_dims`; None when unknown at parse
time). Snakemake's rule files only read the plan: each rule declares the stage's inputs, outputs,
log and benchmark from :meth:`Plan.job` and runs ``memctl <command> <Job.args>``; nothing about
which jobs exist, where they write or how they are keyed lives in the rule files.

Keys. Every artifact directory carries a short hash of the settings and upstream hashes that made
it (:func:`memctl.config.settings_hash`), so two settings never overwrite each other and a lab can
share one root::

    {root}/demo/corpus-<h>/ tokenizer-<h>/ model-<h>/           demo_corpus, demo_tokenizer, demo_pretrain
    {root}/<model tag>/candidates-<h>/candidates.parquet        candidates
    {root}/<model tag>/extract-<h>/<table>.parquet              extract
    {root}/<model tag>/heldout-<h>/, calibration-<h>/, reference-<h>/
    {root}/<model tag>/kfac-<h>/factors, eigen-<h>/eigen, spectrum-<h>/
    {root}/<model tag>/edits/<edit id>/delta.safetensors        apply_edit, train_mask, prune_baseline, balanced_subnet
    {root}/<model tag>/eval-<h>/<edit id>/metrics.parquet       evaluate
    {results_dir}/...                                           report, curvature_report, masks_report

An edit id is the edit family and the hash of exactly the settings and upstream artifacts its job
uses, so changing one edit reruns that edit and its evaluation only.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from memctl import stages as registry
from memctl.config import ConfigError, check_store_path, resolve_bf16, settings_hash
from memctl.labels import BASELINE_LABELS, MASK_MODE_LABELS

#: A path-safe edit id / tag.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: A model tag: a safe name, then optionally ``@<revision>`` (memctl.models.model_tag of a pinned hub model).
SAFE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._-]+)?")
CORPUS_TABLES = ("train", "heldout", "canaries")
EXTRACT_TABLES = ("extraction", "memorized", "nonmemorized", "memorized_train", "memorized_val", "memorized_test", "er_train", "er_test", "ood",
                  "by_copies")
EIGEN_METHOD = "eigh fp64, symmetrized, clamped, descending, sign-fixed"
#: Settings that change how fast a stage runs, not what it writes (``Job.runtime``).
RUNTIME_KEYS = {"extract": ("batch_size",), "reference_topk": ("batch_size", "heldout_batch_size"),
                "evaluate": ("batch_size", "heldout_batch_size")}
#: Appended to the label of each K-FAC edit of curvature.ablations.calibration_without_memories.
WITHOUT_MEMORIES = ", calibration without memories"


def as_json(value: Any) -> str:
    """Canonical JSON: a job's ``--settings`` argument (the same text on every parse)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _store_path(value: str, key: str) -> str:
    """``root`` / ``results_dir``: any path (spaces and shell characters are quoted in every
    command), but no ``..`` component (artifacts would land outside it), no control characters,
    and not ``/``, a system directory, the home directory, the project checkout or an ancestor of
    it (:func:`memctl.config.store_path_problems`, resolved against the working directory)."""
    check_store_path(value, key)
    return value.rstrip("/") or "/"


def _split_runtime(stage: str, settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(settings that shape the stage's output, runtime knobs) of a config section."""
    keys = RUNTIME_KEYS.get(stage, ())
    return ({k: v for k, v in settings.items() if k not in keys},
            {k: int(settings[k]) for k in keys if k in settings})


# ------------------------------------------------------------------------------- plan objects


@dataclass(frozen=True)
class Job:
    """One job of a stage: what it reads and writes, and the ``memctl`` arguments that do it."""

    stage: str
    key: str  #: the value of the stage's wildcard ("" for a stage with one job)
    inputs: Mapping[str, Any]  #: name -> path (or list of paths)
    outputs: Mapping[str, str]  #: name -> path
    args: tuple[str, ...]  #: ``memctl <command>`` arguments (``--threads`` comes from the rule)
    log: str
    benchmark: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)  #: resolved settings (the ``--settings`` JSON)
    label: str | None = None
    #: knobs that change speed and memory, not the output (batch sizes): flags from the rule's
    #: resources, outside the params, the settings and the hash, so changing one reruns nothing
    runtime: Mapping[str, int] = field(default_factory=dict)

    @property
    def arg_string(self) -> str:
        """The arguments shell-quoted: every path and value reaches the shell as one word."""
        return shlex.join(self.args)

    def command(self, threads: int | None = None) -> str:
        """The command line the rule runs (without the log redirection)."""
        stage = registry.get(self.stage)
        words = ["memctl", stage.command]
        if stage.threads and threads is not None:
            words += ["--threads", str(threads)]
        for name, value in self.runtime.items():
            words += [f"--{name.replace('_', '-')}", str(value)]
        return shlex.join([*words, *self.args])


@dataclass(frozen=True)
class StagePlan:
    """The jobs of one stage and the path patterns its rule declares."""

    name: str
    wildcard: str | None  #: the wildcard that tells jobs apart (None: one job)
    outputs: Mapping[str, str]  #: name -> path pattern
    directories: tuple[str, ...]  #: outputs that are directories
    log: str
    benchmark: str | None
    jobs: Mapping[str, Job]
    shown: Mapping[str, tuple[str, str]] = field(default_factory=dict)  #: output -> (report category, caption)

    @property
    def constraint(self) -> str:
        """A regex that matches exactly this stage's job keys (rules sharing an output pattern)."""
        return "|".join(re.escape(k) for k in self.jobs) or "(?!x)x"


@dataclass(frozen=True)
class Edit:
    """An edit of the model under study, as the evaluation and the reports see it."""

    id: str
    label: str
    stage: str | None  #: the stage that writes its delta (None for the unedited model)
    delta: str | None
    info: Mapping[str, Any] = field(default_factory=dict)  #: family, mode, sparsity, tables ...


@dataclass(frozen=True)
class Model:
    """The model under study."""

    source: str
    tag: str  #: its directory name in the store
    ref: str  #: what ``--model`` gets: a directory or a hub id
    key: str  #: hash of what identifies its weights
    dir: str  #: ``{root}/<tag>``
    settings: Mapping[str, Any]  #: the config's ``model`` section with ``tag`` filled in
    inputs: Mapping[str, str]  #: files the model is (a demo or local model directory)


@dataclass(frozen=True)
class Plan:
    config: Mapping[str, Any]
    root: str
    results: str
    model: Model
    stages: Mapping[str, StagePlan]
    edits: Mapping[str, Edit]
    targets: tuple[str, ...]  #: what ``rule all`` asks for

    def stage(self, name: str) -> StagePlan:
        if name not in self.stages:
            raise KeyError(f"the plan has no stage {name!r}")
        return self.stages[name]

    def job(self, stage: str, wildcards: Mapping[str, str] | None = None) -> Job:
        """The job of ``stage`` that Snakemake's ``wildcards`` select."""
        plan = self.stage(stage)
        key = "" if plan.wildcard is None else str(dict(wildcards or {})[plan.wildcard])
        try:
            return plan.jobs[key]
        except KeyError:
            raise KeyError(f"stage {stage} has no job {key!r}") from None

    def jobs(self) -> list[Job]:
        return [job for stage in self.stages.values() for job in stage.jobs.values()]

    def artifacts(self) -> list[str]:
        """Every output of every job the targets depend on, transitively. ``rule all`` asks for
        them: Snakemake looks for missing outputs only among what a target needs, so an artifact
        removed by ``memctl verify --repair`` (or lost to a kill) upstream of up-to-date tables
        would otherwise never be rebuilt."""
        producer = {path: job for job in self.jobs() for path in job.outputs.values()}
        seen: set[tuple[str, str]] = set()
        stack, found = list(self.targets), []
        while stack:
            job = producer.get(stack.pop())
            if job is None or (job.stage, job.key) in seen:
                continue
            seen.add((job.stage, job.key))
            found += job.outputs.values()
            for value in job.inputs.values():
                stack += value if isinstance(value, (list, tuple)) else [value]
        return list(dict.fromkeys(found))


def results_summary(plan: Plan) -> str:
    """What ``snakemake`` prints when a run succeeds: where the tables, plots and reports are."""
    from pathlib import Path

    names = [("results.html", "start here: the summary table with intervals, the frontier, by-copies and masks "
                               "plots, every table, in one page"),
             ("results.md", "both evaluation tracks, every edit, with intervals"),
             ("frontier.png", "memorization against perplexity, every edit (and .svg)"),
             ("extraction_by_copies.png", "extraction rate vs copy count (and .svg)"),
             ("edits_by_copies.png", "every edit per copy-count bucket (and .svg)"),
             ("curvature.md", "K-FAC vs SVD at matched perplexity"),
             ("masks/table.md", "masks and pruning baselines, the paper's table"),
             ("vision.md", "the vision track")]
    lines = [f"memctl: results in {plan.results}/"]
    for name, what in names:
        path = Path(plan.results) / name
        if path.exists():
            lines.append(f"  {path}  ({what})")
    lines.append("  snakemake --report report.html  gathers them with every stage's plots (its first page links results.html)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ builder


class _Builder:
    """Builds the plan stage by stage (each ``_stage`` method adds one :class:`StagePlan`)."""

    def __init__(self, config: Mapping[str, Any], dims: Any, python_version: str) -> None:
        self.cfg = config
        self.dims = dims
        self.python_version = python_version
        self.root = _store_path(config["root"], "root")
        self.results = _store_path(config["results_dir"], "results_dir")
        self.gpu = bool(config["resources"]["gpu"])
        self.stages: dict[str, StagePlan] = {}
        self.edits: dict[str, Edit] = {"none": Edit("none", "Origin", None, None, {"family": "origin"})}
        self.targets: list[str] = []

    # -- helpers --------------------------------------------------------------------------------
    def log(self, stage: str, name: str) -> str:
        return f"{self.root}/logs/{stage}/{name}.log"

    def bench(self, stage: str, name: str) -> str | None:
        return None if registry.get(stage).cache else f"{self.root}/benchmarks/{stage}/{name}.tsv"

    def add(self, name: str, jobs: list[Job], *, wildcard: str | None = None, outputs: Mapping[str, str] | None = None,
            directories: tuple[str, ...] = (), log: str | None = None, shown: Mapping | None = None) -> None:
        """Add stage ``name``; with a ``wildcard``, ``outputs`` and ``log`` are patterns in it (the
        benchmark pattern follows the log's name)."""
        if wildcard is None:
            if len(jobs) != 1:
                raise ValueError(f"stage {name}: one job expected without a wildcard, got {len(jobs)}")
            outputs, log, bench = jobs[0].outputs, jobs[0].log, jobs[0].benchmark
        else:
            log = log or f"{self.root}/logs/{name}/{{{wildcard}}}.log"
            stem = PurePosixPath(log).name.removesuffix(".log")
            bench = self.bench(name, stem)
        keyed = {job.key: job for job in jobs}
        if len(keyed) != len(jobs):
            raise ValueError(f"stage {name}: two jobs share a key")
        self.stages[name] = StagePlan(name, wildcard, dict(outputs or {}), directories, log, bench, keyed,
                                      dict(shown or {}))

    def model_args(self) -> list[str]:
        return ["--model", self.model.ref, "--model-settings", as_json(dict(self.model.settings))]

    def register_edit(self, edit_id: str, label: str, stage: str, **info: Any) -> str:
        if not SAFE_NAME.fullmatch(edit_id):
            raise ConfigError(f"edit id {edit_id!r} is not a path-safe name")
        if edit_id in self.edits:
            raise ConfigError(f"edit id {edit_id!r} is planned twice")
        delta = f"{self.model.dir}/edits/{edit_id}/delta.safetensors"
        self.edits[edit_id] = Edit(edit_id, label, stage, delta, info)
        return delta

    # -- the stages -----------------------------------------------------------------------------
    def demo(self) -> None:
        demo = self.cfg["demo"]
        self.corpus_hash = settings_hash(self.python_version, demo["corpus"], demo["canaries"])
        self.tokenizer_hash = settings_hash(self.corpus_hash, demo["tokenizer"])
        # bf16 `auto` resolved here: a model trained in bf16 and one in fp32 are different artifacts
        train = {**demo["train"], "bf16": resolve_bf16(demo["train"]["bf16"], bool(self.gpu))}
        self.demo_model_hash = settings_hash(self.tokenizer_hash, demo["architecture"], train, self.gpu)
        corpus = f"{self.root}/demo/corpus-{self.corpus_hash}"
        tokenizer = f"{self.root}/demo/tokenizer-{self.tokenizer_hash}"
        model = f"{self.root}/demo/model-{self.demo_model_hash}"
        self.corpus_dir = corpus
        self.corpus_files = {f"corpus_{t}": f"{corpus}/{t}.parquet" for t in CORPUS_TABLES}
        h = self.corpus_hash
        self.add("demo_corpus", [Job(
            "demo_corpus", "", {}, {t: f"{corpus}/{t}.parquet" for t in CORPUS_TABLES},
            ("--settings", as_json(demo["corpus"]), "--canary-settings", as_json(demo["canaries"]), "--out-dir", corpus),
            self.log("demo_corpus", h), self.bench("demo_corpus", h), {"corpus": demo["corpus"], "canaries": demo["canaries"]},
        )])
        h = self.tokenizer_hash
        self.add("demo_tokenizer", [Job(
            "demo_tokenizer", "", {"train": self.corpus_files["corpus_train"]}, {"tokenizer": tokenizer},
            ("--corpus", corpus, "--settings", as_json(demo["tokenizer"]), "--out", tokenizer),
            self.log("demo_tokenizer", h), self.bench("demo_tokenizer", h), demo["tokenizer"],
        )], directories=("tokenizer",))
        h = self.demo_model_hash
        self.add("demo_pretrain", [Job(
            "demo_pretrain", "", {"train": self.corpus_files["corpus_train"], "tokenizer": tokenizer},
            {"model": model, "model_meta": f"{model}.meta.json"},
            ("--corpus", corpus, "--tokenizer", tokenizer, "--arch-settings", as_json(demo["architecture"]),
             "--settings", as_json(train), "--out", model),
            self.log("demo_pretrain", h), self.bench("demo_pretrain", h),
            {"architecture": demo["architecture"], "train": train},
        )], directories=("model",))
        self.demo_model_dir = model

    def model_under_study(self) -> None:
        model = self.cfg["model"]
        if model["source"] == "demo":
            tag = model.get("tag") or f"demo-{self.demo_model_hash}"
            ref, key, inputs = self.demo_model_dir, self.demo_model_hash, {"model": self.demo_model_dir}
        else:
            from memctl.models import model_tag

            tag = model_tag(model)
            ref = str(model["name_or_path"])
            key = settings_hash(ref, model["revision"])
            inputs = {"model": ref} if model["source"] == "local" else {}
        if not SAFE_TAG.fullmatch(tag) or set(tag) == {"."}:
            raise ConfigError(f"model.tag: {tag!r} is not a path-safe name (letters, digits, '.', '_', '-'; "
                              f"starting with a letter or digit; '@' only before a revision)")
        from memctl.config import check_model_fit

        check_model_fit(self.cfg, self.dims)  # extraction window vs context, npy ids vs vocabulary
        from memctl.models import check_placement

        check_placement(model)  # device_map / max_memory
        settings = dict(model, tag=tag)
        if self.gpu and settings.get("device", "auto") == "auto" and not self.cfg["resources"].get("allow_cpu_fallback"):
            settings["device"] = "cuda"  # asked for a GPU: a job that gets none fails instead of running on the CPU
        self.model = Model(model["source"], tag, ref, key, f"{self.root}/{tag}", settings, inputs)

    def data_inputs(self, section: str) -> dict[str, str]:
        """A local data file (candidates / text) is an input: replacing it reruns what read it."""
        import os

        settings = self.cfg[section]
        if settings["source"] in ("jsonl", "parquet", "npy", "text") and settings.get("path"):
            return {"data": settings["path"]}
        if settings["source"] == "hf" and os.path.exists(settings.get("hf_name") or ""):
            return {"data": settings["hf_name"]}
        if settings["source"] == "demo":
            return dict(self.corpus_files)
        return {}

    def corpus_args(self, section: str) -> list[str]:
        return ["--corpus", self.corpus_dir] if self.cfg[section]["source"] == "demo" else []

    def text_stages(self) -> None:
        cfg, m = self.cfg, self.model
        ext = cfg["extract"]
        lengths = {"prefix_len": ext["prefix_len"], "suffix_len": ext["suffix_len"]}
        cand = dict(cfg["candidates"], **lengths)
        self.candidates_hash = settings_hash(m.key, cand)
        path = f"{m.dir}/candidates-{self.candidates_hash}/candidates.parquet"
        self.candidates = path
        self.add("candidates", [Job(
            "candidates", "", {**m.inputs, **self.data_inputs("candidates")}, {"candidates": path},
            (*self.model_args(), *self.corpus_args("candidates"), "--settings", as_json(cfg["candidates"]),
             "--extract-settings", as_json(lengths), "--out", path),
            self.log("candidates", self.candidates_hash), self.bench("candidates", self.candidates_hash), cand,
        )])
        # GPU and CPU kernels round differently (borderline sequences can flip): the device is in the key.
        ext, ext_runtime = _split_runtime("extract", ext)
        self.extract_hash = settings_hash(self.candidates_hash, cfg["model"], ext, self.gpu)
        self.extract_dir = f"{m.dir}/extract-{self.extract_hash}"
        tables = {t: f"{self.extract_dir}/{t}.parquet" for t in EXTRACT_TABLES}
        self.tables = tables
        outputs = {**tables, **{f"{t}_meta": f"{p}.meta.json" for t, p in tables.items()}}
        self.add("extract", [Job(
            "extract", "", {**m.inputs, "candidates": path}, outputs,
            (*self.model_args(), "--candidates", path, "--settings", as_json(ext), "--out-dir", self.extract_dir),
            self.log("extract", self.extract_hash), None, ext, runtime=ext_runtime,
        )])
        # every sequence an evaluation or validation split scores (the validation slice too, like the
        # test sequences it stands in for): calibration windows sharing an n-gram with one are dropped
        self.disjoint_ngram = int(ext["disjoint_ngram"])
        self.evaluated = [tables["memorized_test"], tables["memorized_val"], tables["er_test"], tables["ood"]]
        self.calibration_jobs: dict[str, Job] = {}  # planned on demand (calibration_windows), one per setting
        self.calibration_used: dict[str, str] = {}  # consumer -> windows
        # CSP puts its prompt vectors in front of every input: held-out windows leave room for them,
        # so that every row (CSP's too) scores the same tokens within the model's context
        reserve = int(cfg["csp"]["prompt_length"]) if cfg["masks"]["enabled"] and cfg["csp"]["enabled"] else 0
        self.heldout_reserve = reserve
        h = settings_hash(m.key, cfg["heldout"], *([{"reserve_positions": reserve}] if reserve else []))
        self.heldout, self.heldout_hash = f"{m.dir}/heldout-{h}/windows.safetensors", h
        self.add("heldout", [Job(
            "heldout", "", {**m.inputs, **self.data_inputs("heldout")}, {"windows": self.heldout},
            (*self.model_args(), *self.corpus_args("heldout"), "--settings", as_json(cfg["heldout"]),
             *(("--reserve-positions", str(reserve)) if reserve else ()), "--out", self.heldout),
            self.log("heldout", h), self.bench("heldout", h), cfg["heldout"],
        )])
        ev, ev_runtime = _split_runtime("evaluate", cfg["evaluate"])
        self.eval_runtime = ev_runtime
        # only what the reference depends on: the held-out windows it scores
        ref_settings = {"ndcg_windows": ev["ndcg_windows"], "ndcg_sequences": ev["ndcg_sequences"]}
        ref_runtime = dict(ev_runtime)
        h = settings_hash(self.heldout_hash, self.extract_hash, cfg["model"], ref_settings, self.gpu)
        self.reference = f"{m.dir}/reference-{h}/top10.safetensors"
        er_test = self.tables["er_test"]
        self.add("reference_topk", [Job(
            "reference_topk", "", {**m.inputs, "heldout": self.heldout, "sequences": er_test}, {"topk": self.reference},
            (*self.model_args(), "--heldout", self.heldout, "--sequences", er_test, "--settings", as_json(ref_settings),
             "--out", self.reference),
            self.log("reference_topk", h), self.bench("reference_topk", h), ref_settings, runtime=ref_runtime,
        )])
        self.evaluate_settings = ev
        self.eval_hash = settings_hash(self.extract_hash, self.heldout_hash, cfg["model"], ev, self.gpu)
        self.eval_dir = f"{m.dir}/eval-{self.eval_hash}"

    def calibration_windows(self, consumer: str, without_memories: bool = False) -> tuple[str, str]:
        """(windows path, hash) of the calibration text that ``consumer`` reads: ``kfac`` (the
        factors) or ``masks`` (mask training, Wanda / SparseGPT, BalancedSubnet's retain set). One
        ``calibration`` job per distinct setting (the stage is keyed by its hash): with
        ``calibration.source: demo`` each consumer's ``calibration.demo_text`` (``stream``: the
        training stream, canaries included, as the loss-curvature paper's factors; ``documents``: no
        canaries, as the weight-pruning paper's C4); any other source is one text for both. Windows
        sharing ``extract.disjoint_ngram`` tokens with an evaluated sequence are dropped; with
        ``without_memories`` (the curvature ablation) the demo's documents are read and windows
        sharing a run with any memorized sequence are dropped too."""
        cfg, m = self.cfg, self.model
        settings = {k: v for k, v in cfg["calibration"].items() if k != "demo_text"}
        demo = settings["source"] == "demo"
        text = ("documents" if without_memories else cfg["calibration"]["demo_text"][consumer]) if demo else None
        n = self.disjoint_ngram
        exclude = [*self.evaluated, *([self.tables["memorized"]] if without_memories else [])] if n > 0 else []
        h = settings_hash(m.key, settings, *([{"demo_text": text}] if demo else []),
                          *([self.extract_hash, n, [PurePosixPath(p).stem for p in exclude]] if exclude else []))
        out = f"{m.dir}/calibration-{h}/windows.safetensors"
        if h not in self.calibration_jobs:
            extra = ("--exclude", *exclude, "--disjoint-ngram", str(n)) if exclude else ()
            extra += ("--demo-text", text) if demo else ()
            self.calibration_jobs[h] = Job(
                "calibration", h,
                {**m.inputs, **self.data_inputs("calibration"), **({"exclude": exclude} if exclude else {})},
                {"windows": out},
                (*self.model_args(), *self.corpus_args("calibration"), "--settings", as_json(settings), *extra,
                 "--out", out),
                self.log("calibration", h), self.bench("calibration", h),
                dict(settings, **({"demo_text": text} if demo else {}), exclude=[PurePosixPath(p).stem for p in exclude]),
            )
        if not without_memories:
            self.calibration_used.setdefault(consumer, out)
        return out, h

    def calibration_stage(self) -> None:
        """The ``calibration`` jobs the consumers asked for (after curvature and masks)."""
        self.add("calibration", list(self.calibration_jobs.values()), wildcard="calib",
                 outputs={"windows": f"{self.model.dir}/calibration-{{calib}}/windows.safetensors"})

    def kfac_chain(self, windows: str, windows_hash: str) -> tuple[str, str, str, str]:
        """collect_kfac (+ merge_kfac) and decompose_kfac jobs over one calibration text; returns
        (factors hash, factors dir, eigen hash, eigen dir). The jobs go to ``self.kfac_jobs``; the
        stages are keyed (the ablation's chain beside the main one)."""
        cfg, m, curv = self.cfg, self.model, self.cfg["curvature"]
        # Factors depend on the model (its dtype and device), the calibration text, the data pass and
        # the module set.
        kfac_hash = settings_hash(windows_hash, m.key, cfg["model"], curv["data"], curv["modules"], self.gpu)
        kfac = f"{m.dir}/kfac-{kfac_hash}"
        eigen_hash = settings_hash(kfac_hash, EIGEN_METHOD)
        eigen_dir = f"{kfac}/eigen-{eigen_hash}"
        collect = {"data": curv["data"], "modules": curv["modules"]}
        shards = int(curv["data"]["shards"])
        collect_args = (*self.model_args(), "--windows", windows, "--settings", as_json(collect))
        with_meta = self.with_meta
        if shards == 1:
            outs = with_meta({"factors": f"{kfac}/factors", "summary": f"{kfac}/summary.parquet"})
            self.kfac_jobs["collect_kfac"].append(Job(
                "collect_kfac", kfac_hash, {**m.inputs, "windows": windows}, outs, (*collect_args, "--out-dir", kfac),
                self.log("collect_kfac", kfac_hash), None, collect,
            ))
        else:
            for i in range(shards):
                key = f"{kfac_hash}/shards/{i}"
                d = f"{m.dir}/kfac-{key}"
                outs = with_meta({"factors": f"{d}/factors", "summary": f"{d}/summary.parquet"})
                self.kfac_jobs["collect_kfac"].append(Job(
                    "collect_kfac", key, {**m.inputs, "windows": windows}, outs,
                    (*collect_args, "--shard", f"{i}/{shards}", "--out-dir", d),
                    self.log("collect_kfac", key), None, dict(collect, shard=i)))
            shard_dirs = [f"{kfac}/shards/{i}" for i in range(shards)]
            self.kfac_jobs["merge_kfac"].append(Job(
                "merge_kfac", kfac_hash, {"shards": [f"{d}/factors" for d in shard_dirs]},
                {"factors": f"{kfac}/factors", "summary": f"{kfac}/summary.parquet"},
                ("--inputs", *shard_dirs, "--out-dir", kfac),
                self.log("merge_kfac", kfac_hash), self.bench("merge_kfac", kfac_hash),
            ))
        key = f"{kfac_hash}/eigen-{eigen_hash}"
        self.kfac_jobs["decompose_kfac"].append(Job(
            "decompose_kfac", key, {"factors": f"{kfac}/factors"},
            with_meta({"eigen": f"{eigen_dir}/eigen", "summary": f"{eigen_dir}/summary.parquet"}),
            ("--factors", f"{kfac}/factors", "--out-dir", eigen_dir), self.log("decompose_kfac", key), None,
        ))
        return kfac_hash, f"{kfac}/factors", eigen_hash, eigen_dir

    @staticmethod
    def with_meta(outs: Mapping[str, str]) -> dict[str, str]:
        return {**outs, **{f"{k}_meta": f"{v}.meta.json" for k, v in outs.items()}}

    def curvature(self) -> None:
        from memctl.curvature import settings as curvature_settings

        cfg, m, curv = self.cfg, self.model, self.cfg["curvature"]
        n_layers = None if self.dims is None else self.dims.num_layers
        curvature_settings.check(curv)
        specs = curvature_settings.expand_edits(curv, n_layers)
        self.kfac_jobs: dict[str, list[Job]] = {"collect_kfac": [], "merge_kfac": [], "decompose_kfac": []}
        self.kfac_hash, self.kfac_factors, eigen_hash, eigen_dir = self.kfac_chain(*self.calibration_windows("kfac"))
        spectrum_hash = settings_hash(eigen_hash, self.extract_hash, curv["spectrum"])
        spectrum = f"{eigen_dir}/spectrum-{spectrum_hash}/spectrum.parquet"
        planned = [(spec, eigen_hash, eigen_dir) for spec in specs]
        # the ablation row: the same K-FAC edits on factors of calibration text without the memories
        if curv["ablations"]["calibration_without_memories"] and any(s["method"] != "svd" for s in specs):
            if cfg["calibration"]["source"] != "demo" and self.disjoint_ngram == 0:
                raise ConfigError(
                    f"curvature.ablations.calibration_without_memories: with calibration.source "
                    f"{cfg['calibration']['source']!r} the memories are removed by dropping windows that share an "
                    f"extract.disjoint_ngram-token run with a memorized sequence, and extract.disjoint_ngram is 0; set it "
                    f"(e.g. 16) or turn the ablation off")
            _, _, ab_hash, ab_dir = self.kfac_chain(*self.calibration_windows("kfac", without_memories=True))
            labels = {spec["label"] for spec in specs}
            for spec in specs:
                if spec["method"] == "svd":  # SVD reads no factors: no ablation row
                    continue
                label = spec["label"] + WITHOUT_MEMORIES
                if label in labels:
                    raise ConfigError(
                        f"curvature.edits: the label {label!r} is also the label that "
                        f"curvature.ablations.calibration_without_memories gives the ablation row of {spec['label']!r}; "
                        f"give that edit another label")
                planned.append(({**spec, "calibration": "without_memories", "label": label}, ab_hash, ab_dir))
        pattern = self.with_meta({"factors": f"{m.dir}/kfac-{{kfac}}/factors",
                                  "summary": f"{m.dir}/kfac-{{kfac}}/summary.parquet"})
        self.add("collect_kfac", self.kfac_jobs["collect_kfac"], wildcard="kfac", outputs=pattern,
                 directories=("factors",))
        if self.kfac_jobs["merge_kfac"]:
            self.add("merge_kfac", self.kfac_jobs["merge_kfac"], wildcard="kfac",
                     outputs={"factors": f"{m.dir}/kfac-{{kfac}}/factors",
                              "summary": f"{m.dir}/kfac-{{kfac}}/summary.parquet"}, directories=("factors",))
        self.add("decompose_kfac", self.kfac_jobs["decompose_kfac"], wildcard="eigen",
                 outputs=self.with_meta({"eigen": f"{m.dir}/kfac-{{eigen}}/eigen",
                                         "summary": f"{m.dir}/kfac-{{eigen}}/summary.parquet"}),
                 directories=("eigen",))
        # edit id -> job; K-FAC ids chain the eigenbasis hash, SVD ids only the model's.
        svd_upstream = settings_hash(m.key, cfg["model"])
        jobs = []
        for spec, chain_hash, chain_dir in planned:
            svd = spec["method"] == "svd"
            edit = curvature_settings.edit_id(spec, svd_upstream if svd else chain_hash)
            marker = {"calibration": spec["calibration"]} if "calibration" in spec else {}
            delta = self.register_edit(edit, spec["label"], "apply_edit", family="curvature", method=spec["method"],
                                       **marker)
            outputs = {"delta": delta}
            extra: tuple[str, ...] = ()
            if curv["write_model_dir"]:
                outputs["model_dir"] = f"{m.dir}/edits/{edit}/model"
                extra = ("--model-out", outputs["model_dir"])
            eigen = {} if svd else {"eigen": f"{chain_dir}/eigen"}
            jobs.append(Job(
                "apply_edit", edit, {**m.inputs, **eigen}, outputs,
                (*self.model_args(), *(("--eigen", eigen["eigen"]) if eigen else ()), "--edit-id", edit,
                 "--settings", as_json(spec), "--out", delta, *extra),
                self.log("apply_edit", edit), self.bench("apply_edit", edit), spec, spec["label"],
            ))
        self.curvature_edits = [j.key for j in jobs]
        pattern = {"delta": f"{m.dir}/edits/{{curv_edit}}/delta.safetensors"}
        if curv["write_model_dir"]:
            pattern["model_dir"] = f"{m.dir}/edits/{{curv_edit}}/model"
        self.add("apply_edit", jobs, wildcard="curv_edit", outputs=pattern,
                 directories=("model_dir",) if curv["write_model_dir"] else ())
        self.add("kfac_spectrum", [Job(
            "kfac_spectrum", "",
            {**m.inputs, "eigen": f"{eigen_dir}/eigen", "memorized": self.tables["memorized"],
             "nonmemorized": self.tables["nonmemorized"]},
            {"spectrum": spectrum},
            (*self.model_args(), "--eigen", f"{eigen_dir}/eigen", "--memorized", self.tables["memorized"],
             "--nonmemorized", self.tables["nonmemorized"], "--settings", as_json(curv["spectrum"]), "--out", spectrum),
            self.log("kfac_spectrum", spectrum_hash), self.bench("kfac_spectrum", spectrum_hash), curv["spectrum"],
        )])
        report = {"markdown": "curvature.md", "sweep": "curvature_sweep.png", "sweep_svg": "curvature_sweep.svg",
                  "table": "curvature_edits.parquet", "html": "curvature.html"}
        if curv["spectrum"]["enabled"]:
            report.update(spectrum="curvature_spectrum.png", spectrum_svg="curvature_spectrum.svg")
        report = {k: f"{self.results}/{v}" for k, v in report.items()}
        metrics = [self.metrics(e) for e in ["none", *self.curvature_edits]]
        scores = [m.replace("/metrics.parquet", "/scores.parquet") for m in metrics]
        deltas = [self.edits[e].delta for e in self.curvature_edits]
        spectra = [spectrum] if curv["spectrum"]["enabled"] else []
        name = f"{self.eval_hash}-{spectrum_hash}"
        self.add("curvature_report", [Job(
            "curvature_report", "", {**m.inputs, "metrics": metrics, "scores": scores, "deltas": deltas,
                                     "spectrum": spectra, "memorized": self.tables["memorized_test"]},
            report,
            (*self.model_args(), "--memorized", self.tables["memorized_test"], "--metrics", *metrics,
             "--scores", *scores, "--deltas", *deltas,
             *(("--spectrum", spectrum) if spectra else ()),
             "--settings", as_json(curv["report"]), "--out-dir", self.results),
            self.log("curvature_report", name), self.bench("curvature_report", name), curv["report"],
        )], shown={k: ("3. Curvature", f"{PurePosixPath(v).stem}.rst") for k, v in report.items()
                   if v.endswith((".html", ".png"))})
        if self.curvature_edits or curv["spectrum"]["enabled"]:
            self.targets += list(report.values())

    def metrics(self, edit: str) -> str:
        return f"{self.eval_dir}/{edit}/metrics.parquet"

    def masks(self) -> None:
        """Masks, pruning baselines, BalancedSubnet and CSP (main table, ablations and sweeps), the
        sample of their training memories every one of them is scored on, and the masks report."""
        from memctl.masks import settings as mask_settings

        cfg = self.cfg
        masks = cfg["masks"]
        self.mask_jobs: list[Job] = []
        self.prune_jobs: list[Job] = []
        self.bsn_jobs: list[Job] = []
        self.csp_jobs: list[Job] = []
        self.mask_ablation_rows: list[dict[str, Any]] = []
        self.masks_spec = {"none": {"edit": "none", "series": "Origin", "family": "origin", "delta": None,
                                    "tables": ["main"]}}
        self.own_memories = None
        sample_jobs: list[Job] = []
        if masks["enabled"]:
            sample_jobs.append(self._own_memories_job(mask_settings))
            self._main_masks(mask_settings)
            self.mask_ablations(masks["sparsity"], mask_settings)
            self._mask_sweeps(mask_settings)
        self.add("sample_memories", sample_jobs, wildcard="sample",
                 outputs={"sample": f"{self.model.dir}/memories-{{sample}}/er_train.parquet"})
        edit_pattern = {"delta": f"{self.model.dir}/edits/{{edit}}/delta.safetensors"}
        log_pattern = {**edit_pattern, "log": f"{self.model.dir}/edits/{{edit}}/train_log.parquet"}
        self.add("train_mask", self.mask_jobs, wildcard="edit", outputs=log_pattern)
        self.add("prune_baseline", self.prune_jobs, wildcard="edit", outputs=edit_pattern)
        self.add("balanced_subnet", self.bsn_jobs, wildcard="edit", outputs=log_pattern)
        self.add("csp", self.csp_jobs, wildcard="edit", outputs=log_pattern)
        self._masks_report()

    def _own_memories_job(self, mask_settings) -> Job:
        """The forget track: one seeded sample of the masks' training memories (er_train), scored by
        every edit trained on them, the `none` masks and Origin (the same rows for all)."""
        own = mask_settings.resolve_own_memories(self.cfg["masks"]["own_memories"])
        h = settings_hash(self.extract_hash, own)
        self.own_memories = f"{self.model.dir}/memories-{h}/er_train.parquet"
        origin = self.edits["none"]
        self.edits["none"] = Edit(origin.id, origin.label, origin.stage, origin.delta,
                                  {**origin.info, "forget": self.own_memories})
        self.masks_spec["none"]["forget"] = self.own_memories
        return Job(
            "sample_memories", h, {"table": self.tables["er_train"]}, {"sample": self.own_memories},
            ("--table", self.tables["er_train"], "--settings", as_json(own), "--out", self.own_memories),
            self.log("sample_memories", h), self.bench("sample_memories", h), own,
        )

    def _main_masks(self, mask_settings) -> None:
        """The main table at ``masks.sparsity``: pruning baselines, BalancedSubnet, CSP, each mode per seed."""
        masks, pruning = self.cfg["masks"], self.cfg["pruning"]
        if pruning["second_moments"] == "kfac" and "sequential" in pruning["forms"]:
            raise ConfigError(
                f"pruning.second_moments: 'kfac' works with pruning.forms: [one_pass] only (the K-FAC factors "
                f"are the unpruned model's statistics; the sequential form needs those of the pruned blocks "
                f"below); got pruning.forms: {pruning['forms']}"
            )
        r = masks["sparsity"]
        for method in pruning["methods"]:
            for form in (["sequential"] if method == "magnitude" else pruning["forms"]):
                self.baseline(method, form, r, "main", mask_settings)
        if pruning["balanced_subnet"]["enabled"]:
            self.balanced_subnet(mask_settings)
        self.csp()
        for mode in masks["modes"]:
            for seed in masks["seeds"]:  # the first seed's mask is the mode's reference run
                self.mask(mode, r, masks["threshold"], "main", mask_settings,
                          None if seed == masks["seeds"][0] else f"{MASK_MODE_LABELS[mode]}, seed {seed}",
                          seed=seed)

    def _mask_sweeps(self, mask_settings) -> None:
        """The sparsity sweep (paper Fig. 3; baselines too where asked) and the threshold sweep (Fig. 4)."""
        masks, pruning = self.cfg["masks"], self.cfg["pruning"]
        r, sweep = masks["sparsity"], masks["sweep"]
        for s in sweep["sparsities"]:
            for mode in sweep["sparsity_modes"]:
                self.mask(mode, s, masks["threshold"], "sparsity", mask_settings,
                          f"{MASK_MODE_LABELS[mode]}, sparsity {s:.2f}")
            if sweep["baselines"]:
                for method in pruning["methods"]:
                    form = "sequential" if method == "magnitude" else pruning["forms"][0]
                    self.baseline(method, form, s, "sparsity", mask_settings,
                                  f"{BASELINE_LABELS[method]}, sparsity {s:.2f}")
        for t in sweep["thresholds"]:
            self.mask("down", r, t, "threshold", mask_settings, f"Ours (down), t={t:g}")
        if sweep["thresholds"]:
            self.mask("down", r, masks["threshold"], "threshold", mask_settings)

    def _masks_report(self) -> None:
        masks = self.cfg["masks"]
        spec = {"title": f"Masks and pruning baselines at sparsity {masks['sparsity']:g}",
                "edits": list(self.masks_spec.values())}
        if self.mask_ablation_rows:
            spec["ablations"] = self.mask_ablation_rows
        h = settings_hash(self.eval_hash, spec)
        out = f"{self.results}/masks"
        outputs = {"markdown": f"{out}/table.md", "table": f"{out}/table.parquet", "html": f"{out}/table.html"}
        for table in ("sparsity", "threshold"):
            if any(table in e["tables"] for e in self.masks_spec.values()):
                outputs.update({f"{table}_{ext}": f"{out}/ablation_{table}.{ext}" for ext in ("md", "parquet", "png", "svg")})
        if self.mask_ablation_rows:
            outputs.update({f"ablations_{ext}": f"{out}/ablations.{ext}" for ext in ("md", "parquet")})
        metrics = [self.metrics(e) for e in self.masks_spec]
        self.add("masks_report", [Job(
            "masks_report", "", {"metrics": metrics, "scores": [m.replace("/metrics.parquet", "/scores.parquet") for m in metrics],
                                 "deltas": [e["delta"] for e in self.masks_spec.values() if e["delta"]]},
            outputs, ("--metrics", *metrics, "--spec", as_json(spec), "--out-dir", out),
            self.log("masks_report", h), self.bench("masks_report", h), spec,
        )], shown={k: ("4. Masks and pruning", f"masks_{PurePosixPath(v).stem}.rst") for k, v in outputs.items()
                   if v.endswith((".html", ".png"))})
        if masks["enabled"]:
            self.targets += list(outputs.values())

    def _masks_edit(self, jobs: list[Job], stage: str, edit: str, job_settings: Mapping, label: str, series: str,
                    table: str, inputs: Mapping[str, str], args: tuple[str, ...], **info: Any) -> None:
        """Plan an edit once (the first, main-table label wins); list every table it appears in."""
        if edit not in self.masks_spec:
            delta = self.register_edit(edit, label, stage, **info)
            outputs = {"delta": delta}
            out_args: tuple[str, ...] = ("--out", delta)
            if stage != "prune_baseline":
                outputs["log"] = f"{self.model.dir}/edits/{edit}/train_log.parquet"
                out_args += ("--log", outputs["log"])
            jobs.append(Job(
                stage, edit, {**self.model.inputs, **inputs}, outputs,
                (*self.model_args(), *args, "--settings", as_json(dict(job_settings)), "--label", label, *out_args),
                self.log(stage, edit), self.bench(stage, edit), job_settings, label,
            ))
            self.masks_spec[edit] = dict(edit=edit, series=series, delta=delta, tables=[], **info)
        if table not in self.masks_spec[edit]["tables"]:
            self.masks_spec[edit]["tables"].append(table)

    def mask_ablations(self, r, mask_settings) -> None:
        """The weight-pruning paper's ablation rows (``masks.ablations``): Table 5's regularizers, the
        gate kinds of appendix A, the low-rank gate logits of appendix D; each a mask of one ablated mode
        at the first seed with one setting changed, next to that mode's main-table mask (its reference)."""
        masks = self.cfg["masks"]
        abl = masks["ablations"]
        if not (abl["regularizers"] or abl["gates"] or abl["logit_ranks"] or abl["mem_loss_tokens"]):
            return
        t = masks["threshold"]
        for mode in abl["modes"]:
            base = MASK_MODE_LABELS[mode][:-1]  # "Ours (up"
            rows: list[tuple[str, str, str, float | None, bool]] = []  # ablation, setting, edit, target, reference
            reference = self.mask(mode, r, t, "ablations", mask_settings)  # the main-table mask (first seed)
            if abl["regularizers"]:
                if "sparsity_only" in abl["regularizers"]:  # no memorization term: the `none` objective
                    rows.append(("regularizers", "sparsity only", self.mask(
                        "none", r, None, "ablations", mask_settings, f"{base}, sparsity only)",
                        lambda_s=mask_settings.lambda_s_of(masks, mode)), r, False))
                if "memorization_only" in abl["regularizers"]:  # no sparsity term: no target sparsity
                    rows.append(("regularizers", "memorization only", self.mask(
                        mode, r, t, "ablations", mask_settings, f"{base}, memorization only)", lambda_s=0,
                        eval_mask="threshold"), None, False))
                rows.append(("regularizers", "both", reference, r, True))
            if abl["gates"]:
                rows.append(("gate", f"gate {masks['gate']}", reference, r, True))
                for kind in abl["gates"]:
                    if kind != masks["gate"]:
                        rows.append(("gate", f"gate {kind}", self.mask(
                            mode, r, t, "ablations", mask_settings, f"{base}, gate {kind})", gate=kind), r, False))
            if abl["logit_ranks"]:
                own = masks["logit_rank"]
                rows.append(("logit_rank", "full-rank logits" if own is None else f"logit rank {own}", reference, r,
                             True))
                for rank in abl["logit_ranks"]:
                    if rank != own:
                        rows.append(("logit_rank", f"logit rank {rank}", self.mask(
                            mode, r, t, "ablations", mask_settings, f"{base}, logit rank {rank})", logit_rank=rank),
                            r, False))
            if abl["mem_loss_tokens"]:  # L_mem over the suffix only (or the whole sequence): masks.mem_loss_tokens
                own = masks["mem_loss_tokens"]
                rows.append(("mem_loss_tokens", f"L_mem over {own} tokens", reference, r, True))
                for tokens in abl["mem_loss_tokens"]:
                    if tokens != own:
                        rows.append(("mem_loss_tokens", f"L_mem over {tokens} tokens", self.mask(
                            mode, r, t, "ablations", mask_settings, f"{base}, L_mem over {tokens} tokens)",
                            mem_loss_tokens=tokens), r, False))
            self.mask_ablation_rows += [
                {"edit": edit, "label": f"{base}, {setting})", "ablation": ablation, "setting": setting, "mode": mode,
                 "target_sparsity": target, "reference": ref} for ablation, setting, edit, target, ref in rows]

    def mask(self, mode, sparsity, threshold, table, mask_settings, label=None, **change) -> str:
        """Plan one mask (``change``: job settings that differ from the config's, e.g. a seed or a gate
        kind); returns its edit id."""
        masks = self.cfg["masks"]
        job = {k: v for k, v in masks.items() if k not in mask_settings.CONFIG_ONLY}
        job.update(mode=mode, sparsity=sparsity, lambda_s=mask_settings.lambda_s_of(masks, mode),
                   seed=masks["seeds"][0])
        job.update(change)
        if mode == "down":
            job["threshold"] = threshold
        job = mask_settings.resolve_mask_job(job)
        job["bf16"] = resolve_bf16(job["bf16"], bool(self.gpu))  # `auto`: bf16 where it is fast
        calibration, calibration_hash = self.calibration_windows("masks")
        upstream = [calibration_hash, self.extract_hash if mode != "none" else None]
        h = settings_hash(self.model.key, self.cfg["model"], self.gpu, upstream, job)
        inputs = {"calibration": calibration}
        args: tuple[str, ...] = ("--calibration", calibration)
        if mode != "none":  # the memorization term trains on the extraction-rate track's train side
            inputs["memorized"] = self.tables["er_train"]
            args += ("--memorized", self.tables["er_train"])
        series = MASK_MODE_LABELS[mode]
        edit = f"mask-{mode}-{h}"
        # forget: scored on its own training memories (the `none` mask on the same rows: the paired
        # `up` vs `none` comparison there too); lambda_s: the tables check the comparison is paired
        self._masks_edit(self.mask_jobs, "train_mask", edit, job, label or series, series, table,
                         inputs, args, family="ours", mode=mode, sparsity=sparsity,
                         threshold=threshold if mode == "down" else None, seed=job["seed"],
                         lambda_s=job["lambda_s"], mem_loss_tokens=job["mem_loss_tokens"], forget=self.own_memories)
        return edit

    def baseline(self, method, form, sparsity, table, mask_settings, label=None) -> None:
        pruning = self.cfg["pruning"]
        job = {"method": method, "sparsity": sparsity, "groups": pruning["groups"]}
        if method != "magnitude":
            keys = ["calibration_windows", "batch_size", "second_moments"]
            keys += ["damp", "block_size"] if method == "sparsegpt" else []
            job.update({k: pruning[k] for k in keys}, form=form)
        kfac = job.get("second_moments") == "kfac"
        job = mask_settings.resolve_prune_job(job)
        inputs, args, upstream = {}, (), []
        if method != "magnitude":  # statistics: the K-FAC factors' A, or the masks' calibration windows
            if kfac:
                name, path, upstream = "factors", self.kfac_factors, [self.kfac_factors]
            else:
                path, windows_hash = self.calibration_windows("masks")
                name, upstream = "calibration", [windows_hash]
            inputs, args = {name: path}, (f"--{name}", path)
        h = settings_hash(self.model.key, self.cfg["model"], self.gpu, upstream, job)
        tag = "-onepass" if form == "one_pass" and method != "magnitude" else ""
        series = BASELINE_LABELS[method] + (" (one-pass)" if tag else "")
        self._masks_edit(self.prune_jobs, "prune_baseline", f"{method}{tag}-{h}", job, label or series, series, table,
                         inputs, args, family="baseline", method=method,
                         form=form if method != "magnitude" else "none", sparsity=sparsity)

    def balanced_subnet(self, mask_settings) -> None:
        bsn = mask_settings.resolve_balanced_subnet(
            {k: v for k, v in self.cfg["pruning"]["balanced_subnet"].items() if k != "enabled"})
        if bsn["retain"] == "nonmemorized":
            retain, retain_hash = self.tables["nonmemorized"], self.extract_hash
        else:
            retain, calibration_hash = self.calibration_windows("masks")
            retain_hash = [self.extract_hash, calibration_hash]
        h = settings_hash(self.model.key, self.cfg["model"], self.gpu, retain_hash, bsn)
        forget = self.tables["memorized_train"]
        self._masks_edit(self.bsn_jobs, "balanced_subnet", f"bsn-{h}", bsn, "BalancedSubnet", "BalancedSubnet",
                         "main", {"forget": forget, "retain": retain}, ("--forget", forget, "--retain", retain),
                         family="baseline", method="balanced_subnet", sparsity=bsn["ratio"], forget=forget)

    def csp(self) -> None:
        """CSP soft prompts (config section ``csp``): one job per mode for the main table, and mode
        down at every ``csp.sweep.thetas`` value for the learning-threshold ablation."""
        from memctl.masks.csp import resolve_job

        cfg = self.cfg["csp"]
        if not cfg["enabled"]:
            return
        if getattr(self.dims, "learned_positions", False):  # a position table: the prompt must fit in it
            # held-out windows leave the prompt room (text_stages); the sequences have their fixed length
            ext = self.cfg["extract"]
            longest = int(ext["prefix_len"]) + int(ext["suffix_len"])
            if cfg["prompt_length"] + longest > self.dims.context_length:
                raise ConfigError(
                    f"csp.prompt_length: {cfg['prompt_length']} prompt vectors + {longest}-token sequences "
                    f"(extract prefix + suffix) exceed the model's {self.dims.context_length} learned positions; "
                    f"shorten the prompt (csp.prompt_length: {self.dims.context_length - longest} or less), "
                    f"or set csp.enabled: false")
        base = {k: v for k, v in cfg.items() if k not in ("enabled", "modes", "sweep")}
        points = [(mode, cfg["theta"], "main") for mode in cfg["modes"]]
        points += [("down", t, "threshold") for t in cfg["sweep"]["thetas"]]
        if cfg["sweep"]["thetas"] and "down" in cfg["modes"]:
            points.append(("down", cfg["theta"], "threshold"))  # the main-table point on the ablation's curve
        er_train = self.tables["er_train"]
        for mode, theta, table in points:
            job = resolve_job({**base, "mode": mode, "theta": theta})
            h = settings_hash(self.model.key, self.cfg["model"], self.gpu, self.extract_hash, job)
            series = f"CSP ({mode})"
            label = series if table == "main" or theta == cfg["theta"] else f"{series}, theta={theta:g}"
            self._masks_edit(self.csp_jobs, "csp", f"csp-{mode}-{h}", job, label, series, table,
                             {"memorized": er_train}, ("--memorized", er_train), family="csp", method="csp",
                             mode=mode, sparsity=None, threshold=theta if mode == "down" else None,
                             forget=self.own_memories)

    def vision(self) -> None:
        """The vision track (:mod:`memctl.vision`, docs/vision.md), planned when ``vision.enabled``:
        data -> ViT -> K-FAC factors and eigenbases -> edits per method -> one evaluation of every
        edit -> band analysis -> report. With ``vision.only``, ``rule all`` asks for it alone."""
        vis = self.cfg["vision"]
        if not vis["enabled"]:
            if vis["only"]:
                raise ConfigError("vision.only: true needs vision.enabled: true")
            return
        missing = sorted(set(vis["edits"]["methods"]) - {m for m, v in vis["edits"]["strengths"].items() if v})
        if missing:
            raise ConfigError(f"vision.edits.strengths: no values for the methods {missing} of vision.edits.methods")
        if any(m != "svd" for m in vis["edits"]["methods"]) and set(vis["edits"]["roles"]) - set(vis["kfac"]["roles"]):
            raise ConfigError(f"vision.edits.roles {vis['edits']['roles']}: K-FAC edits need factors of these roles; "
                              f"vision.kfac.roles collects {vis['kfac']['roles']}")
        if vis["spectrum"]["enabled"] and set(vis["spectrum"]["roles"]) - set(vis["kfac"]["roles"]):
            raise ConfigError(f"vision.spectrum.roles {vis['spectrum']['roles']}: not in vision.kfac.roles "
                              f"{vis['kfac']['roles']}")
        if vis["data"]["source"] == "imagefolder" and not vis["data"]["path"]:
            raise ConfigError("vision.data.path: required when vision.data.source is 'imagefolder'")
        root, device = f"{self.root}/vision", "cuda" if self.gpu else "cpu"
        h = settings_hash(vis["data"])
        data = f"{root}/data-{h}"
        source = {"images": vis["data"]["path"]} if vis["data"]["source"] == "imagefolder" else {}
        self.add("vision_data", [Job(
            "vision_data", "", source, {"data": data}, ("--settings", as_json(vis["data"]), "--out-dir", data),
            self.log("vision_data", h), self.bench("vision_data", h), vis["data"],
        )], directories=("data",))
        train_settings = {"model": vis["model"], "train": vis["train"]}
        train_hash = settings_hash(h, train_settings, self.gpu)
        train = f"{root}/vit-{train_hash}"
        model = f"{train}/model"
        self.add("vision_train", [Job(
            "vision_train", "", {"data": data}, {"model": model, "log": f"{train}/train_log.parquet"},
            ("--data", data, "--settings", as_json(train_settings), "--device", device, "--out-dir", train),
            self.log("vision_train", train_hash), self.bench("vision_train", train_hash), train_settings,
        )], directories=("model",))
        kfac_hash = settings_hash(train_hash, vis["kfac"])
        kfac = f"{train}/kfac-{kfac_hash}"
        self.add("vision_kfac", [Job(
            "vision_kfac", "", {"model": model, "data": data},
            {"factors": f"{kfac}/factors", "eigen": f"{kfac}/eigen", "summary": f"{kfac}/summary.parquet"},
            ("--model", model, "--data", data, "--settings", as_json(vis["kfac"]), "--device", device, "--out-dir", kfac),
            self.log("vision_kfac", kfac_hash), self.bench("vision_kfac", kfac_hash), vis["kfac"],
        )], directories=("factors", "eigen"))
        edit_settings = {k: v for k, v in vis["edits"].items() if k != "methods"}
        jobs = []
        for method in vis["edits"]["methods"]:
            svd = method == "svd"
            key = f"{method.replace('_', '-')}-{settings_hash(train_hash if svd else kfac_hash, edit_settings, method)}"
            out = f"{train}/edits-{key}"
            eigen = {} if svd else {"eigen": f"{kfac}/eigen"}
            jobs.append(Job(
                "vision_edit", key, {"model": model, **eigen}, {"deltas": f"{out}/deltas", "table": f"{out}/edits.parquet"},
                ("--model", model, *(("--eigen", eigen["eigen"]) if eigen else ()), "--method", method,
                 "--settings", as_json(edit_settings), "--out-dir", out),
                self.log("vision_edit", key), self.bench("vision_edit", key), dict(edit_settings, method=method),
            ))
        self.add("vision_edit", jobs, wildcard="vision_edits",
                 outputs={"deltas": f"{train}/edits-{{vision_edits}}/deltas",
                          "table": f"{train}/edits-{{vision_edits}}/edits.parquet"},
                 directories=("deltas",))
        edit_dirs = [f"{train}/edits-{j.key}" for j in jobs]
        eval_hash = settings_hash(h, [j.key for j in jobs], vis["evaluate"])
        metrics = f"{train}/eval-{eval_hash}/metrics.parquet"
        self.add("vision_evaluate", [Job(
            "vision_evaluate", "", {"model": model, "data": data, "edits": [f"{d}/edits.parquet" for d in edit_dirs],
                                    "deltas": [f"{d}/deltas" for d in edit_dirs]},
            {"metrics": metrics},
            ("--model", model, "--data", data, "--edits", *edit_dirs, "--settings", as_json(vis["evaluate"]),
             "--device", device, "--out", metrics),
            self.log("vision_evaluate", eval_hash), self.bench("vision_evaluate", eval_hash), vis["evaluate"],
        )])
        spectrum_hash = settings_hash(kfac_hash, vis["spectrum"])
        spectrum = f"{kfac}/spectrum-{spectrum_hash}/spectrum.parquet"
        self.add("vision_spectrum", [Job(
            "vision_spectrum", "", {"model": model, "data": data, "eigen": f"{kfac}/eigen"}, {"spectrum": spectrum},
            ("--model", model, "--data", data, "--eigen", f"{kfac}/eigen", "--settings", as_json(vis["spectrum"]),
             "--device", device, "--out", spectrum),
            self.log("vision_spectrum", spectrum_hash), self.bench("vision_spectrum", spectrum_hash), vis["spectrum"],
        )])
        with_spectrum = bool(vis["spectrum"]["enabled"])
        out = f"{self.results}/vision"
        report = {"markdown": "vision.md", "html": "vision.html", "table": "vision_edits.parquet",
                  "best": "vision_best.parquet", "blocks": "vision_blocks.png", "blocks_svg": "vision_blocks.svg"}
        if with_spectrum:
            report.update(spectrum="vision_spectrum.png", spectrum_svg="vision_spectrum.svg")
        report = {k: f"{out}/{v}" for k, v in report.items()}
        name = settings_hash(eval_hash, spectrum_hash if with_spectrum else None, vis["report"])
        self.add("vision_report", [Job(
            "vision_report", "", {"metrics": metrics, "data": data, "model": model, "log": f"{train}/train_log.parquet",
                                  "summary": f"{kfac}/summary.parquet", **({"spectrum": spectrum} if with_spectrum else {})},
            report,
            ("--metrics", metrics, *(("--spectrum", spectrum) if with_spectrum else ()), "--data", data,
             "--train-dir", train, "--kfac-summary", f"{kfac}/summary.parquet", "--settings", as_json(vis["report"]),
             "--out-dir", out),
            self.log("vision_report", name), self.bench("vision_report", name), vis["report"],
        )], shown={k: ("6. Vision", f"{PurePosixPath(v).stem}.rst") for k, v in report.items()
                   if v.endswith((".html", ".png"))})
        self.targets = list(report.values()) if vis["only"] else [*self.targets, *report.values()]

    #: Edit record fields the results report shows (what tells two rows apart).
    REPORT_EDIT_FIELDS = ("family", "method", "mode", "form", "sparsity", "threshold", "seed", "calibration")

    def evaluation(self) -> None:
        m, ev = self.model, self.evaluate_settings
        jobs = []
        for edit in self.edits.values():
            delta = {"delta": edit.delta} if edit.delta else {}
            # an edit trained on a set of its own is scored on it too (the forget track): BalancedSubnet's
            # forget set; the masks' and CSP's sample of er_train (masks.own_memories), also Origin's
            forget = {"forget": edit.info["forget"]} if edit.info.get("forget") else {}
            out_dir = f"{self.eval_dir}/{edit.id}"
            jobs.append(Job(
                "evaluate", edit.id,
                {**m.inputs, **delta, **forget, "memorized": self.tables["memorized_test"],
                 "er_test": self.tables["er_test"], "validation": self.tables["memorized_val"],
                 "ood": self.tables["ood"], "heldout": self.heldout, "reference": self.reference},
                {"metrics": f"{out_dir}/metrics.parquet", "scores": f"{out_dir}/scores.parquet"},
                (*self.model_args(), "--edit", edit.id, "--method", edit.label,
                 *(("--delta", edit.delta) if edit.delta else ()), "--memorized", self.tables["memorized_test"],
                 "--er-test", self.tables["er_test"], "--validation", self.tables["memorized_val"],
                 "--ood", self.tables["ood"], *(("--forget", forget["forget"]) if forget else ()),
                 "--heldout", self.heldout, "--reference", self.reference, "--settings", as_json(ev),
                 "--out-dir", out_dir),
                self.log("evaluate", f"{self.eval_hash}-{edit.id}"), self.bench("evaluate", f"{self.eval_hash}-{edit.id}"),
                ev, edit.label, runtime=self.eval_runtime,
            ))
        self.add("evaluate", jobs, wildcard="edit",
                 outputs={"metrics": f"{self.eval_dir}/{{edit}}/metrics.parquet",
                          "scores": f"{self.eval_dir}/{{edit}}/scores.parquet"},
                 log=f"{self.root}/logs/evaluate/{self.eval_hash}-{{edit}}.log")
        metrics = [self.metrics(e) for e in self.edits]
        scores = [f"{self.eval_dir}/{e}/scores.parquet" for e in self.edits]
        r = self.results
        # every plot as PNG and SVG (memctl.plots.save); results.html embeds the SVGs
        outputs = {"results": f"{r}/results.md", "table": f"{r}/results.parquet", "html": f"{r}/results.html",
                   "frontier": f"{r}/frontier.png", "frontier_svg": f"{r}/frontier.svg",
                   "by_copies": f"{r}/extraction_by_copies.md", "plot": f"{r}/extraction_by_copies.png",
                   "plot_svg": f"{r}/extraction_by_copies.svg",
                   "edits_by_copies": f"{r}/edits_by_copies.md", "edits_by_copies_table": f"{r}/edits_by_copies.parquet",
                   "edits_by_copies_plot": f"{r}/edits_by_copies.png",
                   "edits_by_copies_svg": f"{r}/edits_by_copies.svg"}
        # their sidecars: what was dropped (the report's data section: one row per calibration text)
        data = [self.candidates, self.tables["er_train"],
                *dict.fromkeys([*(p for c, p in self.calibration_used.items() if c != "kfac"), self.calibration_used["kfac"]])]
        # what tells the rows apart (method, strength, layers, sparsity, seed): the edits' records
        curvature_specs = self.stages["apply_edit"].jobs if "apply_edit" in self.stages else {}
        records = []
        for e in self.edits.values():
            rec = {k: v for k, v in e.info.items() if k in self.REPORT_EDIT_FIELDS and v is not None}
            if e.id in curvature_specs:
                spec = curvature_specs[e.id].settings
                rec.update({k: spec[k] for k in ("layers", "strength") if spec.get(k) is not None})
            records.append({"edit": e.id, "label": e.label, **rec})
        report_spec = {"edits": records, "run": self.report_run()}
        # the results page shows the masks table and its ablation plots where the config runs masks
        masks_inputs: dict[str, Any] = {}
        masks_args: tuple[str, ...] = ()
        if self.cfg["masks"]["enabled"]:
            masks_out = self.stages["masks_report"].outputs
            figures = [masks_out[f"{t}_svg"] for t in ("sparsity", "threshold") if f"{t}_svg" in masks_out]
            masks_inputs = {"masks_table": masks_out["markdown"], "masks_figures": figures}
            masks_args = ("--masks-table", masks_out["markdown"], *(("--masks-figures", *figures) if figures else ()))
        self.add("report", [Job(
            "report", "", {"metrics": metrics, "scores": scores, "by_copies": self.tables["by_copies"], "data": data,
                           **masks_inputs},
            outputs,
            ("--metrics", *metrics, "--scores", *scores, "--by-copies", self.tables["by_copies"],
             "--data-provenance", *data, *masks_args, "--spec", as_json(report_spec), "--out-dir", r),
            self.log("report", self.eval_hash), self.bench("report", self.eval_hash), report_spec,
        )], shown={"html": ("1. Results", "results.rst"), "frontier": ("1. Results", "frontier.rst"),
                   "plot": ("2. Extraction by copies", "extraction_by_copies.rst"),
                   "edits_by_copies_plot": ("2. Extraction by copies", "edits_by_copies.rst")})
        self.targets = [outputs["html"], outputs["results"], outputs["frontier"], outputs["by_copies"], outputs["plot"],
                        outputs["edits_by_copies"], outputs["edits_by_copies_plot"], *self.targets]

    def report_run(self) -> dict[str, Any]:
        """The configuration the results page's captions name (the report job's ``--spec`` ``run``):
        the model, the extraction window and splits, and the masks' settings where they run. Every
        value is upstream of an artifact the report reads, so it adds no rerun of its own."""
        model, ext = self.cfg["model"], self.cfg["extract"]
        run: dict[str, Any] = {"model": self.model.tag, "source": model["source"],
                               "name_or_path": model.get("name_or_path"), "revision": model.get("revision")}
        run.update({k: ext.get(k) for k in ("prefix_len", "suffix_len", "er_test_fraction", "test_fraction",
                                            "split_seed")})
        masks = self.cfg["masks"]
        if masks["enabled"]:
            run["masks"] = {k: masks.get(k) for k in ("modes", "sparsity", "threshold", "steps", "seeds")}
            run["masks"]["sweep"] = {k: masks["sweep"].get(k) for k in ("sparsities", "sparsity_modes", "thresholds")}
        return run

    def downstream(self) -> None:
        """lm-eval downstream tasks (config section ``downstream``): the chosen edits in jobs of
        ``edits_per_job`` (each loads the model once and applies the edits in turn), and Table 4."""
        m, cfg = self.model, self.cfg["downstream"]
        if cfg["edits"] == "main":
            chosen = [e for e, spec in self.masks_spec.items() if "main" in spec["tables"]]
        else:
            chosen = list(self.edits)
        h = settings_hash(m.key, self.cfg["model"], self.gpu, {k: v for k, v in cfg.items() if k != "edits_per_job"})
        out_dir = f"{m.dir}/downstream-{h}"
        size = cfg["edits_per_job"] or max(1, len(chosen))
        jobs = []
        for start in range(0, len(chosen), size):
            part = [self.edits[e] for e in chosen[start:start + size]]
            key = f"{start // size:03d}-{settings_hash([e.id for e in part])}"
            spec = [{"edit": e.id, "label": e.label, "delta": e.delta} for e in part]
            deltas = [e.delta for e in part if e.delta]
            tasks = {"tasks": cfg["include_path"]} if cfg["include_path"] else {}
            out = f"{out_dir}/{key}.parquet"
            jobs.append(Job(
                "downstream", key, {**m.inputs, **tasks, "deltas": deltas}, {"results": out},
                (*self.model_args(), "--edits", as_json(spec), "--settings", as_json(cfg), "--out", out),
                self.log("downstream", f"{h}-{key}"), self.bench("downstream", f"{h}-{key}"), cfg,
            ))
        if not cfg["tasks"]:
            jobs = []
        self.add("downstream", jobs, wildcard="part", outputs={"results": f"{out_dir}/{{part}}.parquet"},
                 log=f"{self.root}/logs/downstream/{h}-{{part}}.log")
        results = [j.outputs["results"] for j in jobs]
        outputs = {k: f"{self.results}/downstream.{k}" for k in ("md", "parquet", "html")}
        self.add("downstream_report", [Job(
            "downstream_report", "", {"results": results}, outputs,
            ("--results", *results, "--settings", as_json(cfg), "--out-dir", self.results),
            self.log("downstream_report", h), self.bench("downstream_report", h), cfg,
        )], shown={"html": ("5. Downstream tasks", "downstream.rst")})
        if cfg["tasks"]:
            self.targets += list(outputs.values())


def build_plan(config: Mapping[str, Any], dims: Any = None, *, python_version: str | None = None) -> Plan:
    """The plan of a validated config (:func:`memctl.config.load_config`).

    ``dims`` (a :class:`memctl.lab.ModelDims`) gives the layer count that sweeps over every layer
    need; ``python_version`` keys the demo corpus (read from the running Python's standard library).
    Raises :class:`memctl.config.ConfigError` naming the key when the config asks for something the
    model cannot do.
    """
    problems = registry.stage_threads_problems(config["resources"])
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    b = _Builder(config, dims, python_version or "{}.{}".format(*sys.version_info[:2]))
    b.demo()
    b.model_under_study()
    b.text_stages()
    b.curvature()
    b.masks()
    b.calibration_stage()  # the calibration texts curvature and masks asked for
    b.evaluation()
    b.downstream()
    b.vision()  # last: with vision.only it replaces the targets
    return Plan(config, b.root, b.results, b.model, dict(b.stages), dict(b.edits), tuple(dict.fromkeys(b.targets)))
