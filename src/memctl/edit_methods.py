"""One record per edit method: its name, row label, family, the stage that writes its delta and,
for the pruning baselines, what the planner and the runner need to know about it (the calibration
statistics it reads, the ``pruning.*`` settings its jobs carry, its forms and its per-matrix rule).

The plan (:mod:`memctl.planning.pruning`, :mod:`memctl.planning.masks`), the runner
(:mod:`memctl.pruning.runner`), the config's check of ``pruning.methods`` (:mod:`memctl.config`),
the row labels (:mod:`memctl.labels`) and the docs' tables read these records; adding a pruning
baseline is one :func:`register` call plus its rule's module and tests (docs/architecture.md,
"Adding an edit method"; ``tests/test_edit_methods.py`` adds a toy one through this path alone).

Plain data: this module imports nothing of the package and nothing heavy (a rule is named by a
``"module:function"`` string and imported when a job runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Family -> the registry stage (:mod:`memctl.stages`) that writes its deltas.
FAMILY_STAGES = {"curvature": "apply_edit", "mask": "train_mask", "baseline": "prune_baseline",
                 "balanced_subnet": "balanced_subnet", "csp": "csp"}
#: Calibration statistics a pruning baseline may read: none, the per-feature sum of squared inputs
#: (``diagonal``, Wanda's column norms) or the full ``X^T X`` (``full``, SparseGPT's Hessian).
STATISTICS = (None, "diagonal", "full")
#: The forms of a data-driven baseline (``pruning.forms``).
FORMS = ("sequential", "one_pass")
#: The ``pruning.*`` keys a baseline's job may carry besides method, sparsity, groups and form.
PRUNING_SETTING_KEYS = ("calibration_windows", "batch_size", "second_moments", "damp", "block_size")


class EditMethodError(ValueError):
    """A record that cannot be registered (a name or label taken, an unknown family ...)."""


@dataclass(frozen=True)
class EditMethod:
    """One edit method.

    ``prune`` (pruning baselines only): the per-matrix rule, a ``"module:function"`` string (or the
    function itself), called as ``rule(weight, statistic, sparsity, settings) -> (keep, new_weight)``:
    ``weight`` is ``(d_out, d_in)``, ``statistic`` is None (``statistics`` None), the ``d_in``
    vector of summed squared inputs (``diagonal``) or the ``(d_in, d_in)`` ``X^T X`` (``full``),
    ``settings`` the job's resolved settings; ``keep`` is the bool keep-mask, ``new_weight`` None
    for a pure mask or the replaced weight (with its zeros) for a rule that also updates weights.
    """

    name: str  #: the value the config and the plan use (``pruning.methods``, ``masks.modes`` ...)
    label: str  #: the row label of the tables (an edit without a label of its own)
    family: str  #: curvature, mask, baseline, balanced_subnet or csp
    stage: str  #: the registry stage that writes its delta
    description: str = ""  #: what the row is (the config's label check names it)
    mode: str | None = None  #: the mask / CSP mode it is
    statistics: str | None = None  #: calibration moments a pruning baseline needs (STATISTICS)
    setting_keys: tuple[str, ...] = ()  #: the ``pruning.*`` keys that enter its job (in this order)
    forms: tuple[str, ...] = ()  #: the forms it runs in (one: always that one, whatever pruning.forms says)
    prune: str | Callable[..., Any] | None = None  #: the per-matrix rule (see above)

    def __post_init__(self) -> None:
        if self.family not in FAMILY_STAGES:
            raise EditMethodError(f"edit method {self.name!r}: unknown family {self.family!r} "
                                  f"(known: {', '.join(FAMILY_STAGES)})")
        if self.stage != FAMILY_STAGES[self.family]:
            raise EditMethodError(f"edit method {self.name!r}: family {self.family!r} is written by stage "
                                  f"{FAMILY_STAGES[self.family]!r}, not {self.stage!r}")
        if self.family == "baseline":
            self._check_baseline()

    def _check_baseline(self) -> None:
        if self.statistics not in STATISTICS:
            raise EditMethodError(f"pruning baseline {self.name!r}: statistics {self.statistics!r} is none of "
                                  f"{list(STATISTICS)}")
        if self.prune is None:
            raise EditMethodError(f"pruning baseline {self.name!r}: no per-matrix rule (prune)")
        if not self.forms or not set(self.forms) <= set(FORMS):
            raise EditMethodError(f"pruning baseline {self.name!r}: forms {list(self.forms)} must be some of "
                                  f"{list(FORMS)}")
        if self.statistics is None and len(self.forms) != 1:
            raise EditMethodError(f"pruning baseline {self.name!r}: reads no statistics, so it has one form")
        unknown = set(self.setting_keys) - set(PRUNING_SETTING_KEYS)
        if unknown:
            raise EditMethodError(f"pruning baseline {self.name!r}: setting_keys {sorted(unknown)} are no "
                                  f"pruning settings (known: {', '.join(PRUNING_SETTING_KEYS)})")

    # ------------------------------------------------------------------ pruning baselines

    @property
    def reads_data(self) -> bool:
        """Whether the baseline reads calibration statistics (and so has the config's forms)."""
        return self.statistics is not None

    def planned_forms(self, config_forms: list[str] | tuple[str, ...]) -> list[str]:
        """The forms its jobs are planned in: its own one form, or the config's ``pruning.forms``."""
        return list(self.forms) if len(self.forms) == 1 else list(config_forms)

    def rule(self) -> Callable[..., Any]:
        """The per-matrix rule, imported (``prune`` named as ``"module:function"``) when asked."""
        if callable(self.prune):
            return self.prune
        if not isinstance(self.prune, str) or ":" not in self.prune:
            raise EditMethodError(f"edit method {self.name!r} has no per-matrix rule")
        module, function = self.prune.split(":", 1)
        return getattr(importlib.import_module(module), function)


_RULES = "memctl.pruning.runner"

#: Every registered edit method by name, in declaration order.
METHODS: dict[str, EditMethod] = {}


def register(method: EditMethod) -> EditMethod:
    """Add ``method``; a name or a row label another method has already is refused."""
    if not isinstance(method, EditMethod):
        raise EditMethodError(f"register() takes an EditMethod, not {type(method).__name__}")
    if method.name in METHODS:
        raise EditMethodError(f"edit method {method.name!r} is registered already "
                              f"({METHODS[method.name].family}, label {METHODS[method.name].label!r})")
    for other in METHODS.values():
        if other.label == method.label:
            raise EditMethodError(f"edit method {method.name!r}: label {method.label!r} is the label of "
                                  f"{other.name!r} already; rows with one label cannot be told apart")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> EditMethod:
    """Remove a registered method (tests that add one take it out again)."""
    return METHODS.pop(name)


def family(name: str) -> dict[str, EditMethod]:
    """The registered methods of one family, by name, in declaration order."""
    return {k: m for k, m in METHODS.items() if m.family == name}


def baseline_methods() -> dict[str, EditMethod]:
    """The registered pruning baselines (the values ``pruning.methods`` may list)."""
    return family("baseline")


def baseline(name: str) -> EditMethod:
    """The pruning baseline ``name``; a KeyError naming the known ones otherwise."""
    found = baseline_methods().get(name)
    if found is None:
        raise KeyError(f"unknown pruning baseline {name!r} (known: {', '.join(baseline_methods())})")
    return found


def markdown() -> str:
    """The records as a markdown table (docs/architecture.md, "Records: edit methods", shows it)."""
    lines = ["| Name | Label | Family | Stage | Statistics | Settings (`pruning.*`) | Forms |",
             "|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        baseline_only = m.family == "baseline"
        cells = [f"`{m.name}`", m.label, m.family, f"`{m.stage}`",
                 (m.statistics or "none") if baseline_only else "-",
                 (", ".join(m.setting_keys) or "none") if baseline_only else "-",
                 ", ".join(m.forms) if baseline_only else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Labels(Mapping):
    """A live, read-only view ``name -> label`` of one family (:mod:`memctl.labels`' mappings)."""

    def __init__(self, *families: str) -> None:
        self._families = families

    def _items(self) -> dict[str, str]:
        return {m.name: m.label for m in METHODS.values() if m.family in self._families}

    def __getitem__(self, name: str) -> str:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


def _declare() -> None:
    for name, label in (("kfac", "K-FAC"), ("kfac_factor", "K-FAC (per factor)"),
                        ("kfac_pairwise", "K-FAC (pairwise)"), ("svd", "SVD")):
        register(EditMethod(name, label, "curvature", "apply_edit", f"{name} edits without a label"))
    for mode in ("none", "up", "down", "reciprocal"):
        register(EditMethod(mode, f"Ours ({mode})", "mask", "train_mask", f"the {mode} mask", mode=mode))
    register(EditMethod("magnitude", "Magnitude", "baseline", "prune_baseline", "the magnitude baseline",
                        statistics=None, forms=("sequential",), prune=f"{_RULES}:magnitude_rule"))
    register(EditMethod("wanda", "Wanda", "baseline", "prune_baseline", "the wanda baseline",
                        statistics="diagonal", setting_keys=("calibration_windows", "batch_size", "second_moments"),
                        forms=FORMS, prune=f"{_RULES}:wanda_rule"))
    register(EditMethod("sparsegpt", "SparseGPT", "baseline", "prune_baseline", "the sparsegpt baseline",
                        statistics="full",
                        setting_keys=("calibration_windows", "batch_size", "second_moments", "damp", "block_size"),
                        forms=FORMS, prune=f"{_RULES}:sparsegpt_rule"))
    register(EditMethod("balanced_subnet", "BalancedSubnet", "balanced_subnet", "balanced_subnet",
                        "the BalancedSubnet baseline"))
    for mode in ("down", "up"):
        register(EditMethod(f"csp_{mode}", f"CSP ({mode})", "csp", "csp", "the CSP baseline", mode=mode))


_declare()
