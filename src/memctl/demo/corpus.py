"""Offline demo corpus: Python standard-library sources plus planted canaries.

Documents
    Every ``*.py`` file of the running interpreter's standard library (``sysconfig``'s ``stdlib``
    path), in sorted order, except third-party and test code (``site-packages``, ``test``/``tests``
    directories, ``idlelib``, ``lib2to3``, ``turtledemo``) and the machine-specific
    ``_sysconfigdata_*`` module. Module docstrings and ``pydoc_data/topics.py`` (the language
    reference as text) give English prose next to the code. Text is normalised (``\\n`` line ends,
    no trailing blanks) and files longer than :data:`MAX_DOC_CHARS` are cut at blank lines into
    parts, so that one huge file cannot dominate the capped corpus or the held-out slice. Parts are
    deduplicated by a hash of their whitespace-collapsed text (the first in path order is kept) and
    parts shorter than ``min_doc_chars`` are dropped. ``doc_id`` numbers the surviving documents in
    path order, so it does not depend on the seed or the cap.

Selection and held-out slice
    A permutation seeded with ``corpus.seed`` orders the documents; they are taken in that order
    while the total stays within ``max_chars`` (a document that would overflow is skipped). The
    first ``heldout_fraction`` of the taken documents (at least one) form the held-out slice, the
    rest the training documents, in permutation order. The slice is written to disk and fixed.

Canaries
    For each kind in ``kinds`` and each copy count in ``copies``, ``per_count`` canaries:

    * ``words``: ``words`` words drawn (seeded, with replacement) from a word list built from the
      stdlib itself (:func:`build_word_list`), arranged in sentences of 5-12 words with a capital
      letter, the odd comma and a full stop;
    * ``digits``: ``digits`` random digits in groups of four separated by spaces;
    * ``quotes``: an attributed quotation, ``"<sentences>" -- <Name> <Surname>``: ``quote_words``
      words in sentences like ``words``, but drawn from a disjoint vocabulary (the next
      :data:`WORD_LIST_SIZE` words by frequency, :func:`build_word_list` with ``skip``), and a
      made-up name of two to three syllables per part. Meant as an out-of-domain family (the
      weight-pruning paper's quotes): nothing the edits train on shares its form or its words.

    ``per_count`` is one number for every kind, or a mapping ``{kind: number}`` (kinds left out
    of the mapping get none). These three are the independent canaries: each one random text, sharing
    nothing with any other, the control group of the structured kinds below.

Canary families (issue 23: memories that share structure, as licences, templated records and
near-duplicates do in real training data)
    For each structured kind in ``kinds``, ``families`` families (one number, or ``{kind: n}``) of
    ``family_members`` members each. A family has one frame and its members vary the fields:

    * ``records``: ``"<Title> <word> register. <label>: <value>; <label>: <value>; ... ."`` with
      ``record_fields`` fields; the title, the labels (distinct words of the word list) and each
      field's type (a made-up name, a 4-digit number, a word, a code like ``KV-482``) are the
      family's, the values the member's;
    * ``near_dups``: one base text of ``near_dup_words`` words (like ``words``); every member
      replaces the word at every ``near_dup_edit_every``-th position (one phase per family) by
      another word (case and trailing punctuation kept);
    * ``boilerplate``: a comment-header / licence-like block of ``boilerplate_lines`` lines drawn
      per family from :data:`BOILERPLATE_LINES` (copyright, author, licence, version, dates...),
      whose slots (years, names, e-mail addresses, versions...) the members fill.

    At every varied slot the members of a family take pairwise distinct values (for boilerplate:
    the first slot of each line), so two members never share more than the frame text between two
    slots (a few tokens: at most ``near_dup_edit_every - 1`` words for near_dups, one label or one
    header line's fixed words for the others). That keeps every member a distinct evaluated
    sequence under the 16-token disjointness filter (``extract.disjoint_ngram``: a training-side
    row sharing a 16-token run with a test sequence is dropped), while the frame is shared and
    seen ``members x copies`` times. Member ``j`` of family ``i`` is planted
    ``family_copies[(i + j) % len(family_copies)]`` times. The ``kind`` column of the canary table
    holds the family name ``<kind>-<i>`` (e.g. ``records-3``), so the candidates' group is
    ``canary-records-3`` (:func:`kind_of` gives the kind back); ``canary_id`` is
    ``<kind>-<i>-<copies:03d>-<member:03d>``. Each structured kind draws from its own seeded stream
    (``seed`` and the kind), so adding or resizing families leaves the control canaries unchanged.

    A canary (member or not) must not occur in any stdlib document (train, held-out or unselected)
    nor inside another canary; a draw that does is redrawn (a whole family at once). Each canary is inserted ``copies`` times between
    training documents at seeded random gaps (distinct gaps while there are enough), never into the
    held-out slice. ``canary_id`` is ``<kind>-<copies:03d>-<index:03d>``.

Canary lengths (Python 3.11 stdlib, tokenizer of 4096 BPE tokens). The tokenizer learns its merges
from the training stream, canaries included (each distinct text once), so lengths depend on the
canary mix: with the schema defaults (64 canaries), a 48-word canary has 88-110 tokens (median 98)
and a 120-digit canary 86-94 tokens (median 90); with config/config.yaml's demo (1,072 canaries,
512 of them digits, whose digit pairs earn merges), a 43-word canary has 68-101 tokens (median 82),
a 132-digit canary 69-85 (median 76) and a 24-word quote 70-93 (median 79): at least the 64 tokens
of the 32/32 preset, which is all the demo model's context of 64 admits. For the 50/50 preset (100
tokens) raise ``context_length`` and the lengths (e.g. ``words: 56``, ``digits: 180``). The
tokenizer stage records the measured lengths in its provenance sidecar (``canary_tokens``).
"""

