"""Sources: every kind of source reads to one frame of text columns, and every bad input fails clearly."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import psycopg2
import psycopg2.sql
import pytest

from maas_tasks.config import load_settings
from maas_tasks.sources import (
    IMDB_COLUMNS,
    UNDECODABLE,
    FileSource,
    ImdbSource,
    IngestError,
    PostgresSource,
    S3Source,
    check_source,
    open_source,
)

CSV = 'id,text,label\n1,"Great, really great",1\n2,"Two\nlines",0\n3,,1\n'
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"


def read(source, **kwargs) -> pd.DataFrame:
    return open_source(source, **kwargs).read().frame


def fails(source, match: str, **kwargs) -> str:
    with pytest.raises(IngestError, match=match) as caught:
        read(source, **kwargs)
    return str(caught.value)


def reviews_csv(rows: int, bad_rows: tuple[int, ...] = ()) -> bytes:
    """A UTF-8 CSV of ``rows`` reviews whose rows in ``bad_rows`` hold one latin-1 byte."""
    lines = [b"id,text,label"]
    for i in range(rows):
        text = "caf\xe9 review".encode("latin-1") if i in bad_rows else f"review {i}".encode()
        lines.append(b"%d,%s,%d" % (i, text, i % 2))
    return b"\n".join(lines) + b"\n"


# ---------------------------------------------------------------- files


def test_csv_keeps_values_as_text_with_quoted_newlines(tmp_path):
    (tmp_path / "d.csv").write_text(CSV)
    frame = read(tmp_path / "d.csv")
    assert list(frame.columns) == ["id", "text", "label"]
    assert all(dtype == "string" for dtype in frame.dtypes)
    assert frame["label"].tolist() == ["1", "0", "1"]
    assert frame["text"].tolist()[:2] == ["Great, really great", "Two\nlines"]
    assert pd.isna(frame["text"].iloc[2])


def test_the_strings_na_and_null_stay_values(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nNA,null\n")
    assert read(tmp_path / "d.csv").iloc[0].tolist() == ["NA", "null"]


def test_gzip_tsv_parquet_and_json_lines(tmp_path):
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(CSV.encode()))
    assert len(read(tmp_path / "d.csv.gz")) == 3
    (tmp_path / "d.tsv").write_text("text\tlabel\nfine, ok\tpos\n")
    assert read(tmp_path / "d.tsv").iloc[0].tolist() == ["fine, ok", "pos"]
    pd.DataFrame({"text": ["a", "b"], "label": pd.array([1, None], dtype="Int64")}).to_parquet(tmp_path / "d.parquet")
    parquet = read(tmp_path / "d.parquet")
    assert parquet["label"].iloc[0] == "1" and pd.isna(parquet["label"].iloc[1])  # not pandas' float "1.0"
    lines = [{"text": "a", "label": 1, "score": 0.50}, {"text": "b", "label": None, "tags": ["x"], "ok": True}, {}]
    (tmp_path / "d.ndjson.gz").write_bytes(gzip.compress("\n\n".join(map(json.dumps, lines)).encode()))
    jsonl = read(tmp_path / "d.ndjson.gz")
    assert list(jsonl.columns) == ["text", "label", "score", "tags", "ok"]
    assert jsonl.iloc[0, :3].tolist() == ["a", "1", "0.5"]
    assert jsonl["tags"].iloc[1] == '["x"]' and jsonl["ok"].iloc[1] == "true" and pd.isna(jsonl["label"].iloc[1])


def test_empty_strings_are_missing_in_every_format(tmp_path):
    pd.DataFrame({"text": ["", "a"]}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text('{"text": ""}\n{"text": "a"}\n')
    for name in ("d.parquet", "d.jsonl"):
        assert read(tmp_path / name)["text"].isna().tolist() == [True, False]


def test_a_ten_megabyte_review_is_read_whole(tmp_path):
    text = "word " * 2_000_000
    (tmp_path / "big.csv").write_text(f'text,label\n"{text}",1\nshort,0\n')
    frame = read(tmp_path / "big.csv")
    assert frame["text"].str.len().tolist() == [len(text), 5]


def test_a_directory_reads_its_data_files_recursively_in_path_order(tmp_path):
    root = tmp_path / "reviews"
    (root / "2024" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.csv").write_text("text,label\nb,1\n")
    (root / "a.jsonl").write_text('{"label": "0", "text": "a"}\n')
    (root / "2024" / "b" / "c.tsv").write_text("label\ttext\n1\tc\n")
    (root / "README.md").write_text("not data")
    (root / "_SUCCESS").write_text("")
    (root / ".hidden" / "x.csv").write_text("other\n1\n")
    source = open_source(root)
    assert isinstance(source, FileSource) and source.name == "reviews/" and source.uri == str(root.resolve())
    frame = source.read().frame
    # 2024/b/c.tsv, a.jsonl, b.csv; columns in the first file's order.
    assert frame.values.tolist() == [["1", "c"], ["0", "a"], ["1", "b"]]
    assert list(frame.columns) == ["label", "text"]


def test_a_glob_reads_the_files_it_matches(tmp_path, monkeypatch):
    (tmp_path / "reviews").mkdir()
    for name in ("a", "b"):
        (tmp_path / "reviews" / f"{name}.csv").write_text(f"text,label\n{name},1\n")
    (tmp_path / "reviews" / "c.tsv").write_text("text\tlabel\nc\t1\n")
    monkeypatch.chdir(tmp_path)
    source = open_source("reviews/*.csv")
    assert source.name == "reviews/*.csv" and source.uri == str(tmp_path / "reviews" / "*.csv")
    assert source.read().frame["text"].tolist() == ["a", "b"]
    fails("reviews/*.parquet", "matches no data files")


def test_files_with_other_columns_are_named(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("text,label\na,1\n")
    (tmp_path / "d" / "b.csv").write_text("text,sentiment\nb,1\n")
    message = fails(tmp_path / "d", "b.csv has other columns than")
    assert "missing label" in message and "extra sentiment" in message


# ---------------------------------------------------------------- aclImdb

IMDB = {
    ("train", "pos"): [(0, 9, "Great film"), (12, 7, "Fine<br /><br />fun")],
    ("train", "neg"): [(0, 2, "Awful, just awful")],
    ("test", "pos"): [(3, 10, "Loved it")],
    ("test", "neg"): [(1, 1, "Dull\nand slow")],
}


def build_imdb(root: Path) -> Path:
    tree = root / "aclImdb"
    for (split, label), reviews in IMDB.items():
        (tree / split / label).mkdir(parents=True)
        for number, rating, text in reviews:
            (tree / split / label / f"{number}_{rating}.txt").write_text(text)
    (tree / "train" / "unsup").mkdir()
    (tree / "train" / "unsup" / "0_0.txt").write_text("unlabeled")
    (tree / "train" / "urls_pos.txt").write_text("http://example.invalid/\n")
    (tree / "imdb.vocab").write_text("the\n")
    return tree


def build_tarball(root: Path) -> Path:
    tree = build_imdb(root / "src")
    path = root / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(tree, arcname="aclImdb")
    return path


EXPECTED_IMDB = [
    ["Dull\nand slow", "neg", "1", "test_neg_1", "test"],
    ["Loved it", "pos", "10", "test_pos_3", "test"],
    ["Awful, just awful", "neg", "2", "train_neg_0", "train"],
    ["Great film", "pos", "9", "train_pos_0", "train"],
    ["Fine<br /><br />fun", "pos", "7", "train_pos_12", "train"],
]


def test_an_aclimdb_directory_reads_its_labeled_reviews(tmp_path):
    tree = build_imdb(tmp_path)
    source = open_source(tree)
    assert isinstance(source, ImdbSource) and source.name == "aclImdb"
    frame = source.read().frame
    assert list(frame.columns) == list(IMDB_COLUMNS)
    assert frame.values.tolist() == EXPECTED_IMDB
    train = open_source(tree / "train")
    assert train.name == "aclImdb/train" and train.read().frame["split"].unique().tolist() == ["train"]


def test_the_aclimdb_tarball_streams_without_unpacking(tmp_path, monkeypatch):
    path = build_tarball(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the tarball must not be unpacked")

    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    source = open_source(path)
    assert isinstance(source, ImdbSource) and source.name == "aclImdb_v1.tar.gz"
    assert source.read().frame.values.tolist() == EXPECTED_IMDB


def test_a_truncated_or_foreign_tarball_fails_clearly(tmp_path):
    data = build_tarball(tmp_path).read_bytes()
    # Wherever the download stopped: in a member, or in the archive's zero padding after the last one (where
    # tarfile alone ends its member list without a word), or just before the gzip trailer.
    for cut in (len(data) // 4, len(data) // 2, len(data) * 3 // 4, len(data) - 20, len(data) - 1):
        (tmp_path / "cut.tar.gz").write_bytes(data[:cut])
        fails(tmp_path / "cut.tar.gz", "cut.tar.gz is truncated")
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as archive:
        archive.add(tmp_path / "src" / "aclImdb" / "imdb.vocab", arcname="imdb.vocab")
    fails(other, "holds no aclImdb reviews")


# ---------------------------------------------------------------- bad input


def test_missing_path_and_directory_without_data_files(tmp_path):
    fails(tmp_path / "missing.csv", "missing.csv does not exist; pass an existing data file")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", r"directory .*empty holds no data files .*it is empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    fails(tmp_path / "notes", r"holds no data files .*it holds a\.txt")


@pytest.mark.parametrize("name, hint", [("d.txt", "unsupported file type"), ("d.json", "named .jsonl")])
def test_unsupported_suffix(tmp_path, name, hint):
    (tmp_path / name).write_text("{}")
    fails(tmp_path / name, hint)


def test_empty_file_fails_and_header_only_gives_zero_rows(tmp_path):
    (tmp_path / "empty.csv").write_text("\n \n")
    fails(tmp_path / "empty.csv", "empty.csv is empty")
    (tmp_path / "empty.csv.gz").write_bytes(gzip.compress(b""))
    fails(tmp_path / "empty.csv.gz", "empty once decompressed")
    (tmp_path / "header.csv").write_text("text,label\n")
    frame = read(tmp_path / "header.csv")
    assert list(frame.columns) == ["text", "label"] and len(frame) == 0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("semi.csv", "text;label\nfine, really;1\n", r"looks ';'-separated, not comma-separated"),
        ("tabs.csv", "text\tlabel\nfine\t1\n", r"looks tab-separated.*name it \.tsv"),
        ("commas.tsv", "text,label\nfine,1\n", r"looks comma-separated.*name it \.csv"),
        ("ragged.csv", "text,label\nok,1\nnot, quoted,1\n", "line 3 has 3 fields where the header has 2"),
        ("quote.csv", 'text,label\n"never closed,1\n', "quoted field opened in row 1 is never closed"),
        ("first.csv", "text,label\na,b,c\n", "first row has more fields than the header's 2"),
        ("dup.csv", "text,text\na,b\n", "column.s. text appear more than once"),
        ("page.csv", "<!DOCTYPE html><html><body>Not found</body></html>\n", "HTML page"),
        ("lines.csv", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n', "this is JSON Lines.*name it .jsonl"),
        ("array.jsonl", '[{"text": "a"}]\n', "JSON array, not JSON Lines"),
        ("pretty.jsonl", '{\n  "text": "a"\n}\n', "line 1 is not a JSON object"),
        ("scalar.jsonl", '{"text": "a"}\n"b"\n', "line 2 is a JSON str, not an object"),
        ("text.parquet", "text,label\na,1\n", "is not a Parquet file"),
    ],
)
def test_malformed_files_say_what_is_wrong(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    fails(tmp_path / name, message)


def test_a_json_document_named_csv_is_named_and_never_echoed(tmp_path):
    document = json.dumps({"reviews": [{"text": "secret review " * 50, "label": i} for i in range(500)]}, indent=2)
    (tmp_path / "doc.csv").write_text(document)
    message = fails(tmp_path / "doc.csv", "this is JSON; .*name it .jsonl")
    assert "secret" not in message and len(message) < 300


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("zipped.csv", gzip.compress(CSV.encode()), r"this file is gzip-compressed; name it .*zipped\.csv\.gz"),
        ("image.csv", PNG, r"this file is binary \(PNG image\)"),
        ("nul.jsonl", b'{"a": 1}\x00\x00\x01', "binary"),
        ("utf16.csv", "text,label\na,1\n".encode("utf-16"), "UTF-16 text; re-save it as UTF-8"),
        ("table.csv", b"PAR1\x15\x04", "a Parquet file; name it .parquet"),
        ("plain.csv.gz", CSV.encode(), r"not gzip-compressed: name it .*plain\.csv"),
        ("cut.csv.gz", gzip.compress(CSV.encode() * 50)[:-20], "cut.csv.gz is truncated"),
    ],
)
def test_binary_and_misnamed_files_are_recognised(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    fails(tmp_path / name, message)


def test_a_latin1_file_is_refused_as_not_utf8(tmp_path):
    rows = "".join(f"{i},Caf\xe9 n\xb0{i},1\n" for i in range(50))
    (tmp_path / "latin1.csv").write_bytes(("id,text,label\n" + rows).encode("latin-1"))
    message = fails(tmp_path / "latin1.csv", r"latin1.csv is not UTF-8 \(byte 0xe9 at line 2; 50 of 51 lines")
    assert "re-save it as UTF-8" in message
    (tmp_path / "header.csv").write_bytes("caf\xe9,label\n".encode("latin-1") + b"ok,1\n" * 99)
    fails(tmp_path / "header.csv", "byte 0xe9 at line 1")


def test_a_few_undecodable_rows_are_marked_for_quarantine(tmp_path, caplog):
    (tmp_path / "few.csv.gz").write_bytes(gzip.compress(reviews_csv(100, bad_rows=(7, 40))))
    frame = read(tmp_path / "few.csv.gz")
    assert len(frame) == 100
    marked = frame.index[frame["text"].str.contains(UNDECODABLE, regex=False)].tolist()
    assert marked == [7, 40] and frame["text"].iloc[7] == f"caf{UNDECODABLE} review"
    assert "2 of 101 lines hold bytes that are not UTF-8 (first: byte 0xe9 at line 9)" in caplog.text


def test_more_undecodable_rows_than_the_quarantine_allows_are_refused(tmp_path):
    (tmp_path / "many.csv").write_bytes(reviews_csv(100, bad_rows=tuple(range(0, 100, 10))))
    fails(tmp_path / "many.csv", "not UTF-8 .*10 of 101 lines")


def test_an_undecodable_review_in_aclimdb_is_marked(tmp_path):
    tree = build_imdb(tmp_path)
    for i in range(30):
        (tree / "test" / "pos" / f"{100 + i}_8.txt").write_text(f"fine {i}")
    (tree / "test" / "pos" / "99_8.txt").write_bytes("caf\xe9".encode("latin-1"))
    frame = read(tree)
    assert frame.loc[frame["id"] == "test_pos_99", "text"].tolist() == [f"caf{UNDECODABLE}"]


def test_watermark_and_query_apply_to_postgresql_only(tmp_path):
    (tmp_path / "d.csv").write_text(CSV)
    fails(tmp_path / "d.csv", "watermark_col applies to PostgreSQL sources only", watermark_col="id")
    fails("s3://bucket/p", "table_query applies to PostgreSQL sources only", table_query="SELECT 1")


# ---------------------------------------------------------------- S3


@pytest.fixture
def s3(s3_env):
    """The MAAS_* settings of a fresh bucket, a minio client on it and the bucket's name."""
    from minio import Minio

    settings = load_settings(s3_env)
    bucket = settings.store_url.removeprefix("s3://")
    client = Minio(
        settings.s3_endpoint.removeprefix("http://"), access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key, secure=False, region=settings.s3_region,
    )
    return settings, client, bucket


