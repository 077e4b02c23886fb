"""Candidate sequences and held-out text, from every source a user points the pipeline at.

Candidates become one table: ``candidate_id``, ``prefix_ids``, ``suffix_ids`` (token ids of the
target model), ``source``, ``group`` and ``copies`` (known exposure count, or -1 when unknown).
Sources: the demo corpus (planted canaries + sampled windows with their duplicate counts), local
JSONL / parquet (token ids or text), ``.npy`` arrays in the LM extraction benchmark layout, and HF
datasets by name (or a local dataset directory).

Bad input fails here, before anything is written, with the file (and row and column) named: a
declared source that does not match the file's content, a file a library cannot read, a token id
that is not an integer or lies outside the model's vocabulary. Rows too short for the extraction
window are dropped, counted by reason (``stats['dropped']``) and logged as a warning; when every
row is dropped the stage fails.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("memctl.data")

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


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def id_list(value: Any, where: str) -> list[int]:
    """The token ids of one cell (a list or 1-D array), or :class:`DataError` naming ``where`` and
    the position of the first element that is not an integer: None / NaN (a missing value), a
    fraction, a string, a nested list. A whole-number float is accepted (pandas stores an integer
    list column that has a null anywhere as floats)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise DataError(f"{where}: expected a list of token ids, got a {value.ndim}-D array of shape {value.shape}")
        if np.issubdtype(value.dtype, np.integer):
            if value.size and np.issubdtype(value.dtype, np.unsignedinteger) and int(value.max()) > np.iinfo(np.int64).max:
                raise DataError(f"{where}: token id {int(value.max())} does not fit in int64")
            return value.astype(np.int64).tolist()
    ids = []
    for k, v in enumerate(value):
        if isinstance(v, (bool, np.bool_)):
            bad = f"{v!r} (a boolean)"
        elif isinstance(v, (int, np.integer)):
            ids.append(int(v))
            continue
        elif _is_missing(v):
            bad = "a missing value (NaN / None / null)"
        elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
            ids.append(int(v))
            continue
        elif isinstance(v, (float, np.floating)):
            bad = f"the float {v!r}"
        else:
            bad = f"{v!r} (a {type(v).__name__})"
        raise DataError(f"{where}: position {k} is {bad}, not a token id (an id list holds integers only)")
    return ids


def check_id_range(ids: Sequence[int], vocab_size: int | None, where: str, vocabulary: str = "the model's vocabulary",
                   hint: str = "") -> None:
    """Every id in ``[0, vocab_size)`` (only ``>= 0`` when the size is unknown), else
    :class:`DataError` naming ``where``, the position, the id and the limit."""
    if len(ids) == 0:
        return
    arr = np.asarray(ids, dtype=np.int64)
    bad = arr < 0 if vocab_size is None else (arr < 0) | (arr >= int(vocab_size))
    if bad.any():
        k = int(np.argmax(bad))
        limit = "ids are >= 0" if vocab_size is None else f"{vocabulary} has {int(vocab_size)} ids: 0..{int(vocab_size) - 1}"
        raise DataError(f"{where}: token id {int(arr[k])} at position {k} is out of range ({limit})"
                        f"{hint if arr[k] >= 0 else ''}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_ids(value: Any, tokenizer, where: str) -> list[int]:
    if isinstance(value, str):
        return _encode(tokenizer, value)
    if _is_sequence(value):
        return id_list(value, where)
    if _is_missing(value):
        raise DataError(f"{where}: missing value (null / NaN); expected text or a list of token ids")
    raise DataError(f"{where}: expected text or a list of token ids, got {type(value).__name__} {str(value)[:50]!r}")


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


#: Why a row can be dropped (``stats['dropped']`` counts each).
DROP_REASONS = ("prefix_too_short", "suffix_too_short", "sequence_too_short")


def _split_whole(ids: Sequence[int], prefix_len: int, suffix_len: int):
    if len(ids) < prefix_len + suffix_len:
        return "sequence_too_short"
    return list(ids[:prefix_len]), list(ids[prefix_len : prefix_len + suffix_len])


def _split_pair(prefix: Sequence[int], suffix: Sequence[int], prefix_len: int, suffix_len: int):
    if len(prefix) < prefix_len:
        return "prefix_too_short"
    if len(suffix) < suffix_len:
        return "suffix_too_short"
    return list(prefix[len(prefix) - prefix_len :]), list(suffix[:suffix_len])


def _copies(value: Any, where: str) -> int:
    """A row's exposure count: a whole number >= 0, or -1 where it is missing (null / NaN / no
    column); anything else is a :class:`DataError` naming ``where``."""
    if value is None or _is_missing(value):
        return -1
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)) \
            or not float(value).is_integer() or value < 0:
        raise DataError(f"{where}: {value!r} is not a count of copies (a whole number >= 0, or null when unknown)")
    return int(value)