from __future__ import annotations

import hashlib
import keyword
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memctl.config import ConfigError
from memctl.demo import resolve_settings

#: Files longer than this many characters are cut at blank lines into parts of at most this size.
MAX_DOC_CHARS = 8000
#: Directory names whose sources are not used (third-party code, test suites, demos).
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo"}
)
#: Size of the word list canary sentences are drawn from.
WORD_LIST_SIZE = 2000
#: Independent canaries (each one random text): the control group.
CONTROL_KINDS = ("words", "digits", "quotes")
#: Canaries planted as families whose members share a frame.
STRUCTURED_KINDS = ("records", "near_dups", "boilerplate")
_WORD_RE = re.compile(r"(?<![A-Za-z0-9_])[a-z]{3,12}(?![A-Za-z0-9_])")


@dataclass(frozen=True)
class Document:
    doc_id: int
    source: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard-library ``*.py`` files used by the demo, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if any(p in SKIP_DIRS for p in parts[:-1]):
            continue
        if parts[0].startswith("config-") or parts[-1].startswith("_sysconfigdata"):
            continue
        if not path.is_file():
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def normalize_text(text: str) -> str:
    """``\\n`` line ends, no trailing whitespace on lines, no leading or trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def dedup_key(text: str) -> str:
    """Hash of the whitespace-collapsed text: documents that differ only in spacing are duplicates."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def split_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` into parts of at most ``max_chars`` characters, at blank lines where possible."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        # An oversized paragraph: pack its lines, and hard-cut any single over-long line.
        buf: list[str] = []
        size = 0
        for line in para.split("\n"):
            while len(line) > max_chars:
                if buf:
                    pieces.append("\n".join(buf))
                    buf, size = [], 0
                pieces.append(line[:max_chars])
                line = line[max_chars:]
            if buf and size + 1 + len(line) > max_chars:
                pieces.append("\n".join(buf))
                buf, size = [], 0
            size += len(line) + (1 if buf else 0)
            buf.append(line)
        if buf:
            pieces.append("\n".join(buf))
    parts: list[str] = []
    current = ""
    for piece in pieces:
        joined = f"{current}\n\n{piece}" if current else piece
        if current and len(joined) > max_chars:
            parts.append(current)
            current = piece
        else:
            current = joined
    if current:
        parts.append(current)
    return [p.strip("\n") for p in parts if p.strip()]


@lru_cache(maxsize=4)
def _load_stdlib(root: str, min_doc_chars: int) -> tuple[tuple[Document, ...], tuple[tuple[str, int], ...]]:
    base = Path(root)
    docs: list[Document] = []
    seen: set[str] = set()
    stats = Counter()
    for path in stdlib_sources(base):
        stats["files"] += 1
        try:
            raw = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            stats["files_unreadable"] += 1
            continue
        rel = path.relative_to(base).as_posix()
        for part in split_document(normalize_text(raw)):
            stats["parts"] += 1
            if len(part) < min_doc_chars:
                stats["dropped_short"] += 1
                continue
            key = dedup_key(part)
            if key in seen:
                stats["dropped_duplicates"] += 1
                continue
            seen.add(key)
            docs.append(Document(doc_id=len(docs), source=rel, text=part))
    return tuple(docs), tuple(sorted(stats.items()))


