"""``memctl init``: a complete, commented workflow config for a user's own model and memories.

It reads the model's ``config.json`` (a local directory, or a hub id's config), its tokenizer, the
memories file (any candidate format of docs/data-formats.md) and the held-out text, then chooses
from them, with the reason beside each value:

- the extraction window (``extract.preset``, or explicit lengths): the standard preset that keeps
  every row (or at least :data:`KEEP_SHARE` of them) within the model's context;
- the split fractions: ``extract.er_test_fraction`` so that the extraction-rate test split, cut
  per (group, copies) stratum exactly as :func:`memctl.extract.split_extraction_rate` cuts it,
  reaches :func:`memctl.stats.min_n_for_width` examples where the data allows (at most half of the
  candidates); ``extract.validation_fraction`` so that the validation slice reaches
  :func:`memctl.stats.min_n_zero_below` sequences if half the candidates are memorized;
- batch sizes from the model's parameter count, the layers to edit from its layer count, held-out
  and calibration window lengths from the text's token count.

The file is written only where nothing exists yet, then validated as ``memctl validate-config``
validates it; a bad model directory, data file or value fails before anything is written, naming
it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memctl import stats
from memctl.config import ConfigError

#: The standard windows, shortest first: ``32/32`` is the cheapest and the default.
PRESETS = ((32, 32), (50, 50), (64, 48))
#: A preset is taken when it keeps at least this share of the rows (the rest are dropped, counted).
KEEP_SHARE = 0.95
#: The extraction-rate test split takes at most this share of the candidates (masks train on the rest).
MAX_ER_TEST_SHARE = 0.5
#: Candidate fractions tried for ``er_test_fraction`` (the weight-pruning paper's 1/15 first).
ER_FRACTIONS = (1 / 15, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
#: Held-out / calibration windows: at least this many of them (shorter windows where text is short).
MIN_WINDOWS = 16


def _model(model: str, revision: str | None):
    """(source, dims) of a local model directory or a hub id (its config from the cache or the hub)."""
    from memctl.lab import local_model_dims, model_dims

    path = Path(model)
    if path.exists():
        return "local", local_model_dims(path, "--model")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model: {model!r} is neither a local model directory nor a readable hub model "
                          f"({type(err).__name__}: {err})") from None
    return "hub", model_dims(cfg)


def _tokenizer(model: str, revision: str | None):
    from memctl.models import load_tokenizer

    try:
        return load_tokenizer(model, {"revision": revision} if revision else None)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"--model: {model}: its tokenizer cannot be loaded ({type(err).__name__}: {err})") from None


def _memories(path: Path) -> tuple[str, pd.DataFrame]:
    """(candidates.source, the table as the candidates stage reads it)."""
    from memctl.data import read_npy_candidates, read_table, sniff_format

    if not path.exists():
        raise ConfigError(f"--memories: {path}: no such file or directory")
    if path.is_dir() or sniff_format(path) == "npy":
        return "npy", read_npy_candidates(path, 1, 1)
    found = sniff_format(path)
    source = {"parquet": "parquet", "jsonl": "jsonl", "gzip": "jsonl"}.get(found)
    if source is None:
        raise ConfigError(f"--memories: {path} is {found}, not JSON lines, parquet or .npy "
                          "(docs/data-formats.md)")
    return source, read_table(path, source, "candidates")


def _text_source(path: Path, flag: str) -> str:
    from memctl.data import sniff_format

    if not path.is_file():
        raise ConfigError(f"{flag}: {path}: no such file")
    found = sniff_format(path)
    source = {"parquet": "parquet", "jsonl": "jsonl", "text": "text"}.get(found)
    if source is None:
        raise ConfigError(f"{flag}: {path} is {found}, not plain text, JSON lines or parquet")
    return source


def _kept(table: pd.DataFrame, tokenizer, source: str, prefix_len: int, suffix_len: int,
          vocab_size: int) -> tuple[pd.DataFrame, int]:
    """(candidates, rows dropped) as the candidates stage would cut them (memctl.data)."""
    from memctl.data import DataError, candidates_from_table

    try:
        df, found = candidates_from_table(table, tokenizer, prefix_len, suffix_len, {}, source,
                                          vocab_size=None if source == "npy" else vocab_size)
    except DataError as err:
        if "all" in str(err) and "rows dropped" in str(err):
            return table.iloc[0:0], len(table)
        raise
    return df, sum(found["dropped"].values())


def choose_window(table: pd.DataFrame, tokenizer, source: str, context: int, vocab_size: int,
                  path: Path | None = None) -> tuple[dict[str, Any], pd.DataFrame, str]:
    """(extract window keys, the candidates it keeps, the reason). For ``.npy`` (``path``) the
    arrays are read again per window: a single array's suffix is its last ``suffix_len`` columns."""
    from memctl.data import read_npy_candidates

    n = len(table)
    tried = []
    if source == "npy":  # the benchmark's window is 50/50 whatever else fits
        order = [(50, 50), (32, 32)]
    else:
        order = list(PRESETS)
    for p, s in order:
        if p + s > context:
            tried.append(f"{p}/{s} exceeds the {context}-token context")
            continue
        if source == "npy" and path is not None:
            table = read_npy_candidates(path, p, s)
        df, dropped = _kept(table, tokenizer, source, p, s, vocab_size)
        if len(df) >= KEEP_SHARE * n:
            why = (f"{p}/{s} keeps {len(df)} of {n} rows" + (f" ({dropped} too short are dropped)" if dropped else "")
                   + (f"; {'; '.join(tried)}" if tried else ""))
            return {"preset": f"{p}/{s}"}, df, why
        tried.append(f"{p}/{s} keeps only {len(df)} of {n} rows")
    # no preset fits: the longest window that keeps KEEP_SHARE of the rows, split like the presets
    lengths = _sequence_lengths(table, tokenizer)
    usable = int(np.quantile(lengths, 1 - KEEP_SHARE, method="lower")) if len(lengths) else 0
    total = min(usable, context)
    if total < 2:
        raise ConfigError(f"--memories: its rows are too short to split into a prefix and a suffix "
                          f"({'; '.join(tried)})")
    p, s = total - total // 2, total // 2
    df, dropped = _kept(table, tokenizer, source, p, s, vocab_size)
    return ({"preset": None, "prefix_len": p, "suffix_len": s}, df,
            f"no preset keeps {KEEP_SHARE:.0%} of the rows ({'; '.join(tried)}); {p}/{s} keeps {len(df)} of {n}")


