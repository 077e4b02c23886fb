"""The curvature machinery of :mod:`memctl.curvature` on the ViT: factors, edits, band analysis.

- :func:`collect`: K-FAC factors of the ViT's MLP matrices with
  :func:`memctl.curvature.collect.collect_factors`, the loss being the summed cross-entropy of each
  image's logits against a label **sampled from the model's own predictive distribution** (true
  Fisher; nothing about the noise is used) or, ``labels: empirical``, its assigned label. Every
  token position (CLS and patches) counts in A and G: the MLP weights are shared over positions.
  The uniform that picks image i's label depends only on (seed, i)
  (:func:`memctl.curvature.collect.window_uniforms`).
- :func:`edit_specs`: one edit per (method, strength, unit), a unit being one MLP block or a pair
  of blocks; each is a spec of :mod:`memctl.curvature.settings` and is applied by the same code as
  the language models' edits (:func:`memctl.curvature.edit.edit_matrix`, the one delta format).
- :func:`spectrum_table`: the paper's Fig. 2 for the ViT: inputs of each MLP down-projection for
  memorized images (noised, predicted as their noised label) and clean ones (not noised, predicted
  correctly), scored per curvature band of the K-FAC basis and of the SVD basis with
  :mod:`memctl.curvature.spectrum`'s exact band weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from memctl.architectures import LinearTarget
from memctl.capture import Capture
from memctl.vision.data import ImageSet
from memctl.vision.model import sequence_length


def classification_loss(labels_mode: str, seed: int, assigned: torch.Tensor):
    """``batch_loss`` for :func:`~memctl.curvature.collect.collect_factors`: summed cross-entropy of
    a batch of images against sampled (or assigned) labels; ``first`` is the batch's global index."""
    from memctl.curvature.collect import sample_labels, window_uniforms

    def loss(model, pixels: torch.Tensor, labels: str, seed_: int, first: int) -> torch.Tensor:
        logits = model(pixel_values=pixels).logits.float()
        index = torch.arange(pixels.shape[0], device=pixels.device) + first
        if labels_mode == "empirical":
            y = assigned.to(pixels.device)[index]
        else:
            with torch.no_grad():
                y = sample_labels(logits.detach(), window_uniforms(seed, index, 1)[:, 0])
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    return loss


def factor_rows(images: ImageSet, max_images: int | None, seed: int) -> np.ndarray:
    """The training rows the factors see: all, or a seeded subset of ``max_images`` (sorted)."""
    rows = images.rows("train")
    if max_images is not None and max_images < len(rows):
        rows = np.sort(np.random.default_rng([seed, 2]).choice(rows, size=int(max_images), replace=False))
    return rows


def collect(model, images: ImageSet, targets: Sequence[LinearTarget], settings: Mapping[str, Any], progress=False):
    """K-FAC factors (:class:`memctl.curvature.collect.Factors`) over the chosen training images."""
    from memctl.curvature.collect import collect_factors

    seed = int(settings["seed"])
    rows = factor_rows(images, settings.get("max_images"), seed)
    pixels = images.pixels(rows)
    assigned = torch.as_tensor(images.labels["label"].to_numpy()[rows], dtype=torch.long)
    factors = collect_factors(
        model, pixels, targets, labels=settings["labels"], seed=seed, batch_size=int(settings["batch_size"]),
        progress=progress, precision=settings["precision"],
        batch_loss=classification_loss(settings["labels"], seed, assigned), positions=None,
        tokens_per_window=sequence_length(model),
    )
    factors.meta.update({"images": int(len(rows)), "positions": "all (CLS + patches)"})
    return factors


# --------------------------------------------------------------------------------------- edits