def load_stdlib_documents(min_doc_chars: int = 200, root: str | Path | None = None) -> tuple[list[Document], dict[str, int]]:
    """Deduplicated stdlib documents (``doc_id`` in path order) and counts of what was dropped."""
    docs, stats = _load_stdlib(str(Path(root) if root is not None else stdlib_dir()), int(min_doc_chars))
    return list(docs), dict(stats)


def build_word_list(docs: list[Document], size: int = WORD_LIST_SIZE, skip: int = 0) -> list[str]:
    """The ``size`` most frequent lowercase words (3-12 letters, no Python keywords) in ``docs``,
    after the ``skip`` most frequent ones.

    Ties are broken alphabetically and the result is sorted, so the list is a pure function of the
    documents.
    """
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(_WORD_RE.findall(doc.text))
    banned = set(keyword.kwlist) | set(getattr(keyword, "softkwlist", [])) | {"self", "cls", "none", "true", "false"}
    ranked = sorted((w for w in counts if w not in banned), key=lambda w: (-counts[w], w))
    return sorted(ranked[skip : skip + size])


def _words_canary(rng: np.random.Generator, words: list[str], n_words: int) -> str:
    lengths: list[int] = []
    left = n_words
    while left > 0:
        n = int(rng.integers(5, 13))
        if left - n < 3:  # never leave a stub sentence of 1-2 words
            n = left
        lengths.append(n)
        left -= n
    sentences = []
    for n in lengths:
        chosen = [words[i] for i in rng.integers(0, len(words), size=n)]
        if n >= 7 and rng.random() < 0.4:
            at = int(rng.integers(2, n - 2))
            chosen[at] = chosen[at] + ","
        chosen[0] = chosen[0][0].upper() + chosen[0][1:]
        sentences.append(" ".join(chosen) + ".")
    return " ".join(sentences)


def _digits_canary(rng: np.random.Generator, n_digits: int) -> str:
    digits = "".join(str(d) for d in rng.integers(0, 10, size=n_digits))
    return " ".join(digits[i : i + 4] for i in range(0, n_digits, 4))


_CONSONANTS, _VOWELS = "bcdfghklmnprstvz", "aeiou"


def _name(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(2, 4))
    name = "".join(_CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
                   for _ in range(syllables))
    return name.capitalize()


def _quote_canary(rng: np.random.Generator, words: list[str], n_words: int) -> str:
    return f'"{_words_canary(rng, words, n_words)}" -- {_name(rng)} {_name(rng)}'


# ------------------------------------------------------------------------------ canary families

def _distinct(rng: np.random.Generator, draw, n: int, avoid: frozenset[str] = frozenset()) -> list[str]:
    """``n`` pairwise distinct values of ``draw(rng)``, none in ``avoid``."""
    out: list[str] = []
    for _attempt in range(1000 * n):
        value = draw(rng)
        if value not in avoid and value not in out:
            out.append(value)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct values")  # pragma: no cover - pools are large


def _full_name(rng: np.random.Generator) -> str:
    return f"{_name(rng)} {_name(rng)}"


def _code(rng: np.random.Generator) -> str:
    letters = "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, size=2))
    return f"{letters}-{int(rng.integers(100, 1000))}"


def _slot_drawers(words: list[str]) -> dict[str, Any]:
    def word(r):
        return words[int(r.integers(len(words)))]

    return {
        "name": _full_name,
        "number": lambda r: str(int(r.integers(1000, 10000))),
        "word": word,
        "Word": lambda r: word(r).capitalize(),
        "code": _code,
        "year": lambda r: str(int(r.integers(1970, 2040))),
        "num": lambda r: str(int(r.integers(2, 1000))),
        "ver": lambda r: ".".join(str(int(v)) for v in r.integers(0, 20, size=3)),
        "date": lambda r: f"{int(r.integers(1970, 2040))}-{int(r.integers(1, 13)):02d}-{int(r.integers(1, 29)):02d}",
        "email": lambda r: f"{word(r)}@{word(r)}.org",
        "file": lambda r: f"{word(r)}_{word(r)}.py",
    }


