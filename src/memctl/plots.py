"""One style for every memctl figure: backend, palette, method-family colours and markers, saving.

Every plot function of the package (the results report, the curvature frontier and spectrum, the
masks' ablations, the vision track) draws through this module:

- :func:`style` is the house style (on the non-interactive Agg backend, so plots work on a cluster
  node without a display): one scale of font sizes, a light grid, the palette as the colour cycle.
- :data:`PALETTE` is Okabe & Ito's colour-blind-safe palette (eight colours told apart under the common
  colour-vision deficiencies) plus a neutral grey. :func:`family_style` gives each method family one
  fixed colour *and* one marker, so no figure relies on colour alone: the unedited model (Origin)
  black stars, K-FAC blue, SVD sky blue, the trained masks' modes vermillion (down), orange (up),
  reddish purple (reciprocal) and grey (none), the pruning baselines bluish green, CSP yellow,
  BalancedSubnet dark grey.
- :func:`save` writes the PNG and an SVG beside it (same name, ``.svg``), each atomically through
  :func:`memctl.store.atomic_path`, each with its provenance sidecar when a stage's provenance is
  given; both are reproducible byte for byte (no date in the SVG, fixed element ids).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display (cluster nodes, CI)

import matplotlib.pyplot as plt  # noqa: E402

from memctl.store import atomic_path  # noqa: E402

#: Okabe & Ito (2008), "Color Universal Design": distinguishable with protanopia, deuteranopia and
#: tritanopia; ``grey`` is the neutral many implementations add as a ninth colour.
PALETTE = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#999999",
}
#: A second neutral for the tenth family (BalancedSubnet); its marker tells it from grey and black.
DARK_GREY = "#4D4D4D"
#: Colours of lines that are no method (reference lines, budgets, frontiers' guides).
REFERENCE = "#555555"
#: Dots per inch of the PNG files (the SVG is resolution-free).
DPI = 120

STYLE: Mapping[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=[PALETTE[k] for k in (
        "blue", "orange", "bluish_green", "vermillion", "reddish_purple", "sky_blue", "black", "yellow")]),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.facecolor": "white",
    "svg.fonttype": "path",  # text as outlines: the SVG looks the same without the fonts installed
    "svg.hashsalt": "memctl",  # fixed element ids: the same figure gives the same file
}


@dataclass(frozen=True)
class Style:
    """How one method family is drawn: colour, marker and the legend's name for the family."""

    color: str
    marker: str
    family: str
    edge: str | None = None  #: marker edge (yellow needs one on white)

    def scatter_kwargs(self) -> dict[str, Any]:
        return {"color": self.color, "marker": self.marker,
                "edgecolors": self.edge or self.color, "linewidths": 0.8 if self.edge else 0}

    def line_kwargs(self) -> dict[str, Any]:
        return {"color": self.color, "marker": self.marker, "markeredgecolor": self.edge or self.color}


#: Method family -> its style (:func:`family_of` names the family of an edit record).
FAMILIES: Mapping[str, Style] = {
    "origin": Style(PALETTE["black"], "*", "Origin (unedited)"),
    "kfac": Style(PALETTE["blue"], "o", "K-FAC"),
    "svd": Style(PALETTE["sky_blue"], "^", "SVD"),
    "down": Style(PALETTE["vermillion"], "v", "Ours (down)"),
    "up": Style(PALETTE["orange"], "P", "Ours (up)"),
    "reciprocal": Style(PALETTE["reddish_purple"], "X", "Ours (reciprocal)"),
    "none": Style(PALETTE["grey"], "h", "Ours (none)"),
    "baseline": Style(PALETTE["bluish_green"], "s", "pruning baselines (magnitude, Wanda, SparseGPT)"),
    "csp": Style(PALETTE["yellow"], "d", "CSP (soft prompt)", edge=PALETTE["black"]),
    "balanced_subnet": Style(DARK_GREY, "<", "BalancedSubnet"),
    "other": Style(PALETTE["grey"], ".", "other"),
}
#: Families in the order legends list them.
FAMILY_ORDER = tuple(FAMILIES)


def family_of(record: Mapping[str, Any] | None, label: str = "") -> str:
    """The family (a key of :data:`FAMILIES`) of an edit from its plan record (``family``,
    ``method``, ``mode``: the report job's ``--spec``), else from its row label."""
    rec = dict(record or {})
    family, method, mode = rec.get("family"), str(rec.get("method") or ""), str(rec.get("mode") or "")
    if family == "origin" or label == "Origin" or rec.get("edit") == "none":
        return "origin"
    if family == "curvature" or method in ("kfac", "kfac_factor", "kfac_pairwise", "svd"):
        return "svd" if method == "svd" else "kfac"
    if family == "ours" and mode in FAMILIES:
        return mode
    if family == "csp" or method == "csp":
        return "csp"
    if method in ("balanced_subnet", "BalancedSubnet") or label.startswith("BalancedSubnet"):
        return "balanced_subnet"
    if family == "baseline":
        return "baseline"
    # no record (an older spec, a hand-made table): the row labels the planner gives
    from memctl.edit_methods import family as method_family

    baselines = tuple((m.label, "baseline") for m in method_family("baseline").values())  # the records' labels
    for prefix, fam in (("K-FAC", "kfac"), ("SVD", "svd"), ("CSP", "csp"), ("BalancedSubnet", "balanced_subnet"),
                        *baselines):
        if label.startswith(prefix):
            return fam
    for mode in ("down", "up", "reciprocal", "none"):
        if label.startswith(f"Ours ({mode}"):
            return mode
    return "other"


def family_style(family: str) -> Style:
    return FAMILIES.get(family, FAMILIES["other"])


def style():
    """The house style as a context: draw a figure inside it (``with plots.style(): fig, ax =
    plots.subplots(...)``; sizes, grid and colours are read when each artist is made)."""
    return plt.rc_context(STYLE)


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` (call it inside :func:`style`)."""
    return plt.subplots(nrows, ncols, **kwargs)


def svg_path(path: str | os.PathLike) -> Path:
    """The SVG written beside a figure's PNG."""
    return Path(path).with_suffix(".svg")


def save(fig, path: str | os.PathLike, provenance=None) -> tuple[Path, Path]:
    """Write ``fig`` as ``path`` (PNG) and the SVG beside it (:func:`svg_path`), each atomically
    (a reader never sees half a file; a failure leaves the previous version) and, with a stage's
    ``provenance``, each with its sidecar. Closes the figure. Returns (png, svg)."""
    png, svg = Path(path), svg_path(path)
    try:
        with style():
            with atomic_path(png, provenance=provenance) as tmp:
                fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
            with atomic_path(svg, provenance=provenance) as tmp:
                # the same canvas printed again (what savefig does for each file): one savefig call per
                # figure, so a caller that watches Figure.savefig sees each figure once
                fig.canvas.print_figure(tmp, format="svg", metadata={"Date": None, "Creator": None})
    finally:
        plt.close(fig)
    return png, svg
