"""``memctl`` subcommands of the masks stages (filled in as the stages land)."""


def register(subparsers) -> None:
    """Add this stage family's subcommands to the main parser."""
