"""Housekeeping: the retention of store objects, so that a pipeline retraining on every new snapshot does not
fill its object store.

What the stages write (the layout this module knows; a test checks it against the stages' own constants):

- ``staging/<sha>/<run>/`` ingest's staged copy, published or discarded by validation: left only by a killed
  run, so an old one is stale;
- ``snapshots/<sha>/`` a published snapshot (``source.json`` last), ``validation/<sha>/`` its Great
  Expectations result and Data Docs, ``quarantine/<sha>/`` its quarantined rows, ``drift/<hash>/`` its drift
  report (the snapshot's ``drift_uri``); validation reports of data that failed have no snapshot;
- ``cleaned/<hash>/`` a run's cleaned table: an intermediate, read only by the run that wrote it (each
  version's features hold its cleaned rows, ``train.parquet`` and ``eval.parquet``);
- ``features/<hash>/`` and ``trained/<hash>/`` a version's lineage: its exported metadata
  (``models/<m>/<v>.json``) names its trained model, whose ``history.json`` names its features, and its
  evaluation report names both (so a rejected version, never exported, has a known lineage too);
- ``models/<m>/<v>/`` + ``models/<m>/<v>.json`` an exported version, ``reports/<m>/<v>/`` its report;
- temporary files of a file store (``.<name>.tmp-<id>``), left by a writer that was killed.

Each model keeps its newest K versions (MAAS_KEEP_VERSIONS) and, whatever their age, every version the
registry's serving target names (stable, canary, previous), the serving one and pinned ones. Kept are also
what a kept version references (its snapshot, features, trained model, export and report), the reports of
kept snapshots, every batch of a source read by watermark (they are the data set: the next run trains on
all of them), the newest snapshot of every source (the one the next run trains on), and anything written
less than ``min_age`` ago (a run in progress; the DAG's runs time out after 6 hours). Everything else under
the prefixes above goes; anything else in the store (e.g. ``ingest/``) is never touched.

Deleting is safe under races: a version's export and report are deleted only after the registry agreed,
under the model's lock, that nothing serves or may serve it (:meth:`Registry.prune_version` clears its
artifact, so no promotion or rollback can pick it later); a snapshot only if no version registered since
the plan uses it; each tree loses its commit point first (the file readers check), so nobody trusts a
half-deleted one. Every deletion is recorded as a registry event; a rerun finds nothing more to do.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from maas_tasks.storage import ObjectNotFound, Store, store_key

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE = timedelta(hours=24)
# The store's layout (see the module docstring).
STAGING, SNAPSHOTS, VALIDATION, QUARANTINE = "staging", "snapshots", "validation", "quarantine"
CLEANED, DRIFT, FEATURES, TRAINED, MODELS, REPORTS = "cleaned", "drift", "features", "trained", "models", "reports"
HISTORY_FILE = "history.json"  # maas_tasks.train.HISTORY_FILE
REPORT_PAGE = "index.html"  # maas_tasks.report.REPORT_FILE
# Files readers check before they trust a tree: they are deleted first.
COMMIT_FILES = ("source.json", "vectorizer.json", "model.json", "MANIFEST.json", "index.html", "report.json")
_LINEAGE_KEY = re.compile(rf"\b(?:{TRAINED}|{FEATURES})/[0-9a-f]{{16}}\b")
# How many deleted prefixes a summary event or a task's return value lists (the counts are always complete).
LISTED = 200


@dataclass
class Group:
    """Store objects that go together: one snapshot's files, one version's export and report, one tree."""

    kind: str
    prefix: str
    keys: list[str]
    reason: str
    model_name: str | None = None
    version: int | None = None
    snapshot_id: int | None = None


@dataclass
class Plan:
    """What housekeeping keeps and what it deletes (:func:`plan_housekeeping`)."""

    keep_versions: int
    min_age: timedelta
    kept_versions: dict[str, list[int]] = field(default_factory=dict)
    protected: dict[str, dict[int, str]] = field(default_factory=dict)
    kept_snapshots: list[int] = field(default_factory=list)
    seen_versions: set[tuple[str, int]] = field(default_factory=set)
    groups: list[Group] = field(default_factory=list)
    temporary: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _deletion_order(keys: list[str], first: tuple[str, ...] = ()) -> list[str]:
    """``keys`` with the ones in ``first`` first, then the commit points, then the rest."""
    def rank(key: str) -> tuple[int, str]:
        if key in first:
            return 0, key
        return (1 if key.rsplit("/", 1)[-1] in COMMIT_FILES else 2), key
    return sorted(keys, key=rank)


def _tree_groups(store: Store, top: str, depth: int) -> dict[str, list[str]]:
    """The keys under ``top``, grouped by their first ``depth`` path parts (``snapshots/<sha>``...)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in store.list_keys(top):
        parts = key.split("/")
        if len(parts) > depth:
            groups["/".join(parts[:depth])].append(key)
    return dict(groups)


