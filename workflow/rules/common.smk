# Helpers shared by every rule: the validated config, artifact paths and stage settings.
#
# Every artifact path carries a short hash of the settings (and upstream hashes) that made it, so
# two settings never overwrite each other and a lab can share one artifact root.
import json
import os
import re
import sys
from pathlib import Path

from memctl.artifacts import claim_workflow, share_with_group
from memctl.lab import estimate_mem_mb, estimate_runtime_min, workflow_model_dims
from memctl.config import ConfigError, load_config, prefix_suffix_lengths, settings_hash
from memctl.models import model_tag

try:
    _resolved = load_config(config)
except ConfigError as err:
    raise WorkflowError(str(err))
config.clear()
config.update(_resolved)

ROOT = config["root"].rstrip("/")

# envs/memctl.post-deploy.sh installs memctl into a conda-deployed env from this checkout, wherever
# Snakemake is started from.
os.environ.setdefault("MEMCTL_SRC", workflow.basedir)

# A lab shares one store: what this run creates there (Snakemake's own directories, logs and
# benchmarks included) is group-writable, and a run claims its outputs in the store before any
# job starts, so two runs from different working directories never write the same artifact.
share_with_group()


onstart:
    claim_workflow(workflow, ROOT)

RESULTS = config["results_dir"].rstrip("/")
DEMO = config["model"]["source"] == "demo"
PREFIX_LEN, SUFFIX_LEN = prefix_suffix_lengths(config["extract"])


def shown_in_report(paths, category, caption_prefix=""):
    """``paths`` as rule outputs, the HTML tables and PNG plots marked for ``snakemake --report``,
    each captioned by workflow/report/<caption_prefix><file stem>.rst."""
    return [
        path if not path.endswith((".html", ".png"))
        else report(path, caption=f"../report/{caption_prefix}{Path(path).stem}.rst", category=category)
        for path in paths
    ]


def as_json(section):
    """A config subsection as canonical JSON: the rule's params and the command's --settings."""
    return json.dumps(section, sort_keys=True, separators=(",", ":"))


# --- the embedded demo model (only when model.source is 'demo') --------------------------------
# The corpus is read from the running Python's standard library: its version is part of the key.
PYTHON_VERSION = "{}.{}".format(*sys.version_info[:2])
CORPUS_HASH = settings_hash(PYTHON_VERSION, config["demo"]["corpus"], config["demo"]["canaries"])
TOKENIZER_HASH = settings_hash(CORPUS_HASH, config["demo"]["tokenizer"])
DEMO_MODEL_HASH = settings_hash(
    TOKENIZER_HASH, config["demo"]["architecture"], config["demo"]["train"], config["resources"]["gpu"]
)
CORPUS_DIR = f"{ROOT}/demo/corpus-{CORPUS_HASH}"
TOKENIZER_DIR = f"{ROOT}/demo/tokenizer-{TOKENIZER_HASH}"
DEMO_MODEL_DIR = f"{ROOT}/demo/model-{DEMO_MODEL_HASH}"
CORPUS_TABLES = ["train", "heldout", "canaries"]

# --- the model under study ---------------------------------------------------------------------
if DEMO:
    MODEL_TAG = f"demo-{DEMO_MODEL_HASH}"
    MODEL_REF = DEMO_MODEL_DIR
    MODEL_KEY = DEMO_MODEL_HASH
else:
    MODEL_TAG = model_tag(config["model"])
    MODEL_REF = config["model"]["name_or_path"]
    MODEL_KEY = settings_hash(MODEL_REF, config["model"]["revision"])
# The model name that tables show: the tag of its artifact directory.
MODEL_SETTINGS = dict(config["model"], tag=MODEL_TAG)
MODEL_DIR = f"{ROOT}/{MODEL_TAG}"


def model_inputs(wildcards):
    """The demo model and corpus are files the DAG builds; a local model directory is an input
    (replacing it reruns what used it); a hub model is just a name."""
    if config["model"]["source"] == "local":
        return {"model": MODEL_REF}
    if not DEMO:
        return {}
    corpus = {f"corpus_{name}": f"{CORPUS_DIR}/{name}.parquet" for name in CORPUS_TABLES}
    return {"model": DEMO_MODEL_DIR, **corpus}