def describe_dropped(dropped: Mapping[str, int], prefix_len: int, suffix_len: int) -> str:
    """'3 with fewer than 32 prefix tokens, 1 ...' for the counts that are not 0."""
    what = {"prefix_too_short": f"with fewer than {prefix_len} prefix tokens",
            "suffix_too_short": f"with fewer than {suffix_len} suffix tokens",
            "sequence_too_short": f"shorter than {prefix_len} + {suffix_len} = {prefix_len + suffix_len} tokens"}
    return ", ".join(f"{n} {what.get(reason, reason)}" for reason, n in dropped.items() if n)


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
    vocab_size: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Candidates from a table with prefix/suffix columns, or one whole-sequence column.

    Prefix/suffix columns: the last ``prefix_len`` prefix tokens and the first ``suffix_len``
    suffix tokens. A whole sequence (ids or text): its first ``prefix_len + suffix_len`` tokens.
    Rows too short for the window are dropped and counted by reason (``stats['dropped']``); when
    every row is, :class:`DataError`. With ``source_tokenizer`` given, id columns are decoded with
    it and re-encoded with the target tokenizer. Id columns are checked cell by cell: integers
    only, and in ``[0, vocab_size)`` (the model's vocabulary; the source tokenizer's when ids are
    re-encoded) -- the error names the file, row, column and limit.
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
    if len(table) == 0:
        raise DataError(f"{source}: no rows")
    if source_tokenizer is not None:
        raw_limit, vocabulary = len(source_tokenizer), "the source tokenizer's vocabulary (candidates.source_tokenizer)"
        hint = ""
    else:
        raw_limit, vocabulary = vocab_size, "the model's vocabulary"
        hint = ("; ids written with another tokenizer (the LM extraction benchmark's are GPT-2's)? "
                "set candidates.source_tokenizer to decode them with it")

    def convert(value, where):
        if _is_sequence(value):
            ids = id_list(value, where)
            check_id_range(ids, raw_limit, where, vocabulary, hint)
            if source_tokenizer is None:
                return ids
            value = source_tokenizer.decode(ids)
        return _as_ids(value, tokenizer, where)

    rows = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for i, rec in enumerate(table.to_dict("records")):
        where = f"{source} row {i}"
        if whole is not None:
            pair = _split_whole(convert(rec[whole], f"{where} column {whole!r}"), prefix_len, suffix_len)
        else:
            pair = _split_pair(
                convert(rec[pcol], f"{where} column {pcol!r}"), convert(rec[scol], f"{where} column {scol!r}"),
                prefix_len, suffix_len,
            )
        if isinstance(pair, str):
            dropped[pair] += 1
            continue
        cid = str(rec[idcol]) if idcol is not None else f"row-{i:07d}"
        group = rec.get("group")
        rows.append(
            {
                "candidate_id": cid,
                "prefix_ids": pair[0],
                "suffix_ids": pair[1],
                "source": source,
                # a row without a group (a JSON line that leaves it out: NaN in the table) is in "all"
                "group": "all" if group is None or _is_missing(group) else str(group),
                "copies": _copies(rec.get("copies"), f"{where} column 'copies'"),
            }
        )
    if not rows:
        raise DataError(
            f"{source}: all {len(table)} rows dropped ({describe_dropped(dropped, prefix_len, suffix_len)}); "
            f"no row has {prefix_len} prefix + {suffix_len} suffix tokens"
        )
    return pd.DataFrame(rows), {"rows": len(table), "dropped": dropped}


