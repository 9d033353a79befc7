"""Ingest: content-addressed staging of a source's rows, known content and incremental reads, publish and discard."""

from __future__ import annotations

import io
import json
import logging

import pandas as pd
import psycopg2
import pytest

from maas_tasks.ingest import discard_snapshot, hash_rows, ingest_data, publish_snapshot
from maas_tasks.registry import Registry
from maas_tasks.sources import IngestError, open_source

CSV = 'id,text,label\n1,"Great, really great",1\n2,Awful <br />film,0\n3,,1\n'


@pytest.fixture
def store(file_store):
    return file_store


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


def record(store, registry, staged) -> int:
    """What validation does with a staged snapshot that passes: publish it and record it with its watermark."""
    published = publish_snapshot(store, staged)
    return registry.record_snapshot(
        published["uri"], published["sha256"], published["rows"], published["source"], columns=published["columns"],
        source_uri=published["source_uri"], schema=published["schema"],
        watermark=tuple(published["watermark"]) if published["watermark"] else None,
    )


# ---------------------------------------------------------------- the content address


def test_the_same_rows_in_another_format_or_order_hash_the_same(tmp_path):
    frame = pd.read_csv(io.StringIO(CSV), dtype="string")
    (tmp_path / "d.csv").write_text(CSV)
    frame.iloc[::-1][["label", "text", "id"]].to_parquet(tmp_path / "d.parquet", index=False)
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": int(i), "label": int(v)}) for i, t, v in frame.fillna("").values)
    )
    digests = {hash_rows(open_source(tmp_path / name).read().frame) for name in ("d.csv", "d.parquet", "d.jsonl")}
    assert len(digests) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f.assign(label=f["label"].replace("0", "1")),  # one value
        lambda f: f.rename(columns={"label": "class"}),  # a column name
        lambda f: f.iloc[:2],  # a row fewer
        lambda f: pd.concat([f, f.iloc[:1]]),  # a duplicate row more
        lambda f: f.assign(text=f["text"].fillna("<NA>")),  # a missing value written as text
        lambda f: f.assign(text=f["text"].str.replace("Great, really", "Great,really")),  # one character
    ],
)
def test_any_change_of_content_changes_the_hash(change):
    frame = pd.read_csv(io.StringIO(CSV), dtype="string")
    assert hash_rows(change(frame).reset_index(drop=True)) != hash_rows(frame)


def test_values_moving_between_neighbouring_cells_change_the_hash():
    a = pd.DataFrame({"x": ["ab", "c"], "y": ["1", "2"]}, dtype="string")
    b = pd.DataFrame({"x": ["a", "bc"], "y": ["1", "2"]}, dtype="string")
    assert hash_rows(a) != hash_rows(b)


# ---------------------------------------------------------------- staging


