"""The declared rule that picks the K-FAC and the SVD edit the curvature report compares.

The loss-curvature paper (Sec. 4.2.1) searches layer-wise and coarsely over multi-layer edits,
sweeps SVD over keeping [1, 2, 5, 10, 20, 30, 50]% of singular values of the same layers, and
reports one setting: K-FAC keeping 80% of energy in the first three MLPs against SVD keeping the
top 20% of singular values there (nDCG@10 near 0.9 for both, its Table 2). It states no rule for
choosing a point from the search. The rule here is **our addition**, declared in
``curvature.report`` before any test score exists, and it reads no test score:

1. **Search space**: every curvature edit of the config (explicit edits and both sweeps) whose
   method is a K-FAC form named in ``kfac_forms`` (they compete as "K-FAC") or ``svd``; not the
   rows of ``curvature.ablations`` (edits on other factors, spec key ``calibration``).
2. **Utility budget**, against the unedited model: held-out perplexity ratio at most
   ``max_ppl_ratio`` on the *selection windows* (the first ``selection_windows`` share of the
   held-out windows, from the per-window NLL of the scores; the report's perplexity ratios of the
   chosen points use the other windows only) and nDCG@10 at least ``min_ndcg10`` on the held-out
   text windows (column ``ndcg10_text``: the first ``evaluate.ndcg_windows`` windows, inside the
   selection share when ``ndcg_windows`` is at most that many windows). The paper's nDCG@10 column
   (``ndcg10``) scores non-memorized sequences of the extraction-rate *test* split, so the rule
   does not read it; it is reported for the chosen points.
3. **Memorization** on the memorized track's validation slice only (``val_`` columns: sequences
   held out of the train side): lowest validation Exact ER, ties broken by utility (lower
   selection PPL ratio, then higher nDCG@10), then strength and edit id (deterministic).
4. **Same layers**: the layer sets (layers and roles) where both K-FAC and SVD have an edit
   compete; ``layer_rule: kfac`` takes the set where K-FAC's best in-budget point (by 3.) is best,
   then SVD's as the tie-break or where K-FAC has none in budget; ``joint`` takes the set where
   both have an in-budget point and the sum of their validation Exact ERs is lowest. Within the
   set, each method's point by 3.
5. **Nothing in budget** is reported as such: no point is picked outside the budget.

:func:`choose` reads only the columns in :data:`READS` (it drops every other column first), so no
test-split score or metric can move the choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from memctl.config import ConfigError

#: K-FAC forms (memctl.curvature.settings.METHODS without svd).
KFAC_FORMS = ("kfac", "kfac_factor", "kfac_pairwise")
#: The rule's defaults (the schema's; config/config.yaml states them).
DEFAULTS = {"max_ppl_ratio": 1.02, "min_ndcg10": 0.90, "selection_windows": 0.5,
            "kfac_forms": list(KFAC_FORMS), "layer_rule": "kfac"}
LAYER_RULES = ("kfac", "joint")
KIND_NAMES = {"kfac": "K-FAC", "svd": "SVD"}

#: Every column :func:`choose` reads: the edit's spec, the validation slice, the selection utility.
READS = ("edit", "spec_method", "calibration", "layers", "roles", "strength", "val_n_examples", "val_exact_er",
         "sel_ppl_ratio", "sel_ndcg10")

#: The loss-curvature paper's reported setting (Sec. 4.2.1): the first three MLPs, K-FAC keeping 80%
#: of energy (its projector rule: memctl's ``kfac``), SVD keeping the top 20% of singular values, and
#: its SVD grid over the same layers.
PAPER_LAYERS = (0, 1, 2)
PAPER_KFAC_ENERGY = 0.8
PAPER_SVD_KEEP = 0.2
PAPER_SVD_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
MLP_ROLES = frozenset({"gate", "up", "down"})


@dataclass(frozen=True)
class Rule:
    """``curvature.report``'s selection keys (module docstring)."""

    max_ppl_ratio: float | None = DEFAULTS["max_ppl_ratio"]
    min_ndcg10: float | None = DEFAULTS["min_ndcg10"]
    selection_windows: float = DEFAULTS["selection_windows"]
    kfac_forms: tuple[str, ...] = KFAC_FORMS
    layer_rule: str = DEFAULTS["layer_rule"]

    @classmethod
    def from_settings(cls, settings: Mapping | None) -> Rule:
        """The rule of a ``curvature.report`` mapping (defaults for missing keys); a bad value is
        named by its key."""
        s = {**DEFAULTS, **{k: v for k, v in (settings or {}).items() if k in DEFAULTS}}
        key = "curvature.report"
        ppl, ndcg, share = s["max_ppl_ratio"], s["min_ndcg10"], s["selection_windows"]
        if ppl is not None and not (isinstance(ppl, (int, float)) and ppl > 1):
            raise ConfigError(f"{key}.max_ppl_ratio: {ppl!r} must be a number above 1 (or null: no perplexity budget)")
        if ndcg is not None and not (isinstance(ndcg, (int, float)) and 0 <= ndcg <= 1):
            raise ConfigError(f"{key}.min_ndcg10: {ndcg!r} must be in [0, 1] (or null: no nDCG@10 budget)")
        if not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ConfigError(f"{key}.selection_windows: {share!r} must be a share strictly between 0 and 1")
        forms = list(s["kfac_forms"])
        bad = [f for f in forms if f not in KFAC_FORMS]
        if bad or not forms:
            raise ConfigError(f"{key}.kfac_forms: {forms!r}; each must be one of {list(KFAC_FORMS)} (at least one)")
        if s["layer_rule"] not in LAYER_RULES:
            raise ConfigError(f"{key}.layer_rule: {s['layer_rule']!r} is not one of {list(LAYER_RULES)}")
        return cls(None if ppl is None else float(ppl), None if ndcg is None else float(ndcg), float(share),
                   tuple(forms), s["layer_rule"])

    def budget_text(self) -> str:
        parts = []
        if self.max_ppl_ratio is not None:
            parts.append(f"held-out PPL / unedited <= {self.max_ppl_ratio:g} on the selection windows")
        if self.min_ndcg10 is not None:
            parts.append(f"nDCG@10 against the unedited model >= {self.min_ndcg10:g} on held-out text windows")
        return " and ".join(parts) if parts else "none declared (every edit is within it)"


