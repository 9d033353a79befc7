"""Errors shared across MaaS: which failures a retry cannot fix.

Airflow retries a failed task; for bad data, bad parameters or a model that cannot be served a retry
only repeats the failure later. Stages raise ``ValueError`` for bad input and :class:`PermanentError`
for the other failures that will not improve; the DAG fails those tasks at once and keeps its retries
for passing faults (a store, registry or model server briefly unreachable). What a user sees of a
failure is one paragraph (:func:`one_paragraph`), the traceback going to a log.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path


class PermanentError(Exception):
    """A failure that retrying the same step cannot fix; the message says what to change."""


def one_paragraph(text: str, limit: int) -> str:
    """``text`` on one line (a multi-line message's lines joined), cut at ``limit`` characters."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def append_traceback(path: Path, command: str) -> Path | None:
    """Append the exception being handled to the log ``path``, headed by the time and ``command``.

    Returns:
        ``path``, or None when it cannot be written (the failure's paragraph is then all there is).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
            fh.write(traceback.format_exc())
    except OSError:
        return None
    return path
