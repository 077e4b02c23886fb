"""Candidate sequences and held-out text, from every source a user points the pipeline at.

Candidates become one table: ``candidate_id``, ``prefix_ids``, ``suffix_ids`` (token ids of the
target model), ``source``, ``group`` and ``copies`` (known exposure count, or -1 when unknown).
Sources: the demo corpus (planted canaries + sampled windows with their duplicate counts), local
JSONL / parquet (token ids or text), ``.npy`` arrays in the LM extraction benchmark layout, and HF
datasets by name (or a local dataset directory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CANDIDATE_COLUMNS = ["candidate_id", "prefix_ids", "suffix_ids", "source", "group", "copies"]

# Column names tried, in order, when the config does not name them.
_PREFIX_NAMES = ("prefix_ids", "prefix", "prompt", "context")
_SUFFIX_NAMES = ("suffix_ids", "suffix", "continuation", "target")
_IDS_NAMES = ("ids", "input_ids", "tokens", "token_ids")
_TEXT_NAMES = ("text", "content", "sequence")


class DataError(ValueError):
    """A data file or dataset does not have the expected shape or columns."""


# ---------------------------------------------------------------------------------------------
# helpers


def _is_ids(value: Any) -> bool:
    if isinstance(value, str):
        return False
    arr = np.asarray(value)
    return arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_ids(value: Any, tokenizer, where: str) -> list[int]:
    if isinstance(value, str):
        return _encode(tokenizer, value)
    if _is_ids(value):
        return [int(v) for v in np.asarray(value)]
    raise DataError(f"{where}: expected text or a list of token ids, got {type(value).__name__}")


def _pick_column(columns: Sequence[str], wanted: str | None, names: Sequence[str], what: str, where: str):
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where}: column {wanted!r} ({what}) not found; columns: {list(columns)}")
        return wanted
    for name in names:
        if name in columns:
            return name
    return None


def _window_hashes(stream: np.ndarray, length: int) -> np.ndarray:
    """64-bit polynomial hash of every ``length``-token window of ``stream`` (vectorised)."""
    n = len(stream) - length + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    base = np.uint64(1_000_003)
    acc = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(length):
            acc = acc * base + stream[k : k + n].astype(np.uint64) + np.uint64(1)
    return acc


def count_occurrences(stream: np.ndarray, windows: Sequence[Sequence[int]]) -> np.ndarray:
    """How often each window (all of one length) occurs in ``stream``."""
    if len(windows) == 0:
        return np.zeros(0, dtype=np.int64)
    length = len(windows[0])
    all_hashes = np.sort(_window_hashes(np.asarray(stream, dtype=np.int64), length))
    query = np.array([_window_hashes(np.asarray(w, dtype=np.int64), length)[0] for w in windows])
    lo = np.searchsorted(all_hashes, query, side="left")
    hi = np.searchsorted(all_hashes, query, side="right")
    return (hi - lo).astype(np.int64)


def _finish(df: pd.DataFrame, max_candidates: int | None, seed: int) -> pd.DataFrame:
    if max_candidates is not None and len(df) > max_candidates:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(df), size=max_candidates, replace=False))
        df = df.iloc[keep]
    df = df.reset_index(drop=True)
    if df["candidate_id"].duplicated().any():
        dup = df.loc[df["candidate_id"].duplicated(), "candidate_id"].iloc[0]
        raise DataError(f"duplicate candidate_id {dup!r}")
    return df[CANDIDATE_COLUMNS + [c for c in df.columns if c not in CANDIDATE_COLUMNS]]


def _split_whole(ids: Sequence[int], prefix_len: int, suffix_len: int):
    if len(ids) < prefix_len + suffix_len:
        return None
    return list(ids[:prefix_len]), list(ids[prefix_len : prefix_len + suffix_len])


def _split_pair(prefix: Sequence[int], suffix: Sequence[int], prefix_len: int, suffix_len: int):
    if len(prefix) < prefix_len or len(suffix) < suffix_len:
        return None
    return list(prefix[len(prefix) - prefix_len :]), list(suffix[:suffix_len])


# ---------------------------------------------------------------------------------------------
# candidate sources


def candidates_from_table(
    table: pd.DataFrame,
    tokenizer,
    prefix_len: int,
    suffix_len: int,
    settings: Mapping[str, Any],
    source: str,
    source_tokenizer=None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Candidates from a table with prefix/suffix columns, or one whole-sequence column.

    Prefix/suffix columns: the last ``prefix_len`` prefix tokens and the first ``suffix_len``
    suffix tokens. A whole sequence (ids or text): its first ``prefix_len + suffix_len`` tokens.
    Rows too short for the window are dropped and counted. With ``source_tokenizer`` given, id
    columns are decoded with it and re-encoded with the target tokenizer.
    """
    cols = list(table.columns)
    pcol = _pick_column(cols, settings.get("prefix_column"), _PREFIX_NAMES, "prefix", source)
    scol = _pick_column(cols, settings.get("suffix_column"), _SUFFIX_NAMES, "suffix", source)
    idcol = _pick_column(cols, settings.get("id_column"), ("candidate_id", "id", "index"), "id", source)
    whole = None
    if pcol is None or scol is None:
        whole = _pick_column(cols, settings.get("ids_column"), _IDS_NAMES, "token ids", source)
        if whole is None:
            whole = _pick_column(cols, settings.get("text_column"), _TEXT_NAMES, "text", source)
        if whole is None:
            raise DataError(
                f"{source}: need prefix/suffix columns or a whole-sequence column (ids or text); "
                f"columns: {cols}"
            )

    def convert(value, where):
        if source_tokenizer is not None and _is_ids(value):
            value = source_tokenizer.decode([int(v) for v in np.asarray(value)])
        return _as_ids(value, tokenizer, where)

    rows, dropped = [], 0
    for i, rec in enumerate(table.to_dict("records")):
        where = f"{source} row {i}"
        if whole is not None:
            pair = _split_whole(convert(rec[whole], where), prefix_len, suffix_len)
        else:
            pair = _split_pair(
                convert(rec[pcol], where), convert(rec[scol], where), prefix_len, suffix_len
            )
        if pair is None:
            dropped += 1
            continue
        cid = str(rec[idcol]) if idcol is not None else f"row-{i:07d}"
        rows.append(
            {
                "candidate_id": cid,
                "prefix_ids": pair[0],
                "suffix_ids": pair[1],
                "source": source,
                "group": str(rec.get("group", "all")),
                "copies": int(rec["copies"]) if "copies" in rec and rec["copies"] is not None else -1,
            }
        )
    if not rows:
        raise DataError(
            f"{source}: no row has {prefix_len} prefix + {suffix_len} suffix tokens ({dropped} too short)"
        )
    return pd.DataFrame(rows), {"rows": len(table), "dropped_too_short": dropped}


