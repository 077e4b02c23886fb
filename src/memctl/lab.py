"""Lab-scale helpers: ``memctl`` subcommands for clusters and shared stores (filled in as they land)."""


def register(subparsers) -> None:
    """Add the lab subcommands to the main parser."""
