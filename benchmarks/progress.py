"""Progress of a benchmark run, one line per step on stderr, so a run of many minutes shows where it is.

A line reads ``[bench 3/14 +0:42] scaling 10k: train``: the step's number out of the run's planned steps
and the time since the run began. The report itself goes to stdout, so the two can be redirected apart.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_elapsed(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Numbered, timed step lines; ``total`` is the number of steps the run plans."""

    def __init__(self, total: int, *, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._clock = clock
        self._started = clock()

    def step(self, what: str) -> None:
        """Announce the step about to run."""
        self.done += 1
        stream = self._stream or sys.stderr
        print(f"[bench {self.done}/{self.total} +{format_elapsed(self._clock() - self._started)}] {what}",
              file=stream, flush=True)
