"""One way to declare a ``memctl`` subcommand: :func:`command` and reusable argument specs.

Every module's ``register(subparsers)`` (the stage registry's command modules and the utilities,
:mod:`memctl.cli`) adds its subcommands as ``command(subparsers, name, func, help, *specs)``: the
parser, its arguments in order, and the function it runs. A spec is an :class:`Arg` (the arguments of
one ``add_argument`` call), any callable that adds arguments to a parser (``memctl.runner.model_args``:
``--model``, ``--model-settings``, ``--threads``), or a tuple of specs (a group used by several
commands). The common ones are here: :func:`settings_arg` (``--settings`` JSON),
:data:`OUT_DIR`, :func:`out_arg`, :func:`threads_arg`, :func:`device_arg`. Only argparse: any layer may use it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

#: What :func:`command` takes for arguments.
Spec = Union["Arg", Callable[[argparse.ArgumentParser], Any], tuple]


@dataclass(frozen=True)
class Arg:
    """The arguments of one ``parser.add_argument`` call."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, **self.kwargs)


def arg(*flags: str, **kwargs: Any) -> Arg:
    """``parser.add_argument(*flags, **kwargs)``, as a spec."""
    return Arg(flags, kwargs)


def add(parser: argparse.ArgumentParser, *specs: Spec) -> argparse.ArgumentParser:
    """Add ``specs`` to ``parser`` in order (a tuple: its specs, in order)."""
    for spec in specs:
        if isinstance(spec, tuple):
            add(parser, *spec)
        else:
            spec(parser)
    return parser


def command(subparsers, name: str, func: Callable[[argparse.Namespace], Any], help: str, *specs: Spec,
            **parser_kwargs: Any) -> argparse.ArgumentParser:
    """Subcommand ``name`` of ``subparsers`` (``help``: its line in ``memctl --help``; ``parser_kwargs``:
    more of ``add_parser``'s, e.g. ``description``) with the arguments ``specs``, running ``func``."""
    parser = subparsers.add_parser(name, help=help, **parser_kwargs)
    add(parser, *specs)
    parser.set_defaults(func=func)
    return parser


# ------------------------------------------------------------------ the common arguments

#: The output directory of a stage.
OUT_DIR = arg("--out-dir", required=True)


def settings_arg(help: str | None = None, *, default: str | None = None) -> Arg:
    """``--settings``: the job's config subsection as JSON; required unless it has a ``default``."""
    if default is None:
        return arg("--settings", required=True, help=help)
    return arg("--settings", default=default, help=help)


def out_arg(help: str | None = None) -> Arg:
    """``--out``: the output file (or directory) of a stage, required."""
    return arg("--out", required=True, help=help)


def threads_arg(help: str | None = None) -> Arg:
    """``--threads``: torch threads, 0 = torch's default (Snakemake passes the job's threads)."""
    return arg("--threads", type=int, default=0, help=help)


def device_arg(help: str) -> Arg:
    """``--device``, default ``auto`` (the GPU when one is visible)."""
    return arg("--device", default="auto", help=help)
