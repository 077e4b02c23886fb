"""One record per metric: its column, header, direction, interval, paired test and tracks.

The report modules (:mod:`memctl.report`, :mod:`memctl.masks.report`, :mod:`memctl.curvature.report`,
:mod:`memctl.vision.report`) build their tables' columns from these records (:meth:`Metric.column`,
:meth:`Metric.columns`) instead of writing headers and formats of their own; the results page's three
track tables take every record that names their track (:func:`on_track`). Adding a metric is one
record here (in :data:`METRICS`), the code that computes its column, and its tests. Pure data: no
pandas or numpy, so that anything (the planner, the config's checks) may read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# ------------------------------------------------------------------ what the fields take

#: Roles: a memorization metric (``direction``: the way that means suppression), a utility metric
#: (``direction``: the way that means better), a property of the edit itself (``direction``: the
#: way that means a larger edit).
MEMORIZATION, UTILITY, EDIT = "memorization", "utility", "edit"
#: Interval kinds (:mod:`memctl.stats`).
CLOPPER_PEARSON = "exact Clopper-Pearson"
PERCENTILE_BOOTSTRAP = "percentile bootstrap over examples"
PAIRED_BOOTSTRAP_RATIO = "paired bootstrap over held-out windows"
#: Paired tests behind the verdicts, as the tables name them ("vs unedited (McNemar)").
MCNEMAR = "McNemar"
PAIRED_BOOTSTRAP = "paired bootstrap"

#: The generation tracks and the prefix of their metrics columns (``memctl.evaluate.EXTRA_TRACKS``).
PREFIXES = {"memorized": "", "extraction_rate": "er_", "validation": "val_", "ood": "ood_",
            "ood_nonmemorized": "ood_nonmem_", "forget": "forget_"}
#: Tracks of the vision track's accuracies (one set of images each).
VISION = "vision"


@dataclass(frozen=True)
class Metric:
    """One metric. ``key``: its metrics column (on the memorized track; other generation tracks
    prefix it, :data:`PREFIXES`, unless ``per_track`` is False); ``header`` its table header (may
    name ``{reference}``, the row every verdict compares against); ``fmt`` its number format.
    ``count`` / ``ci`` / ``verdict``: the columns :func:`memctl.report.with_intervals` (or the
    vision report) writes beside it (``k/N``, the interval's text, the paired test's verdict
    against the unedited model), None where it has none; ``short``: its name in a verdict's header
    ("vs Origin (Exact ER)"). ``tracks``: the generation tracks whose tables in ``results.md``
    show it (a utility metric: the tracks it stands beside). ``units``: the per-example score
    columns its interval and test read."""

    key: str
    header: str
    fmt: str = "{:.3f}"
    role: str = MEMORIZATION
    direction: str = "lower"
    interval: str | None = None
    test: str | None = None
    tracks: tuple[str, ...] = ()
    per_track: bool = True
    count: str | None = None
    ci: str | None = None
    ci_header: str = "95% CI"
    verdict: str | None = None
    short: str = ""
    units: tuple[str, ...] = ()

    def column(self, part: str = "value", prefix: str = "", *, name: str | None = None, header: str = "{}",
               label: str = "", reference: str = "Origin", by_test: bool = False, against: str = "",
               fmt: str | None = None) -> tuple[str, str, str]:
        """One (column, header, format) of a table. ``part``: ``value``, ``count``, ``ci``,
        ``verdict`` (against the unedited model, named ``reference``) or ``against`` (a verdict
        against another row, the header ``against``; column ``verdict`` with ``origin`` -> ``ref``).
        ``prefix``: the track's (a metric with ``per_track`` False takes none); ``name`` replaces
        the column; ``header`` wraps the part's header (``"Val. {}"``; one without ``{}`` replaces
        it, as the curvature table's plain "95% CI" of the PPL ratio); ``label`` names the set
        the table computes it on ("memorized": "Exact ER (memorized)", "k/N (memorized)",
        "vs Origin (Exact ER, memorized)"); ``by_test``: a verdict's header names the test
        ("vs unedited (McNemar)") instead of the metric; ``fmt`` replaces the value's format."""
        prefix = prefix if self.per_track else ""
        tail = f" ({label})" if label else ""
        if part == "value":
            return name or prefix + self.key, header.format(self.header.format(reference=reference)) + tail, fmt or self.fmt
        if part == "count":
            return name or prefix + _given(self.count, part, self.key), header.format("k/N") + tail, "{}"
        if part == "ci":
            base = "95% CI" if label else self.ci_header
            return name or prefix + _given(self.ci, part, self.key), header.format(base) + tail, "{}"
        verdict = _given(self.verdict, part, self.key)
        what = (self.test if by_test else self.short) + (f", {label}" if label else "")
        if part == "verdict":
            return name or prefix + verdict, header.format(f"vs {reference} ({what})"), "{}"
        if part == "against":
            return name or prefix + verdict.replace("origin", "ref"), header.format(f"{against} ({what})"), "{}"
        raise ValueError(f"unknown part {part!r} of metric {self.key!r}")

    def parts(self) -> tuple[str, ...]:
        """The parts a track table shows: the value, then its count, interval and verdict where it has them."""
        return ("value", *(p for p in ("count", "ci", "verdict") if getattr(self, p)))

    def columns(self, parts: Sequence[str] | None = None, prefix: str = "", **kwargs) -> list[tuple[str, str, str]]:
        """:meth:`column` of each of ``parts`` (default :meth:`parts`), with the same keywords."""
        return [self.column(p, prefix, **kwargs) for p in (self.parts() if parts is None else parts)]


