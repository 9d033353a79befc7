"""Tests of the progress lines: numbered against the plan, with the time since the run began."""

from __future__ import annotations

import io

from benchmarks.progress import Progress, format_elapsed


def test_progress_lines_count_steps_and_show_elapsed_time():
    now = iter([100.0, 100.5, 142.0, 3800.0])
    stream = io.StringIO()
    progress = Progress(14, stream=stream, clock=lambda: next(now))
    for step in ("reading data", "scaling 10k: train", "serving"):
        progress.step(step)
    assert stream.getvalue().splitlines() == [
        "[bench 1/14 +0:00] reading data", "[bench 2/14 +0:42] scaling 10k: train", "[bench 3/14 +1:01:40] serving",
    ]
    assert format_elapsed(59.9) == "0:59" and format_elapsed(3600) == "1:00:00"