def local_data_input(section):
    """A stage's local data file (candidates / held-out text) as a rule input, when it has one."""

    def inputs(wildcards):
        settings = config[section]
        if settings["source"] in ("jsonl", "parquet", "npy", "text") and settings.get("path"):
            return {"data": settings["path"]}
        if settings["source"] == "hf" and os.path.exists(settings.get("hf_name") or ""):
            return {"data": settings["hf_name"]}
        return {}

    return inputs


def corpus_arg(wildcards, input):
    """``--corpus DIR`` for the demo (derived from the rule's inputs), nothing otherwise."""
    return f"--corpus {os.path.dirname(input.corpus_train)}" if DEMO else ""


def parent_dir(wildcards, output):
    """The directory of a rule's first output: stage commands write several files into it."""
    return os.path.dirname(output[0])


# --- data and extraction -----------------------------------------------------------------------
CANDIDATES_SETTINGS = dict(config["candidates"], prefix_len=PREFIX_LEN, suffix_len=SUFFIX_LEN)
CANDIDATES_HASH = settings_hash(MODEL_KEY, CANDIDATES_SETTINGS)
CANDIDATES = f"{MODEL_DIR}/candidates-{CANDIDATES_HASH}/candidates.parquet"

# GPU and CPU kernels round differently (borderline sequences can flip): the device is in the key.
EXTRACT_HASH = settings_hash(CANDIDATES_HASH, config["model"], config["extract"], config["resources"]["gpu"])
EXTRACT_DIR = f"{MODEL_DIR}/extract-{EXTRACT_HASH}"
EXTRACT_TABLES = [
    "extraction",
    "memorized",
    "nonmemorized",
    "memorized_train",
    "memorized_test",
    "by_copies",
]



def with_sidecars(outputs):
    """Named outputs plus their provenance sidecars, for rules in Snakemake's between-workflow
    cache: the cache stores declared outputs only, and a restored artifact needs its sidecar."""
    return {**outputs, **{f"{name}_meta": f"{path}.meta.json" for name, path in outputs.items()}}


HELDOUT_HASH = settings_hash(MODEL_KEY, config["heldout"])
HELDOUT = f"{MODEL_DIR}/heldout-{HELDOUT_HASH}/windows.safetensors"
# The unedited model's top-10 on the first held-out windows: nDCG@10's reference, keyed by model + text.
REFERENCE_HASH = settings_hash(
    HELDOUT_HASH, config["model"], config["evaluate"]["ndcg_windows"], config["resources"]["gpu"]
)
REFERENCE_TOPK = f"{MODEL_DIR}/reference-{REFERENCE_HASH}/top10.safetensors"

CALIBRATION_HASH = settings_hash(MODEL_KEY, config["calibration"])
CALIBRATION = f"{MODEL_DIR}/calibration-{CALIBRATION_HASH}/windows.safetensors"

EVAL_HASH = settings_hash(
    EXTRACT_HASH, HELDOUT_HASH, config["model"], config["evaluate"], config["resources"]["gpu"]
)
EVAL_DIR = f"{MODEL_DIR}/eval-{EVAL_HASH}"

# --- edits -------------------------------------------------------------------------------------
# Every edit is evaluated and reported: id -> table label, and id -> its delta file (the unedited
# model "none" has none). Edit stages (workflow/rules/curvature.smk, masks.smk) call register_edit
# for each edit their config asks for; an edit id carries the hash of the settings that made it,
# so changing one edit's settings makes a new id and reruns only that edit and its evaluation.
EDITS = {"none": "Origin"}
EDIT_DELTAS = {}
# Outputs that stage families add to `rule all` (tables, plots); see final_outputs().
EXTRA_OUTPUTS = []