#: Field types of ``records`` (one per label, fixed per family).
RECORD_FIELD_TYPES = ("name", "number", "word", "code")
#: Header-line templates of ``boilerplate`` (each family draws ``boilerplate_lines`` of them).
#: Every line has a varied slot (its first takes distinct values across a family's members) and
#: at most ~10 tokens of fixed text between slots.
BOILERPLATE_LINES = (
    "# Copyright (c) {year} {name}",
    "# Author: {name} <{email}>",
    "# Licensed under the {Word} License, version {ver}",
    "# File: {file}",
    "# Project: {Word} {Word}",
    "# Created: {date}",
    "# Version: {ver} ({word})",
    "# Maintainer: {name}",
    "# Contact: {email}",
    "# Revision {num} of the {word} module",
    "# All rights reserved by {Word} {Word} Ltd.",
    "# You may not use this file except under the {Word} terms.",
    "# Distributed without any warranty; see {file} for details.",
    "# Issue tracker: https://{word}.org/{word}/{num}",
    "# Part of the {word} {word} toolkit, release {num}.",
    "# Reviewed by {name} on {date}.",
)
_SLOT_RE = re.compile(r"\{(\w+)\}")


def _records_family(rng: np.random.Generator, words: list[str], n_members: int, n_fields: int) -> list[str]:
    drawers = _slot_drawers(words)
    title = f"{words[int(rng.integers(len(words)))].capitalize()} {words[int(rng.integers(len(words)))]} register"
    labels = [words[int(i)] for i in rng.choice(len(words), size=n_fields, replace=False)]
    types = [RECORD_FIELD_TYPES[int(rng.integers(len(RECORD_FIELD_TYPES)))] for _ in range(n_fields)]
    values = [_distinct(rng, drawers[t], n_members) for t in types]
    return [f"{title}. " + "; ".join(f"{labels[k]}: {values[k][j]}" for k in range(n_fields)) + "."
            for j in range(n_members)]


def _near_dups_family(rng: np.random.Generator, words: list[str], n_members: int, n_words: int,
                      every: int) -> list[str]:
    base = _words_canary(rng, words, n_words).split(" ")
    members = [list(base) for _ in range(n_members)]
    phase = int(rng.integers(every))
    for pos in range(phase, len(base), every):
        token = base[pos]
        core = token.rstrip(",.")
        tail = token[len(core):]
        capital = core[:1].isupper()
        repl = _distinct(rng, lambda r: words[int(r.integers(len(words)))], n_members, frozenset({core.lower()}))
        for j, word in enumerate(repl):
            members[j][pos] = (word.capitalize() if capital else word) + tail
    return [" ".join(m) for m in members]


def _boilerplate_family(rng: np.random.Generator, words: list[str], n_members: int, n_lines: int) -> list[str]:
    drawers = _slot_drawers(words)
    chosen = [BOILERPLATE_LINES[int(i)] for i in rng.choice(len(BOILERPLATE_LINES), size=n_lines, replace=False)]
    lines: list[list[str]] = [[] for _ in range(n_members)]
    for template in chosen:
        slots = _SLOT_RE.findall(template)
        # the first slot is distinct across members, the others are drawn freely
        values = [_distinct(rng, drawers[slots[0]], n_members)]
        values += [[drawers[s](rng) for _ in range(n_members)] for s in slots[1:]]
        for j in range(n_members):
            it = iter([v[j] for v in values])
            lines[j].append(_SLOT_RE.sub(lambda _m, it=it: next(it), template))
    return ["\n".join(m) for m in lines]


def kind_of(kind: str) -> str:
    """The canary kind of a canary table's ``kind`` value: itself for the control kinds, the kind
    of a family name (``records-3`` -> ``records``)."""
    base, _, index = str(kind).rpartition("-")
    return base if base in STRUCTURED_KINDS and index.isdigit() else str(kind)


def families_of(canary_settings: Mapping[str, Any], kind: str) -> int:
    """Families of structured ``kind``: ``families`` itself, or its entry for ``kind``."""
    families = canary_settings["families"]
    if isinstance(families, Mapping):
        return int(families.get(kind, 0))
    return int(families)


