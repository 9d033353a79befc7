"""Errors shared across MaaS: which failures a retry cannot fix.

Airflow retries a failed task; for bad data, bad parameters or a model that cannot be served a retry
only repeats the failure later. Stages raise ``ValueError`` for bad input and :class:`PermanentError`
for the other failures that will not improve; the DAG fails those tasks at once and keeps its retries
for passing faults (a store, registry or model server briefly unreachable).
"""

from __future__ import annotations


class PermanentError(Exception):
    """A failure that retrying the same step cannot fix; the message says what to change."""
