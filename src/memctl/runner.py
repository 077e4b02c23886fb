"""What every stage command does the same way, written once.

- :func:`model_args`: the ``--model``, ``--model-settings`` and ``--threads`` arguments;
- :func:`load`: set torch's threads, load the model and its tokenizer, and record what was loaded
  (hub commit, device, dtype, threads) in the stage's provenance;
- :func:`model_name`: the model's display name in results tables;
- :func:`stage`: the stage's :class:`~memctl.store.Provenance`, with its start and finish
  (stage, outputs, wall time) logged;
- :func:`write_dir`: write a directory artifact atomically, with its sidecar.

Stage commands (:mod:`memctl.commands` and the families' ``cli`` modules) import this module; it
imports none of them, nor the ``memctl`` dispatcher.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from memctl.config import parse_settings
from memctl.store import IntegrityError, Provenance, atomic_path

log = logging.getLogger("memctl")


def model_args(p: argparse.ArgumentParser) -> None:
    """The arguments of a stage that loads the model."""
    p.add_argument("--model", required=True, help="HF model directory or hub id")
    p.add_argument("--model-settings", default="{}", help="the config's `model` subsection (JSON)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")


def set_threads(n: int | None) -> None:
    """torch's intra-op threads (0 / None: leave torch's default)."""
    import torch

    if n:
        torch.set_num_threads(int(n))


def load(args: argparse.Namespace, prov: Provenance, device: str | None = None):
    """Model and tokenizer of ``args`` (:func:`model_args`); records what was actually loaded
    (hub commit, device, dtype, torch threads) in ``prov.extra['model_loaded']``.

    ``device`` overrides the model settings' device (edits that only read weights keep them off
    the accelerator).
    """
    import torch

    from memctl.models import load_model, load_tokenizer

    settings = parse_settings(args.model_settings)
    if device is not None:  # one device overrides a placement over several (device_map)
        settings = {k: v for k, v in {**settings, "device": device}.items() if k not in ("device_map", "max_memory")}
        args.model_settings = json.dumps(settings)
    set_threads(args.threads)
    model = load_model(args.model, settings)
    param = next(model.parameters())
    prov.extra["model_loaded"] = {
        "ref": str(args.model),
        "hub_commit": getattr(model.config, "_commit_hash", None),
        "device": str(param.device),
        "device_map": settings.get("device_map"),  # accelerate's placement (None: all on `device`)
        "devices": sorted({str(p.device) for p in model.parameters()}),
        "dtype": str(param.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }
    return model, load_tokenizer(args.model, settings)


def model_name(args: argparse.Namespace) -> str:
    """The model's display name (results tables) from ``--model`` and ``--model-settings``."""
    from memctl.models import model_tag

    settings = parse_settings(args.model_settings)
    return model_tag({**settings, "name_or_path": settings.get("name_or_path") or args.model})


@contextlib.contextmanager
def stage(
    name: str,
    settings: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    outputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Provenance]:
    """The provenance of one run of stage ``name``; logs its start and, when the block succeeds,
    its finish with the outputs and the wall time. Pass the provenance to every write
    (``provenance=prov``) so each output gets its sidecar before it appears.

    Every input that is an artifact of the store is first checked against its sidecar's
    checksum (:class:`~memctl.store.Provenance`); a corrupt or incomplete one raises
    :class:`~memctl.data.DataError` naming it, before the block runs."""
    from memctl import stages

    stages.get(name)  # sidecars name the stage in the registry's vocabulary (= its rule)
    outs = [str(o) for o in outputs if o]
    try:
        prov = Provenance(name, settings, inputs)
    except IntegrityError as err:
        # A corrupt or incomplete input artifact: refused before any compute, as bad input data
        # (`memctl <cmd>: error: <path>: ...`, exit status 2).
        from memctl.data import DataError

        raise DataError(_refusal(err.problems)) from None
    log.info("%s: started -> %s", name, ", ".join(outs) or "(no outputs)")
    yield prov
    log.info("%s: finished in %.1f s -> %s", name, time.time() - prov.started, ", ".join(outs) or "(no outputs)")


def _refusal(problems: list[str]) -> str:
    """One line: the first problem, how to repair it, and how many more inputs have one."""
    more = f" (and {len(problems) - 1} more damaged inputs)" if len(problems) > 1 else ""
    # Without its sidecar, only the plan can tell that it is the store's (memctl.store.repair).
    repair = "memctl verify --repair --configfile CONFIG" if "provenance sidecar" in problems[0] else "memctl verify --repair"
    return f"{problems[0]}{more}; refusing to use it: `{repair}` removes it, the next run rebuilds it"


def write_dir(
    final: str | os.PathLike,
    write: Callable[[Path], Any],
    provenance: Provenance | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Call ``write(tmp)`` to fill a temporary directory, then put it in place as ``final``
    (with its sidecar first when a ``provenance`` is given); nothing changes if ``write`` fails."""
    with atomic_path(final, directory=True, provenance=provenance, extra=extra) as tmp:
        write(tmp)
    return Path(final)


def count_tokens(model):
    """:func:`memctl.capture.count_tokens` for the stage commands (imported when called: loading
    this module does not import torch)."""
    from memctl.capture import count_tokens as counter

    return counter(model)
