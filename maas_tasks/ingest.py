"""Ingest: stage a source's rows as an immutable, content-addressed Parquet snapshot in the object store.

:mod:`maas_tasks.sources` reads the rows (files, a directory or glob, the aclImdb layout, ``s3://``, a
PostgreSQL table or query); this module names them by their content and stages them. The content address
is a SHA-256 of the normalised rows, not of the file bytes: the same rows from another file format, with
the columns or the rows in another order, are the same snapshot (:func:`hash_rows`). Rows already in the
registry are not staged again, and the run says so.

Ingest only *stages* a snapshot (``staging/<sha>/<run>/``); validation decides whether it is published
(``snapshots/<sha>/``, recorded in the registry) or discarded, so bad input leaves no snapshot behind. Every
column is text: the snapshot is the raw data, typed later by clean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maas_tasks.sources import IngestError, PostgresSource, open_source
from maas_tasks.storage import Store

if TYPE_CHECKING:
    import pandas as pd

    from maas_tasks.config import Settings
    from maas_tasks.registry import Registry, Snapshot

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "data.parquet"
SOURCE_FILE = "source.json"
# What publish_snapshot writes to source.json, when the staged reference has it.
_SOURCE_FIELDS = ("sha256", "rows", "columns", "source", "source_uri", "schema", "watermark")



def hash_rows(frame: pd.DataFrame) -> str:
    """The content address of ``frame``: hex SHA-256 of its rows, whatever their file format or order.

    The digest covers the column names (sorted), the row count and every value exactly (a missing value
    differs from any text), with the columns in name order and the rows in the order of a 64-bit hash of
    each row, so reordering columns or rows gives the same digest while any changed value changes it.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = sorted(str(c) for c in frame.columns)
    digest = hashlib.sha256(json.dumps({"columns": columns, "rows": len(frame)}).encode())
    if not len(frame) or not columns:
        return digest.hexdigest()
    ordered = frame[columns]
    order = np.argsort(pd.util.hash_pandas_object(ordered, index=False).to_numpy(), kind="stable")
    table = pa.Table.from_pandas(ordered, preserve_index=False).take(pa.array(order))
    for column in table.columns:
        values = column.combine_chunks().cast(pa.large_string())
        # Byte lengths (-1 for missing) then the concatenated UTF-8 bytes: together they spell every value.
        lengths = pc.fill_null(pc.binary_length(values), -1).to_numpy(zero_copy_only=False).astype("<i8")
        digest.update(lengths.tobytes())
        filled = pc.fill_null(values, "")
        data = filled.buffers()[2]
        if data is not None:
            offsets = np.frombuffer(filled.buffers()[1], dtype="<i8")[filled.offset:filled.offset + len(filled) + 1]
            digest.update(memoryview(data)[offsets[0]:offsets[-1]])
    return digest.hexdigest()


def _existing(snapshot: Snapshot, base: dict[str, Any]) -> dict[str, Any]:
    """The reference of a run that staged nothing: it points at the recorded ``snapshot``."""
    return {
        **base, "key": None, "sha256": snapshot.sha256, "rows": snapshot.rows, "columns": list(snapshot.columns),
        "new": False, "snapshot_id": snapshot.id,
    }