# ----------------------------------------------------------------------------- the paper's setting


def _is_mlp(spec: Mapping) -> bool:
    roles, groups = spec.get("roles"), spec.get("groups") or ["mlp"]
    if roles is None:
        return list(groups) == ["mlp"]
    return {"up", "down"} <= set(roles) <= MLP_ROLES


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def paper_setting(spec: Mapping | None) -> tuple[str, str] | None:
    """(label, kind) where an edit spec is the loss-curvature paper's setting: ``setting`` (K-FAC
    keeping 80% energy or SVD keeping 20% in the first three MLPs) or ``grid`` (another point of its
    SVD grid on those layers); None otherwise. The label is what the tables print."""
    if not spec or spec.get("calibration") or list(spec.get("layers") or []) != list(PAPER_LAYERS) or not _is_mlp(spec):
        return None  # (an ablation's edit, e.g. calibration without memories, is not the paper's setting)
    method, strength = spec.get("method"), float(spec.get("strength", math.nan))
    where = f"MLPs {PAPER_LAYERS[0]}-{PAPER_LAYERS[-1]}"
    if method == "kfac" and math.isclose(strength, PAPER_KFAC_ENERGY):
        return f"K-FAC (paper: {_pct(PAPER_KFAC_ENERGY)} energy, {where})", "setting"
    if method == "svd" and math.isclose(strength, PAPER_SVD_KEEP):
        return f"SVD (paper: top {_pct(PAPER_SVD_KEEP)}, {where})", "setting"
    if method == "svd" and any(math.isclose(strength, g) for g in PAPER_SVD_GRID):
        return f"SVD (paper grid: top {_pct(strength)}, {where})", "grid"
    return None


# ----------------------------------------------------------------------------- selection utility


@dataclass(frozen=True)
class Windows:
    """How the held-out windows were divided: ``selection`` of ``total`` (the first ones) for the
    budget, the rest for the report; ``split`` False where they could not be (no per-window scores,
    or fewer than 2 windows): then both read all windows and the report says so."""

    total: int
    selection: int
    split: bool

    def describe(self) -> str:
        if not self.split:
            why = "no per-window held-out scores" if not self.total else f"only {self.total} held-out window"
            return (f"held-out perplexity over all windows ({why}: the budget and the reported ratios read the "
                    "same windows)")
        return (f"held-out windows 0-{self.selection - 1} of {self.total} (selection) for the budget; windows "
                f"{self.selection}-{self.total - 1} (report) for the perplexity ratios reported below")


