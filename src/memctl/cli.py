"""The ``memctl`` command: one subcommand per pipeline stage.

Every Snakemake rule calls exactly one of these with the stage's config subsection as
``--settings`` JSON, so any stage can be rerun by hand with the same arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from memctl.config import ConfigError

#: Modules with utility subcommands besides the stages' (validate-config, verify; install-profile,
#: estimate-resources; init).
UTILITY_MODULES = ("memctl.commands", "memctl.lab", "memctl.init")


def command_modules() -> list[str]:
    """Every module whose ``register(subparsers)`` adds subcommands: the stage registry's command
    modules (memctl.stages), then the utilities."""
    from memctl import stages

    return list(dict.fromkeys([*stages.command_modules(), *UTILITY_MODULES]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memctl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        importlib.import_module(module).register(sub)
    from memctl import stages

    missing = set(stages.commands()) - set(sub.choices)
    if missing:  # a registry entry whose module does not add its subcommand
        raise RuntimeError(f"stages without a subcommand: {sorted(missing)}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from memctl.store import share_with_group

    share_with_group()  # stages create directories in a shared store: keep them group-writable
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        # Bad input: one clear line instead of a traceback deep inside a library.
        from memctl.data import DataError

        if isinstance(err, (ConfigError, DataError, FileNotFoundError)):
            print(f"memctl {args.command}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        raise


if __name__ == "__main__":
    main()
