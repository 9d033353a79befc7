"""What maas_ingest decides at each look (ingest or not, announce or not) and which snapshot an
Asset-triggered training run trains on."""

from __future__ import annotations

import time

import pytest

from maas_tasks.registry import Registry
from maas_tasks.retrain import (
    announced_params,
    announced_snapshot,
    decide_announcement,
    look_at_source,
    newest_announcement,
    record_look,
    scheduled_source,
    snapshot_asset,
)
from maas_tasks.sources import IngestError
from maas_tasks.storage import FileStore

PARAMS = {"text_col": "text", "label_col": "label", "retrain_on": "new_data"}
CSV = "text,label\ngood film,positive\nbad film,negative\n"


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "store")


def look(store, source, announced=(), **kwargs):
    return look_at_source(store, str(source), model_name="m", params=PARAMS, announced=list(announced), **kwargs)


def snapshot(snapshot_id=3):
    return {"snapshot_id": snapshot_id, "sha256": "ab" * 32, "rows": 2, "source_uri": "/in", "source": "in/"}


def test_the_asset_is_named_after_the_model():
    assert snapshot_asset("reviews") == {"name": "maas_snapshots_reviews", "uri": "maas://snapshots/reviews"}


def test_a_watched_directory_waits_for_data_until_a_file_lands(store, tmp_path):
    incoming = tmp_path / "incoming"
    waiting = look(store, incoming)
    assert waiting["ingest"] is False and waiting["reason"].startswith("waiting for data: ")
    incoming.mkdir()
    (incoming / "notes.txt").write_text("not data")
    assert look(store, incoming)["ingest"] is False
    assert look(store, tmp_path / "glob" / "*.csv")["ingest"] is False
    (incoming / "a.csv").write_text(CSV)
    found = look(store, incoming)
    assert found["ingest"] is True and found["files"] == 1 and found["source"] == str(incoming.resolve())


def test_a_source_that_cannot_be_used_fails_the_look(store, tmp_path):
    bad = tmp_path / "data.xlsx"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(IngestError):
        look(store, bad)