def _sequence_lengths(table: pd.DataFrame, tokenizer) -> list[int]:
    """Tokens of each row's prefix + suffix (or whole sequence), in the model's tokenizer."""
    from memctl.data import _IDS_NAMES, _PREFIX_NAMES, _SUFFIX_NAMES, _TEXT_NAMES

    def count(value) -> int:
        if isinstance(value, str):
            return len(tokenizer(value, add_special_tokens=False)["input_ids"])
        return len(value) if isinstance(value, (list, tuple, np.ndarray)) else 0

    cols = list(table.columns)
    pcol = next((c for c in _PREFIX_NAMES if c in cols), None)
    scol = next((c for c in _SUFFIX_NAMES if c in cols), None)
    if pcol and scol:  # the presets split evenly; the shorter side limits
        return [2 * min(count(a), count(b)) for a, b in zip(table[pcol], table[scol])]
    whole = next((c for c in (*_IDS_NAMES, *_TEXT_NAMES) if c in cols), None)
    return [count(v) for v in table[whole]] if whole else []


def choose_er_fraction(candidates: pd.DataFrame) -> tuple[float, int, str]:
    """(er_test_fraction, the test split's size, the reason): the smallest fraction of
    :data:`ER_FRACTIONS` whose stratified test split reaches ``min(min_n_for_width(), half the
    candidates)``; sizes are the splitter's own (per (group, copies) stratum, rounded)."""
    from memctl.extract import split_extraction_rate

    n = len(candidates)
    target = stats.min_n_for_width()
    goal = min(target, int(MAX_ER_TEST_SHARE * n))
    best = None
    for f in ER_FRACTIONS:
        size = len(split_extraction_rate(candidates, f, 42)[1])
        best = (f, size)
        if size >= goal and size > 0:
            break
    f, size = best
    strata = candidates.groupby(["group", "copies"]).ngroups
    width = stats.worst_case_width(size)
    why = (f"{size} of {n} candidates in {strata} (group, copies) strata; an exact 95% interval is narrower than "
           f"{stats.TARGET_WIDTH:g} from {target} examples (worst case, a rate of 0.5)")
    if size >= target:
        why += f": reached ({size})"
    else:
        why += (f": not reachable with {n} candidates (at most {MAX_ER_TEST_SHARE:.0%} go to the test side, the masks "
                f"train on the rest); its intervals are up to {width:.2f} wide and its verdicts are marked underpowered")
    if f > 1 / 15 + 1e-9:
        default = len(split_extraction_rate(candidates, 1 / 15, 42)[1])
        why += f"; the default 1/15 would give {default}"
    return f, size, why