#: What a declared ``source`` must find in the file (:func:`sniff_format`).
_ACCEPTS = {"parquet": {"parquet"}, "jsonl": {"jsonl"}, "npy": {"npy"}, "text": {"text", "jsonl", "json-array"}}
_FORMAT_NAMES = {"parquet": "a parquet file", "npy": "a .npy array", "gzip": "a gzip file", "zip": "a zip (.npz) file",
                 "jsonl": "JSON lines", "json-array": "a JSON array (not JSON lines: one object per line)",
                 "text": "a text file", "binary": "a binary file (not UTF-8 text)", "empty": "an empty file"}


def sniff_format(path: str | Path) -> str:
    """What a file holds, from its first bytes: ``parquet``, ``npy``, ``gzip``, ``zip``,
    ``jsonl`` (text starting with ``{``), ``json-array``, ``text``, ``binary`` or ``empty``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    if not head:
        return "empty"
    for magic, kind in ((b"PAR1", "parquet"), (b"\x93NUMPY", "npy"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip")):
        if head.startswith(magic):
            return kind
    for cut in range(4):  # the 4096-byte head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return "binary"
    if "\x00" in text:
        return "binary"
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("{"):
        return "jsonl"
    if stripped.startswith("["):
        return "json-array"
    return "text"


def check_format(path: str | Path, source: str, section: str) -> None:
    """:class:`DataError` naming ``<section>.source`` and the file when the file's content is not
    what the declared source reads (``source: jsonl`` on a parquet file, ``npy`` on text, ...)."""
    found = sniff_format(path)
    accepted = set(_ACCEPTS.get(source, ()))
    if source == "jsonl" and str(path).endswith(".gz"):
        accepted.add("gzip")
    if found in accepted:
        return
    sources = ("jsonl", "parquet", "npy") if section == "candidates" else ("text", "jsonl", "parquet")
    hint = f"; set {section}.source: {found}" if found in sources and found != "text" else ""
    raise DataError(f"{section}.source is {source!r}, but {section}.path {path} is {_FORMAT_NAMES.get(found, found)}"
                    f"{hint}")


def read_parquet_file(path: str | Path, what: str = "parquet file") -> pd.DataFrame:
    """``pd.read_parquet`` with any pyarrow / IO error turned into :class:`DataError` naming the file."""
    import pyarrow as pa

    try:
        return pd.read_parquet(path)
    except FileNotFoundError as err:
        raise DataError(f"{what} not found: {path}") from err
    except (OSError, ValueError, pa.lib.ArrowException) as err:
        raise DataError(f"{path}: not a readable {what} ({type(err).__name__}: {err})") from err


def read_table(path: str | Path, source: str | None = None, section: str = "candidates") -> pd.DataFrame:
    """A local JSONL or parquet file as a DataFrame.

    With ``source`` ('jsonl' or 'parquet', the config's), the file's content must match it; without
    it the content decides. Library errors are :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        what = "candidate file" if section == "candidates" else f"{section}.path: file"
        raise DataError(f"{what} not found: {path}")
    if path.is_dir():
        raise DataError(f"{section}.path: {path} is a directory, not a {source or 'jsonl / parquet'} file")
    if source is None:
        found = sniff_format(path)
        source = {"parquet": "parquet", "jsonl": "jsonl", "gzip": "jsonl"}.get(found)
        if source is None:
            raise DataError(f"{path}: {_FORMAT_NAMES.get(found, found)}; expected JSON lines or parquet")
    check_format(path, source, section)
    if source == "parquet":
        return read_parquet_file(path)
    if source == "jsonl":
        try:
            # utf-8-sig: a leading byte-order mark (Windows editors write one) is read past, not refused
            return pd.read_json(path, lines=True, compression="infer", encoding="utf-8-sig")
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: not valid JSON lines ({type(err).__name__}: {err})") from err
    raise DataError(f"{section}.source: {source!r} is not a table format (use jsonl or parquet)")


def _load_npy(path: Path, section: str = "candidates") -> np.ndarray:
    check_format(path, "npy", section)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from err


def _check_npy_ids(arr: np.ndarray, name: str, vocab_size: int | None, vocabulary: str, hint: str) -> None:
    """Every id of a 2-D token array in range, else :class:`DataError` naming file, row, column, limit."""
    if arr.size == 0:
        return
    bad = arr < 0 if vocab_size is None else (arr < 0) | (arr >= vocab_size)
    if bad.any():
        r, c = (int(x) for x in np.argwhere(bad)[0])
        n_rows = int(bad.any(axis=1).sum())
        limit = "ids are >= 0" if vocab_size is None else f"{vocabulary} has {vocab_size} ids: 0..{vocab_size - 1}"
        raise DataError(f"{name} row {r} column {c}: token id {int(arr[r, c])} is out of range ({limit}; "
                        f"{n_rows} of {arr.shape[0]} rows have such ids){hint if arr[r, c] >= 0 else ''}")


def read_npy_candidates(
    path: str | Path, prefix_len: int, suffix_len: int, vocab_size: int | None = None,
    vocabulary: str = "the model's vocabulary", hint: str = "",
) -> pd.DataFrame:
    """LM extraction benchmark arrays (uint16 token ids).

    ``path`` is either a directory holding ``*_prefix.npy`` and ``*_suffix.npy`` (optionally
    ``*_preprefix.npy``, which is prepended to the prefix), or one 2-D array whose rows are
    pre-prefix + prefix + suffix: the last ``suffix_len`` columns are the suffix and everything
    before is prefix material. Every id must be ``>= 0`` and below ``vocab_size`` when it is given
    (the error names the array file, row and column).
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
        parts = {"prefix": pre_files[0], "suffix": suf}
        preprefix_file = path / f"{stem}_preprefix.npy"
        if preprefix_file.exists():
            parts["preprefix"] = preprefix_file
        arrays = {}
        for name, file in parts.items():
            arr = _load_npy(file)
            if arr.ndim != 2:
                raise DataError(f"{file}: expected a 2-D array (rows x tokens), got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{file}: token arrays must be integer (uint16 in the benchmark), got {arr.dtype}")
            _check_npy_ids(arr, str(file), vocab_size, vocabulary, hint)
            arrays[name] = arr
        prefix, suffix = arrays["prefix"], arrays["suffix"]
        if "preprefix" in arrays:
            if arrays["preprefix"].shape[0] != prefix.shape[0]:
                raise DataError(f"{path}: {arrays['preprefix'].shape[0]} preprefix rows but {prefix.shape[0]} prefix rows")
            prefix = np.concatenate([arrays["preprefix"], prefix], axis=1)
        where = f"{path}/{stem}_*.npy"
    elif path.exists():
        arr = _load_npy(path)
        if arr.ndim != 2 or arr.shape[1] <= suffix_len:
            raise DataError(f"{path}: expected a 2-D array wider than suffix_len={suffix_len}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: token arrays must be integer (uint16 in the benchmark), got {arr.dtype}")
        _check_npy_ids(arr, str(path), vocab_size, vocabulary, hint)
        prefix, suffix = arr[:, :-suffix_len], arr[:, -suffix_len:]
        where = str(path)
    else:
        raise DataError(f"npy candidates not found: {path}")
    if prefix.shape[0] != suffix.shape[0]:
        raise DataError(f"{where}: {prefix.shape[0]} prefix rows but {suffix.shape[0]} suffix rows")
    return pd.DataFrame(
        {
            "candidate_id": [f"row-{i:07d}" for i in range(len(prefix))],
            "prefix_ids": [row.astype(np.int64) for row in prefix],
            "suffix_ids": [row.astype(np.int64) for row in suffix],
        }
    )


def load_hf_table(
    name: str, config_name: str | None, split: str, revision: str | None = None, section: str = "candidates"
) -> pd.DataFrame:
    """A HF dataset split as a DataFrame: a hub id, a local dataset folder, or a ``save_to_disk`` dir.

    Any error of ``datasets`` (not found, offline, a bad split, unreadable files) is a
    :class:`DataError` naming the dataset, its config and split.
    """
    import datasets

    local = Path(name)
    try:
        if local.is_dir() and (local / "dataset_info.json").exists() and (local / "state.json").exists():
            ds = datasets.load_from_disk(str(local))
        elif local.is_dir() and (local / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(local))
            if split not in saved:
                raise DataError(f"{section}.hf_split: {split!r} not in {name} (splits: {sorted(saved)})")
            ds = saved[split]
        else:
            ds = datasets.load_dataset(name, config_name, split=split, revision=revision)
        return ds.to_pandas()
    except DataError:
        raise
    except Exception as err:  # datasets raises many kinds (not found, offline, bad split, arrow errors)
        raise DataError(
            f"{section}.hf_name: cannot load dataset {name!r} (config {config_name!r}, split {split!r}): "
            f"{type(err).__name__}: {err}"
        ) from err


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
    canaries = read_parquet_file(corpus_dir / "canaries.parquet", "demo canaries table")
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


def check_candidate_table(
    df: pd.DataFrame, where: str, vocab_size: int | None = None, context_length: int | None = None,
    allow_empty: bool = False,
) -> None:
    """A candidate table a stage is handed (or about to write): ``prefix_ids`` / ``suffix_ids``
    columns of integer ids in ``[0, vocab_size)``, prefix + suffix within ``context_length``.
    :class:`DataError` names the file (``where``), the row, its candidate id and the limit."""
    missing = [c for c in ("prefix_ids", "suffix_ids") if c not in df.columns]
    if missing:
        raise DataError(f"{where}: not a candidate table: no {' / '.join(missing)} column; columns: {list(df.columns)}")
    if len(df) == 0 and not allow_empty:
        raise DataError(f"{where}: no candidates")
    ids = df["candidate_id"].tolist() if "candidate_id" in df.columns else [None] * len(df)
    for i, (cid, prefix, suffix) in enumerate(zip(ids, df["prefix_ids"], df["suffix_ids"])):
        row = f"{where} row {i}" + (f" (candidate {cid})" if cid is not None else "")
        lengths = []
        for col, value in (("prefix_ids", prefix), ("suffix_ids", suffix)):
            cell = f"{row} column {col!r}"
            if not _is_sequence(value):
                raise DataError(f"{cell}: expected a list of token ids, got {type(value).__name__}")
            values = id_list(value, cell)
            check_id_range(values, vocab_size, cell)
            lengths.append(len(values))
        if context_length is not None and sum(lengths) > context_length:
            raise DataError(f"{row}: {lengths[0]} prefix + {lengths[1]} suffix = {sum(lengths)} tokens exceed the "
                            f"model's context length of {context_length}")


def build_candidates(
    settings: Mapping[str, Any],
    tokenizer,
    prefix_len: int,
    suffix_len: int,
    corpus_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dispatch on ``settings['source']`` and return (candidates, stats).

    ``vocab_size`` (the model's, its embedding rows) bounds every token id: a table with an id
    outside it is never returned. ``stats['dropped']`` counts the rows dropped by reason; a
    warning says how many when any are.
    """
    src = settings["source"]
    seed = int(settings.get("seed", 0))
    source_tok = None
    if settings.get("source_tokenizer"):
        from memctl.models import load_tokenizer

        try:
            source_tok = load_tokenizer(settings["source_tokenizer"])
        except (OSError, ValueError) as err:
            raise DataError(f"candidates.source_tokenizer: cannot load {settings['source_tokenizer']!r} "
                            f"({type(err).__name__}: {err})") from err
    if src == "demo":
        if corpus_dir is None:
            raise DataError("candidates.source 'demo' needs the demo corpus directory (--corpus)")
        df, stats = demo_candidates(
            corpus_dir, tokenizer, prefix_len, suffix_len, int(settings.get("demo_windows", 0)), seed,
            n_duplicated=int(settings.get("demo_duplicated_windows", 0)),
        )
        where = f"{corpus_dir} (demo candidates)"
    elif src in ("jsonl", "parquet", "npy", "hf"):
        columns = settings  # which columns hold what (fixed for the npy arrays)
        if src == "hf":
            where = f"hf:{settings['hf_name']}"
            table = load_hf_table(
                settings["hf_name"], settings.get("hf_config"), settings.get("hf_split", "train"),
                settings.get("hf_revision"),
            )
        elif not settings.get("path"):
            raise DataError(f"candidates.path: required when candidates.source is {src!r}")
        elif src == "npy":
            where = str(settings["path"])
            if source_tok is not None:
                limit, vocabulary, hint = len(source_tok), "the source tokenizer's vocabulary", ""
            else:
                limit, vocabulary = vocab_size, "the model's vocabulary"
                hint = "; ids written with another tokenizer (the benchmark's are GPT-2's)? set candidates.source_tokenizer"
            table = read_npy_candidates(settings["path"], prefix_len, suffix_len, limit, vocabulary, hint)
            columns = {}
        else:
            where = str(settings["path"])
            table = read_table(settings["path"], src, "candidates")
        df, stats = candidates_from_table(
            table, tokenizer, prefix_len, suffix_len, columns, where, source_tok, vocab_size=vocab_size
        )
    else:
        raise DataError(f"candidates.source: unknown source {src!r}")
    if df["candidate_id"].duplicated().any():
        dup = df.loc[df["candidate_id"].duplicated(), "candidate_id"].iloc[0]
        raise DataError(f"{where}: duplicate candidate_id {dup!r}")
    rows = int(stats.get("rows", len(df)))
    dropped = dict(stats.get("dropped", {}))
    n_dropped = sum(dropped.values())
    if n_dropped:
        log.warning("candidates: dropped %d of %d rows of %s: %s", n_dropped, rows, where,
                    describe_dropped(dropped, prefix_len, suffix_len))
    usable = len(df)
    df = _finish(df, settings.get("max_candidates"), seed)
    # The target tokenizer's ids (text re-encoded, demo windows) must fit the model as well.
    check_candidate_table(df, f"{where} (as candidates)", vocab_size)
    stats = dict(stats, rows=rows, dropped=dropped, dropped_total=n_dropped, not_sampled=usable - len(df),
                 kept=int(len(df)), prefix_len=prefix_len, suffix_len=suffix_len)
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
    training documents without the planted canaries (``'train'``: the masks' and pruning baselines'
    calibration text, ``calibration.demo_text: documents``; the K-FAC factors read the whole training
    stream instead, :func:`demo_stream_windows`).
    """
    src = settings["source"]
    col = settings.get("text_column", "text")
    if src == "demo":
        if corpus_dir is None:
            raise DataError(f"{section}.source 'demo' needs the demo corpus directory (--corpus)")
        table = read_parquet_file(Path(corpus_dir) / f"{demo_split}.parquet", "demo corpus table")
        if "kind" in table.columns:
            table = table[table["kind"] == "doc"]
        return table["text"].tolist(), "eos"
    if src in ("text", "jsonl", "parquet") and not settings.get("path"):
        raise DataError(f"{section}.path: required when {section}.source is {src!r}")
    if src == "text":
        path = Path(settings["path"])
        if not path.exists():
            raise DataError(f"{section}.path: text file not found: {path}")
        if path.is_dir():
            raise DataError(f"{section}.path: {path} is a directory, not a text file")
        check_format(path, "text", section)
        try:
            return [path.read_text(encoding="utf-8-sig")], "\n\n"  # a leading byte-order mark is not text
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from err
    if src in ("jsonl", "parquet"):
        where = str(settings["path"])
        table = read_table(settings["path"], src, section)
    elif src == "hf":
        where = f"hf:{settings['hf_name']}"
        table = load_hf_table(
            settings["hf_name"], settings.get("hf_config"), settings.get("hf_split", "validation"),
            settings.get("hf_revision"), section=section,
        )
    else:
        raise DataError(f"{section}.source: unknown source {src!r}")
    if col not in table.columns:
        raise DataError(f"{section}.text_column: column {col!r} not found in {where}; columns: {list(table.columns)}")
    texts = table[col].tolist()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "a missing value (null / NaN)" if _is_missing(t) else f"{type(t).__name__} {str(t)[:50]!r}"
            raise DataError(f"{where} row {i} column {col!r}: {what}, not text")
    # WikiText-2 protocol: the split's lines joined with blank lines, then cut into windows.
    return texts, "\n\n"


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



def stream_windows(ids: Sequence[int] | np.ndarray, context_length: int, what: str = "text") -> np.ndarray:
    """Non-overlapping ``context_length`` windows of a token stream (int64); the ragged tail is dropped."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // context_length
    if n == 0:
        raise DataError(f"{what} has {len(ids)} tokens, fewer than one window of {context_length}")
    return ids[: n * context_length].reshape(n, context_length)


def demo_stream_windows(corpus_dir: str | Path, tokenizer, context_length: int) -> np.ndarray:
    """Windows of the demo's pretraining stream (:func:`memctl.corpus_stream.train_token_stream`:
    every segment of ``train.parquet`` in stream order, documents and canary copies, each followed
    by eos), cut at multiples of ``context_length`` from its start."""
    from memctl.corpus_stream import train_token_stream

    path = Path(corpus_dir) / "train.parquet"
    if not path.exists():
        raise DataError(f"calibration.source 'demo': the demo corpus table {path} does not exist")
    return stream_windows(train_token_stream(corpus_dir, tokenizer), context_length, f"the demo training stream {path}")


def sample_windows(
    windows: np.ndarray,
    max_windows: int | None,
    seed: int,
    exclude: set[bytes] | None = None,
    ngram: int = 0,
) -> tuple[np.ndarray, dict[str, int]]:
    """A seeded random choice of ``max_windows`` rows of ``windows`` (None: all), dropping before
    sampling: the rows are walked in one seeded permutation and those sharing an ``ngram``-token run
    with ``exclude`` (:func:`memctl.overlap.ngram_index` of the evaluated sequences) are skipped
    until ``max_windows`` are kept, so the drop does not shrink the budget (unless the text runs
    out). Consumers take the first N rows as their budget, so a smaller budget uses a prefix of a
    larger one. Returns (windows, counts: available, examined, dropped, kept)."""
    from memctl import overlap

    order = np.random.default_rng(seed).permutation(len(windows))
    if exclude and ngram > 0:
        kept, examined = overlap.first_disjoint(windows, order, exclude, ngram, max_windows)
    else:
        kept = order if max_windows is None else order[:max_windows]
        examined = len(kept)
    stats = {"available": int(len(windows)), "examined": int(examined), "dropped": int(examined - len(kept)),
             "kept": int(len(kept))}
    return np.ascontiguousarray(windows[kept]), stats


def calibration_windows(
    texts: Sequence[str],
    separator: str,
    tokenizer,
    context_length: int,
    max_windows: int | None,
    seed: int,
) -> np.ndarray:
    """Full-length windows of calibration text, a seeded random choice of ``max_windows`` of them
    (:func:`sample_windows` without exclusion).

    Consumers (K-FAC collection, mask training, Wanda / SparseGPT) take the first N rows as their
    data budget, so a smaller budget uses a subset of a larger one.
    """
    windows = heldout_windows(texts, separator, tokenizer, context_length)
    return sample_windows(windows, max_windows, seed)[0]