def _newest_write(store: Store, keys: list[str]) -> datetime | None:
    times = []
    for key in keys:
        try:
            times.append(store.modified_at(key))
        except ObjectNotFound:  # deleted meanwhile
            continue
    return max(times) if times else None


def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(key))
    except (ObjectNotFound, ValueError):
        return None


def version_lineage(store: Store, model_name: str, version: int) -> tuple[set[str], bool]:
    """The ``trained/<hash>`` and ``features/<hash>`` prefixes a version was made from, and whether both were
    found (from its exported metadata and the trained model's history, and from its evaluation report)."""
    refs: set[str] = set()
    metadata = _read_json(store, f"{MODELS}/{model_name}/{version}.json")
    if metadata and metadata.get("model_key"):
        refs.add(str(metadata["model_key"]).rstrip("/"))
    try:
        page = store.get_bytes(f"{REPORTS}/{model_name}/{version}/{REPORT_PAGE}").decode("utf-8", "replace")
        refs.update(_LINEAGE_KEY.findall(page))
    except ObjectNotFound:
        pass
    for trained in [r for r in refs if r.startswith(f"{TRAINED}/")]:
        history = _read_json(store, f"{trained}/{HISTORY_FILE}")
        if history and history.get("features_key"):
            refs.add(str(history["features_key"]).rstrip("/"))
    complete = any(r.startswith(f"{TRAINED}/") for r in refs) and any(r.startswith(f"{FEATURES}/") for r in refs)
    return refs, complete


def _protected(versions: list[Any], target: Any) -> dict[int, str]:
    """The versions of one model that are never deleted whatever their age, with why."""
    reasons: dict[int, str] = {}
    for v in versions:
        if v.pinned:
            reasons[v.version] = "pinned"
        elif v.status == "serving":
            reasons[v.version] = "serving"
    if target is not None:
        for role in ("previous", "canary", "stable"):
            held = getattr(target, role)
            if held is not None:
                reasons.setdefault(held, f"the {role} version")
    return reasons


def _prefix_of(store: Store, uri: str | None, depth: int) -> str | None:
    """The first ``depth`` parts of the key of ``uri`` in ``store`` (None when it is elsewhere)."""
    if not uri:
        return None
    try:
        key = store_key(store, uri)
    except ValueError:
        return None
    parts = key.split("/")
    return "/".join(parts[:depth]) if len(parts) > depth else None


