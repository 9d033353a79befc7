"""Retraining on new data: what ``maas_ingest`` looks at, when a snapshot is worth a training run, and which
snapshot an Asset-triggered ``maas_training`` run trains on.

``maas_ingest`` looks at the watched source on a schedule. Most looks find nothing new, so a look starts
with a cheap fingerprint of the source (each local file's path, size, modification and change times, plus
the ingest parameters): when it equals the fingerprint of the last look that completed, and that look's
snapshot was announced if it was to be, nothing is read. Correctness does not rest on it: any other look
ingests, and ingest addresses a snapshot by its rows, so data already ingested makes no new snapshot.
``s3://`` and PostgreSQL sources have no fingerprint here and are read at every look (a watermarked table
only past its watermark). Each look's record is a small JSON file in the store (``ingest/looks/``).

A snapshot is *announced* (an Airflow Asset event, which schedules ``maas_training``) once: when
MAAS_RETRAIN_ON is ``new_data``, every snapshot not announced before; when it is ``drift``, only one whose
drift against the serving model's training data was flagged, or one nothing could be compared with (no
model serves yet). Whether a snapshot was announced is read from the Asset's own events, so a run that died
between recording a snapshot and announcing it is made good by the next look.

No Airflow import here: the DAGs pass in what they read from Airflow (the Asset's past events).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maas_tasks.storage import ObjectNotFound, Store

log = logging.getLogger(__name__)

LOOKS_PREFIX = "ingest/looks"
# Ingest parameters an announcement carries to the training run (its Params for those are overridden).
DATA_PARAMS = ("text_col", "label_col", "id_col", "group_col", "label_map", "max_quarantine_fraction")


def snapshot_asset(model_name: str) -> dict[str, str]:
    """The ``name`` and ``uri`` of the Airflow Asset announcing new snapshots for ``model_name``'s training."""
    return {"name": f"maas_snapshots_{model_name}", "uri": f"maas://snapshots/{model_name}"}


def _look_key(model_name: str, source_uri: str) -> str:
    digest = hashlib.sha256(json.dumps([model_name, source_uri]).encode()).hexdigest()[:16]
    return f"{LOOKS_PREFIX}/{digest}.json"


def _local_files(opened: Any) -> list[Path] | None:
    """The local files a source reads (None for S3 and PostgreSQL, which have no cheap fingerprint here)."""
    from maas_tasks.sources import FileSource, ImdbSource

    if isinstance(opened, FileSource):
        return list(opened.files)
    if isinstance(opened, ImdbSource):
        return sorted(p for p in opened.path.rglob("*") if p.is_file()) if opened.path.is_dir() else [opened.path]
    return None


def _waiting_for_data(source: str) -> bool:
    """Whether ``source`` names a local place that holds no data yet (a missing or empty directory, a glob
    matching nothing): a watched place waits for data, it is not misconfigured."""
    if source.startswith(("s3://", "postgresql://", "postgres://")):
        return False
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists():
        return not glob.glob(str(path), recursive=True)
    return path.is_dir()


def scheduled_source(watched: str, fallback: str) -> str:
    """The data a scheduled training run with no data source given trains on: the watched source
    (``MAAS_INGEST_SOURCE``) once it holds data, so the weekly run retrains on what has landed, else
    ``fallback`` (the bundled sample) until then. A watched source that cannot be used as given is an
    error, not a reason to train on the sample.

    Raises:
        IngestError: the watched source is malformed (the message says what to pass).
    """
    from maas_tasks.sources import IngestError, check_source

    try:
        return check_source(watched)
    except IngestError:
        if _waiting_for_data(watched):
            return fallback
        raise


def read_last_look(store: Store, model_name: str, source_uri: str) -> dict[str, Any] | None:
    """The record of the last look at ``source_uri`` that completed (for ``model_name``), or None."""
    try:
        return json.loads(store.get_bytes(_look_key(model_name, source_uri)))
    except ObjectNotFound:
        return None


