"""CSP: the soft-prompt baseline of the weight-pruning paper's tables (Ozdayi et al., 2023).

A soft prompt of ``prompt_length`` vectors is put in front of every input (:mod:`memctl.soft_prompt`)
and trained with the model frozen on the extraction-rate train side (the ``er_train`` sequences the
masks train on), on the suffix tokens only (the loss of each suffix token given the prompt, the
prefix and the suffix before it):

- ``down`` (suppression): gradient *ascent* on the suffix loss while the batch's loss is below the
  threshold ``theta``, descent while it is above, so the loss settles around ``theta`` instead of
  diverging;
- ``up`` (amplification): the suffix loss is minimized.

Adam on the prompt vectors only (constant learning rate); batches cycle through the sequences in a
seeded order (:func:`memctl.masks.data.cycling_indices`), the prompt starts from the embeddings of
``prompt_length`` vocabulary tokens drawn with the seed (``init: vocab``, the usual prompt-tuning
start) or from Gaussian vectors of the embedding table's scale (``init: random``). Same settings and
seed, same prompt. The prompt is the edit: a ``prompt/embeddings`` entry of the delta format
(:mod:`memctl.edits`); every weight stays byte-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from memctl.masks.settings import Resolved

if TYPE_CHECKING:  # torch, pandas and the data module load inside the functions: the planner
    import pandas as pd  # resolves jobs (resolve_job) while Snakemake parses the workflow
    import torch

    from memctl.masks.data import Sequences

MODES = ("down", "up")


@dataclass
class CSPResult:
    prompt: torch.Tensor  #: [prompt_length, hidden], float32, CPU
    log: pd.DataFrame  #: one row per logged iteration
    stats: dict[str, Any]


@cache
def job_schema() -> dict[str, Any]:
    """The schema of one ``csp`` job's settings: the config's ``csp`` section without the lists that
    make jobs (``enabled``, ``modes``, ``sweep``), plus the job's ``mode``."""
    from memctl.masks.settings import _job_schema, fragment

    return _job_schema(fragment("csp"), drop=("enabled", "modes", "sweep"), add={"mode": {"enum": list(MODES)}},
                       required=["mode"])


@dataclass(frozen=True)
class CspJob(Resolved):
    """One ``csp`` job's settings, resolved by :func:`resolve_job` (keys: :func:`job_schema`), carried
    as ``--settings`` (:meth:`to_json`) and read back by ``memctl csp`` (:meth:`from_json`).

    Mode ``up`` has no threshold: ``theta`` is None, left out of its JSON and mapping view (so an
    ``up`` job's text, hash and paths stay those of the settings without it), and refused if given;
    mode ``down`` needs it."""

    where = "csp"
    resolver = "resolve_job"
    schema = "job_schema"

    batch_size: int
    init: str
    log_every: int
    lr: float
    mode: Literal["down", "up"]
    prompt_length: int
    seed: int
    steps: int
    theta: float | None

    @classmethod
    def absent(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        return {"theta": "mode up has no threshold"} if settings.get("mode") == "up" else {}


def resolve_job(settings: Mapping[str, Any]) -> CspJob:
    """A ``csp`` job's settings with defaults, as a :class:`CspJob`; fails naming the bad key, before
    any model is loaded. Mode ``up`` has no threshold (``theta`` is dropped: it does not change an
    ``up`` prompt)."""
    from memctl.masks.settings import _resolve

    job = _resolve(job_schema(), settings, "csp")
    if job["mode"] == "up":
        job.pop("theta", None)
    return CspJob.from_dict(job, limits=False)


def initial_prompt(model, length: int, init: str, seed: int) -> torch.Tensor:
    """The prompt's starting vectors (float32, on the model's device)."""
    import torch

    table = model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(int(seed))
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (length,), generator=gen)
        return table[ids.to(table.device)].float().clone()
    if init == "random":
        scale = float(table.float().std())
        return (torch.randn((length, table.shape[1]), generator=gen) * scale).to(table.device)
    raise ValueError(f"csp.init: unknown initialisation {init!r}; use vocab or random")


def train_soft_prompt(model, sequences: Sequences, settings: Mapping[str, Any], progress: bool = True) -> CSPResult:
    """Train a soft prompt on ``sequences`` (suffix-only targets) with ``model`` frozen.

    ``settings`` is a resolved job (:func:`resolve_job`, a :class:`CspJob`). The model leaves as it
    came: no parameter changes, no prompt attached, ``requires_grad`` flags restored.
    """
    import pandas as pd
    import torch
    from memctl.progress import tqdm

    from memctl import soft_prompt
    from memctl.masks.data import cycling_indices, sequence_loss

    s = dict(settings)
    mode, steps = s["mode"], int(s["steps"])
    if mode not in MODES:
        raise ValueError(f"csp mode must be one of {MODES}, got {mode!r}")
    theta = float(s["theta"]) if mode == "down" else None
    if len(sequences) == 0:
        raise ValueError("csp: no training sequences")
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # no dropout: the prompt is trained against the model as evaluated
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(int(s["seed"]))
    prompt = torch.nn.Parameter(initial_prompt(model, int(s["prompt_length"]), s["init"], int(s["seed"])))
    optimizer = torch.optim.Adam([prompt], lr=float(s["lr"]))
    rows, losses, ascents = [], [], 0
    soft_prompt.attach(model, prompt)
    try:
        bar = tqdm(range(steps), desc=f"csp ({mode})", unit="it", disable=not progress)
        for it in bar:
            idx = cycling_indices(len(sequences), int(s["batch_size"]), it, int(s["seed"]))
            ids, attention, targets = sequences.batch(idx, device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            loss = sequence_loss(logits, ids, targets)
            value = float(loss.detach())
            # down: ascend below theta, descend above it (the loss settles around theta)
            direction = -1.0 if mode == "down" and value < theta else 1.0
            ascents += direction < 0
            optimizer.zero_grad(set_to_none=True)
            (direction * loss).backward()
            optimizer.step()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if (it + 1) % int(s["log_every"]) == 0 or it == 0 or it + 1 == steps:
                rows.append({"iteration": it + 1, "suffix_loss": value, "direction": "ascent" if direction < 0 else "descent",
                             "prompt_norm": float(prompt.detach().norm(dim=1).mean())})
        bar.close()
    finally:
        soft_prompt.detach(model)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    tail = losses[-max(1, min(len(losses), int(s["log_every"]))):]
    stats = {
        "mode": mode,
        "steps": steps,
        "prompt_length": int(s["prompt_length"]),
        "initial_suffix_loss": losses[0],
        "final_suffix_loss": float(sum(tail) / len(tail)),  # mean over the last log_every batches
        "ascent_steps": int(ascents),
        "train_sequences": len(sequences),
    }
    if theta is not None:
        stats["theta"] = theta
    if not all(math.isfinite(v) for v in losses):
        raise ValueError(f"csp ({mode}): the suffix loss became non-finite; lower csp.lr (now {s['lr']})")
    return CSPResult(prompt.detach().float().cpu(), pd.DataFrame(rows), stats)