def register_edit(edit_id, label, delta):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", edit_id):
        raise WorkflowError(f"edit id {edit_id!r} is not a path-safe name")
    if edit_id in EDITS:
        raise WorkflowError(f"edit id {edit_id!r} registered twice")
    EDITS[edit_id] = label
    EDIT_DELTAS[edit_id] = delta


def edit_inputs(wildcards):
    """The delta of an edit (nothing for the unedited model)."""
    delta = EDIT_DELTAS.get(wildcards.edit)
    return {"delta": delta} if delta else {}


def delta_arg(wildcards, input):
    return f"--delta {input.delta}" if "delta" in input.keys() else ""


def final_outputs():
    return [
        f"{RESULTS}/results.md",
        f"{RESULTS}/extraction_by_copies.md",
        f"{RESULTS}/extraction_by_copies.png",
        *EXTRA_OUTPUTS,
    ]


# --- code versions -----------------------------------------------------------------------------
# Rules call `memctl` shell commands, whose Python code Snakemake's "code" trigger cannot see. Each
# rule gets the hash of the modules its stage runs as a param, so editing one stage's module
# reruns that stage and what depends on it (and the between-workflow cache sees the change).
# Shared plumbing (cli, config, artifacts, models) is left out: editing it reruns nothing.
import hashlib

import memctl

MEMCTL_SRC = Path(memctl.__file__).parent
STAGE_MODULES = {
    "demo_corpus": ["demo/corpus.py"],
    "demo_tokenizer": ["demo/tokenizer.py"],
    "demo_pretrain": ["demo/pretrain.py"],
    "candidates": ["data.py"],
    "extract": ["extract.py", "generation.py", "metrics.py"],
    "heldout": ["data.py"],
    "calibration": ["data.py"],
    "reference_topk": ["generation.py"],
    "evaluate": ["evaluate.py", "generation.py", "metrics.py", "edits.py"],
    "report": ["report.py"],
    "collect_kfac": ["curvature/collect.py", "curvature/store.py"],
    "merge_kfac": ["curvature/store.py"],
    "decompose_kfac": ["curvature/decompose.py", "curvature/store.py"],
    "apply_edit": ["curvature/edit.py", "curvature/store.py", "edits.py"],
    "kfac_spectrum": ["curvature/spectrum.py", "curvature/store.py"],
    "curvature_report": ["curvature/report.py", "report.py"],
    "train_mask": ["masks/gates.py", "masks/regularizers.py", "masks/training.py", "masks/data.py", "edits.py"],
    "prune_baseline": ["pruning/*.py", "masks/data.py", "edits.py"],
    "balanced_subnet": ["masks/balanced_subnet.py", "masks/data.py", "edits.py"],
    "masks_report": ["masks/report.py", "report.py"],
}


def stage_code(stage):
    """Short hash of the source of the modules ``stage`` runs (see STAGE_MODULES)."""
    digest = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        for path in sorted(MEMCTL_SRC.glob(name)):
            digest.update(path.relative_to(MEMCTL_SRC).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# --- resources ---------------------------------------------------------------------------------
THREADS = config["resources"]["threads"]
GPU = 1 if config["resources"]["gpu"] else 0


# Memory and wall time per job come from the model's size (memctl.lab: weights, activations,
# K-FAC factors, mask logits + optimizer state) and grow with each retry; `base` is the request
# when the model's config cannot be read while parsing (a hub model not in the local cache).
MODEL_DIMS = workflow_model_dims(config)


def mem_mb(base, stage=None):
    def request(wildcards, attempt):
        if stage is None or MODEL_DIMS is None:
            return base * attempt
        return estimate_mem_mb(MODEL_DIMS, stage, config, gpu=bool(GPU), attempt=attempt)

    return request


def runtime_min(base, stage=None):
    def request(wildcards, attempt):
        if stage is None or MODEL_DIMS is None:
            return base * attempt
        return estimate_runtime_min(MODEL_DIMS, stage, config, gpu=bool(GPU), attempt=attempt, floor_min=base)

    return request


ENV = "../../envs/memctl.yaml"