def read_table(path: str | Path) -> pd.DataFrame:
    """A local JSONL or parquet file as a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"candidate file not found: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json", ".jsonl.gz"):
        try:
            return pd.read_json(path, lines=True)
        except ValueError as err:
            raise DataError(f"{path}: not valid JSON lines ({err})") from err
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl or .parquet)")


def read_npy_candidates(path: str | Path, prefix_len: int, suffix_len: int) -> pd.DataFrame:
    """LM extraction benchmark arrays (uint16 token ids).

    ``path`` is either a directory holding ``*_prefix.npy`` and ``*_suffix.npy`` (optionally
    ``*_preprefix.npy``, which is prepended to the prefix), or one 2-D array whose rows are
    pre-prefix + prefix + suffix: the last ``suffix_len`` columns are the suffix and everything
    before is prefix material.
    """
    path = Path(path)
    if path.is_dir():
        pre_files = sorted(path.glob("*_prefix.npy"))
        if len(pre_files) != 1:
            raise DataError(f"{path}: expected exactly one *_prefix.npy, found {[p.name for p in pre_files]}")
        stem = pre_files[0].name[: -len("_prefix.npy")]
        suf = path / f"{stem}_suffix.npy"
        if not suf.exists():
            raise DataError(f"{path}: {suf.name} missing next to {pre_files[0].name}")
        prefix = np.load(pre_files[0], allow_pickle=False)
        suffix = np.load(suf, allow_pickle=False)
        preprefix_file = path / f"{stem}_preprefix.npy"
        if preprefix_file.exists():
            prefix = np.concatenate([np.load(preprefix_file, allow_pickle=False), prefix], axis=1)
        where = f"{path}/{stem}_*.npy"
    elif path.exists():
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or arr.shape[1] <= suffix_len:
            raise DataError(f"{path}: expected a 2-D array wider than suffix_len={suffix_len}, got {arr.shape}")
        prefix, suffix = arr[:, :-suffix_len], arr[:, -suffix_len:]
        where = str(path)
    else:
        raise DataError(f"npy candidates not found: {path}")
    if prefix.shape[0] != suffix.shape[0]:
        raise DataError(f"{where}: {prefix.shape[0]} prefix rows but {suffix.shape[0]} suffix rows")
    if not np.issubdtype(prefix.dtype, np.integer) or not np.issubdtype(suffix.dtype, np.integer):
        raise DataError(f"{where}: token arrays must be integer (uint16 in the benchmark)")
    return pd.DataFrame(
        {
            "candidate_id": [f"row-{i:07d}" for i in range(len(prefix))],
            "prefix_ids": [row.astype(np.int64) for row in prefix],
            "suffix_ids": [row.astype(np.int64) for row in suffix],
        }
    )


def load_hf_table(
    name: str, config_name: str | None, split: str, revision: str | None = None
) -> pd.DataFrame:
    """A HF dataset split as a DataFrame: a hub id, a local dataset folder, or a ``save_to_disk`` dir."""
    import datasets

    local = Path(name)
    if local.is_dir() and (local / "dataset_info.json").exists() and (local / "state.json").exists():
        ds = datasets.load_from_disk(str(local))
    elif local.is_dir() and (local / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(local))[split]
    else:
        ds = datasets.load_dataset(name, config_name, split=split, revision=revision)
    return ds.to_pandas()


def demo_candidates(
    corpus_dir: str | Path,
    tokenizer,
    prefix_len: int,
    suffix_len: int,
    n_windows: int,
    seed: int,
    n_duplicated: int = 0,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Planted canaries plus windows of the demo training stream.

    ``n_windows`` windows start at uniformly random positions; up to ``n_duplicated`` more are
    windows that occur at least twice in the stream (natural duplicates such as licence headers
    and boilerplate), so natural memorization can be read by duplication count. Every row's
    ``copies`` is how often its full prefix+suffix window occurs in the token stream the model was
    trained on (canaries also keep ``planted_copies``).
    """
    from memctl.corpus_stream import train_token_stream

    corpus_dir = Path(corpus_dir)
    stream, in_canary = train_token_stream(corpus_dir, tokenizer, return_canary_mask=True)
    stream = np.asarray(stream, dtype=np.int64)
    canaries = pd.read_parquet(corpus_dir / "canaries.parquet")
    width = prefix_len + suffix_len
    rows, short = [], 0
    for rec in canaries.to_dict("records"):
        ids = _encode(tokenizer, rec["text"])
        if len(ids) < width:
            short += 1
            continue
        rows.append(
            {
                "candidate_id": f"canary:{rec['canary_id']}",
                "prefix_ids": ids[:prefix_len],
                "suffix_ids": ids[prefix_len:width],
                "source": "demo-canary",
                "group": f"canary-{rec['kind']}",
                "planted_copies": int(rec["copies"]),
            }
        )
    if short:
        raise DataError(
            f"{corpus_dir}/canaries.parquet: {short} canaries are shorter than {width} tokens; "
            "raise demo.canaries.words / digits or use a shorter extract preset"
        )
    hashes = _window_hashes(stream, width)
    uniq, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    # Corpus windows must not touch a planted canary: their counts would be the canary's.
    canary_tokens = np.concatenate([[0], np.cumsum(in_canary, dtype=np.int64)])
    touches_canary = (canary_tokens[width:] - canary_tokens[:-width]) > 0
    clean = np.flatnonzero(~touches_canary)
    rng = np.random.default_rng(seed)
    n_windows = min(n_windows, len(clean))
    starts = rng.choice(clean, size=n_windows, replace=False) if n_windows else np.zeros(0, int)
    duplicated = np.setdiff1d(first[(counts >= 2) & ~touches_canary[first]], starts)
    n_duplicated = min(n_duplicated, len(duplicated))
    dup_starts = rng.choice(duplicated, size=n_duplicated, replace=False) if n_duplicated else np.zeros(0, int)
    for group, chosen in (("corpus-window", starts), ("corpus-duplicate", dup_starts)):
        for s in np.sort(chosen):
            win = stream[s : s + width]
            rows.append(
                {
                    "candidate_id": f"window:{int(s)}",
                    "prefix_ids": win[:prefix_len].tolist(),
                    "suffix_ids": win[prefix_len:].tolist(),
                    "source": "demo-corpus",
                    "group": group,
                    "planted_copies": -1,
                }
            )
    df = pd.DataFrame(rows)
    query = np.array([_window_hashes(np.asarray(p + s, dtype=np.int64), width)[0] for p, s in
                      zip(df["prefix_ids"], df["suffix_ids"])], dtype=np.uint64)
    pos = np.clip(np.searchsorted(uniq, query), 0, len(uniq) - 1)
    df["copies"] = np.where(uniq[pos] == query, counts[pos], 0).astype(np.int64)
    stats = {
        "canaries": int(len(canaries)),
        "windows": int(n_windows),
        "duplicated_windows": int(n_duplicated),
        "distinct_duplicated_windows_in_stream": int((counts >= 2).sum()),
        "stream_tokens": int(len(stream)),
    }
    return df, stats