def units(n_layers: int, pairs) -> list[tuple[str, list[int]]]:
    """``(kind, layers)``: every block alone, then the block pairs (``"all"`` or a list)."""
    out = [("block", [i]) for i in range(n_layers)]
    if pairs == "all":
        chosen = list(itertools.combinations(range(n_layers), 2))
    else:
        chosen = []
        for pair in pairs or []:
            a, b = (int(i) % n_layers for i in pair)
            if a == b:
                raise ValueError(f"vision.edits.pairs: {list(pair)} names one block twice")
            chosen.append(tuple(sorted((a, b))))
    out += [("pair", list(p)) for p in dict.fromkeys(chosen)]
    return out


def edit_specs(edits: Mapping[str, Any], method: str, n_layers: int) -> list[dict[str, Any]]:
    """Resolved edit specs (memctl.curvature.settings form) of one method, every unit x strength."""
    from memctl.curvature.settings import LABELS

    specs = []
    for kind, layers in units(n_layers, edits["pairs"]):
        for strength in edits["strengths"][method]:
            specs.append({"method": method, "layers": layers, "roles": list(edits["roles"]), "groups": ["mlp"],
                          "strength": float(strength), "label": LABELS[method], "unit": kind})
    return specs


def spec_id(spec: Mapping[str, Any]) -> str:
    layers = "-".join(str(i) for i in spec["layers"])
    return f"{spec['method'].replace('_', '-')}-L{layers}-s{spec['strength']:g}"


@torch.no_grad()
def apply_replace(model, replace: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Overwrite parameters in place; returns their previous values (to restore)."""
    params = dict(model.named_parameters())
    saved = {}
    for name, value in replace.items():
        saved[name] = params[name].detach().clone()
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    return saved


# ------------------------------------------------------------------------------- Fig. 2 bands


@torch.no_grad()
def capture_states(model, images: ImageSet, rows: np.ndarray, targets: Sequence[LinearTarget], positions: str,
                   batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Inputs of each target for the given images: every token position, or the CLS token only."""
    device = next(model.parameters()).device
    store: dict[str, list[torch.Tensor]] = {t.input_key: [] for t in targets}
    pos = 0 if positions == "cls" else None
    with Capture(model, targets, on_input=lambda t, x: store[t.input_key].append(x.float().cpu()), positions=pos):
        for _, x in images.batches(rows, batch_size):
            model(pixel_values=x.to(device))
    return {t.name: torch.cat(store[t.input_key]) for t in targets}


def memorized_and_clean(images: ImageSet, pred: np.ndarray, max_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows the model memorized (noised, predicted as their noised label) and clean rows it
    fits (not noised, predicted correctly); at most ``max_images`` of each, seeded."""
    lab = images.labels
    train = (lab["split"] == "train").to_numpy()
    hit = pred == lab["label"].to_numpy()
    noised = lab["noised"].to_numpy().astype(bool)
    rng = np.random.default_rng([seed, 3])
    out = []
    for mask in (train & noised & hit, train & ~noised & hit):
        rows = np.flatnonzero(mask)
        if len(rows) > max_images:
            rows = np.sort(rng.choice(rows, size=max_images, replace=False))
        out.append(rows)
    return out[0], out[1]


def spectrum_table(model, eig, targets: Sequence[LinearTarget], images: ImageSet, pred: np.ndarray,
                   settings: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (matrix, basis, band): mean ``||Z x||`` of memorized and of clean images' states
    (columns of :data:`memctl.curvature.spectrum.SPECTRUM_COLUMNS`; 'nonmemorized' = clean)."""
    from memctl.curvature.spectrum import SPECTRUM_COLUMNS, band_table

    edges = tuple(settings["bands"])
    mem_rows, clean_rows = memorized_and_clean(images, pred, int(settings["max_images"]), int(settings["seed"]))
    if not len(mem_rows) or not len(clean_rows):
        return pd.DataFrame(columns=SPECTRUM_COLUMNS)
    states = {name: capture_states(model, images, rows, targets, settings["positions"])
              for name, rows in (("memorized", mem_rows), ("clean", clean_rows))}
    return band_table(model, eig, targets, states["memorized"], states["clean"], edges)
