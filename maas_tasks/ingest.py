"""Ingest: turn a labeled text file into an immutable Parquet snapshot in the object store.

A snapshot is keyed by the SHA-256 of the source file, so ingesting the same file twice yields the
same snapshot. Ingest only *stages* the snapshot (``staging/<sha>/``); validation decides whether it
is published (``snapshots/<sha>/``, recorded in the registry) or discarded, so bad input leaves no
snapshot behind. Every column is read as text: the snapshot is the raw data, typed later by clean.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any

from maas_tasks.storage import Store, sha256_file

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")
SNAPSHOT_FILE = "data.parquet"
SOURCE_FILE = "source.json"


class IngestError(ValueError):
    """The source file cannot be read; the message says which file and how to fix it."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise IngestError(f"{path}: unsupported file type; MaaS reads {', '.join(SUPPORTED_SUFFIXES)}")


def read_source(path: Path):
    """Read a CSV/TSV (optionally gzipped) or Parquet file into a DataFrame of strings.

    An empty file gives an empty DataFrame (no columns, no rows) so that validation, not a parser
    traceback, explains what is wrong with it.

    Raises:
        IngestError: the file is missing, of an unsupported type, or not parseable.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise IngestError(f"data file {path} does not exist; pass an existing CSV with --data or the data_path param")
    suffix = _suffix(path)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path).astype("string")
        sep = "\t" if suffix.startswith(".tsv") else ","
        # Strings only: the snapshot keeps the source's values as written (labels "0"/"1", not ints).
        return pd.read_csv(path, sep=sep, dtype="string", keep_default_na=True, quoting=csv.QUOTE_MINIMAL)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, ValueError) as exc:
        raise IngestError(f"{path}: cannot parse as {suffix[1:]}: {exc}; check the file's format and encoding") from None


def ingest_data(store: Store, source: str | Path, *, run_id: str | None = None) -> dict[str, Any]:
    """Stage a snapshot of ``source`` in the store, under a key private to the run.

    Each run stages under its own key (``staging/<sha>/<run>/``), so two runs ingesting the same
    file never discard each other's staged copy; a retry of the same run rewrites the same key.

    Returns:
        A small reference: ``key`` (the staged Parquet), ``sha256`` of the source, ``rows``,
        ``columns`` and ``source`` (the file's name).
    """
    path = Path(source).expanduser()
    frame = read_source(path)
    digest = sha256_file(path)
    run_token = hashlib.sha256(run_id.encode()).hexdigest()[:16] if run_id else uuid.uuid4().hex[:16]
    key = f"staging/{digest}/{run_token}/{SNAPSHOT_FILE}"
    with tempfile.TemporaryDirectory(prefix="maas-ingest-") as tmp:
        local = Path(tmp) / SNAPSHOT_FILE
        frame.to_parquet(local, index=False)
        store.put_file(key, local)
    log.info(
        "read %d rows with columns %s from %s (sha256 %s); staged as %s",
        len(frame), ", ".join(map(str, frame.columns)), path, digest[:12], store.uri(key),
    )
    return {
        "key": key,
        "sha256": digest,
        "rows": int(len(frame)),
        "columns": [str(c) for c in frame.columns],
        "source": path.name,
    }


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
        info = {k: staged[k] for k in ("sha256", "rows", "columns", "source")}
        store.put_bytes(f"{prefix}/{SOURCE_FILE}", json.dumps(info, indent=2).encode())
    discard_snapshot(store, staged)
    return {**staged, "key": key, "uri": store.uri(key)}


def discard_snapshot(store: Store, staged: dict[str, Any]) -> None:
    """Remove a staged snapshot (after it was published, or rejected by validation); idempotent."""
    store.delete(staged["key"])
