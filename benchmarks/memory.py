"""The peak memory of one benchmark step, on its own.

``ru_maxrss`` only ever grows within a process, so after the first big stage it says nothing about the
next ones. :class:`PeakMemory` instead samples the resident set size of this process and of its children
(the model server a stage starts counts too) from a background thread every few milliseconds while the
step runs, and keeps the largest: the step's peak, and how far that is above the RSS it started from. A
peak shorter than the interval can be missed; the sampler takes one reading at the start and one at the end
as well, so a step that keeps what it allocated is never reported below it.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import psutil

SAMPLE_SECONDS = 0.02
MIB = 2**20


def rss_mb(process: psutil.Process | None = None) -> float:
    """The resident set size of ``process`` (default: this one) plus all its descendants', in MiB.

    A child that exits while it is being read is left out (its memory is gone with it).
    """
    process = process or psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


class PeakMemory:
    """A context manager recording the highest :func:`rss_mb` while its block runs.

    After the block: ``start_mb`` (on entry), ``peak_mb`` and ``delta_mb`` (peak minus start), or
    :meth:`summary` for all three.
    """

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        if interval <= 0:
            raise ValueError(f"interval={interval} must be positive")
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, rss_mb(self._process))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = rss_mb(self._process)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb

    def summary(self) -> dict[str, Any]:
        """``start_mb``, ``peak_mb`` and ``delta_mb``, rounded to 0.1 MiB."""
        return {"start_mb": round(self.start_mb, 1), "peak_mb": round(self.peak_mb, 1), "delta_mb": round(self.delta_mb, 1)}