def ingest_data(
    store: Store,
    registry: Registry | None,
    source: str | Path,
    *,
    run_id: str | None = None,
    table_query: str | None = None,
    watermark_col: str | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Read ``source`` and stage a snapshot of its rows in the store, under a key private to the run.

    Each run stages under its own key (``staging/<sha>/<run>/``), so two runs ingesting the same rows
    never discard each other's staged copy; a retry of the same run rewrites the same key. Rows whose
    content is already a recorded snapshot are not staged again; nor is anything when an incremental
    PostgreSQL read finds no row past the source's watermark.

    Args:
        store: where the snapshot is staged.
        registry: looked up for known content and the source's watermark; None skips both (a benchmark).
        source: see :func:`maas_tasks.sources.open_source` (a file, directory, glob, aclImdb folder or
            tarball, ``s3://bucket/prefix``, ``postgresql://...?table=NAME``).
        run_id: the run staging it (a retry reuses its key); default: a fresh key.
        table_query: SQL to read from a ``postgresql://`` DSN instead of ``?table=``.
        watermark_col: PostgreSQL only: read only rows whose column is past the last ingested value.
        settings: ``MAAS_S3_*`` settings for ``s3://`` sources (default: the environment's).

    Returns:
        A small JSON-able reference: ``key`` (the staged Parquet, or None when nothing new was staged),
        ``sha256``, ``rows``, ``columns``, ``source`` (a display name), ``source_uri`` (the source's
        identity, never with a password), ``schema`` (column -> dtype), ``watermark`` ([column, highest
        value] of an incremental read, else None), ``new`` and ``snapshot_id`` (the recorded snapshot
        when ``new`` is False, else None). When ``new`` is False, sha256/rows/columns describe that snapshot.

    Raises:
        IngestError: the source cannot be read; the message names it and says what to do.
        SourceUnavailable: its server (S3, PostgreSQL) cannot be reached; a retry may succeed.
    """
    opened = open_source(source, table_query=table_query, watermark_col=watermark_col, settings=settings)
    recorded = None
    if isinstance(opened, PostgresSource) and watermark_col and registry is not None:
        recorded = registry.get_watermark(opened.uri)
        if recorded is not None and recorded[0] != watermark_col:
            raise IngestError(
                f"{opened.name}: its ingested rows are tracked by watermark column {recorded[0]!r}; pass "
                f"watermark_col={recorded[0]} (one source keeps one watermark column)"
            )
        if recorded is not None:
            opened = dataclasses.replace(opened, after=recorded[1])
    batch = opened.read()
    frame = batch.frame
    base = {
        "source": opened.name,
        "source_uri": opened.uri,
        "columns": [str(c) for c in frame.columns],
        "schema": {str(c): str(frame[c].dtype) for c in frame.columns},
        "watermark": list(batch.watermark) if batch.watermark else None,
    }
    if recorded is not None and frame.empty:
        latest = registry.list_snapshots(opened.uri, last=1)[-1]
        log.info(
            "%s has no rows with %s > %r: nothing new to ingest; its latest batch is snapshot %d",
            opened.name, recorded[0], recorded[1], latest.id,
        )
        return _existing(latest, {**base, "watermark": list(recorded)})
    digest = hash_rows(frame)
    known = registry.find_snapshot(digest) if registry is not None else None
    if known is not None and not is_published(store, digest):
        # Housekeeping removed its files (maas_tasks.housekeeping): stage the rows again; publishing them
        # restores the same snapshot (same sha256, same id).
        log.info(
            "%s: its %d rows are snapshot %d, whose files are no longer in the store; staging them again",
            opened.name, len(frame), known.id,
        )
        known = None
    if known is not None:
        log.info(
            "%s was already ingested: its %d rows are snapshot %d (sha256 %s, from %s); nothing new to stage",
            opened.name, len(frame), known.id, digest[:12], known.source,
        )
        return _existing(known, base)
    run_token = hashlib.sha256(run_id.encode()).hexdigest()[:16] if run_id else uuid.uuid4().hex[:16]
    key = f"staging/{digest}/{run_token}/{SNAPSHOT_FILE}"
    with tempfile.TemporaryDirectory(prefix="maas-ingest-") as tmp:
        local = Path(tmp) / SNAPSHOT_FILE
        frame.to_parquet(local, index=False)
        store.put_file(key, local)
    log.info(
        "read %d rows with columns %s from %s (sha256 %s); staged as %s",
        len(frame), ", ".join(base["columns"]), opened.name, digest[:12], store.uri(key),
    )
    return {**base, "key": key, "sha256": digest, "rows": len(frame), "new": True, "snapshot_id": None}


def snapshot_key(sha256: str) -> str:
    """Where the published snapshot of content ``sha256`` lives."""
    return f"snapshots/{sha256}/{SNAPSHOT_FILE}"


def is_published(store: Store, sha256: str) -> bool:
    """Whether the snapshot of ``sha256`` is published (its ``source.json``, written last, exists)."""
    return store.exists(f"snapshots/{sha256}/{SOURCE_FILE}")


def publish_snapshot(store: Store, staged: dict[str, Any]) -> dict[str, Any]:
    """Move a validated staged snapshot to ``snapshots/<sha>/`` (idempotent) and describe it.

    The source description is written last, so a snapshot directory with ``source.json`` is complete.
    """
    prefix = f"snapshots/{staged['sha256']}"
    key = snapshot_key(staged["sha256"])
    if not is_published(store, staged["sha256"]):
        store.put_bytes(key, store.get_bytes(staged["key"]))
        info = {k: staged[k] for k in _SOURCE_FIELDS if k in staged}
        store.put_bytes(f"{prefix}/{SOURCE_FILE}", json.dumps(info, indent=2).encode())
    discard_snapshot(store, staged)
    return {**staged, "key": key, "uri": store.uri(key)}


def discard_snapshot(store: Store, staged: dict[str, Any]) -> None:
    """Remove a staged snapshot (after it was published, or rejected by validation); idempotent.

    A reference that staged nothing (``key`` None: the rows were already a snapshot) has nothing to remove.
    """
    if staged.get("key"):
        store.delete(staged["key"])