def family_copies_of(canary_settings: Mapping[str, Any], family: int, member: int) -> int:
    """Copy count of member ``member`` of family ``family``."""
    counts = [int(c) for c in canary_settings["family_copies"]]
    return counts[(family + member) % len(counts)]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_family_settings(cfg: Mapping[str, Any]) -> None:
    """The family settings (also checked by the schema where a config is loaded): a
    :class:`ConfigError` naming ``demo.canaries.<key>``."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"demo.canaries.{key}: {why}")

    families = cfg["families"]
    if isinstance(families, Mapping):
        unknown = sorted(set(families) - set(STRUCTURED_KINDS))
        if unknown:
            raise bad("families", f"{', '.join(unknown)}: not a structured kind ({', '.join(STRUCTURED_KINDS)}); "
                      "independent canaries are sized by per_count")
        missing = sorted(set(families) - set(cfg["kinds"]))
        if missing:
            raise bad("families", f"kind(s) {', '.join(missing)} not in kinds {cfg['kinds']}")
        sizes = list(families.values())
    else:
        sizes = [families]
    if any(not _whole(v) or v < 0 for v in sizes):
        raise bad("families", f"expected a whole number >= 0 (or {{kind: number}}), got {families!r}")
    for key, low, high in (("family_members", 2, 40), ("record_fields", 4, 1000), ("near_dup_words", 8, 100000),
                           ("near_dup_edit_every", 2, 8), ("boilerplate_lines", 3, len(BOILERPLATE_LINES))):
        value = cfg[key]
        if not _whole(value) or not low <= value <= high:
            raise bad(key, f"expected a whole number in [{low}, {high}], got {value!r}")
    copies = cfg["family_copies"]
    if not isinstance(copies, (list, tuple)) or not copies or any(not _whole(c) or c < 1 for c in copies):
        raise bad("family_copies", f"expected a non-empty list of whole numbers >= 1, got {copies!r}")
    if cfg["near_dup_edit_every"] >= cfg["near_dup_words"]:
        raise bad("near_dup_edit_every", f"{cfg['near_dup_edit_every']} leaves at most one edit in a "
                  f"{cfg['near_dup_words']}-word text (demo.canaries.near_dup_words)")


def _family_texts(kind: str, rng: np.random.Generator, cfg: Mapping[str, Any], words: list[str]) -> list[str]:
    n = int(cfg["family_members"])
    if kind == "records":
        return _records_family(rng, words, n, int(cfg["record_fields"]))
    if kind == "near_dups":
        return _near_dups_family(rng, words, n, int(cfg["near_dup_words"]), int(cfg["near_dup_edit_every"]))
    return _boilerplate_family(rng, words, n, int(cfg["boilerplate_lines"]))


def per_count_of(canary_settings: Mapping[str, Any], kind: str) -> int:
    """Canaries of ``kind`` per copy count: ``per_count`` itself, or its entry for ``kind``."""
    per_count = canary_settings["per_count"]
    if isinstance(per_count, Mapping):
        return int(per_count.get(kind, 0))
    return int(per_count)


def _unique(draw, forbidden_text: str, texts: list[str], what: str):
    """``draw()`` again until none of its texts occurs in ``forbidden_text`` or in (or around) one
    of ``texts``; returns what it drew."""
    for _attempt in range(1000):
        drawn = draw()
        members = drawn if isinstance(drawn, list) else [drawn]
        if not any(m in forbidden_text or any(m in t or t in m for t in texts) for m in members):
            return drawn
    raise RuntimeError(f"could not draw a unique {what}")  # pragma: no cover - astronomically unlikely


def _family_rows(kind: str, cfg: Mapping[str, Any], word_list: list[str], forbidden_text: str,
                 texts: list[str]) -> list[dict[str, Any]]:
    """The canary rows of every family of structured ``kind`` (their texts appended to ``texts``)."""
    # its own stream: families never shift the control canaries' draws
    frng = np.random.default_rng([int(cfg["seed"]), 0xFA5, STRUCTURED_KINDS.index(kind)])
    rows = []
    for family in range(families_of(cfg, kind)):
        name = f"{kind}-{family}"
        members = _unique(lambda: _family_texts(kind, frng, cfg, word_list), forbidden_text, texts, f"{kind} family")
        for member, text in enumerate(members):
            copies = family_copies_of(cfg, family, member)
            texts.append(text)
            rows.append({"canary_id": f"{name}-{copies:03d}-{member:03d}", "kind": name,
                         "copies": copies, "text": text, "n_chars": len(text)})
    return rows


def _control_rows(kind: str, cfg: Mapping[str, Any], rng: np.random.Generator, word_list: list[str],
                  quote_word_list: list[str] | None, forbidden_text: str, texts: list[str]) -> list[dict[str, Any]]:
    """The independent canaries of control ``kind``: ``per_count`` at each copy count (drawn from
    ``rng``, shared by the control kinds in order; texts appended to ``texts``)."""
    draws = {"words": lambda: _words_canary(rng, word_list, int(cfg["words"])),
             "digits": lambda: _digits_canary(rng, int(cfg["digits"])),
             "quotes": lambda: _quote_canary(rng, quote_word_list, int(cfg["quote_words"]))}
    if kind not in draws:
        raise ValueError(f"demo.canaries.kinds: unknown kind {kind!r}")
    rows = []
    for copies in sorted(set(int(c) for c in cfg["copies"])):
        for index in range(per_count_of(cfg, kind)):
            text = _unique(draws[kind], forbidden_text, texts, f"{kind} canary")
            texts.append(text)
            rows.append({"canary_id": f"{kind}-{copies:03d}-{index:03d}", "kind": kind, "copies": copies,
                         "text": text, "n_chars": len(text)})
    return rows


def make_canaries(
    canary_settings: Mapping[str, Any], word_list: list[str], forbidden_text: str,
    quote_word_list: list[str] | None = None,
) -> pd.DataFrame:
    """The canary table (``canary_id``, ``kind``, ``copies``, ``text``, ``n_chars``).

    ``forbidden_text`` is the text no canary may occur in (all stdlib documents joined);
    ``quote_word_list`` the vocabulary of the ``quotes`` kind (required when it is used).
    """
    cfg = resolve_settings("canaries", canary_settings)
    rng = np.random.default_rng(cfg["seed"])
    if isinstance(cfg["per_count"], Mapping):
        unknown = sorted(set(cfg["per_count"]) - set(cfg["kinds"]))
        if unknown:
            raise ValueError(f"demo.canaries.per_count: kind(s) {', '.join(unknown)} not in kinds {cfg['kinds']}")
    if "quotes" in cfg["kinds"] and not quote_word_list:
        raise ValueError("demo.canaries.kinds: quotes need a quote word list")
    _check_family_settings(cfg)
    rows: list[dict[str, Any]] = []
    texts: list[str] = []  # every canary drawn so far: none may occur in another
    for kind in cfg["kinds"]:
        if kind in STRUCTURED_KINDS:
            rows += _family_rows(kind, cfg, word_list, forbidden_text, texts)
        else:
            rows += _control_rows(kind, cfg, rng, word_list, quote_word_list, forbidden_text, texts)
    df = pd.DataFrame(rows, columns=["canary_id", "kind", "copies", "text", "n_chars"])
    return df.astype({"copies": "int64", "n_chars": "int64"})


def _plant(train_docs: list[Document], canaries: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The training stream: train documents in order, canary copies inserted into gaps between them."""
    rng = np.random.default_rng([seed, 0xCA7A])
    n_gaps = len(train_docs) + 1
    gap_of: list[tuple[int, float, str]] = []  # (gap, tie-break key, canary_id)
    for row in canaries.itertuples(index=False):
        copies = int(row.copies)
        gaps = rng.choice(n_gaps, size=copies, replace=copies > n_gaps)
        for g in gaps:
            gap_of.append((int(g), float(rng.random()), row.canary_id))
    gap_of.sort()
    texts = dict(zip(canaries["canary_id"], canaries["text"]))
    rows: list[tuple[str, Any, Any, str, str]] = []
    k = 0
    for gap in range(n_gaps):
        while k < len(gap_of) and gap_of[k][0] == gap:
            cid = gap_of[k][2]
            rows.append(("canary", pd.NA, cid, "canary", texts[cid]))
            k += 1
        if gap < len(train_docs):
            doc = train_docs[gap]
            rows.append(("doc", doc.doc_id, pd.NA, doc.source, doc.text))
    df = pd.DataFrame(rows, columns=["kind", "doc_id", "canary_id", "source", "text"])
    df.insert(0, "segment", np.arange(len(df), dtype=np.int64))
    return df.astype({"doc_id": "Int64", "canary_id": "string"})