def put(client, bucket: str, name: str, data: bytes, **kwargs) -> None:
    client.put_object(bucket, name, io.BytesIO(data), len(data), **kwargs)


def test_an_s3_prefix_reads_every_data_file_under_it(s3):
    settings, client, bucket = s3
    put(client, bucket, "reviews/a.csv", b"text,label\na,1\n")
    put(client, bucket, "reviews/2024/b.jsonl.gz", gzip.compress(b'{"text": "b", "label": "0"}\n'))
    put(client, bucket, "reviews/notes.md", b"not data")
    put(client, bucket, "reviews-old/c.csv", b"text,label\nold,1\n")
    source = open_source(f"s3://{bucket}/reviews/", settings=settings)
    assert isinstance(source, S3Source) and source.uri == f"s3://{bucket}/reviews"
    assert source.read().frame.values.tolist() == [["b", "0"], ["a", "1"]]
    assert read(f"s3://{bucket}/reviews/a.csv", settings=settings)["text"].tolist() == ["a"]


def test_the_aclimdb_tarball_streams_from_s3(s3, tmp_path):
    settings, client, bucket = s3
    put(client, bucket, "raw/aclImdb_v1.tar.gz", build_tarball(tmp_path).read_bytes())
    assert read(f"s3://{bucket}/raw/aclImdb_v1.tar.gz", settings=settings).values.tolist() == EXPECTED_IMDB