def build_candidates(
    settings: Mapping[str, Any],
    tokenizer,
    prefix_len: int,
    suffix_len: int,
    corpus_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dispatch on ``settings['source']`` and return (candidates, stats)."""
    src = settings["source"]
    seed = int(settings.get("seed", 0))
    source_tok = None
    if settings.get("source_tokenizer"):
        from memctl.models import load_tokenizer

        source_tok = load_tokenizer(settings["source_tokenizer"])
    if src == "demo":
        if corpus_dir is None:
            raise DataError("candidates.source 'demo' needs the demo corpus directory (--corpus)")
        df, stats = demo_candidates(
            corpus_dir, tokenizer, prefix_len, suffix_len, int(settings.get("demo_windows", 0)), seed,
            n_duplicated=int(settings.get("demo_duplicated_windows", 0)),
        )
    elif src in ("jsonl", "parquet"):
        table = read_table(settings["path"])
        df, stats = candidates_from_table(
            table, tokenizer, prefix_len, suffix_len, settings, str(settings["path"]), source_tok
        )
    elif src == "npy":
        table = read_npy_candidates(settings["path"], prefix_len, suffix_len)
        df, stats = candidates_from_table(
            table, tokenizer, prefix_len, suffix_len, {}, str(settings["path"]), source_tok
        )
    elif src == "hf":
        table = load_hf_table(
            settings["hf_name"], settings.get("hf_config"), settings.get("hf_split", "train"),
            settings.get("hf_revision"),
        )
        df, stats = candidates_from_table(
            table, tokenizer, prefix_len, suffix_len, settings, f"hf:{settings['hf_name']}", source_tok
        )
    else:
        raise DataError(f"candidates.source: unknown source {src!r}")
    df = _finish(df, settings.get("max_candidates"), seed)
    stats = dict(stats, kept=int(len(df)), prefix_len=prefix_len, suffix_len=suffix_len)
    return df, stats


# ---------------------------------------------------------------------------------------------
# held-out text


def text_documents(
    settings: Mapping[str, Any],
    corpus_dir: str | Path | None = None,
    section: str = "heldout",
    demo_split: str = "heldout",
) -> tuple[list[str], str]:
    """Documents of a text source and the separator to join them with ('eos' or a string).

    ``source: demo`` reads the demo corpus: its held-out documents (``demo_split='heldout'``) or its
    training documents without the planted canaries (``'train'``, pretraining-like calibration text).
    """
    src = settings["source"]
    col = settings.get("text_column", "text")
    if src == "demo":
        if corpus_dir is None:
            raise DataError(f"{section}.source 'demo' needs the demo corpus directory (--corpus)")
        table = pd.read_parquet(Path(corpus_dir) / f"{demo_split}.parquet")
        if "kind" in table.columns:
            table = table[table["kind"] == "doc"]
        return table["text"].tolist(), "eos"
    if src == "text":
        path = Path(settings["path"])
        if not path.exists():
            raise DataError(f"{section}.path: text file not found: {path}")
        return [path.read_text(encoding="utf-8")], "\n\n"
    if src in ("jsonl", "parquet"):
        table = read_table(settings["path"])
    elif src == "hf":
        table = load_hf_table(
            settings["hf_name"], settings.get("hf_config"), settings.get("hf_split", "validation"),
            settings.get("hf_revision"),
        )
    else:
        raise DataError(f"{section}.source: unknown source {src!r}")
    if col not in table.columns:
        raise DataError(f"{section}.text_column: column {col!r} not found; columns: {list(table.columns)}")
    # WikiText-2 protocol: the split's lines joined with blank lines, then cut into windows.
    return [str(t) for t in table[col].tolist()], "\n\n"


def heldout_texts(settings: Mapping[str, Any], corpus_dir: str | Path | None = None) -> tuple[list[str], str]:
    """Held-out documents (the demo's held-out split, or the configured source)."""
    return text_documents(settings, corpus_dir, "heldout", "heldout")


def heldout_windows(
    texts: Sequence[str], separator: str, tokenizer, context_length: int, max_windows: int | None = None
) -> np.ndarray:
    """Non-overlapping ``context_length`` windows of the tokenized text; the ragged tail is dropped."""
    if separator == "eos":
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for t in texts:
            ids.extend(_encode(tokenizer, t))
            if eos is not None:
                ids.append(eos)
    else:
        ids = _encode(tokenizer, separator.join(texts))
    n = len(ids) // context_length
    if n == 0:
        raise DataError(f"held-out text has {len(ids)} tokens, fewer than one window of {context_length}")
    if max_windows is not None:
        n = min(n, max_windows)
    return np.asarray(ids[: n * context_length], dtype=np.int64).reshape(n, context_length)



def calibration_windows(
    texts: Sequence[str],
    separator: str,
    tokenizer,
    context_length: int,
    max_windows: int | None,
    seed: int,
) -> np.ndarray:
    """Full-length windows of calibration text, a seeded random choice of ``max_windows`` of them.

    Consumers (K-FAC collection, mask training, Wanda / SparseGPT) take the first N rows as their
    data budget, so a smaller budget uses a subset of a larger one.
    """
    windows = heldout_windows(texts, separator, tokenizer, context_length)
    order = np.random.default_rng(seed).permutation(len(windows))
    if max_windows is not None:
        order = order[:max_windows]
    return np.ascontiguousarray(windows[order])