def build_corpus(
    corpus_settings: Mapping[str, Any] | None,
    canary_settings: Mapping[str, Any] | None,
    *,
    root: str | Path | None = None,
    return_stats: bool = False,
):
    """Build the demo corpus: ``(train_df, heldout_df, canaries_df)`` (plus ``stats`` if asked).

    ``train_df``: ordered segments of the training stream (``segment``, ``kind`` in {doc, canary},
    ``doc_id``, ``canary_id``, ``source``, ``text``); ``heldout_df``: ``doc_id``, ``source``,
    ``text``; ``canaries_df``: ``canary_id``, ``kind``, ``copies``, ``text``, ``n_chars``.
    Deterministic for given settings and Python standard library. ``root`` overrides the stdlib
    directory (tests).
    """
    cfg = resolve_settings("corpus", corpus_settings)
    can_cfg = resolve_settings("canaries", canary_settings)
    docs, load_stats = load_stdlib_documents(cfg["min_doc_chars"], root)
    if not docs:
        raise RuntimeError(f"no standard-library documents found under {root or stdlib_dir()}")

    rng = np.random.default_rng(cfg["seed"])
    order = rng.permutation(len(docs))
    selected: list[Document] = []
    total = 0
    for i in order:
        doc = docs[int(i)]
        if total + len(doc.text) > cfg["max_chars"]:
            continue
        selected.append(doc)
        total += len(doc.text)
    if len(selected) < 2:
        raise ValueError(f"demo.corpus.max_chars={cfg['max_chars']} leaves fewer than 2 documents")
    n_held = min(len(selected) - 1, max(1, int(round(cfg["heldout_fraction"] * len(selected)))))
    heldout_docs, train_docs = selected[:n_held], selected[n_held:]

    word_list = build_word_list(docs)
    quote_words = build_word_list(docs, skip=WORD_LIST_SIZE) if "quotes" in can_cfg["kinds"] else None
    forbidden = "\n\x00\n".join(d.text for d in docs)
    canaries_df = make_canaries(can_cfg, word_list, forbidden, quote_words)
    train_df = _plant(train_docs, canaries_df, int(cfg["seed"]))
    heldout_df = pd.DataFrame(
        [(d.doc_id, d.source, d.text) for d in sorted(heldout_docs, key=lambda d: d.doc_id)],
        columns=["doc_id", "source", "text"],
    ).astype({"doc_id": "int64"})

    canary_chars = int(train_df.loc[train_df["kind"] == "canary", "text"].str.len().sum())
    stats = {
        "python": sys.version.split()[0],
        "stdlib": str(Path(root) if root is not None else stdlib_dir()),
        "files": load_stats.get("files", 0),
        "files_unreadable": load_stats.get("files_unreadable", 0),
        "parts": load_stats.get("parts", 0),
        "dropped_duplicates": load_stats.get("dropped_duplicates", 0),
        "dropped_short": load_stats.get("dropped_short", 0),
        "docs_available": len(docs),
        "docs_available_chars": sum(len(d.text) for d in docs),
        "docs_kept": len(selected),
        "docs_train": len(train_docs),
        "docs_heldout": len(heldout_docs),
        "chars_train_docs": sum(len(d.text) for d in train_docs),
        "chars_heldout": sum(len(d.text) for d in heldout_docs),
        "canaries": len(canaries_df),
        "canary_insertions": int((train_df["kind"] == "canary").sum()),
        "chars_canaries": canary_chars,
        "segments_train": len(train_df),
        "word_list_size": len(word_list),
        "quote_word_list_size": len(quote_words or []),
    }
    if return_stats:
        return train_df, heldout_df, canaries_df, stats
    return train_df, heldout_df, canaries_df


__all__ = [
    "MAX_DOC_CHARS",
    "Document",
    "build_corpus",
    "BOILERPLATE_LINES",
    "CONTROL_KINDS",
    "RECORD_FIELD_TYPES",
    "STRUCTURED_KINDS",
    "build_word_list",
    "dedup_key",
    "families_of",
    "family_copies_of",
    "kind_of",
    "load_stdlib_documents",
    "make_canaries",
    "normalize_text",
    "per_count_of",
    "split_document",
    "stdlib_dir",
    "stdlib_sources",
]