def test_s3_failures_name_the_object(s3):
    settings, client, bucket = s3
    fails(f"s3://{bucket}/nothing", rf"s3://{bucket}/nothing holds no data files .*it is empty", settings=settings)
    put(client, bucket, "cold/a.csv", b"text,label\na,1\n", metadata={"x-amz-storage-class": "GLACIER"})
    fails(f"s3://{bucket}/cold", rf"cannot read s3://{bucket}/cold/a.csv: InvalidObjectState", settings=settings)
    put(client, bucket, "img/a.csv", PNG)
    fails(f"s3://{bucket}/img", rf"s3://{bucket}/img/a.csv is not CSV: this file is binary", settings=settings)
    fails("s3://no-such-bucket-maas/x", "bucket 'no-such-bucket-maas' does not exist", settings=settings)
    fails(f"s3://{bucket}/x", "needs MAAS_S3_ENDPOINT", settings=load_settings({}))


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_url(pg_dsn):
    """The test database as a postgresql:// URL (with its password), holding a small reviews table."""
    info = psycopg2.extensions.parse_dsn(pg_dsn)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        # Timestamps read as text in UTC, whatever the machine's zone.
        cur.execute(psycopg2.sql.SQL("ALTER DATABASE {} SET timezone = 'UTC'").format(psycopg2.sql.Identifier(info["dbname"])))
        cur.execute(
            "CREATE TABLE reviews (id integer, body text, label text, at timestamptz, score numeric);"
            "INSERT INTO reviews VALUES (9, 'fine', 'pos', '2024-01-02 10:00+00', 0.5),"
            " (10, 'bad', 'neg', '2024-01-01 10:00+00', NULL), (NULL, '', 'pos', NULL, 2)"
        )
    conn.close()
    return f"postgresql://{info['user']}:{info['password']}@{info['host']}:{info['port']}/{info['dbname']}", info