def look_at_source(
    store: Store,
    source: str,
    *,
    model_name: str,
    params: dict[str, Any],
    announced: list[int],
    settle_seconds: float = 0.0,
    now: float | None = None,
) -> dict[str, Any]:
    """Whether ``source`` may hold data the last completed look did not see.

    Args:
        source: the watched source (see :func:`maas_tasks.sources.open_source`).
        model_name: the model the looks are for (each model keeps its own record).
        params: the ingest parameters (part of the fingerprint: other parameters are another look).
        announced: the snapshot ids announced so far (the Asset's recent events).
        settle_seconds: a local file modified less than this long ago is still being written: wait.

    Returns:
        ``ingest`` (True: ingest it now), ``reason`` (one sentence for the log), ``source`` (as ingest
        must be given it), ``source_uri``, ``fingerprint`` (None when the source has none) and ``files``.

    Raises:
        IngestError: the source cannot be used as given (other than a watched place still empty).
    """
    from maas_tasks.sources import IngestError, open_source

    now = time.time() if now is None else now
    try:
        opened = open_source(source, table_query=params.get("table_query"), watermark_col=params.get("watermark_col"))
    except IngestError as exc:
        if _waiting_for_data(source):
            return {"ingest": False, "reason": f"waiting for data: {exc}", "source": source, "source_uri": None,
                    "fingerprint": None, "files": 0}
        raise
    files = _local_files(opened)
    look = {"source": opened.uri if files is not None else source, "source_uri": opened.uri, "fingerprint": None,
            "files": len(files or [])}
    if files is None:
        return {**look, "ingest": True, "reason": f"{opened.name} has no cheap fingerprint: reading it"}
    stats = []
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:
            return {**look, "ingest": False, "reason": (
                f"{opened.name}: {path.name} went away while it was looked at: waiting for the source to settle"
            )}
        stats.append([str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    newest = max(max(s[2], s[3]) for s in stats) / 1e9
    if now - newest < settle_seconds:
        return {**look, "ingest": False, "reason": (
            f"{opened.name}: a file changed {now - newest:.0f} s ago, less than {settle_seconds:.0f} s: waiting for "
            "its writer to finish (the next look takes it)"
        )}
    fingerprint = hashlib.sha256(json.dumps({"files": stats, "params": params}, sort_keys=True).encode()).hexdigest()
    look["fingerprint"] = fingerprint
    last = read_last_look(store, model_name, opened.uri)
    if last is not None and last.get("fingerprint") == fingerprint:
        pending = last.get("announce") and last.get("snapshot_id") not in announced
        if not pending:
            return {**look, "ingest": False, "reason": (
                f"{opened.name} is unchanged since the look of {last.get('at')} (snapshot {last.get('snapshot_id')}, "
                f"{len(stats)} file(s)): nothing to ingest"
            )}
        return {**look, "ingest": True, "reason": (
            f"{opened.name} is unchanged, but snapshot {last['snapshot_id']} of the last look was never announced: "
            "looking again"
        )}
    return {**look, "ingest": True, "reason": f"{opened.name}: {len(stats)} file(s), changed since the last look"}


def decide_announcement(
    snapshot: dict[str, Any],
    drift: dict[str, Any],
    *,
    model_name: str,
    retrain_on: str,
    announced: list[int],
    trained: Sequence[int] = (),
    params: dict[str, Any],
    run_id: str | None,
) -> dict[str, Any]:
    """Whether the validated ``snapshot`` (validation's reference) is announced, given its ``drift`` report,
    the snapshots ``announced`` so far and the versions of ``model_name`` already ``trained`` on it (e.g. by
    ``maas run`` on the same data).

    Returns:
        ``announce`` (bool), ``reason`` (one sentence) and ``extra`` (the Asset event's extra when announced:
        ``snapshot_id``, ``sha256``, ``source_uri``, ``source``, ``rows``, ``drift_flagged``,
        ``drift_compared``, ``drift_reasons``, ``retrain_on``, ``model_name``, ``params``
        (:data:`DATA_PARAMS`) and ``ingest_run_id``; else None).
    """
    snapshot_id = snapshot["snapshot_id"]
    what = f"snapshot {snapshot_id} ({snapshot['rows']} rows, sha256 {snapshot['sha256'][:12]})"
    if snapshot_id in announced:
        return {"announce": False, "extra": None, "reason": f"{what} was announced already: no new training run"}
    if trained:
        versions = ", ".join(f"v{v}" for v in sorted(trained))
        return {"announce": False, "extra": None, "reason": (
            f"{what} was trained on already ({model_name} {versions}): no new training run"
        )}
    flagged, compared = bool(drift.get("flagged")), bool(drift.get("compared"))
    if retrain_on == "drift" and compared and not flagged:
        return {"announce": False, "extra": None, "reason": (
            f"{what} is new but its drift is under the thresholds ({drift.get('message')}); MAAS_RETRAIN_ON=drift: "
            "no training run"
        )}
    why = ("it is new" if retrain_on == "new_data" else
           f"its drift is flagged: {'; '.join(drift.get('reasons') or [])}" if flagged else
           f"its drift could not be compared ({drift.get('message')})")
    extra = {
        "snapshot_id": snapshot_id, "sha256": snapshot["sha256"], "source_uri": snapshot.get("source_uri"),
        "source": snapshot.get("source"), "rows": snapshot["rows"], "drift_flagged": flagged,
        "drift_compared": compared, "drift_reasons": list(drift.get("reasons") or []), "retrain_on": retrain_on,
        "model_name": model_name, "params": {k: params.get(k) for k in DATA_PARAMS}, "ingest_run_id": run_id,
    }
    return {"announce": True, "extra": extra, "reason": f"announcing {what} for training {model_name}: {why}"}


def record_look(store: Store, model_name: str, look: dict[str, Any], snapshot: dict[str, Any], *, announce: bool) -> None:
    """Record a completed look (its fingerprint, the snapshot it found and whether that is to be announced),
    which the next look compares with. Looks without a fingerprint leave no record."""
    if look.get("fingerprint") is None:
        return
    record = {
        "source_uri": look["source_uri"], "fingerprint": look["fingerprint"], "snapshot_id": snapshot["snapshot_id"],
        "sha256": snapshot["sha256"], "announce": announce,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store.put_bytes(_look_key(model_name, look["source_uri"]), json.dumps(record, indent=2).encode())


def announced_ids(extras: list[dict[str, Any]]) -> list[int]:
    """The snapshot ids named by Asset events' extras (events without one are ignored)."""
    return [int(e["snapshot_id"]) for e in extras if isinstance(e, dict) and e.get("snapshot_id") is not None]


def newest_announcement(extras: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of the events that triggered a run, the one naming the newest snapshot (None: not triggered by one)."""
    named = [e for e in extras if isinstance(e, dict) and e.get("snapshot_id") is not None]
    return max(named, key=lambda e: int(e["snapshot_id"])) if named else None


def announced_params(params: dict[str, Any], announcement: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` with the ingest parameters of ``announcement`` (if any) in place of their own."""
    if announcement is None:
        return params
    given = announcement.get("params") or {}
    merged = {**params, **{k: given[k] for k in DATA_PARAMS if k in given}}
    if announcement.get("model_name"):
        merged["model_name"] = announcement["model_name"]
    return merged


def announced_snapshot(store: Store, registry: Any, announcement: dict[str, Any]) -> dict[str, Any]:
    """What ingest returns for data already ingested, for the snapshot ``announcement`` names: the training
    run trains on exactly that snapshot, not on whatever the source holds by now.

    Raises:
        ValueError: the snapshot is not in the registry, its content differs, or its files are gone (e.g.
            removed by housekeeping): the message says to let maas_ingest look again.
    """
    from maas_tasks.ingest import is_published
    from maas_tasks.registry import RegistryError

    snapshot_id = int(announcement["snapshot_id"])
    try:
        snapshot = registry.get_snapshot(snapshot_id)
    except RegistryError:
        raise ValueError(f"maas_ingest announced snapshot {snapshot_id}, which is not in the registry") from None
    if announcement.get("sha256") and snapshot.sha256 != announcement["sha256"]:
        raise ValueError(
            f"maas_ingest announced snapshot {snapshot_id} with sha256 {announcement['sha256'][:12]}, but the registry "
            f"records {snapshot.sha256[:12]}: the registry is not the one maas_ingest used (check MAAS_REGISTRY_DSN)"
        )
    if not is_published(store, snapshot.sha256):
        raise ValueError(
            f"snapshot {snapshot_id} ({snapshot.source}) that maas_ingest announced is no longer in the store "
            f"({store.uri('snapshots/' + snapshot.sha256)}); trigger maas_ingest to ingest its source again"
        )
    log.info(
        "training on snapshot %d that maas_ingest announced (run %s): %d rows from %s, sha256 %s, already ingested; "
        "drift %s", snapshot.id, announcement.get("ingest_run_id"), snapshot.rows, snapshot.source,
        snapshot.sha256[:12], "flagged" if announcement.get("drift_flagged") else "not flagged",
    )
    return {
        "source": snapshot.source, "source_uri": snapshot.source_uri, "columns": list(snapshot.columns),
        "schema": dict(snapshot.schema or {}), "watermark": None, "key": None, "sha256": snapshot.sha256,
        "rows": snapshot.rows, "new": False, "snapshot_id": snapshot.id,
    }

