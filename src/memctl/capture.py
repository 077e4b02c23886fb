"""Capture what flows into and back out of target matrices: one hook mechanism for every consumer.

K-FAC collection (inputs and output gradients), the curvature spectrum (inputs at chosen
positions) and the pruning baselines' calibration statistics (inputs) all need, for a list of
:class:`~memctl.architectures.LinearTarget`, the activation ``a`` entering each matrix and
sometimes the loss gradient ``g`` w.r.t. its output ``y = W a``, in the orientation of
:func:`memctl.architectures.weight`: ``a`` has ``d_in`` features and ``g`` ``d_out``, whatever the
storage (``nn.Linear``, GPT-2's transposed ``Conv1D``, fused QKV). :class:`Capture` is that
mechanism, in the spirit of kronfluence's tracked modules::

    with Capture(model, targets, on_input=add_a, on_output_grad=add_g, positions=slice(0, -1)):
        loss = loss_fn(model(ids))
        loss.backward()

- ``on_input(target, x)`` receives ``x`` of shape ``(tokens, d_in)``; by default once per distinct
  input (``target.input_key``: q/k/v or gate/up read one tensor) with the first listed target that
  reads it, or once per target with ``per_input_key=False``;
- ``on_output_grad(target, g)`` receives ``g`` of shape ``(tokens, d_out)`` during backward, once
  per target;
- ``positions`` (a slice or index over the sequence axis of ``(batch, seq, d)`` tensors) picks the
  token positions handed over; tokens are flattened batch-major.

Any callable accumulates: a bound method of an accumulator object, a closure over a dict of sums.
Callbacks run under ``torch.no_grad()`` on detached tensors. Nothing is copied or synchronised
beyond what the callback does itself (``x`` is a view of the module's input whenever the
flattening allows one), so the hooks cost what hand-written ones cost.

For output gradients with frozen parameters, a target's input that does not require grad (nothing
below it does) is replaced, for that call only, by a detached leaf that does: the output then
carries a gradient while backward computes no weight gradients and stops at the lowest target.
Detaching a tensor that requires no grad cuts no path, so gradients are unchanged.

All module hooks are removed when the context exits, also on an exception; gradient hooks already
attached to output tensors of a graph built inside the context become no-ops.

:func:`call_arguments` is the other capture the pruning baselines need: the arguments one module
(a transformer block) is called with, stopping the forward pass there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from memctl.architectures import LinearTarget, module

#: ``callback(target, tensor)``: a captured ``(tokens, d)`` tensor of one target.
Callback = Callable[[LinearTarget, torch.Tensor], None]


def _tokens(t: torch.Tensor, positions) -> torch.Tensor:
    """``(tokens, d)``: the chosen sequence positions, batch-major (a view when the layout allows)."""
    if positions is not None:
        t = t[:, positions]
    return t.reshape(-1, t.shape[-1])


class Capture:
    """Context manager: forward hooks capture target inputs, tensor hooks their output gradients."""

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[LinearTarget],
        on_input: Callback | None = None,
        on_output_grad: Callback | None = None,
        *,
        positions: slice | int | None = None,
        per_input_key: bool = True,
    ):
        if on_input is None and on_output_grad is None:
            raise ValueError("Capture needs on_input, on_output_grad or both")
        self.model = model
        self.targets = list(targets)
        self.on_input = on_input
        self.on_output_grad = on_output_grad
        self.positions = positions
        self.per_input_key = per_input_key
        self._handles: list = []
        self._open = False

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._handles:
            raise RuntimeError("this Capture is already active")
        self._open = True
        try:
            owners: set[str] = set()
            for t in self.targets:
                mod = module(self.model, t)
                capture_input = self.on_input is not None and (
                    not self.per_input_key or t.input_key not in owners
                )
                owners.add(t.input_key)
                if capture_input or self.on_output_grad is not None:
                    self._handles.append(mod.register_forward_pre_hook(self._pre_hook(t, capture_input)))
                if self.on_output_grad is not None:
                    self._handles.append(mod.register_forward_hook(self._post_hook(t)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every module hook and disarm the gradient hooks (idempotent)."""
        self._open = False
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks --------------------------------------------------------------------------------
    def _pre_hook(self, t: LinearTarget, capture_input: bool):
        on_input, positions = self.on_input, self.positions
        want_grad = self.on_output_grad is not None

        def hook(mod, args):
            if not args:
                raise TypeError(f"{t.name} was called without a positional input; cannot capture it")
            a = args[0]
            if capture_input:
                with torch.no_grad():
                    on_input(t, _tokens(a.detach(), positions))
            if want_grad and not a.requires_grad and torch.is_grad_enabled():
                return (a.detach().requires_grad_(True), *args[1:])
            return None

        return hook

    def _post_hook(self, t: LinearTarget):
        on_grad, positions = self.on_output_grad, self.positions

        def grad_hook(g):
            if self._open:
                with torch.no_grad():
                    on_grad(t, _tokens(g.detach(), positions))

        def hook(mod, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(grad_hook)

        return hook


class _Stop(Exception):
    """Raised by :func:`call_arguments`'s hook to end a forward pass at the module it watches."""


def call_arguments(mod: nn.Module, run: Callable[[], Any]) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` of the first call of ``mod`` inside ``run()``.

    ``run`` is stopped right there (neither ``mod`` nor anything after it runs); the hook is removed
    on every path. Raises ``RuntimeError`` when ``run`` finishes without calling ``mod``.
    """
    seen: list[tuple[tuple, dict]] = []

    def hook(m, args, kwargs):
        seen.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the forward pass never called {type(mod).__name__}")
    return seen[0]


@contextlib.contextmanager
def count_tokens(model) -> Iterator[dict[str, int]]:
    """Count what passes through ``model``'s forward inside the block (the training cost an edit's
    sidecar records): ``tokens`` = non-padding input tokens of every call (the attention mask's sum
    when given, else every input position; a soft prompt's vectors are not data and not counted),
    ``forward_calls``. Calls that bypass the top-level module (layer-by-layer passes) are not seen."""
    counts = {"tokens": 0, "forward_calls": 0}

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            counts["tokens"] += int(mask.sum())
        elif ids is not None:
            counts["tokens"] += int(ids.numel())
        elif kwargs.get("inputs_embeds") is not None:
            counts["tokens"] += int(kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1])
        counts["forward_calls"] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield counts
    finally:
        handle.remove()
