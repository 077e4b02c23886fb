"""The embedded demo: an offline corpus with planted canaries, a BPE tokenizer and a tiny GPT-NeoX.

Three cached stages, each a library function plus a CLI subcommand (:mod:`memctl.demo.cli`):

1. :func:`memctl.demo.corpus.build_corpus` - documents from the Python standard library's own
   sources (present on every install, no network), deduplicated, capped, a fixed held-out slice,
   and canaries (random word sentences and digit strings) planted 1..128 times in the training
   stream.
2. :func:`memctl.demo.tokenizer.train_tokenizer` - a byte-level BPE trained on the training stream.
3. :func:`memctl.demo.pretrain.pretrain` - a small Pythia-style GPT-NeoX trained from scratch on the
   CPU until it memorizes the canaries that it saw often, and not those it saw once or twice.

Settings arrive as plain dicts: the schema-filled ``demo.*`` subsections of the workflow config.
:func:`resolve_settings` fills any key left out with the schema's default, so the library functions
can also be called with partial dicts (tests, notebooks).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from memctl.config import ConfigError, load_schema

SECTIONS = ("corpus", "canaries", "tokenizer", "architecture", "train")

#: The special token used as bos, eos, pad and unk by the demo tokenizer and model.
EOT_TOKEN = "<|endoftext|>"


def section_defaults(section: str) -> dict[str, Any]:
    """The schema defaults of ``demo.<section>``."""
    if section not in SECTIONS:
        raise ConfigError(f"demo.{section}: unknown section; known: {', '.join(SECTIONS)}")
    props = load_schema()["properties"]["demo"]["properties"][section]["properties"]
    return {name: copy.deepcopy(spec["default"]) for name, spec in props.items() if "default" in spec}


def resolve_settings(section: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``settings`` on top of the schema defaults of ``demo.<section>``; unknown keys are an error."""
    resolved = section_defaults(section)
    unknown = sorted(set(settings or {}) - set(resolved))
    if unknown:
        raise ConfigError(
            f"demo.{section}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(sorted(resolved))}"
        )
    resolved.update(copy.deepcopy(dict(settings or {})))
    return resolved


__all__ = ["EOT_TOKEN", "SECTIONS", "resolve_settings", "section_defaults"]
