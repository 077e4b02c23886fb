"""The ViT (Hugging Face ``ViTForImageClassification``), its training on noised labels, its metrics.

Training follows the ViT recipe the paper uses (Dosovitskiy et al. 2020): AdamW, linear warmup then
cosine decay, weight decay (the paper: 0.3 on ImageNet, Appendix B.1), no dropout, batches drawn
from a seeded permutation per epoch. It trains on the ``train`` rows with their *assigned* labels,
so the noised ones can only be fit by memorizing them.

The four accuracies of :func:`accuracies` are the paper's (§4.2.2, Fig. 4):

- ``memorization``: noised training images predicted as their assigned (noised) label;
- ``recovery``: noised training images predicted as their true label ("GT accuracy");
- ``clean_train``: the other training images (label = true label);
- ``selection`` / ``validation``: the two held-out slices (true labels; selection picks edits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from memctl.vision.data import ImageSet

log = logging.getLogger(__name__)
METRICS = ("memorization", "recovery", "clean_train", "selection", "validation")


def vit_config(arch: Mapping[str, Any], images: ImageSet):
    """A ``ViTConfig`` for the data's image size, channels and classes (no dropout)."""
    from transformers import ViTConfig

    size, patch = images.image_size, int(arch["patch_size"])
    if size % patch:
        raise ValueError(f"vision.model.patch_size: {patch} does not divide the image size {size}")
    if int(arch["hidden_size"]) % int(arch["num_attention_heads"]):
        raise ValueError(f"vision.model.hidden_size {arch['hidden_size']} is not a multiple of num_attention_heads "
                         f"{arch['num_attention_heads']}")
    return ViTConfig(
        image_size=size, patch_size=patch, num_channels=images.channels, num_labels=images.n_classes,
        hidden_size=int(arch["hidden_size"]), num_hidden_layers=int(arch["num_hidden_layers"]),
        num_attention_heads=int(arch["num_attention_heads"]), intermediate_size=int(arch["intermediate_size"]),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={i: c for i, c in enumerate(images.info["classes"])},
        label2id={c: i for i, c in enumerate(images.info["classes"])},
    )


def sequence_length(model) -> int:
    """Token positions per image: the patches and the CLS token."""
    cfg = model.config
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


def load_vit(path, device: str = "cpu"):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(str(path)).to(device).eval()


def device_of(settings: Mapping[str, Any]) -> str:
    from memctl.models import resolve_device

    return str(resolve_device(settings.get("device", "auto"), what="vision.train.device"))


def train_vit(images: ImageSet, arch: Mapping[str, Any], settings: Mapping[str, Any], progress: bool = False):
    """Train a fresh ViT on the train rows' assigned labels; returns ``(model, per-epoch log)``."""
    from transformers import ViTForImageClassification, get_cosine_schedule_with_warmup

    seed = int(settings["seed"])
    torch.manual_seed(seed)
    device = device_of(settings)
    model = ViTForImageClassification(vit_config(arch, images)).to(device)
    rows = images.rows("train")
    labels = torch.tensor(images.labels["label"].to_numpy(), dtype=torch.long)
    noised = images.labels["noised"].to_numpy()
    in_memory = images._pixels is not None
    cached = images.pixels(rows).to(device) if in_memory else None
    bs, epochs = int(settings["batch_size"]), int(settings["epochs"])
    steps_per_epoch = math.ceil(len(rows) / bs)
    total = steps_per_epoch * epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embeddings" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(settings["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(settings["lr"]), betas=(0.9, 0.999))
    sched = get_cosine_schedule_with_warmup(opt, int(round(float(settings["warmup_fraction"]) * total)), total)
    gen = torch.Generator().manual_seed(seed)
    log_every = int(settings["eval_every"])
    history = []
    workers = int(settings.get("workers", 0))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(rows), generator=gen).numpy()
        total_loss, seen = 0.0, 0
        chunks = [order[start : start + bs] for start in range(0, len(rows), bs)]
        decoded = None if in_memory else images.stream([rows[c] for c in chunks], workers)
        for pos in chunks:
            x = cached[torch.as_tensor(pos, device=device)] if in_memory else next(decoded).to(device)
            y = labels[rows[pos]].to(device)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(settings["grad_clip"]))
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(pos)
            seen += len(pos)
        record = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "lr": sched.get_last_lr()[0]}
        if log_every and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            pred = predict(model, images, rows, bs)
            y_rows = images.labels["label"].to_numpy()[rows]
            nz = noised[rows]
            record["train_acc_noised"] = float((pred[nz] == y_rows[nz]).mean()) if nz.any() else math.nan
            record["train_acc_clean"] = float((pred[~nz] == y_rows[~nz]).mean()) if (~nz).any() else math.nan
            if progress:
                log.info("epoch %d: loss %.4f, noised-label accuracy %.3f, clean %.3f", epoch + 1, record["loss"],
                         record["train_acc_noised"], record["train_acc_clean"])
        history.append(record)
    return model.eval(), pd.DataFrame(history)


@torch.no_grad()
def predict(model, images: ImageSet, rows: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """Arg-max class of each row (all rows when ``rows`` is None), in order."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = np.arange(len(images.labels)) if rows is None else np.asarray(rows)
    out = []
    for _, x in images.batches(rows, batch_size):
        out.append(model(pixel_values=x.to(device)).logits.argmax(-1).cpu())
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def score_rows(labels: pd.DataFrame, max_per_group: int | None, seed: int) -> np.ndarray:
    """The rows an evaluation scores (sorted): every row, or at most ``max_per_group`` of each group
    (noised train, clean train, selection, validation), a seeded sample of each larger one."""
    if max_per_group is None:
        return np.arange(len(labels))
    split = labels["split"].to_numpy()
    noised = labels["noised"].to_numpy().astype(bool)
    rng = np.random.default_rng([seed, 4])
    chosen = []
    for mask in ((split == "train") & noised, (split == "train") & ~noised, split == "selection",
                 split == "validation"):
        rows = np.flatnonzero(mask)
        if len(rows) > max_per_group:
            rows = rng.choice(rows, size=int(max_per_group), replace=False)
        chosen.append(rows)
    return np.sort(np.concatenate(chosen))


def hits(pred: np.ndarray, labels: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per metric of :func:`accuracies`: 1/0 per image of its group (in the labels' row order),
    whether the prediction is that group's target; the paired tests compare edits on these."""
    pred = np.asarray(pred)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} images")
    return {name: (pred[mask] == target[mask]).astype(np.int8) for name, (mask, target) in _groups(labels).items()}


def _groups(labels: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    split = labels["split"].to_numpy()
    noised = labels["noised"].to_numpy().astype(bool)
    assigned, true = labels["label"].to_numpy(), labels["true_label"].to_numpy()
    train = split == "train"
    return {
        "memorization": (train & noised, assigned), "recovery": (train & noised, true),
        "clean_train": (train & ~noised, assigned), "selection": (split == "selection", true),
        "validation": (split == "validation", true),
    }


def accuracies(pred: np.ndarray, labels: pd.DataFrame) -> dict[str, float]:
    """The five accuracies of predictions over every row of the labels table (module docstring);
    ``nan`` for an empty group; ``n_<metric>`` counts the images behind each."""
    pred = np.asarray(pred)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} images")
    groups = _groups(labels)
    out: dict[str, float] = {}
    for name, (mask, target) in groups.items():
        n = int(mask.sum())
        out[name] = float((pred[mask] == target[mask]).mean()) if n else math.nan
        out[f"n_{name}"] = n
    return out
