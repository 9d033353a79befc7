"""How the pipeline's cost grows with the data: each stage's time at several sizes, per 1,000 reviews, and
against the size before.

Cost near-linear in the rows keeps the time per review about the same from one size to the next. A stage is
flagged when its time per review changes by more than :data:`NEAR_LINEAR_FACTOR` between two sizes:
``superlinear`` when each review costs more at the larger size, ``sublinear`` when it costs less (a fixed
cost, such as starting a process or importing a library, dominates the smaller size). Stages shorter than
:data:`MIN_FLAGGED_SECONDS` at both sizes are not flagged: on a shared machine their ratio is timer noise.
Each flag comes with the line through its two sizes (:func:`split_cost`): a large fixed part says a
sublinear stage is dominated by a start-up cost; a superlinear one has work per review that grows itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NEAR_LINEAR_FACTOR = 1.5
MIN_FLAGGED_SECONDS = 0.5
END_TO_END = "end to end"


def size_label(rows: int) -> str:
    """``5k``, ``25k``, ``100k``, ``1.5k``; sizes below 1,000 as they are."""
    if rows < 1000:
        return str(rows)
    thousands = rows / 1000
    return f"{thousands:g}k" if thousands < 1000 else f"{rows / 1e6:g}M"


def growth_flag(previous: tuple[int, float], current: tuple[int, float]) -> str | None:
    """``superlinear``, ``sublinear`` or None (near-linear, or too short to judge) for a stage that took
    ``previous[1]`` seconds on ``previous[0]`` rows and ``current[1]`` on ``current[0]``."""
    (rows_a, seconds_a), (rows_b, seconds_b) = previous, current
    if max(seconds_a, seconds_b) < MIN_FLAGGED_SECONDS or min(seconds_a, seconds_b) <= 0:
        return None
    change = (seconds_b / rows_b) / (seconds_a / rows_a)
    if change > NEAR_LINEAR_FACTOR:
        return "superlinear"
    if change < 1 / NEAR_LINEAR_FACTOR:
        return "sublinear"
    return None


def split_cost(previous: tuple[int, float], current: tuple[int, float]) -> tuple[float, float]:
    """The line ``seconds = fixed + per_1k * rows / 1000`` through both (rows, seconds) points:
    ``(fixed, per_1k)``. A negative ``fixed`` means the time per review itself grows with the rows."""
    (rows_a, seconds_a), (rows_b, seconds_b) = previous, current
    per_1k = (seconds_b - seconds_a) / (rows_b - rows_a) * 1000
    return seconds_a - per_1k * rows_a / 1000, per_1k


def scaling_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per stage (and end to end), per size: seconds, seconds per 1k rows, and against the previous size
    the growth of the time, of the rows, the change of the time per row and its flag.

    Args:
        runs: one per size, smallest first: ``rows`` and ``stages`` (``stage``, ``seconds``), as
            :func:`benchmarks.pipeline.run_pipeline` returns them.

    Returns:
        ``sizes`` (the rows) and ``stages``: {stage: [one dict per size: ``rows``, ``seconds``,
        ``seconds_per_1k``, ``growth`` (time over the previous size's; None for the first), ``rows_growth``,
        ``per_row_change`` and ``flag``]}, and ``flags``: ``[stage, from rows, to rows, flag, per_row_change,
        fixed seconds, seconds per 1k]`` for every flagged step (the last two from :func:`split_cost`).
    """
    names: list[str] = []
    for run in runs:
        names += [s["stage"] for s in run["stages"] if s["stage"] not in names]
    seconds = [{s["stage"]: s["seconds"] for s in run["stages"]} for run in runs]
    for per_stage in seconds:
        per_stage[END_TO_END] = sum(per_stage.values())
    stages: dict[str, list[dict[str, Any]]] = {}
    flags = []
    for name in [*names, END_TO_END]:
        cells = []
        for i, run in enumerate(runs):
            rows, value = run["rows"], seconds[i].get(name)
            cell: dict[str, Any] = {"rows": rows, "seconds": value,
                                    "seconds_per_1k": None if value is None else value / rows * 1000,
                                    "growth": None, "rows_growth": None, "per_row_change": None, "flag": None}
            before = seconds[i - 1].get(name) if i else None
            if before and value is not None:
                previous_rows = runs[i - 1]["rows"]
                cell["growth"] = value / before
                cell["rows_growth"] = rows / previous_rows
                cell["per_row_change"] = cell["growth"] / cell["rows_growth"]
                cell["flag"] = growth_flag((previous_rows, before), (rows, value))
                if cell["flag"]:
                    fixed, per_1k = split_cost((previous_rows, before), (rows, value))
                    flags.append([name, previous_rows, rows, cell["flag"], cell["per_row_change"], fixed, per_1k])
            cells.append(cell)
        stages[name] = cells
    return {"sizes": [run["rows"] for run in runs], "stages": stages, "flags": flags}
