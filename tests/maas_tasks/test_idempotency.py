"""Every stage of a training run, run again after it succeeded (a cleared task, a retry whose first attempt
had in fact finished), answers the same and leaves the store and the registry as they were.

Each stage's own tests check its answer on a rerun (test_ingest, test_validate, test_clean, test_features,
test_train, test_evaluate, test_export); this one runs the stages in the DAG's order on one store and
registry and checks what they do not: that a rerun writes no other object, changes no stored byte
beyond the few that record when the work was done, adds no snapshot or version, and appends no event
but the one recording the reports it wrote again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from maas_tasks.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUN = "manual__idempotency"


def _objects(store: Any) -> dict[str, str]:
    return {key: hashlib.sha256(store.get_bytes(key)).hexdigest() for key in store.list_keys()}


def _rows(registry: Registry) -> tuple[list[Any], list[Any]]:
    return registry.list_snapshots(), registry.list_versions()


def rerun(store: Any, registry: Registry, stage: Callable[[], Any]) -> tuple[Any, Any, set[str], list[str]]:
    """Run ``stage`` twice; the two answers, the keys the second run added, removed or rewrote with other
    bytes, and the kinds of the events it appended. Its registry rows must be the same after both."""
    first = stage()
    objects, rows, events = _objects(store), _rows(registry), len(registry.list_events())
    again = stage()
    after = _objects(store)
    changed = {key for key in objects.keys() | after.keys() if objects.get(key) != after.get(key)}
    snapshots, versions = _rows(registry)
    assert [s.id for s in snapshots] == [s.id for s in rows[0]], "a rerun recorded another snapshot"
    assert [(v.version, v.status, v.artifact_uri) for v in versions] == [
        (v.version, v.status, v.artifact_uri) for v in rows[1]
    ], "a rerun registered, moved or re-pointed a version"
    return first, again, changed, [e.kind for e in registry.list_events()[events:]]


def test_every_stage_rerun_after_success_answers_the_same_and_adds_nothing(file_store, pg_dsn, tmp_path):
    from maas_tasks.clean import clean_snapshots, training_batches
    from maas_tasks.evaluate import evaluate_and_register
    from maas_tasks.export import export_registered_version
    from maas_tasks.features import build_features
    from maas_tasks.ingest import ingest_data
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.storage import MANIFEST_NAME, read_manifest
    from maas_tasks.train import HISTORY_FILE, train_model
    from maas_tasks.validate import validate_staged_snapshot

    store = file_store
    source = tmp_path / "reviews.csv"
    generate_reviews(200, seed=23).to_csv(source, index=False)
    columns = {"text_col": "text", "label_col": "label", "group_col": "movie_id"}
    with Registry.connect(pg_dsn) as registry:
        staged, again, changed, events = rerun(store, registry, lambda: ingest_data(
            store, registry, str(source), run_id=RUN))
        assert (again, changed, events) == (staged, set(), [])

        snapshot, again, changed, events = rerun(store, registry, lambda: validate_staged_snapshot(
            store, registry, staged, **columns, dag_run_id=RUN))
        # Validated again, the same verdict; its reports are rewritten (the Data Docs page is named by its time).
        assert {**again, "docs_uri": None} == {**snapshot, "docs_uri": None}
        assert changed and all(key.startswith(f"validation/{snapshot['sha256']}/") for key in changed)
        assert events == ["snapshot_reports"]
        # The whole run again from ingest: the rows are a known snapshot, nothing is staged.
        known, _, changed, events = rerun(store, registry, lambda: ingest_data(
            store, registry, str(source), run_id=RUN))
        assert (known["new"], known["snapshot_id"], changed, events) == (False, snapshot["snapshot_id"], set(), [])

        cleaned, again, changed, events = rerun(store, registry, lambda: clean_snapshots(
            store, training_batches(store, registry, snapshot), **columns))
        assert (again, changed, events) == (cleaned, set(), [])

        features, again, changed, events = rerun(store, registry, lambda: build_features(
            store, cleaned["key"], max_tokens=2000))
        assert (again, changed, events) == (features, set(), [])

        trained, again, changed, events = rerun(store, registry, lambda: train_model(
            store, features["key"], epochs=1, batch_size=64, device="cpu"))
        # The same model byte for byte; only the record of how long training took differs.
        assert {**again, "train_seconds": None} == {**trained, "train_seconds": None}
        assert changed <= {f"{trained['key']}/{HISTORY_FILE}"} and events == []

        evaluation, again, changed, events = rerun(store, registry, lambda: evaluate_and_register(
            store, registry, trained["key"], features["key"], model_name="m", min_accuracy=0.5,
            snapshot_id=snapshot["snapshot_id"], dag_run_id=RUN))
        assert (again, changed, events) == (evaluation, set(), [])

        exported, again, changed, events = rerun(store, registry, lambda: export_registered_version(
            store, registry, trained["key"], evaluation))
        assert again == exported
        # Exported again from the same model with the same facts: nothing is rewritten (a new SavedModel would
        # have other bytes, since TensorFlow numbers what it traces per process) and no event is added.
        assert (changed, events) == (set(), [])
        prefix = exported["prefix"]
        published = [f"{prefix}/{rel}" for rel in read_manifest(store, prefix)] + [f"{prefix}/{MANIFEST_NAME}"]
        assert store.list_keys(prefix) == sorted(published)
        assert registry.get_version("m", evaluation["version"]).artifact_uri == exported["uri"]

