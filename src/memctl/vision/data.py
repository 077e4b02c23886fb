"""An image-classification set with a known share of randomly relabelled ('noised') training images.

The loss-curvature paper (§2.2) trains a ViT where a subset of the training images carry random
labels: the only way to fit them is to memorize each (image, label) pair. This module builds such a
set and keeps the bookkeeping explicit, one row per image in ``labels.parquet``:

- ``index`` (row of the image tensor / the file list), ``split``: ``train``, ``selection`` (the
  held-out slice that picks edits) or ``validation`` (the held-out slice that is reported);
- ``true_label``, ``label`` (what training sees), ``noised`` (``label != true_label``, train only).

Exactly ``round(noise * n_train)`` training images are noised, chosen without replacement by a
seeded generator; each gets a label drawn uniformly from the *other* classes, so a noised label is
never its true one. Two sources:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, shipped in
  the wheel: no network), scaled to [0, 1], optionally resized (bilinear) to ``image_size``; one
  seeded permutation splits them into train / selection / validation. ``images.safetensors`` holds
  them all as ``(N, 1, S, S)`` float32.
- ``imagefolder``: a local directory in the Hugging Face ``imagefolder`` layout,
  ``<path>/train/<class>/<file>`` and ``<path>/validation/<class>/<file>`` (``val/`` also accepted),
  classes sorted by name as ``datasets`` numbers them (ImageNet-1k as prepared for ``datasets``).
  Nothing is decoded at this stage: ``labels.parquet`` lists each file, and :class:`ImageSet`
  decodes batches on demand (resize of the short side, center crop, RGB), so ImageNet never has to
  fit in memory.

Pixels are normalised as ``(x - 0.5) / 0.5`` (the ViT recipe's normalisation) when they are read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from memctl.data import DataError

LABEL_COLUMNS = ["index", "split", "true_label", "label", "noised"]
SPLITS = ("train", "selection", "validation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
HELD_OUT_DIRS = ("validation", "val")


class VisionDataError(DataError):
    """The image data or its label table is missing or malformed (the message names the key or path)."""


def noise_labels(true_labels: np.ndarray, n_classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(assigned labels, noised mask)``: exactly ``round(share * n)`` positions get a label drawn
    uniformly from the other ``n_classes - 1`` classes; the rest keep theirs. Seeded, so the same
    arguments give the same noise."""
    true_labels = np.asarray(true_labels, dtype=np.int64)
    n = len(true_labels)
    if not 0 <= share < 1:
        raise ValueError(f"vision.data.noise: {share} is not in [0, 1)")
    if n_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {n_classes}")
    rng = np.random.default_rng(seed)
    k = int(round(share * n))
    chosen = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)
    assigned = true_labels.copy()
    assigned[chosen] = (true_labels[chosen] + rng.integers(1, n_classes, size=k)) % n_classes
    noised = np.zeros(n, dtype=bool)
    noised[chosen] = True
    return assigned, noised


def _split_held_out(n: int, selection_fraction: float, seed: int) -> np.ndarray:
    """Split names of ``n`` held-out images: a seeded ``selection_fraction`` share is ``selection``."""
    rng = np.random.default_rng([seed, 1])
    k = int(round(selection_fraction * n))
    split = np.array(["validation"] * n, dtype=object)
    split[rng.permutation(n)[:k]] = "selection"
    return split


def label_table(true_labels: np.ndarray, split: np.ndarray, n_classes: int, noise: float, seed: int) -> pd.DataFrame:
    """The ``labels.parquet`` table: noise applied to the ``train`` rows only."""
    true_labels = np.asarray(true_labels, dtype=np.int64)
    split = np.asarray(split, dtype=object)
    train = np.flatnonzero(split == "train")
    assigned = true_labels.copy()
    noised = np.zeros(len(true_labels), dtype=bool)
    a, m = noise_labels(true_labels[train], n_classes, noise, seed)
    assigned[train], noised[train] = a, m
    return pd.DataFrame({"index": np.arange(len(true_labels), dtype=np.int64), "split": split.astype(str),
                         "true_label": true_labels, "label": assigned, "noised": noised})