def heldout_part(scores: pd.DataFrame | None) -> pd.DataFrame | None:
    """The per-window held-out NLL of a scores table, sorted by window (None without)."""
    if scores is None or "track" not in scores:
        return None
    part = scores[scores["track"] == "heldout"]
    if part.empty or "window" not in part or "nll_sum" not in part:
        return None
    return part.sort_values("window")[["window", "nll_sum", "n_tokens"]].reset_index(drop=True)


def window_split(scores: Mapping[str, pd.DataFrame] | None, share: float) -> Windows:
    """The first ``floor(share * n)`` of the unedited model's ``n`` held-out windows (at least 1, at
    most n - 1) select; the rest report."""
    base = heldout_part((scores or {}).get("none"))
    n = 0 if base is None else len(base)
    if n < 2:
        return Windows(n, n, False)
    return Windows(n, min(n - 1, max(1, int(math.floor(share * n)))), True)


def window_ratio(row: pd.DataFrame | None, base: pd.DataFrame | None, windows: set | None) -> float:
    """Held-out perplexity of ``row`` over ``base`` on ``windows`` (window ids; None = all), from the
    summed NLL of the same windows: exp of the mean per-token NLL difference. NaN where ``row``
    lacks one of them."""
    if row is None or base is None:
        return math.nan
    b = base if windows is None else base[base["window"].isin(windows)]
    r = row[row["window"].isin(set(b["window"]))]
    if len(r) != len(b) or not len(b):
        return math.nan
    tokens = float(b["n_tokens"].sum())
    return math.exp((float(r["nll_sum"].sum()) - float(b["nll_sum"].sum())) / tokens) if tokens else math.nan


def window_ids(scores: Mapping[str, pd.DataFrame] | None, windows: Windows) -> tuple[set | None, set | None]:
    """(selection window ids, report window ids); (None, None) = all windows for both."""
    if not windows.split:
        return None, None
    ids = list(heldout_part(scores["none"])["window"])
    return set(ids[: windows.selection]), set(ids[windows.selection:])


def add_utility(table: pd.DataFrame, scores: Mapping[str, pd.DataFrame] | None, rule: Rule) -> tuple[pd.DataFrame, Windows]:
    """``table`` (:func:`memctl.curvature.report.edit_table`) with ``sel_ppl_ratio`` (perplexity
    ratio on the selection windows), ``report_ppl_ratio`` (on the report windows) and ``sel_ndcg10``
    (nDCG@10 on held-out text windows); without per-window scores both ratios are ``ppl_ratio``."""
    table = table.copy()
    windows = window_split(scores, rule.selection_windows)
    table["sel_ndcg10"] = table["ndcg10_text"] if "ndcg10_text" in table else math.nan
    if not windows.split:
        table["sel_ppl_ratio"] = table["ppl_ratio"]
        table["report_ppl_ratio"] = table["ppl_ratio"]
        return table, windows
    sel, rep = window_ids(scores, windows)
    base = heldout_part(scores["none"])
    parts = {e: heldout_part(scores.get(e)) for e in table["edit"]}
    table["sel_ppl_ratio"] = [window_ratio(parts[e], base, sel) for e in table["edit"]]
    table["report_ppl_ratio"] = [window_ratio(parts[e], base, rep) for e in table["edit"]]
    return table, windows


# ----------------------------------------------------------------------------- the choice


@dataclass
class Choice:
    """What the rule chose: ``layers`` / ``roles`` of the common layer set (None where there is
    none), ``chosen`` kind -> candidate record or None, ``why`` kind -> why nothing was chosen,
    ``candidates`` every competing edit with ``in_budget`` and ``why_out``, ``layer_sets`` the
    common layer sets with each method's best in-budget point, ``n_validation`` the slice's size."""

    rule: Rule
    layers: str | None = None
    roles: str | None = None
    chosen: dict[str, dict | None] = field(default_factory=lambda: {"kfac": None, "svd": None})
    why: dict[str, str] = field(default_factory=dict)
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)
    layer_sets: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_validation: int = 0
    note: str = ""

    def edits(self) -> list[dict]:
        return [r for r in (self.chosen["kfac"], self.chosen["svd"]) if r is not None]