def test_ingest_stages_a_content_keyed_snapshot(store, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    staged = ingest_data(store, None, path, run_id="run-1")
    assert staged["key"] == f"staging/{staged['sha256']}/{staged['key'].split('/')[2]}/data.parquet"
    assert (staged["rows"], staged["columns"], staged["source"]) == (3, ["id", "text", "label"], "d.csv")
    assert staged["source_uri"] == str(path.resolve()) and staged["schema"] == dict.fromkeys(staged["columns"], "string")
    assert (staged["new"], staged["snapshot_id"], staged["watermark"]) == (True, None, None)
    assert json.loads(json.dumps(staged)) == staged  # small and JSON-able, for XCom
    assert ingest_data(store, None, path, run_id="run-1") == staged  # a retry rewrites the same key
    other = ingest_data(store, None, path, run_id="run-2")  # another run stages its own copy
    assert other["key"] != staged["key"] and other["sha256"] == staged["sha256"]
    assert store.list_keys() == sorted([staged["key"], other["key"]])
    snapshot = pd.read_parquet(store.uri(staged["key"]).removeprefix("file://"))
    assert snapshot["label"].tolist() == ["1", "0", "1"] and pd.isna(snapshot["text"].iloc[2])


def test_bad_input_stages_nothing(store, tmp_path):
    (tmp_path / "d.csv").write_text("text;label\na;1\n")
    with pytest.raises(IngestError, match="looks ';'-separated"):
        ingest_data(store, None, tmp_path / "d.csv")
    assert store.list_keys() == []


def test_already_ingested_rows_are_not_staged_again(store, registry, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="maas_tasks.ingest")
    (tmp_path / "d.csv").write_text(CSV)
    first = ingest_data(store, registry, tmp_path / "d.csv", run_id="run-1")
    snapshot_id = record(store, registry, first)
    pd.read_csv(tmp_path / "d.csv", dtype="string").iloc[::-1].to_parquet(tmp_path / "d.parquet", index=False)
    keys = store.list_keys()
    again = ingest_data(store, registry, tmp_path / "d.parquet", run_id="run-2")
    assert (again["new"], again["key"], again["snapshot_id"]) == (False, None, snapshot_id)
    assert (again["sha256"], again["rows"], again["source"]) == (first["sha256"], 3, "d.parquet")
    assert store.list_keys() == keys
    assert f"d.parquet was already ingested: its 3 rows are snapshot {snapshot_id}" in caplog.text
    discard_snapshot(store, again)  # nothing was staged, nothing to remove
    assert store.list_keys() == keys


# ---------------------------------------------------------------- incremental PostgreSQL reads


@pytest.fixture
def reviews_url(pg_dsn):
    """The test database as a postgresql:// URL naming its reviews table (id integer, the watermark)."""
    info = psycopg2.extensions.parse_dsn(pg_dsn)
    insert(pg_dsn, "CREATE TABLE reviews (id integer, text text, label text)")
    insert(pg_dsn, "INSERT INTO reviews VALUES (9, 'fine', 'pos'), (10, 'dull', 'neg')")
    url = f"postgresql://{info['user']}:{info['password']}@{info['host']}:{info['port']}/{info['dbname']}"
    return f"{url}?table=reviews", pg_dsn, info["password"]


def insert(dsn: str, statement: str) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


def test_a_watermarked_table_is_read_in_batches(store, registry, reviews_url, caplog):
    caplog.set_level(logging.INFO, logger="maas_tasks.ingest")
    url, dsn, password = reviews_url
    first = ingest_data(store, registry, url, watermark_col="id", run_id="r1")
    assert (first["rows"], first["watermark"], first["source"], first["new"]) == (2, ["id", "10"], "table reviews", True)
    assert password not in json.dumps(first)
    first_id = record(store, registry, first)
    assert registry.get_watermark(first["source_uri"]) == ("id", "10")

    insert(dsn, "INSERT INTO reviews VALUES (11, 'great', 'pos'), (2, 'late but old', 'neg'), (12, 'bad', 'neg')")
    second = ingest_data(store, registry, url, watermark_col="id", run_id="r2")
    assert (second["rows"], second["watermark"], second["new"]) == (2, ["id", "12"], True)
    batch = pd.read_parquet(store.uri(second["key"]).removeprefix("file://"))
    assert batch["id"].tolist() == ["11", "12"]  # 2 is not past 10 as an integer
    second_id = record(store, registry, second)
    assert [s.id for s in registry.list_snapshots(first["source_uri"])] == [first_id, second_id]

    keys = store.list_keys()
    nothing = ingest_data(store, registry, url, watermark_col="id", run_id="r3")
    assert (nothing["new"], nothing["key"], nothing["snapshot_id"]) == (False, None, second_id)
    assert nothing["watermark"] == ["id", "12"] and store.list_keys() == keys
    assert "table reviews has no rows with id > '12': nothing new to ingest" in caplog.text

    with pytest.raises(IngestError, match="tracked by watermark column 'id'; pass watermark_col=id"):
        ingest_data(store, registry, url, watermark_col="label")


# ---------------------------------------------------------------- publish and discard


def test_publish_moves_the_snapshot_and_is_idempotent(store, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    staged = ingest_data(store, None, path)
    published = publish_snapshot(store, staged)
    prefix = f"snapshots/{staged['sha256']}"
    assert published["key"] == f"{prefix}/data.parquet"
    assert store.list_keys() == [f"{prefix}/data.parquet", f"{prefix}/source.json"]
    info = json.loads(store.get_bytes(f"{prefix}/source.json"))
    assert info["source_uri"] == str(path.resolve()) and info["rows"] == 3
    assert publish_snapshot(store, ingest_data(store, None, path)) == published
    assert store.list_keys() == [f"{prefix}/data.parquet", f"{prefix}/source.json"]


def test_discard_leaves_nothing_behind(store, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(CSV)
    discard_snapshot(store, ingest_data(store, None, path))
    assert store.list_keys() == []
    assert not any((tmp_path / "store").iterdir())