def plan_housekeeping(
    store: Store,
    registry: Any,
    *,
    keep_versions: int,
    min_age: timedelta = DEFAULT_MIN_AGE,
    now: datetime | None = None,
) -> Plan:
    """Decide what to delete (nothing is deleted here).

    Args:
        keep_versions: how many of each model's newest versions are kept (at least 1).
        min_age: nothing written, and no version registered, less than this long ago is deleted.

    Raises:
        ValueError: ``keep_versions`` is below 1 or ``min_age`` negative.
    """
    if keep_versions < 1:
        raise ValueError(f"keep_versions={keep_versions}: housekeeping keeps at least each model's newest version")
    if min_age < timedelta(0):
        raise ValueError(f"min_age={min_age} is negative")
    now = now or datetime.now(timezone.utc)
    cutoff = now - min_age
    plan = Plan(keep_versions=keep_versions, min_age=min_age)
    targets = {t.model_name: t for t in registry.serving_targets()}
    by_model: dict[str, list[Any]] = defaultdict(list)
    for v in registry.list_versions():
        by_model[v.model_name].append(v)
        plan.seen_versions.add((v.model_name, v.version))

    kept_refs: set[str] = set()
    kept_snapshot_ids: set[int] = set()
    unknown_lineage: list[str] = []
    pruned: list[Any] = []
    for model_name, versions in sorted(by_model.items()):
        versions.sort(key=lambda v: v.version, reverse=True)
        protected = _protected(versions, targets.get(model_name))
        newest = {v.version for v in versions[:keep_versions]}
        young = {v.version for v in versions if v.created_at > cutoff}
        kept = [v for v in versions if v.version in newest or v.version in protected or v.version in young]
        plan.kept_versions[model_name] = sorted(v.version for v in kept)
        plan.protected[model_name] = {n: why for n, why in protected.items() if n not in newest}
        for v in kept:
            refs, complete = version_lineage(store, model_name, v.version)
            kept_refs |= refs
            if not complete:
                unknown_lineage.append(f"{model_name} v{v.version}")
            if v.snapshot_id is not None:
                kept_snapshot_ids.add(v.snapshot_id)
        pruned += [v for v in versions if v not in kept]

    for v in sorted(pruned, key=lambda v: (v.model_name, v.version)):
        prefix = f"{MODELS}/{v.model_name}/{v.version}"
        metadata = f"{prefix}.json"
        keys = store.list_keys(prefix) + ([metadata] if store.exists(metadata) else [])
        keys += store.list_keys(f"{REPORTS}/{v.model_name}/{v.version}")
        if keys:
            plan.groups.append(Group(
                "version", prefix, _deletion_order(keys, first=(metadata,)),
                f"older than the newest {keep_versions} of {v.model_name}, not serving, pinned or in the serving target",
                model_name=v.model_name, version=v.version,
            ))

    # Snapshots: those kept versions trained on, every batch of a watermarked source, the newest of each source,
    # and young ones.
    snapshots = registry.list_snapshots()
    newest_of_source: dict[str | None, int] = {}
    for s in snapshots:
        newest_of_source[s.source_uri] = max(newest_of_source.get(s.source_uri, s.id), s.id)
    kept_snapshots = [
        s for s in snapshots
        if s.id in kept_snapshot_ids or s.watermark is not None or newest_of_source[s.source_uri] == s.id
        or s.created_at > cutoff
    ]
    plan.kept_snapshots = sorted(s.id for s in kept_snapshots)
    kept_shas = {s.sha256 for s in kept_snapshots}
    kept_drift = {p for p in (_prefix_of(store, s.drift_uri, 2) for s in kept_snapshots) if p}
    # Which snapshot a tree belongs to (named in the registry's event of its deletion).
    owner = {f"{top}/{s.sha256}": s.id for s in snapshots for top in (SNAPSHOTS, VALIDATION, QUARANTINE)}
    owner.update({p: s.id for s in snapshots if (p := _prefix_of(store, s.drift_uri, 2))})

    def sweep(top: str, depth: int, keep, reason: str, kind: str | None = None) -> None:
        for prefix, keys in sorted(_tree_groups(store, top, depth).items()):
            if keep(prefix):
                continue
            newest_write = _newest_write(store, keys)
            if newest_write is None or newest_write > cutoff:
                continue
            plan.groups.append(Group(kind or top, prefix, _deletion_order(keys), reason, snapshot_id=owner.get(prefix)))

    snapshot_reason = "a snapshot no kept version trained on, not the newest of its source, not a watermarked batch"
    sweep(SNAPSHOTS, 2, lambda p: p.split("/")[1] in kept_shas, snapshot_reason, "snapshot")
    sweep(VALIDATION, 2, lambda p: p.split("/")[1] in kept_shas, "the validation report of a snapshot not kept")
    sweep(QUARANTINE, 2, lambda p: p.split("/")[1] in kept_shas, "the quarantine of a snapshot not kept")
    sweep(DRIFT, 2, lambda p: p in kept_drift, "a drift report of no kept snapshot")
    sweep(CLEANED, 2, lambda p: False, "a run's cleaned table (an intermediate: the features hold its rows)")
    sweep(STAGING, 3, lambda p: False, "a staged copy left by a run that was killed before validation")
    if unknown_lineage:
        plan.notes.append(
            f"{FEATURES}/ and {TRAINED}/ are not swept: the lineage of {', '.join(unknown_lineage)} is unknown (no "
            "export metadata or evaluation report names its trained model and features), so anything there may be "
            "theirs"
        )
    else:
        sweep(FEATURES, 2, lambda p: p in kept_refs, "features no kept version was made from")
        sweep(TRAINED, 2, lambda p: p in kept_refs, "a trained model no kept version was made from")
    temporary = getattr(store, "temporary_files", None)  # a file store's; S3 writes have no temporary names
    for path in temporary() if temporary is not None else []:
        try:
            written = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        if written <= cutoff:
            plan.temporary.append(path)
    return plan


def _record_snapshot_deletions(registry: Any, groups: list[Group], run_id: str | None) -> None:
    by_snapshot: dict[int, list[str]] = defaultdict(list)
    for group in groups:
        if group.snapshot_id is not None:
            by_snapshot[group.snapshot_id].append(group.prefix)
    for snapshot_id, prefixes in sorted(by_snapshot.items()):
        registry.record_event(
            "snapshot_deleted", detail={"snapshot_id": snapshot_id, "prefixes": prefixes, "dag_run_id": run_id}
        )