def _num(value, default: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(v) else v


def _budget(rec: Mapping, rule: Rule) -> str:
    """'' when ``rec`` is within the budget, else why not."""
    if _num(rec.get("val_n_examples"), 0) <= 0 or math.isnan(_num(rec.get("val_exact_er"), math.nan)):
        return "no validation scores"
    why = []
    ppl = _num(rec.get("sel_ppl_ratio"), math.nan)
    if rule.max_ppl_ratio is not None:
        if math.isnan(ppl):
            why.append("no selection-window perplexity")
        elif ppl > rule.max_ppl_ratio:
            why.append(f"PPL ratio {ppl:.3f} > {rule.max_ppl_ratio:g}")
    ndcg = _num(rec.get("sel_ndcg10"), math.nan)
    if rule.min_ndcg10 is not None:
        if math.isnan(ndcg):
            why.append("no nDCG@10 on held-out text")
        elif ndcg < rule.min_ndcg10:
            why.append(f"nDCG@10 {ndcg:.3f} < {rule.min_ndcg10:g}")
    return "; ".join(why)


def rank_key(rec: Mapping) -> tuple:
    """A point's rank within a method: validation Exact ER (to 1e-12), then selection PPL ratio,
    then nDCG@10 (higher first), then strength and edit id."""
    return (round(_num(rec.get("val_exact_er")), 12), _num(rec.get("sel_ppl_ratio")), -_num(rec.get("sel_ndcg10"), 0.0),
            _num(rec.get("strength")), str(rec["edit"]))


def _layer_text(layers: str, roles: str) -> str:
    return f"{layers}" + ("" if roles in ("all", "-", None) else f" ({roles})")


def _search_space(table: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    """The rule's candidates: the columns of :data:`READS` (nothing else is read) of every K-FAC edit
    of the rule's forms and every SVD edit, with their ``kind``; no ablation rows."""
    t = table[[c for c in READS if c in table.columns]].copy()
    t = t[t["edit"] != "none"]
    if "spec_method" not in t:
        t["spec_method"] = None
    if "calibration" in t:  # ablation rows (curvature.ablations: other factors) are not in the search space
        t = t[t["calibration"].fillna("").astype(str) == ""]
    t["kind"] = t["spec_method"].map(lambda m: "svd" if m == "svd" else ("kfac" if m in rule.kfac_forms else None))
    return t[t["kind"].notna()].copy()


def choose(table: pd.DataFrame, rule: Rule) -> Choice:
    """Apply the rule (module docstring) to an edit table that carries the columns of :data:`READS`
    (:func:`memctl.curvature.report.edit_table` + :func:`add_utility`)."""
    t = _search_space(table, rule)
    choice = Choice(rule)
    n_val = pd.to_numeric(t.get("val_n_examples", pd.Series(dtype=float)), errors="coerce").fillna(0)
    choice.n_validation = int(n_val.max()) if len(n_val) else 0
    if t.empty:
        choice.note = "no K-FAC or SVD edit in the search space"
        choice.why = {k: "no edit of this method in the search space" for k in KIND_NAMES}
        return choice
    if choice.n_validation <= 0:
        choice.note = ("the memorized track has no validation slice (extract.validation_fraction is 0 or the memorized "
                       "set too small): nothing is chosen, since the rule never reads the test split")
        choice.why = {k: "no validation slice" for k in KIND_NAMES}
        t["in_budget"], t["why_out"] = False, "no validation scores"
        choice.candidates = t.reset_index(drop=True)
        return choice
    recs = t.to_dict("records")
    for rec in recs:
        rec["why_out"] = _budget(rec, rule)
        rec["in_budget"] = not rec["why_out"]
    choice.candidates = pd.DataFrame(recs)
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in recs:
        groups.setdefault((str(rec.get("layers")), str(rec.get("roles"))), {"kfac": [], "svd": []})[rec["kind"]].append(rec)
    shared = {key: g for key, g in groups.items() if g["kfac"] and g["svd"]}
    rows = []
    for (layers, roles), g in shared.items():
        best = {k: min((r for r in g[k] if r["in_budget"]), key=rank_key, default=None) for k in KIND_NAMES}
        rows.append({"layers": layers, "roles": roles, "best": best,
                     **{f"{k}_in_budget": sum(r["in_budget"] for r in g[k]) for k in KIND_NAMES},
                     **{f"{k}_edits": len(g[k]) for k in KIND_NAMES},
                     **{f"{k}_best": None if best[k] is None else best[k]["edit"] for k in KIND_NAMES},
                     **{f"{k}_best_val": math.nan if best[k] is None else best[k]["val_exact_er"] for k in KIND_NAMES}})
    if not rows:
        only = sorted({_layer_text(*key) for key in groups})
        choice.note = f"no layer set has both a K-FAC and an SVD edit (layer sets: {', '.join(only)})"
        choice.why = {k: "no layer set shared with the other method" for k in KIND_NAMES}
        return choice

    def none_key(rec):
        return (1,) if rec is None else (0, *rank_key(rec)[:3])

    def set_key(row):
        b = row["best"]
        size = (len(row["layers"].split(",")), row["layers"], row["roles"])
        if rule.layer_rule == "kfac":
            return (*none_key(b["kfac"]), *none_key(b["svd"]), *size)
        missing = sum(b[k] is None for k in KIND_NAMES)
        return (missing, sum(_num(b[k]["val_exact_er"]) for k in KIND_NAMES if b[k] is not None),
                sum(_num(b[k]["sel_ppl_ratio"]) for k in KIND_NAMES if b[k] is not None), *size)

    rows.sort(key=set_key)
    choice.layer_sets = pd.DataFrame([{k: v for k, v in r.items() if k != "best"} for r in rows])
    top = rows[0]
    if all(top["best"][k] is None for k in KIND_NAMES):
        choice.note = "no K-FAC and no SVD edit on a common layer set is within the budget: nothing is chosen"
        for k in KIND_NAMES:
            choice.why[k] = _nothing_text(k, [r for key, g in shared.items() for r in g[k]], None)
        return choice
    choice.layers, choice.roles = top["layers"], top["roles"]
    for k in KIND_NAMES:
        choice.chosen[k] = top["best"][k]
        if top["best"][k] is None:
            choice.why[k] = _nothing_text(k, shared[(top["layers"], top["roles"])][k], _layer_text(top["layers"], top["roles"]))
    return choice


def _nothing_text(kind: str, recs: list[dict], where: str | None) -> str:
    name = KIND_NAMES[kind]
    place = f"on layers {where}" if where else "on any common layer set"
    ppl = [r["sel_ppl_ratio"] for r in recs if not math.isnan(_num(r.get("sel_ppl_ratio"), math.nan))]
    low = f"; lowest selection PPL ratio {min(ppl):.3f}" if ppl else ""
    return f"no {name} edit {place} is within the budget ({len(recs)} competed{low})"


def describe(rule: Rule, choice: Choice, windows: Windows) -> str:
    """The rule in words, with the sizes it ran on."""
    forms = ", ".join(f"`{f}`" for f in rule.kfac_forms)
    layer = ("the layer set where K-FAC's best in-budget point has the lowest validation Exact ER (ties and sets "
             "without an in-budget K-FAC point: SVD's best; then fewer layers)" if rule.layer_rule == "kfac" else
             "the layer set where both methods have an in-budget point and the sum of their best validation Exact "
             "ERs is lowest (then the sum of their PPL ratios, then fewer layers)")
    return "\n".join([
        "Declared in `curvature.report` before any test score is read; the loss-curvature paper states no such "
        "rule (it reports one setting, below), so this rule is **our addition**.", "",
        f"- Search space: every curvature edit of the config with a K-FAC form in {forms} (competing as K-FAC) "
        "or `svd`: the explicit edits and both sweeps (strengths x layer sets).",
        f"- Utility budget, against the unedited model: {rule.budget_text()}. Windows: {windows.describe()}. "
        "nDCG@10 on held-out text (first `evaluate.ndcg_windows` windows), not the paper's column on the "
        "extraction-rate test split's non-memorized sequences (shown for the chosen points only).",
        f"- Memorization: the memorized track's validation slice ({choice.n_validation} sequences held out of "
        "the train side): lowest validation Exact ER within the budget, ties broken by the lower selection PPL "
        "ratio, then the higher nDCG@10.",
        f"- K-FAC and SVD on the same layers: {layer}; then each method's point within it.",
        "- Nothing within the budget: the table says so; no point outside it is picked.",
    ])
