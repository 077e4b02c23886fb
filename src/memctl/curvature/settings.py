"""The ``curvature`` config section turned into concrete edit specs, checked before any job runs.

The Snakefile expands the explicit ``edits`` list and the two sweeps (one edit per layer, one edit
per strength) into fully resolved specs; each spec becomes one DAG branch (apply_edit -> evaluate).
Problems that a JSON schema cannot see (an edit on a layer the factors do not cover, a layer the
model does not have) fail here with the key named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memctl.architectures import GROUPS, ROLES
from memctl.config import ConfigError
from memctl.labels import CURVATURE_LABELS

#: The edit families (memctl.curvature.edit implements them).
METHODS = ("kfac", "kfac_factor", "kfac_pairwise", "svd")
#: Defaults where an edit leaves ``strength`` unset: paper energy (also per factor), public-code rho,
#: paper SVD keep.
DEFAULT_STRENGTH = {"kfac": 0.9, "kfac_factor": 0.9, "kfac_pairwise": 0.6, "svd": 0.2}
FORMS = {"kfac": "projector", "kfac_factor": "per-factor", "kfac_pairwise": "pairwise", "svd": "svd"}
LABELS = CURVATURE_LABELS

#: Which roles belong to which group (architecture-independent vocabulary); every K-FAC method
#: (``kfac``, ``kfac_factor``, ``kfac_pairwise``) edits only collected roles, ``svd`` any of the groups'.
GROUP_ROLES = {"attention": ("qkv", "q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def _layers(value, n_layers: int | None, key: str, allowed: Sequence[int] | None = None) -> list[int] | None:
    if value is None:
        if allowed is not None:
            return sorted(allowed)
        return list(range(n_layers)) if n_layers is not None else None
    if n_layers is not None:
        bad = [i for i in value if not -n_layers <= int(i) < n_layers]
        if bad:
            raise ConfigError(f"{key}: layers {bad} out of range for a model with {n_layers} layers")
        value = [int(i) % n_layers for i in value]
    if allowed is not None:
        missing = sorted(set(value) - set(allowed))
        if missing:
            raise ConfigError(f"{key}: layers {missing} have no K-FAC factors; curvature.modules.layers collects {sorted(allowed)}")
    return sorted(set(int(i) for i in value))


def collected_layers(curv: Mapping[str, Any], n_layers: int | None) -> list[int] | None:
    return _layers(curv["modules"]["layers"], n_layers, "curvature.modules.layers")


def _roles(value, groups: Sequence[str], key: str, method: str) -> list[str] | None:
    if value is None:
        return None
    if method != "svd":
        allowed = {r for g in groups for r in GROUP_ROLES[g]}
        bad = sorted(set(value) - allowed)
        if bad:
            raise ConfigError(f"{key}: roles {bad} are not collected (curvature.modules.groups = {list(groups)})")
    return sorted(set(value), key=ROLES.index)


def resolve_edit(spec: Mapping[str, Any], curv: Mapping[str, Any], n_layers: int | None, key: str) -> dict[str, Any]:
    """One edit with every field explicit: method, layers, roles, groups, strength, label."""
    method = spec["method"]
    if method not in METHODS:
        raise ConfigError(f"{key}.method: {method!r} is not one of {list(METHODS)}")
    groups = list(curv["modules"]["groups"])
    collected = collected_layers(curv, n_layers)
    allowed = None if method == "svd" else collected
    layers = _layers(spec.get("layers"), n_layers, f"{key}.layers", allowed)
    if layers is None:
        raise ConfigError(f"{key}.layers: set the layers explicitly (the model's layer count is unknown)")
    strength = spec.get("strength")
    strength = DEFAULT_STRENGTH[method] if strength is None else float(strength)
    if not 0 < strength <= 1:
        raise ConfigError(f"{key}.strength: {strength} is not in (0, 1]")
    return {
        "method": method,
        "layers": layers,
        "roles": _roles(spec.get("roles"), groups, f"{key}.roles", method),
        "groups": groups,
        "strength": strength,
        "label": spec.get("label") or LABELS[method],
    }


def expand_edits(curv: Mapping[str, Any], n_layers: int | None) -> list[dict[str, Any]]:
    """Explicit edits, then the per-layer sweep, then the strength sweep; duplicates dropped."""
    specs = []
    for i, spec in enumerate(curv["edits"]):
        specs.append(resolve_edit(spec, curv, n_layers, f"curvature.edits[{i}]"))
    per_layer = curv["sweeps"]["per_layer"]
    if per_layer["methods"]:
        key = "curvature.sweeps.per_layer"
        collected = collected_layers(curv, n_layers)
        layers = _layers(per_layer["layers"], n_layers, f"{key}.layers", collected)
        if layers is None:
            raise ConfigError(f"{key}.layers: set the layers explicitly (the model's layer count is unknown)")
        for method in per_layer["methods"]:
            for layer in layers:
                base = {"method": method, "layers": [layer], "roles": per_layer["roles"],
                        "strength": per_layer["strength"].get(method)}
                specs.append(resolve_edit(base, curv, n_layers, f"{key}[{method}, layer {layer}]"))
    sweep = curv["sweeps"]["strength"]
    for method in METHODS:  # kfac (product energy), kfac_factor, kfac_pairwise, svd
        for value in sweep.get(method) or []:
            base = {"method": method, "layers": sweep["layers"], "roles": sweep["roles"], "strength": value}
            specs.append(resolve_edit(base, curv, n_layers, f"curvature.sweeps.strength.{method}"))
    unique, seen = [], set()
    for spec in specs:
        marker = repr(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in spec.items() if k != "label"))
        if marker not in seen:
            seen.add(marker)
            unique.append(spec)
    return unique


def validate_spec(spec: Mapping[str, Any], key: str = "--settings") -> dict[str, Any]:
    """Re-check a resolved edit spec (what :func:`resolve_edit` returns) handed to
    ``memctl curvature-edit``, by the plan or by hand; the problem is named."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: an edit spec must be a JSON object")
    fields = ("method", "layers", "roles", "groups", "strength")
    missing = [f for f in fields if f not in spec]
    if missing:
        raise ConfigError(f"{key}: edit spec lacks {missing} (a resolved spec has {list(fields)} and a label)")
    method = spec["method"]
    if method not in METHODS:
        raise ConfigError(f"{key}.method: {method!r} is not one of {list(METHODS)}")
    strength = spec["strength"]
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ConfigError(f"{key}.strength: {strength!r} is not in (0, 1]")
    layers = spec["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise ConfigError(f"{key}.layers: {layers!r} is not a non-empty list of layer indices >= 0")
    bad = sorted(set(spec["groups"] or []) - set(GROUPS))
    if bad or not spec["groups"]:
        raise ConfigError(f"{key}.groups: {spec['groups']!r}; known groups: {list(GROUPS)}")
    roles = spec["roles"]
    if roles is not None and (not isinstance(roles, list) or set(roles) - set(ROLES)):
        raise ConfigError(f"{key}.roles: {roles!r}; known roles: {list(ROLES)}")
    return {**dict(spec), "strength": float(strength), "label": spec.get("label") or LABELS[method]}


def needs_factors(curv: Mapping[str, Any], specs: Sequence[Mapping[str, Any]]) -> bool:
    return bool(curv["spectrum"]["enabled"]) or any(s["method"] != "svd" for s in specs)


def check(curv: Mapping[str, Any]) -> None:
    """Cross-key rules of the section (the schema has checked types and ranges)."""
    bad = sorted(set(curv["modules"]["groups"]) - set(GROUPS))
    if bad:
        raise ConfigError(f"curvature.modules.groups: unknown groups {bad}; known: {list(GROUPS)}")
    roles = curv["modules"]["roles"]
    if roles is not None:
        _roles(roles, curv["modules"]["groups"], "curvature.modules.roles", "kfac")
    bands = list(curv["spectrum"]["bands"])
    if bands != sorted(set(bands)) or any(b >= 1 for b in bands):
        raise ConfigError(f"curvature.spectrum.bands: {bands} must increase strictly and stay below 1")
    if curv["spectrum"]["enabled"]:
        _roles(curv["spectrum"]["roles"], curv["modules"]["groups"], "curvature.spectrum.roles", "kfac")


def layer_count(hf_config) -> int | None:
    """Number of transformer blocks from a HF config (None when it does not say)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int):
            return value
    return None


def edit_id(spec: Mapping[str, Any], upstream: str) -> str:
    """Path-safe id: the method and a hash of the spec (label excluded) and upstream hashes."""
    from memctl.config import settings_hash

    body = {k: v for k, v in spec.items() if k != "label"}
    return f"{spec['method'].replace('_', '-')}-{settings_hash(upstream, body)}"