def test_a_postgresql_table_reads_as_text(pg_url):
    url, info = pg_url
    source = open_source(f"{url}?table=reviews")
    assert isinstance(source, PostgresSource) and source.name == "table reviews"
    assert source.uri == f"postgresql://{info['user']}@{info['host']}:{info['port']}/{info['dbname']}?table=reviews"
    frame = source.read().frame.sort_values("label", kind="stable")
    assert list(frame.columns) == ["id", "body", "label", "at", "score"]
    assert all(dtype == "string" for dtype in frame.dtypes)
    assert frame.iloc[0].tolist() == ["10", "bad", "neg", "2024-01-01 10:00:00+00", pd.NA]
    assert pd.isna(frame["body"]).sum() == 1  # the empty text is missing, as in a CSV


def test_a_watermark_read_compares_on_the_column_type(pg_url):
    url, _ = pg_url
    by_id = open_source(f"{url}?table=reviews", watermark_col="id")
    batch = by_id.read()
    assert batch.frame["id"].tolist() == ["9", "10"] and batch.watermark == ("id", "10")  # NULL watermarks skipped
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO reviews VALUES (11, 'new', 'pos', '2024-01-03 10:00+00', 1), (2, 'old', 'neg', NULL, 1)")
    conn.close()
    # As text "2" > "10"; as integers only 11 is past the watermark.
    assert dataclasses.replace(by_id, after="10").read().frame["id"].tolist() == ["11"]
    query = "SELECT at, body FROM reviews WHERE label LIKE 'p%';"  # its own % is no placeholder
    by_time = open_source(url, table_query=query, watermark_col="at")
    assert by_time.name.startswith("query ") and "?query=" in by_time.uri
    # As text "2024-01-02 10:30:00+01" > "2024-01-02 10:00:00+00"; as timestamps it is half an hour earlier.
    batch = dataclasses.replace(by_time, after="2024-01-02 10:30:00+01").read()
    assert batch.frame["body"].tolist() == ["fine", "new"] and batch.watermark == ("at", "2024-01-03 10:00:00+00")


def test_postgresql_failures_name_the_table_and_never_the_password(pg_url):
    url, info = pg_url
    message = fails(f"{url}?table=public.nope", r"table public\.nope does not exist in postgresql://")
    assert info["password"] not in message
    fails(f"{url}?table=reviews", "has no watermark column 'updated'; its columns: id, body", watermark_col="updated")
    message = fails(url, "failed: .*syntax error", table_query="SELEC nothing")
    assert info["password"] not in message
    fails(url, "name exactly one of a table")
    fails(f"{url}?table=reviews", "name exactly one of a table", table_query="SELECT 1")
    source = open_source(f"{url}?table=reviews")
    assert info["password"] not in source.uri + source.name


def test_check_source_makes_local_sources_absolute_and_reads_nothing(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_bytes(PNG)  # only read by ingest
    monkeypatch.chdir(tmp_path)
    assert check_source("d.csv") == str(tmp_path / "d.csv")
    assert check_source("*.csv") == str(tmp_path / "*.csv")
    assert check_source("s3://bucket/reviews/") == "s3://bucket/reviews/"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(IngestError, match="unsupported file type"):
        check_source("notes.txt")