def apply_plan(store: Store, registry: Any, plan: Plan, *, run_id: str | None = None) -> dict[str, Any]:
    """Delete what ``plan`` lists, re-checking with the registry first (see the module docstring).

    Returns:
        ``deleted`` (the groups deleted, as dicts), ``skipped`` (groups kept after the re-check, with why),
        ``keys`` (objects deleted) and ``temporary`` (temporary files deleted).
    """
    deleted: list[Group] = []
    skipped: list[dict[str, Any]] = []
    count = 0
    for group in [g for g in plan.groups if g.kind == "version"]:
        why = registry.prune_version(group.model_name, group.version, detail={"dag_run_id": run_id, "keys": len(group.keys)})
        if why is not None:
            skipped.append({"prefix": group.prefix, "why": f"{group.model_name} v{group.version} is {why} now"})
            continue
        for key in group.keys:
            store.delete(key)
        count += len(group.keys)
        deleted.append(group)
    # A version registered since the plan may use an old snapshot (a run of data already ingested).
    in_use = {
        v.snapshot_id for v in registry.list_versions()
        if (v.model_name, v.version) not in plan.seen_versions and v.snapshot_id is not None
    }
    for group in [g for g in plan.groups if g.kind != "version"]:
        if group.snapshot_id in in_use:
            skipped.append({"prefix": group.prefix, "why": f"snapshot {group.snapshot_id} is used by a version "
                                                           "registered since the plan"})
            continue
        for key in group.keys:
            store.delete(key)
        count += len(group.keys)
        deleted.append(group)
    for path in plan.temporary:
        path.unlink(missing_ok=True)
    _record_snapshot_deletions(registry, deleted, run_id)
    if deleted or plan.temporary:
        kinds: dict[str, int] = defaultdict(int)
        for group in deleted:
            kinds[group.kind] += 1
        registry.record_event("housekeeping", detail={
            "dag_run_id": run_id, "keep_versions": plan.keep_versions, "keys": count, "groups": dict(kinds),
            "versions": [f"{g.model_name} v{g.version}" for g in deleted if g.kind == "version"],
            "prefixes": [g.prefix for g in deleted][:LISTED], "temporary_files": len(plan.temporary),
        })
    return {"deleted": deleted, "skipped": skipped, "keys": count, "temporary": len(plan.temporary)}


def describe_plan(plan: Plan) -> dict[str, Any]:
    """A JSON-able summary of ``plan`` (the first :data:`LISTED` groups listed, every count complete)."""
    return {
        "keep_versions": plan.keep_versions,
        "min_age_hours": plan.min_age.total_seconds() / 3600,
        "kept_versions": plan.kept_versions,
        "protected": {m: {str(v): why for v, why in p.items()} for m, p in plan.protected.items() if p},
        "kept_snapshots": plan.kept_snapshots,
        "groups": len(plan.groups),
        "keys": sum(len(g.keys) for g in plan.groups),
        "delete": [
            {"kind": g.kind, "prefix": g.prefix, "keys": len(g.keys), "reason": g.reason} for g in plan.groups[:LISTED]
        ],
        "temporary_files": [str(p) for p in plan.temporary[:LISTED]],
        "notes": plan.notes,
    }


def run_housekeeping(
    store: Store,
    registry: Any,
    *,
    keep_versions: int,
    min_age: timedelta = DEFAULT_MIN_AGE,
    dry_run: bool,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Plan (:func:`plan_housekeeping`), log every decision, and unless ``dry_run`` delete (:func:`apply_plan`).

    Returns:
        :func:`describe_plan`'s summary, with ``dry_run``, ``deleted_keys`` and ``skipped``.
    """
    plan = plan_housekeeping(store, registry, keep_versions=keep_versions, min_age=min_age)
    for model_name, versions in plan.kept_versions.items():
        protected = plan.protected.get(model_name) or {}
        extra = "".join(f"; v{v} is {why}" for v, why in sorted(protected.items()))
        log.info("%s: keeping v%s (the newest %d%s)", model_name, ", v".join(map(str, versions)) or "-", keep_versions,
                 extra)
    log.info("keeping snapshots %s", ", ".join(map(str, plan.kept_snapshots)) or "none")
    for note in plan.notes:
        log.warning(note)
    verb = "would delete" if dry_run else "deleting"
    for group in plan.groups:
        log.info("%s %s/ (%d objects): %s", verb, group.prefix, len(group.keys), group.reason)
    for path in plan.temporary:
        log.info("%s %s: a temporary file left by a killed writer", verb, path)
    summary = {**describe_plan(plan), "dry_run": dry_run, "deleted_keys": 0, "skipped": []}
    if not plan.groups and not plan.temporary:
        log.info("nothing to delete")
        return summary
    if dry_run:
        log.info("dry run: %d groups (%d objects) would be deleted; nothing was", summary["groups"], summary["keys"])
        return summary
    result = apply_plan(store, registry, plan, run_id=run_id)
    for skip in result["skipped"]:
        log.info("kept %s after all: %s", skip["prefix"], skip["why"])
    log.info("deleted %d objects in %d groups, %d temporary files", result["keys"], len(result["deleted"]),
             result["temporary"])
    return {**summary, "deleted_keys": result["keys"], "skipped": result["skipped"]}