# ------------------------------------------------------------------------------------ sources


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def digits(settings: Mapping[str, Any]) -> tuple[torch.Tensor, pd.DataFrame, dict]:
    """scikit-learn's digits: ``(images (N, 1, S, S) in [0, 1], labels table, info)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise VisionDataError("vision.data.source 'digits' needs scikit-learn (pip install scikit-learn)") from err
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    images = _resize(images, int(settings["image_size"]))
    true = np.asarray(bunch.target, dtype=np.int64)
    seed = int(settings["seed"])
    order = np.random.default_rng([seed, 0]).permutation(len(true))
    n_held = int(round(float(settings["validation_fraction"]) * len(true)))
    split = np.array(["train"] * len(true), dtype=object)
    held = order[:n_held]
    split[held] = _split_held_out(n_held, float(settings["selection_fraction"]), seed)
    split, true, images = _limit(split, true, images, settings)
    table = label_table(true, split, 10, float(settings["noise"]), seed)
    return images, table, {"classes": [str(i) for i in range(10)], "channels": 1}


def _limit(split, true, images, settings):
    """Keep the first ``max_train`` train rows / ``max_held_out`` held-out rows (None = all)."""
    keep = np.ones(len(true), dtype=bool)
    for name, key in (("train", "max_train"), ("held", "max_held_out")):
        limit = settings.get(key)
        if limit is None:
            continue
        rows = np.flatnonzero(split == "train") if name == "train" else np.flatnonzero(split != "train")
        keep[rows[int(limit):]] = False
    idx = np.flatnonzero(keep)
    return split[idx], true[idx], (images[torch.as_tensor(idx)] if images is not None else None)


def _class_files(root: Path) -> list[tuple[str, str]]:
    """(class name, file path relative to the data root) under ``root/<class>/``, sorted."""
    rows = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((cls.name, f.relative_to(root.parent).as_posix()))
    return rows


def imagefolder(settings: Mapping[str, Any]) -> tuple[None, pd.DataFrame, dict]:
    """A local ``imagefolder`` directory: the labels table with a ``file`` column (no pixels)."""
    path = settings.get("path")
    if not path:
        raise VisionDataError("vision.data.path: required when vision.data.source is 'imagefolder'")
    root = Path(path)
    train_dir = root / "train"
    held_dir = next((root / d for d in HELD_OUT_DIRS if (root / d).is_dir()), None)
    if not train_dir.is_dir() or held_dir is None:
        raise VisionDataError(f"vision.data.path: {root} needs train/<class>/ and validation/<class>/ (or val/) "
                              "subdirectories (the Hugging Face imagefolder layout)")
    train, held = _class_files(train_dir), _class_files(held_dir)
    classes = sorted({c for c, _ in train})
    if len(classes) < 2:
        raise VisionDataError(f"{train_dir}: found {len(classes)} class directories with images; need at least 2")
    unknown = sorted({c for c, _ in held} - set(classes))
    if unknown:
        raise VisionDataError(f"{held_dir}: classes {unknown[:5]} do not occur under {train_dir}")
    ids = {c: i for i, c in enumerate(classes)}
    files = [f for _, f in train] + [f for _, f in held]
    true = np.array([ids[c] for c, _ in train] + [ids[c] for c, _ in held], dtype=np.int64)
    split = np.array(["train"] * len(train) + list(_split_held_out(len(held), float(settings["selection_fraction"]),
                                                                     int(settings["seed"]))), dtype=object)
    files_arr = np.array(files, dtype=object)
    keep = np.ones(len(true), dtype=bool)
    for key, rows in (("max_train", np.flatnonzero(split == "train")), ("max_held_out", np.flatnonzero(split != "train"))):
        if settings.get(key) is not None:
            keep[rows[int(settings[key]):]] = False
    idx = np.flatnonzero(keep)
    table = label_table(true[idx], split[idx], len(classes), float(settings["noise"]), int(settings["seed"]))
    table["file"] = files_arr[idx].astype(str)
    return None, table, {"classes": classes, "channels": 3, "root": str(root.resolve())}


def build(settings: Mapping[str, Any]) -> tuple[torch.Tensor | None, pd.DataFrame, dict]:
    """Images (or None when they are decoded on demand), the labels table and info of a source."""
    source = settings["source"]
    if source == "digits":
        images, table, info = digits(settings)
    elif source == "imagefolder":
        images, table, info = imagefolder(settings)
    else:
        raise VisionDataError(f"vision.data.source: {source!r} is not one of ['digits', 'imagefolder']")
    counts = table["split"].value_counts()
    for name in SPLITS:
        if counts.get(name, 0) == 0:
            raise VisionDataError(f"vision.data: the {name} split is empty ({dict(counts)}); check validation_fraction, "
                                  "selection_fraction and the max_* limits")
    info.update({"source": source, "image_size": int(settings["image_size"]), "n_classes": len(info["classes"]),
                 "counts": {k: int(v) for k, v in counts.items()}, "noised": int(table["noised"].sum())})
    return images, table, info


# --------------------------------------------------------------------------------- reading


class ImageSet:
    """The images of a data stage's output directory, read by row index as normalised tensors."""

    def __init__(self, directory: str | os.PathLike):
        import json

        self.dir = Path(directory)
        table_path = self.dir / "labels.parquet"
        if not table_path.exists():
            raise VisionDataError(f"{table_path}: not found (the output of `memctl vision-data`)")
        self.labels = pd.read_parquet(table_path)
        missing = [c for c in LABEL_COLUMNS if c not in self.labels.columns]
        if missing:
            raise VisionDataError(f"{table_path}: missing columns {missing}")
        self.info = json.loads((self.dir / "info.json").read_text(encoding="utf-8"))
        self.image_size = int(self.info["image_size"])
        self.n_classes = int(self.info["n_classes"])
        self.channels = int(self.info["channels"])
        tensor = self.dir / "images.safetensors"
        self._pixels = None
        if tensor.exists():
            from safetensors.torch import load_file

            self._pixels = load_file(str(tensor))["images"]
            if self._pixels.shape[0] != len(self.labels):
                raise VisionDataError(f"{tensor}: {self._pixels.shape[0]} images for {len(self.labels)} label rows")
        elif "file" not in self.labels.columns:
            raise VisionDataError(f"{self.dir}: neither images.safetensors nor a file column in labels.parquet")

    def rows(self, split: str | Sequence[str]) -> np.ndarray:
        splits = [split] if isinstance(split, str) else list(split)
        return self.labels.index[self.labels["split"].isin(splits)].to_numpy()

    def _decode(self, rel: str) -> torch.Tensor:
        from PIL import Image

        path = Path(self.info["root"]) / rel
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.image_size / min(w, h)
            im = im.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))),
                           Image.BILINEAR)
            w, h = im.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            arr = np.asarray(im, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    def pixels(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """``(len(rows), C, S, S)`` float32, normalised to [-1, 1]."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._pixels is not None:
            x = self._pixels[torch.as_tensor(rows)]
        else:
            files = self.labels["file"].to_numpy()
            x = torch.stack([self._decode(files[i]) for i in rows]) if len(rows) else torch.zeros(
                0, self.channels, self.image_size, self.image_size)
        return (x - 0.5) / 0.5

    def batches(self, rows: np.ndarray, batch_size: int, workers: int = 0):
        """``(row indices, pixels)`` in order, ``batch_size`` at a time."""
        rows = np.asarray(rows)
        chunks = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
        yield from zip(chunks, self.stream(chunks, workers))

    def stream(self, chunks: list[np.ndarray], workers: int = 0):
        """The pixels of each chunk of rows, in order. Images decoded on demand (imagefolder) are
        decoded by ``workers`` processes (a torch DataLoader) when ``workers > 0``."""
        if workers <= 0 or self._pixels is not None:
            for chunk in chunks:
                yield self.pixels(chunk)
            return
        loader = torch.utils.data.DataLoader(_Decoded(self), batch_sampler=[list(map(int, c)) for c in chunks],
                                             num_workers=int(workers))
        yield from loader


class _Decoded(torch.utils.data.Dataset):
    """One normalised image per row index (for DataLoader workers)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images.labels)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.images.pixels([row])[0]