def _given(column: str | None, part: str, key: str) -> str:
    if column is None:
        raise ValueError(f"metric {key!r} has no {part} column")
    return column


# ------------------------------------------------------------------ the language-model metrics

EXACT_ER = Metric(
    "exact_er", "Exact ER", interval=CLOPPER_PEARSON, test=MCNEMAR,
    tracks=("memorized", "extraction_rate", "ood"), count="exact_count", ci="exact_ci", verdict="vs_origin",
    short="Exact ER", units=("exact_match",))
FRACTIONAL_ER = Metric(
    "fractional_er", "Fractional ER", interval=PERCENTILE_BOOTSTRAP, test=PAIRED_BOOTSTRAP,
    tracks=("memorized", "extraction_rate", "ood"), ci="fractional_ci", verdict="frac_vs_origin",
    short="Fractional ER", units=("n_match", "n_suffix"))
AVG_LEVENSHTEIN = Metric(
    "avg_levenshtein", "Avg. Levenshtein", direction="higher", interval=PERCENTILE_BOOTSTRAP,
    test=PAIRED_BOOTSTRAP, tracks=("memorized",), ci="levenshtein_ci", verdict="lev_vs_origin",
    short="Levenshtein", units=("levenshtein_norm",))
#: Levenshtein similarity >= memctl.metrics.LOOSE_THRESHOLD; memctl.report.paired_tests computes its
#: McNemar test (``loose``), no table shows a verdict of it.
LOOSE_ACCURACY = Metric(
    "loose_accuracy", "Loose acc.", interval=CLOPPER_PEARSON, test=MCNEMAR, tracks=("memorized", "ood"),
    ci="loose_ci", short="loose", units=("levenshtein_sim",))
#: Exact ER under the loss-curvature paper's name (the curvature table): the same count, interval and test.
STRICT_ACCURACY = Metric(
    "strict_accuracy", "Strict acc.", interval=CLOPPER_PEARSON, test=MCNEMAR, count="exact_count",
    ci="exact_ci", verdict="vs_origin", short="strict", units=("exact_match",))
HELDOUT_LOSS = Metric("heldout_loss", "Held-out loss", role=UTILITY, per_track=False, tracks=("memorized",))
HELDOUT_PPL = Metric("heldout_ppl", "Held-out PPL", "{:.2f}", role=UTILITY, per_track=False,
                     tracks=("memorized", "extraction_rate"))
#: Held-out perplexity over the unedited model's on the same windows (memctl.report.with_intervals).
PPL_RATIO = Metric(
    "ppl_ratio", "PPL / {reference}", role=UTILITY, per_track=False, interval=PAIRED_BOOTSTRAP_RATIO,
    test=PAIRED_BOOTSTRAP, tracks=("memorized", "extraction_rate"), ci="ppl_ratio_ci",
    ci_header="95% CI (PPL ratio)", verdict="ppl_vs_origin", short="PPL", units=("nll_sum",))
