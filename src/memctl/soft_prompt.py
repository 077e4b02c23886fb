"""A soft prompt attached to a causal LM: learned input vectors before every input, weights untouched.

:func:`attach` registers a forward pre-hook and a forward hook on the model (a ``transformers``
causal LM), so every caller (greedy decoding with a KV cache, teacher-forced scoring, held-out
windows, ``generate``, lm-eval's ``HFLM``) sees the prompted model without knowing about it:

- first call of a sequence (no cache, or an empty one): the input ids are embedded with the model's
  own input embeddings and the ``P`` prompt vectors are put in front; the attention mask gets ``P``
  ones in front, explicit ``position_ids`` / ``cache_position`` move up by ``P`` (the prompt takes
  positions ``0 .. P-1``), ``labels`` get ``P`` ignored positions (-100);
- the returned logits (and hidden states) are cut back to the caller's ``T`` positions, so position
  ``t`` of the output still predicts the caller's token ``t + 1``;
- later calls with a cache that already holds the prompt: the attention mask gets the ``P`` ones,
  explicit positions move up by ``P``; nothing else changes.

Left padding stays where the caller put it (after the prompt, before the tokens), masked out as before.
The prompt is ``embeddings`` itself (not a copy): an ``nn.Parameter`` trained through the hook
(:mod:`memctl.masks.csp`) gets its gradients from the same code that evaluation runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_ATTR = "_memctl_soft_prompt"


@dataclass
class _Attached:
    embeddings: torch.Tensor
    handles: list[Any] = field(default_factory=list)
    trim: list[int] = field(default_factory=list)  #: caller's length per active prompted call (a stack)


def attached(model) -> torch.Tensor | None:
    """The soft prompt attached to ``model`` (None when there is none)."""
    state = getattr(model, _ATTR, None)
    return None if state is None else state.embeddings


def _cache_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0  # legacy tuple of (key, value) per layer


def _position_limit(model) -> int | None:
    """The size of the model's learned table of absolute positions (prompt + input must fit in it;
    None for rotary models): the family's key in :data:`memctl.architectures.FAMILIES`."""
    from memctl.architectures import family

    config = model.config
    key = family(getattr(config, "model_type", None)).positions_key
    return getattr(config, key, None) if key else None


def _shift_positions(kwargs: dict, n_prompt: int, length: int, first: bool) -> None:
    """Make room for ``n_prompt`` prompt positions in ``kwargs`` (in place): the attention mask gets
    ones in front, explicit position ids and cache positions move by ``n_prompt`` (and, on the first
    forward pass of a generation, gain the prompt's own positions)."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], n_prompt)), mask], dim=1)
    if kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"] + n_prompt
        if first:
            lead = torch.arange(n_prompt, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], -1)
            pos = torch.cat([lead, pos], dim=1)
        kwargs["position_ids"] = pos
    if kwargs.get("cache_position") is not None:
        cache = kwargs["cache_position"]
        kwargs["cache_position"] = (torch.arange(n_prompt + length, device=cache.device, dtype=cache.dtype)
                                    if first else cache + n_prompt)


def _prepend_prompt(module, kwargs: dict, embeddings: torch.Tensor) -> None:
    """Replace the inputs in ``kwargs`` (in place) by their embeddings after the prompt's, and pad
    the labels with -100 over the prompt."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
    batch, n_prompt = embeds.shape[0], embeddings.shape[0]
    prompt = embeddings.to(device=embeds.device, dtype=embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    kwargs["input_ids"] = None
    if kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_full((batch, n_prompt), -100), labels], dim=1)


def attach(model, embeddings: torch.Tensor):
    """Put the soft prompt ``embeddings`` ([P, hidden]) in front of every input of ``model``.

    Checks the width against the model's input embeddings first. Returns ``model`` (patched in place;
    :func:`detach` undoes it). A model carries at most one prompt.
    """
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("the model already carries a soft prompt; detach it first")
    table = model.get_input_embeddings()
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"a soft prompt is a [length, hidden] tensor with length >= 1, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != table.embedding_dim:
        raise ValueError(f"soft prompt width {embeddings.shape[1]} does not match the model's input embeddings "
                         f"({table.embedding_dim})")
    state = _Attached(embeddings)
    n_prompt = int(embeddings.shape[0])
    limit = _position_limit(model)

    def pre(module, args, kwargs):
        kwargs = dict(kwargs)
        if len(args) > 1:
            raise ValueError("a soft-prompted model takes input_ids positionally and everything else by name")
        if args:
            kwargs["input_ids"] = args[0]
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        length = int((embeds if embeds is not None else ids).shape[1])
        first = _cache_length(kwargs.get("cache", kwargs.get("past_key_values"))) == 0  # transformers 5: `cache`
        _shift_positions(kwargs, n_prompt, length, first)
        if not first:
            state.trim.append(-1)
            return (), kwargs
        if limit is not None and n_prompt + length > limit:
            raise ValueError(f"soft prompt ({n_prompt} vectors) + input ({length} tokens) exceed the model's "
                             f"{limit} learned positions")
        _prepend_prompt(module, kwargs, state.embeddings)
        state.trim.append(length)
        return (), kwargs

    def post(module, args, output):
        length = state.trim.pop() if state.trim else -1
        if length < 0:
            return output
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[1] > length:  # (logits_to_keep may already have cut them)
            output.logits = logits[:, -length:]
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            output.hidden_states = tuple(h[:, -length:] for h in hidden)
        return output

    state.handles = [model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post)]
    setattr(model, _ATTR, state)
    return model


def detach(model) -> torch.Tensor | None:
    """Remove the soft prompt from ``model``; returns it (None when there was none)."""
    state = getattr(model, _ATTR, None)
    if state is None:
        return None
    for handle in state.handles:
        handle.remove()
    delattr(model, _ATTR)
    return state.embeddings
