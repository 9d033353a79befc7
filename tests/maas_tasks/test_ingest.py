"""Ingest: staging a source file as a Parquet snapshot, publishing and discarding it."""

from __future__ import annotations

import gzip

import pandas as pd
import pytest

from maas_tasks.ingest import IngestError, discard_snapshot, ingest_data, publish_snapshot, read_source
from maas_tasks.storage import FileStore

CSV = 'id,text,label\n1,"Great, really great",1\n2,Awful <br />film,0\n3,,1\n'


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "store")


def test_read_source_keeps_values_as_strings(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    frame = read_source(path)
    assert list(frame.columns) == ["id", "text", "label"]
    assert frame["label"].tolist() == ["1", "0", "1"]
    assert frame["text"].tolist()[:2] == ["Great, really great", "Awful <br />film"]
    assert pd.isna(frame["text"].iloc[2])


def test_read_source_gzip_tsv_and_parquet(tmp_path):
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(CSV.encode()))
    assert len(read_source(gz)) == 3
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\nfine\tpos\n")
    assert read_source(tsv)["label"].tolist() == ["pos"]
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a"], "label": [1]}).to_parquet(pq)
    assert read_source(pq)["label"].tolist() == ["1"]


def test_empty_file_reads_as_empty_frame(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    frame = read_source(path)
    assert frame.empty and list(frame.columns) == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "does not exist"),
        ("data.json", "{}", "unsupported file type"),
        ("bad.csv", 'a,b\n"unterminated,1\n', "cannot parse"),
    ],
)
def test_unreadable_sources_fail_clearly(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(IngestError, match=message):
        read_source(path)


def test_ingest_stages_a_content_keyed_snapshot(store, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    staged = ingest_data(store, path, run_id="run-1")
    assert staged["key"].startswith(f"staging/{staged['sha256']}/") and staged["key"].endswith("/data.parquet")
    assert (staged["rows"], staged["columns"], staged["source"]) == (3, ["id", "text", "label"], "d.csv")
    assert ingest_data(store, path, run_id="run-1") == staged  # a retry rewrites the same key
    other = ingest_data(store, path, run_id="run-2")  # another run stages its own copy
    assert other["key"] != staged["key"] and other["sha256"] == staged["sha256"]
    assert store.list_keys() == sorted([staged["key"], other["key"]])


def test_publish_moves_the_snapshot_and_is_idempotent(store, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    staged = ingest_data(store, path)
    published = publish_snapshot(store, staged)
    prefix = f"snapshots/{staged['sha256']}"
    assert published["key"] == f"{prefix}/data.parquet"
    assert store.list_keys() == [f"{prefix}/data.parquet", f"{prefix}/source.json"]
    assert publish_snapshot(store, ingest_data(store, path)) == published
    assert store.list_keys() == [f"{prefix}/data.parquet", f"{prefix}/source.json"]


def test_discard_leaves_nothing_behind(store, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    discard_snapshot(store, ingest_data(store, path))
    assert store.list_keys() == []
    assert not any((tmp_path / "store").iterdir())