#: Teacher-forced loss / perplexity on the memorized suffixes: higher = suppressed.
MEM_LOSS = Metric("mem_loss", "Mem. loss", direction="higher", per_track=False, tracks=("memorized",))
MEM_PPL = Metric("mem_ppl", "Mem. PPL", "{:.2f}", direction="higher", per_track=False, tracks=("memorized",))
NDCG10 = Metric("ndcg10", "nDCG@10", role=UTILITY, direction="higher", per_track=False, tracks=("memorized",))
NDCG10_TEXT = Metric("ndcg10_text", "nDCG@10 (text)", role=UTILITY, direction="higher", per_track=False,
                     tracks=("memorized",))
#: Share of zero weights among the matrices an edit touches (memctl.masks.report.delta_info).
SPARSITY = Metric("sparsity", "Sparsity", role=EDIT, direction="higher", per_track=False)

# ------------------------------------------------------------------ the vision track's accuracies


def _accuracy(key: str, header: str, role: str, direction: str, short: str) -> Metric:
    return Metric(key, header, role=role, direction=direction,
                  interval=CLOPPER_PEARSON, test=MCNEMAR, tracks=(VISION,), per_track=False,
                  count=f"{key}_count", ci=f"{key}_ci", verdict=f"{key}_vs_origin", short=short,
                  units=(f"hits_{key}",))


#: Accuracy on the noised training images: predicted as the noised label (memorized) / as the true one.
MEMORIZATION_ACC = _accuracy("memorization", "Memorization (noised labels)", MEMORIZATION, "lower", "memorization")
RECOVERY = _accuracy("recovery", "Recovered true labels", MEMORIZATION, "higher", "recovery")
CLEAN_TRAIN = _accuracy("clean_train", "Clean train", UTILITY, "higher", "clean train")
SELECTION = _accuracy("selection", "Selection slice", UTILITY, "higher", "selection")
VALIDATION = _accuracy("validation", "Validation", UTILITY, "higher", "validation")

#: Every metric, in the order verdict and unit columns are listed.
METRICS: tuple[Metric, ...] = (
    EXACT_ER, FRACTIONAL_ER, AVG_LEVENSHTEIN, LOOSE_ACCURACY, STRICT_ACCURACY, HELDOUT_LOSS, HELDOUT_PPL, PPL_RATIO,
    MEM_LOSS, MEM_PPL, NDCG10, NDCG10_TEXT, SPARSITY,
    MEMORIZATION_ACC, RECOVERY, CLEAN_TRAIN, SELECTION, VALIDATION,
)


def by_key(key: str) -> Metric:
    """The record of metrics column ``key`` (unprefixed)."""
    for metric in METRICS:
        if metric.key == key:
            return metric
    raise KeyError(f"no metric record {key!r} (memctl.metric_records.METRICS)")


def on_track(track: str, order: Sequence[str] = ()) -> list[Metric]:
    """The records whose ``tracks`` name ``track``: those keyed in ``order`` first, in its order,
    then any other in :data:`METRICS` order (a new metric joins its tracks' tables at their end)."""
    found = [m for m in METRICS if track in m.tracks]
    rank = {key: i for i, key in enumerate(order)}
    return sorted(found, key=lambda m: rank.get(m.key, len(rank)))


def verdict_columns() -> tuple[str, ...]:
    """The per-track verdict columns against the unedited model of the generation metrics."""
    return tuple(m.verdict for m in METRICS if m.verdict and m.per_track and PREFIXES.keys() & set(m.tracks))


def unit_columns() -> tuple[str, ...]:
    """The per-example score columns the generation metrics' intervals and paired tests read."""
    return tuple(dict.fromkeys(u for m in METRICS if m.per_track and PREFIXES.keys() & set(m.tracks)
                               for u in m.units))


def markdown() -> str:
    """The records as a markdown table (docs/architecture.md holds it; a test keeps it current)."""
    lines = ["| Column | Header | Role | Direction | Interval | Paired test | Tracks |", "|---|---|---|---|---|---|---|"]
    for m in METRICS:
        lines.append(f"| `{m.key}` | {m.header.format(reference='Origin')} | {m.role} | {m.direction} | "
                     f"{m.interval or '-'} | {m.test or '-'} | {', '.join(m.tracks) or '-'} |")
    return "\n".join(lines)