def test_an_unchanged_source_is_not_read_again_unless_its_snapshot_was_never_announced(store, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text(CSV)
    first = look(store, incoming)
    record_look(store, "m", first, snapshot(), announce=True)
    assert look(store, incoming)["ingest"] is True  # its announcement was lost: look again
    again = look(store, incoming, announced=[3])
    assert again["ingest"] is False and "unchanged since the look of" in again["reason"]
    record_look(store, "m", first, snapshot(), announce=False)  # declined (drift mode): not pending
    assert look(store, incoming)["ingest"] is False
    # Another file, a rewritten file, or other parameters are another look; other models keep their own.
    (incoming / "a.csv").write_text(CSV + "fine film,positive\n")
    assert look(store, incoming, announced=[3])["ingest"] is True
    record_look(store, "m", look(store, incoming), snapshot(4), announce=False)
    assert look_at_source(store, str(incoming), model_name="m", params={**PARAMS, "text_col": "review"},
                          announced=[])["ingest"] is True
    assert look_at_source(store, str(incoming), model_name="other", params=PARAMS, announced=[])["ingest"] is True


def test_a_file_still_being_written_waits_for_the_next_look(store, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text(CSV)
    fresh = look(store, incoming, settle_seconds=30)
    assert fresh["ingest"] is False and "waiting for its writer" in fresh["reason"]
    later = time.time() + 60
    assert look(store, incoming, settle_seconds=30, now=later)["ingest"] is True


def test_s3_and_postgresql_sources_are_read_at_every_look(store):
    s3 = look(store, "s3://bucket/incoming")
    assert s3["ingest"] is True and s3["fingerprint"] is None and s3["source"] == "s3://bucket/incoming"
    record_look(store, "m", s3, snapshot(), announce=False)  # no fingerprint: no record
    assert store.list_keys("ingest") == []


NO_DRIFT = {"compared": True, "flagged": False, "reasons": [], "message": "no check crossed its threshold"}
DRIFT = {"compared": True, "flagged": True, "reasons": ["labels moved"], "message": "labels moved"}
NOT_COMPARED = {"compared": False, "flagged": False, "reasons": [], "message": "m has no serving version yet"}


@pytest.mark.parametrize(
    "retrain_on, drift, announced, trained, announce, reason",
    [("new_data", NO_DRIFT, [], [], True, "it is new"),
     ("new_data", NO_DRIFT, [3], [], False, "was announced already"),
     ("new_data", NO_DRIFT, [], [2], False, "was trained on already (m v2)"),
     ("drift", NO_DRIFT, [], [], False, "drift is under the thresholds"),
     ("drift", DRIFT, [], [], True, "its drift is flagged: labels moved"),
     ("drift", NOT_COMPARED, [], [], True, "could not be compared"),
     ("drift", DRIFT, [3], [], False, "was announced already")],
)
def test_what_is_announced(retrain_on, drift, announced, trained, announce, reason):
    decision = decide_announcement(
        snapshot(), drift, model_name="m", retrain_on=retrain_on, announced=announced, trained=trained,
        params={"text_col": "review", "label_col": "label", "label_map": "0=neg,1=pos", "epochs": 3}, run_id="scheduled__1",
    )
    assert decision["announce"] is announce and reason in decision["reason"]
    if announce:
        extra = decision["extra"]
        assert {k: extra[k] for k in ("snapshot_id", "sha256", "source_uri", "drift_flagged", "retrain_on")} == {
            "snapshot_id": 3, "sha256": "ab" * 32, "source_uri": "/in", "drift_flagged": drift["flagged"],
            "retrain_on": retrain_on,
        }
        assert extra["params"]["text_col"] == "review" and "epochs" not in extra["params"]
        assert extra["ingest_run_id"] == "scheduled__1" and extra["model_name"] == "m"
    else:
        assert decision["extra"] is None


def test_a_run_trains_on_the_newest_announced_snapshot_with_its_ingest_params():
    events = [{"snapshot_id": 4, "params": {"text_col": "a"}}, {"snapshot_id": 6, "params": {"text_col": "b"}}, {}]
    newest = newest_announcement(events)
    assert newest["snapshot_id"] == 6 and newest_announcement([]) is None
    params = {"text_col": "text", "label_col": "label", "epochs": 5, "model_name": None}
    assert announced_params(params, None) is params
    merged = announced_params(params, {**newest, "model_name": "m"})
    assert merged == {"text_col": "b", "label_col": "label", "epochs": 5, "model_name": "m"}


def test_the_announced_snapshot_is_used_as_data_already_ingested(store, pg_dsn, tmp_path):
    from maas_tasks.ingest import ingest_data, publish_snapshot

    data = tmp_path / "d.csv"
    data.write_text(CSV)
    with Registry.connect(pg_dsn) as registry:
        staged = ingest_data(store, registry, data, run_id="r1")
        published = publish_snapshot(store, staged)
        snapshot_id = registry.record_snapshot(published["uri"], staged["sha256"], 2, staged["source"],
                                               columns=staged["columns"], source_uri=staged["source_uri"])
        reference = announced_snapshot(store, registry, {"snapshot_id": snapshot_id, "sha256": staged["sha256"]})
        assert reference == {
            "source": "d.csv", "source_uri": staged["source_uri"], "columns": ["text", "label"], "schema": {},
            "watermark": None, "key": None, "sha256": staged["sha256"], "rows": 2, "new": False,
            "snapshot_id": snapshot_id,
        }
        with pytest.raises(ValueError, match="registry records"):
            announced_snapshot(store, registry, {"snapshot_id": snapshot_id, "sha256": "cd" * 32})
        with pytest.raises(ValueError, match="not in the registry"):
            announced_snapshot(store, registry, {"snapshot_id": snapshot_id + 100})
        store.delete(f"snapshots/{staged['sha256']}/source.json")
        with pytest.raises(ValueError, match="trigger maas_ingest to ingest its source again"):
            announced_snapshot(store, registry, {"snapshot_id": snapshot_id})


def test_a_file_removed_while_the_source_is_looked_at_makes_the_look_wait(store, tmp_path, monkeypatch):
    from maas_tasks import retrain

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text(CSV)
    monkeypatch.setattr(retrain, "_local_files", lambda opened: [incoming / "a.csv", incoming / "gone.csv"])
    result = look(store, incoming)
    assert result["ingest"] is False and "gone.csv went away" in result["reason"]


def test_a_scheduled_run_trains_on_the_watched_source_once_it_holds_data(tmp_path):
    watched = tmp_path / "incoming"
    assert scheduled_source(str(watched), "sample.csv") == "sample.csv"  # not there yet
    watched.mkdir()
    assert scheduled_source(str(watched), "sample.csv") == "sample.csv"  # empty
    (watched / "batch-1.csv").write_text("text,label\ngood film,1\n")
    assert scheduled_source(str(watched), "sample.csv") == str(watched)
    (tmp_path / "reviews.xlsx").write_bytes(b"PK")  # there, but no format MaaS reads: an error, not the sample
    with pytest.raises(IngestError):
        scheduled_source(str(tmp_path / "reviews.xlsx"), "sample.csv")
