"""Progress bars that read well in a rule's log file as well as in a terminal.

In a terminal this is plain ``tqdm``. When stderr is not a terminal (a Snakemake rule redirects it
to ``results/logs/<rule>/<hash>.log``; SLURM to its own file), tqdm would write carriage-return
redraws several times a second, which a log shows as one endless line. Here every redraw becomes
one line, at most every ``MEMCTL_PROGRESS_INTERVAL`` seconds (default 30), with tqdm's count,
rate and ETA, e.g.::

    pretrain:  41%|####      | 471/1150 [01:12<01:44, 6.51it/s, loss=2.31]
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as _tqdm

__all__ = ["tqdm"]


class _Lines:
    """A file-like sink that turns tqdm's ``\\r``-redraws into newline-terminated lines."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MEMCTL_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm`` with log-friendly output when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs["file"] = _Lines(stream)
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), _interval())
        kwargs["maxinterval"] = max(float(kwargs.get("maxinterval", 10.0)), kwargs["mininterval"])
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
    return _tqdm(*args, **kwargs)