def _batch(params: int) -> dict[str, int]:
    """Batch sizes from the parameter count (what fits a 24-80 GB GPU or a laptop's memory)."""
    if params < 200e6:
        return {"extract": 64, "evaluate": 32, "heldout": 4, "masks": 8, "kfac": 8}
    if params < 2e9:
        return {"extract": 32, "evaluate": 16, "heldout": 2, "masks": 4, "kfac": 4}
    return {"extract": 16, "evaluate": 8, "heldout": 1, "masks": 2, "kfac": 2}


def _text_tokens(path: Path, source: str, tokenizer) -> int:
    from memctl.data import text_documents

    texts, sep = text_documents({"source": source, "path": str(path), "text_column": "text"}, section="heldout")
    return len(tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"])


def _window_length(tokens: int, context: int) -> tuple[int | None, str]:
    """(context_length: None = the model's, reason) so the text gives at least :data:`MIN_WINDOWS` windows."""
    if tokens // context >= MIN_WINDOWS:
        return None, f"{tokens} tokens: {tokens // context} windows of the model's {context}-token context"
    length = 2 ** int(math.floor(math.log2(max(tokens // MIN_WINDOWS, 2))))
    length = max(2, min(length, context))
    return length, (f"{tokens} tokens are {tokens // context} windows of the model's {context}-token context; "
                    f"{length}-token windows give {tokens // length}")


def _yaml(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (int, list)):
        return json.dumps(value)
    return json.dumps(str(value))


def _ranges(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 2 else ", ".join(map(str, layers))


def build_config(model: str, memories: str, heldout: str, calibration: str | None = None,
                 revision: str | None = None, root: str = "results") -> str:
    """The commented YAML text of a complete config (see the module docstring)."""
    source, dims = _model(model, revision)
    tokenizer = _tokenizer(model, revision)
    mem_path = Path(memories)
    cand_source, table = _memories(mem_path)
    if len(table) == 0:
        raise ConfigError(f"--memories: {mem_path} has no rows")
    window, candidates, window_why = choose_window(table, tokenizer, cand_source, dims.context_length,
                                                   dims.vocab_size, mem_path)
    if len(candidates) < 2:
        raise ConfigError(f"--memories: {mem_path}: {len(candidates)} usable candidate(s) ({window_why})")
    er_fraction, er_size, er_why = choose_er_fraction(candidates)
    n = len(candidates)
    val_min = stats.min_n_zero_below()
    validation = min(0.3, max(0.1, val_min / max(1, 0.5 * n)))
    val_size = int(round(0.5 * n * validation))
    groups = sorted(map(str, candidates["group"].unique()))
    known = candidates["copies"][candidates["copies"] >= 0]
    copies = f"copies {int(known.min())}-{int(known.max())}" if len(known) else "no copy counts (copies -1: unknown)"
    held_path = Path(heldout)
    held_source = _text_source(held_path, "--heldout")
    cal_path = Path(calibration) if calibration else held_path
    cal_source = _text_source(cal_path, "--calibration") if calibration else held_source
    held_tokens = _text_tokens(held_path, held_source, tokenizer)
    shared = cal_path.resolve() == held_path.resolve()
    held_max: int | None = None
    if shared:
        # one text for both: the held-out windows are its first half, the calibration stage drops them
        # (every window sharing extract.disjoint_ngram tokens with one), so no edit is fitted on the
        # text its held-out perplexity is measured on
        held_ctx, _ = _window_length(held_tokens // 2, dims.context_length)
        length = held_ctx or dims.context_length
        total = held_tokens // length
        held_max = max(1, total // 2)
        held_why = (f"{held_tokens} tokens: {total} windows of "
                    + (f"the model's {length}-token context" if held_ctx is None else f"{length} tokens")
                    + f", half of them held out (at least {MIN_WINDOWS} each where the text allows)")
        cal_ctx, cal_why = held_ctx, "the held-out windows' length (the same text)"
        cal_windows = min(512, max(1, total - held_max))
    else:
        held_ctx, held_why = _window_length(held_tokens, dims.context_length)
        cal_tokens = _text_tokens(cal_path, cal_source, tokenizer)
        cal_ctx, cal_why = _window_length(cal_tokens, dims.context_length)
        cal_windows = min(512, max(1, cal_tokens // (cal_ctx or dims.context_length)))
    params = dims.num_parameters
    batch = _batch(params)
    n_layers = dims.num_layers
    layers = list(range(min(3, max(1, n_layers - 1))))
    gpu = params >= 200e6
    size = (f"{params / 1e3:.0f}k" if params < 1e6 else f"{params / 1e6:.1f}M" if params < 1e9
            else f"{params / 1e9:.2f}B")
    kfac_tokens = cal_windows * (cal_ctx or dims.context_length)
    lines = [
        f"# memctl config for {model} and {mem_path.name}, written by `memctl init` (edit freely; every key is",
        "# documented in workflow/schemas/config.schema.yaml, keys left out take its defaults).",
        "# Run: snakemake all --profile profiles/local --configfile <this file>   (plan only: add -n)",
        f"# Model: {dims.model_type}, {n_layers} layers, hidden {dims.hidden_size}, {dims.context_length}-token context, "
        f"~{size} parameters.",
        f"# Memories: {len(table)} rows ({cand_source}), {n} usable in the chosen window; groups: {', '.join(groups)}; "
        f"{copies}.",
        "",
        f"root: {_yaml(root)}",
        f"results_dir: {_yaml(root + '/tables')}",
        "",
        "model:",
        f"  source: {source}",
        f"  name_or_path: {_yaml(str(Path(model).resolve()) if source == 'local' else model)}",
        f"  revision: {_yaml(revision)}" + ("" if revision or source == "local" else
                                            "   # pin a hub revision: paths and sidecars are keyed by it"),
        f"  dtype: {'bfloat16' if gpu else 'float32'}   # "
        + ("bfloat16 on a GPU for a model this size" if gpu else "float32: small enough to evaluate in full precision"),
        "",
        "candidates:",
        f"  source: {cand_source}        # docs/data-formats.md: fields prefix/suffix (or text / ids), group, copies",
        f"  path: {_yaml(str(mem_path.resolve()))}",
        "",
        "extract:",
    ]
    if window.get("preset"):
        lines.append(f"  preset: {_yaml(window['preset'])}          # {window_why}")
    else:
        lines += [f"  preset: null            # {window_why}",
                  f"  prefix_len: {window['prefix_len']}", f"  suffix_len: {window['suffix_len']}"]
    lines += [
        f"  batch_size: {batch['extract']}          # greedy decoding batch for a ~{size}-parameter model",
        f"  er_test_fraction: {er_fraction:.6g}    # extraction-rate test split: {er_why}",
        "  test_fraction: 0.25     # memorized track: a quarter of what the model extracts exactly is held out",
        f"  validation_fraction: {validation:.3g}  # the validation slice (strengths and layers are chosen on it) "
        f"needs {val_min} sequences",
        f"                          # for a clean 0/N to rule out a rate of {stats.VALIDATION_BOUND:g}; if half the "
        f"{n} candidates are memorized this gives ~{val_size}"
        + ("" if val_size >= val_min else " (too few: add memories for a choice that is not noise)"),
        "                          # (the extract log and results.md warn when the realized slice is smaller)",
        "  split_seed: 42",
        f"  ood_group: null         # optional: one of {groups} held out of every edit's data as an out-of-domain family",
        "",
        "heldout:",
        f"  source: {held_source}",
        f"  path: {_yaml(str(held_path.resolve()))}",
        f"  context_length: {_yaml(held_ctx)}" + f"   # {held_why}",
        *([f"  max_windows: {held_max}           # the text's first {held_max} windows; calibration reads the rest"]
          if shared else []),
        "",
        "calibration:               # K-FAC factors, masks and the pruning baselines fit on this text"
        + ("" if not shared else "; the held-out file (no other --calibration text given): the calibration "
           "stage drops every window sharing extract.disjoint_ngram tokens with a held-out window. Text of "
           "another source (the pruning paper's C4) is better: in docs/masks.md's own-model run, masks fitted on "
           "text of the held-out text's distribution lowered its perplexity 8.07 -> 5.8"),
        f"  source: {cal_source}",
        f"  path: {_yaml(str(cal_path.resolve()))}",
        f"  context_length: {_yaml(cal_ctx)}" + f"   # {cal_why}",
        f"  max_windows: {cal_windows}          # "
        + ("the windows left after the held-out ones, at most 512" if shared else "all the text gives, at most 512"),
        "",
        "evaluate:",
        f"  batch_size: {batch['evaluate']}",
        f"  heldout_batch_size: {batch['heldout']}   # full-context windows: logits are batch x context x vocab",
        "",
        "resources:",
        f"  gpu: {_yaml(gpu)}              # " + ("a job that gets no GPU fails" if gpu else
                                             f"~{size} parameters run on the CPU"),
        "  threads: 2",
        "",
        "curvature:",
        "  data:",
        f"    max_tokens: {kfac_tokens}   # what the calibration windows hold ({cal_windows} windows); the paper: ~2M",
        f"    batch_size: {batch['kfac']}",
        "  sweeps:",
        "    strength:",
        f"      layers: {_yaml(layers)}       # the first {len(layers)} of {n_layers} MLP blocks, as both papers edit "
        f"(blocks {_ranges(layers)})",
        "      kfac: [0.3, 0.5]",
        "      kfac_pairwise: [0.7]",
        "      svd: [0.25, 0.5]",
        "",
        "masks:",
        "  modes: [none, up, down, reciprocal]",
        "  sparsity: 0.3",
        f"  batch_size: {batch['masks']}",
        f"  mem_batch_size: {batch['masks']}",
        "  on_unconverged: flag    # a mask that misses its target is shown 'did not converge', not dropped",
        "",
        "pruning:",
        "  methods: [magnitude, wanda, sparsegpt]",
        "  balanced_subnet:",
        "    on_unconverged: flag  # a BalancedSubnet that barely moved (few memories) is shown 'did not converge', "
        "not a failed run",
        "",
        "downstream:",
        "  tasks: []",
        "",
        "vision:",
        "  enabled: false",
        "",
    ]
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


def _wrap(line: str, width: int = 110) -> list[str]:
    """A long ``value  # reason`` line as that line and continuation comments under its ``#``."""
    import textwrap

    cut = line.find("# ") if line.lstrip().startswith("#") else line.find("  # ")
    if len(line) <= width or cut < 0:
        return [line]
    if not line.lstrip().startswith("#"):
        cut += 2
    code, comment = line[:cut], line[cut + 2:]
    parts = textwrap.wrap(comment, max(40, width - len(code) - 2))
    return [code + "# " + parts[0], *(" " * len(code) + "# " + part for part in parts[1:])]


def write_config(out: str | Path, text: str) -> Path:
    """Validate ``text`` as a config (the error names the key), then write it to ``out`` where
    nothing exists yet: a file is only ever created, never overwritten or removed."""
    import tempfile

    from memctl.config import load_config

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out: {out} exists; memctl init never overwrites a file (choose another --out)")
    with tempfile.TemporaryDirectory(prefix="memctl-init-") as tmp:  # our own scratch copy, read as --out would be
        draft = Path(tmp) / out.name
        draft.write_text(text, encoding="utf-8")
        load_config(str(draft))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as fh:
        fh.write(text)
    return out


def cmd_init(args) -> None:
    text = build_config(args.model, args.memories, args.heldout, args.calibration, args.revision, args.root)
    out = write_config(args.out, text)
    print(f"wrote {out} (valid: memctl validate-config {out})")
    print(f"next: snakemake -n all --configfile {out}   (then without -n to run it)")


def register(subparsers) -> None:
    # imported here, as in every command module (register() stays out of the stages' code hash)
    from memctl.arguments import arg, command

    command(subparsers, "init", cmd_init, "write a commented config for your own model and memories file",
            arg("--model", required=True, help="a local HF model directory or a hub id"),
            arg("--revision", default=None, help="hub revision to pin"),
            arg("--memories", required=True, help="candidates: JSON lines, parquet or .npy (docs/data-formats.md)"),
            arg("--heldout", required=True, help="held-out text: plain text, JSON lines or parquet (column text)"),
            arg("--calibration", default=None, help="calibration text (default: the held-out file)"),
            arg("--root", default="results", help="artifact root (tables under <root>/tables)"),
            arg("--out", default="memctl.yaml", help="config file to write (must not exist)"),
            description="Writes a complete workflow config for a local model directory or hub id and a memories "
            "file (docs/data-formats.md), with window, split fractions, batch sizes and layers chosen from the "
            "model and the data, and the reasons in comments. Never overwrites a file.")

