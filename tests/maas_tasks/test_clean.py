"""Tests of text cleaning, label normalisation and mapping, de-duplication, quarantine and the cleaned table."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from maas_tasks.clean import (
    clean_batches,
    clean_frame,
    clean_snapshot,
    clean_snapshots,
    clean_text,
    clean_texts,
    normalize_label,
    normalize_labels,
    snapshot_batch,
    training_batches,
)
from maas_tasks.sample_data import generate_reviews
from tests.maas_tasks.conftest import put_parquet


def _read(store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Great film.<br /><br />Loved it", "Great film. Loved it"),
        ("<i>so</i> <b>good</b>", "so good"),
        ("Tom &amp; Jerry &quot;rock&quot; &#39;n&#39; roll &lt;3", "Tom & Jerry \"rock\" 'n' roll <3"),
        ("  lots \t of\n\n  space  ", "lots of space"),
        ("<br />", ""),
        ("a<br/>b", "a b"),
        ("I <3 it, 2 < 3", "I <3 it, 2 < 3"),  # a lone "<" is no tag
        # NFKC: ligatures, full-width letters and digits, non-breaking and other Unicode spaces.
        ("ﬁne ＦＩＬＭ №１", "fine FILM No1"),
        ("a\u00a0\u00a0b\u2028c\u3000d\x85e", "a b c d e"),
        ("a&nbsp;&nbsp;b &amp;&amp; c", "a b && c"),
        ("Très bien, ça m'a plu ! 👍", "Très bien, ça m'a plu ! 👍"),
    ],
)
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


def test_entity_escaped_tags_are_kept_as_text():
    # "&lt;br /&gt;" is literal text the author typed, not markup of the page.
    assert clean_text("see &lt;br /&gt; here") == "see <br /> here"


def test_clean_texts_cleans_a_column_like_clean_text_and_keeps_its_index():
    texts = pd.Series(["<b>x</b>  y", None, "caf\u0065\u0301 &amp; more", "plain"], index=[5, 6, 7, 8])
    out = clean_texts(texts)
    assert out.index.tolist() == [5, 6, 7, 8]
    assert out.tolist() == ["x y", "", "café & more", "plain"]
    assert out.tolist()[2] == "caf\u00e9 & more"  # composed by NFKC


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, "1"), (0.0, "0"), (True, "1"), (" pos ", "pos"), (2.5, "2.5"), ("1.0", "1"), ("-2.00", "-2"),
     ("1.5", "1.5"), ("01", "01"), ("1.0.0", "1.0.0")],
)
def test_normalize_label(value, expected):
    assert normalize_label(value) == expected


@pytest.mark.parametrize(
    "values",
    [pd.Series([" 1.0", "0", None, "pos ", "2.50"], dtype="string"), pd.Series([1.0, 0.0, None, 2.5]),
     pd.Series([True, False]), pd.Series(["x", 3, None], dtype=object)],
)
def test_normalize_labels_matches_normalize_label_for_every_dtype(values):
    out = normalize_labels(values)
    assert [v for v in out if not pd.isna(v)] == [normalize_label(v) for v in values if not pd.isna(v)]
    assert out.isna().tolist() == values.isna().tolist()


def test_clean_frame_normalises_columns_and_drops_empty_texts():
    df = pd.DataFrame(
        {
            "review": ["Good<br />film", "<br /><br />", None, "Bad", "Fine"],
            "sentiment": [1, 0, 1, 0, None],
            "movie": [7, 7, 8, 9, 9],
            "extra": list("abcde"),
        }
    )
    out = clean_frame(df, text_col="review", label_col="sentiment", group_col="movie")
    assert list(out.columns) == ["text", "label", "group"]
    assert out.to_dict("records") == [
        {"text": "Good film", "label": "1", "group": "7"},
        {"text": "Bad", "label": "0", "group": "9"},
    ]


def test_clean_frame_keeps_slice_columns_as_strings():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 0, 1], "genre": ["drama", None, 3.0]})
    out = clean_frame(df, text_col="text", label_col="label", slice_cols=["genre"])
    assert list(out.columns) == ["text", "label", "slice:genre"]
    assert out["slice:genre"].tolist() == ["drama", "", "3"]
    with pytest.raises(ValueError, match="slice_col 'year' is not a column of the table; it has: text, label, genre"):
        clean_frame(df, text_col="text", label_col="label", slice_cols=["year"])


def test_clean_frame_without_group_and_missing_column():
    df = pd.DataFrame({"text": ["a"], "label": ["x"]})
    assert list(clean_frame(df, text_col="text", label_col="label").columns) == ["text", "label"]
    with pytest.raises(ValueError, match="group_col 'movie' is not a column of the table; it has: text, label"):
        clean_frame(df, text_col="text", label_col="label", group_col="movie")


def test_label_map_names_the_classes_and_refuses_unknown_labels():
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["0", "1", "1.0", " 0 "], "id": [1, 2, 3, 4]})
    out = clean_frame(df, text_col="text", label_col="label", id_col="id", label_map={0: "negative", "1": "positive"})
    assert out["label"].tolist() == ["negative", "positive", "positive", "negative"]
    assert out["id"].tolist() == ["1", "2", "3", "4"]
    three = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "z"]})
    named = clean_frame(three, text_col="text", label_col="label", label_map={"x": "ham", "y": "spam", "z": "eggs"})
    assert named["label"].tolist() == ["ham", "spam", "eggs"]
    with pytest.raises(ValueError, match=r"label value\(s\) '2' \(2 rows\) are not in the label map \(0=negative, "
                                         r"1=positive\); add them to the map"):
        clean_frame(pd.DataFrame({"text": ["a", "b", "c"], "label": ["2", "2", "1"]}), text_col="text",
                    label_col="label", label_map={"0": "negative", "1": "positive"})


def test_duplicates_keep_the_first_copy_and_conflicting_copies_are_all_dropped():
    df = pd.DataFrame({
        "text": ["Great  film", "Great film<br />", "Great film", "so-so", "so-so", "so-so", "fine"],
        "label": ["pos", "pos", "pos", "pos", "neg", "meh", "pos"],
        "movie": ["m1", "m2", "m3", "m1", "m2", "m3", "m4"],
    })
    out = clean_frame(df, text_col="text", label_col="label", group_col="movie")
    assert out.to_dict("records") == [
        {"text": "Great film", "label": "pos", "group": "m1"},
        {"text": "fine", "label": "pos", "group": "m4"},
    ]


def test_clean_snapshots_quarantines_with_reasons_and_drops_validation_quarantine(file_store):
    first = generate_reviews(60, seed=1)
    first.loc[3, "text"] = "<br /> &nbsp; "
    first.loc[4, "label"] = None
    first.loc[5, "text"] = None
    first.loc[8, "text"] = first.loc[7, "text"]  # a copy that agrees: dropped, not quarantined
    first.loc[8, "label"] = first.loc[7, "label"]
    second = generate_reviews(40, seed=2)
    flipped = {"positive": "negative", "negative": "positive"}[first.loc[10, "label"]]
    second.loc[0, ["text", "label"]] = [first.loc[10, "text"], flipped]  # a conflict across batches
    put_parquet(file_store, "snapshots/a/data.parquet", first)
    put_parquet(file_store, "snapshots/b/data.parquet", second)
    put_parquet(file_store, "quarantine/a/rows.parquet", pd.DataFrame({"row": [20, 21], "reason": ["bad", "bad"]}))
    batches = [
        {"key": "snapshots/a/data.parquet", "quarantine_key": "quarantine/a/rows.parquet", "sha256": "a" * 64},
        {"key": "snapshots/b/data.parquet", "quarantine_key": None, "sha256": "b" * 64},
    ]
    result = clean_snapshots(file_store, batches, text_col="text", label_col="label", group_col="movie_id",
                             id_col="review_id")
    assert result["removed"] == {"validation_quarantine": 2, "conflicting_labels": 2, "duplicate": 1,
                                 "empty_text": 1, "missing_label": 1, "missing_text": 1}
    assert result["rows"] == 100 - 8 and result["dropped"] == 8 and result["quarantined"] == 5
    assert sum(result["splits"].values()) == result["rows"] and min(result["splits"].values()) > 0

    cleaned = _read(file_store, result["key"])
    assert list(cleaned.columns) == ["text", "label", "split", "group", "id"]
    assert set(cleaned["split"]) == {"train", "validation", "test"}
    assert cleaned["text"].is_unique and first.loc[10, "text"] not in set(cleaned["text"])
    assert not {"r00021", "r00022"} & set(cleaned["id"][: len(first)])  # validation's quarantine is gone

    quarantine = _read(file_store, result["quarantine_key"])
    assert list(quarantine.columns) == ["row", "reason", "snapshot_sha256", "text", "label"]
    by_row = {(r.snapshot_sha256[0], r.row): r.reason for r in quarantine.itertuples()}
    assert by_row[("a", 3)].startswith("text is empty after cleaning")
    assert by_row[("a", 4)] == "label is missing" and by_row[("a", 5)] == "text is missing"
    assert by_row[("a", 10)] == by_row[("b", 0)] == "the same text appears with conflicting labels (negative, positive)"
    assert quarantine.loc[quarantine["row"] == 3, "text"].item() == "<br /> &nbsp; "  # as in the source

    assert clean_snapshots(file_store, batches, text_col="text", label_col="label", group_col="movie_id",
                           id_col="review_id") == result
    assert clean_snapshots(file_store, batches, text_col="text", label_col="label")["key"] != result["key"]


def test_splits_stay_put_when_a_batch_is_added(file_store):
    first = generate_reviews(300, seed=3)
    second = generate_reviews(200, seed=4).assign(review_id=lambda d: "b" + d["review_id"])  # ids of its own
    put_parquet(file_store, "snapshots/1/data.parquet", first)
    put_parquet(file_store, "snapshots/2/data.parquet", second)
    one = {"key": "snapshots/1/data.parquet", "quarantine_key": None}
    two = {"key": "snapshots/2/data.parquet", "quarantine_key": None}
    for unit in ({"group_col": "movie_id"}, {"id_col": "review_id"}, {}):
        before = _read(file_store, clean_snapshots(file_store, [one], text_col="text", label_col="label",
                                                   **unit)["key"])
        after = _read(file_store, clean_snapshots(file_store, [one, two], text_col="text", label_col="label",
                                                  **unit)["key"])
        assert len(after) > len(before)
        assert after.head(len(before))["split"].tolist() == before["split"].tolist(), unit


def test_the_sample_data_gets_every_split_and_whole_movies(file_store):
    from maas_tasks.sample_data import SAMPLE_CSV

    put_parquet(file_store, "snapshots/s/data.parquet", pd.read_csv(SAMPLE_CSV, dtype="string"))
    result = clean_snapshot(file_store, "snapshots/s/data.parquet", text_col="text", label_col="label",
                            group_col="movie_id")
    cleaned = _read(file_store, result["key"])
    assert all(n >= 20 for n in result["splits"].values()), result["splits"]
    assert cleaned.groupby("group")["split"].nunique().max() == 1
    for split in ("train", "test"):
        assert set(cleaned.loc[cleaned["split"] == split, "label"]) == {"negative", "positive"}


def test_clean_snapshot_writes_a_content_keyed_table(file_store):
    df = pd.DataFrame({"text": ["good <b>one</b>", " ", "bad", "fine", "awful", "nice", "poor"],
                       "label": [1, 0, 0, 1, 0, 1, 0]})
    snapshot = put_parquet(file_store, "snapshots/a/data.parquet", df)
    first = clean_snapshot(file_store, snapshot, text_col="text", label_col="label")
    assert first["rows"] == 6 and first["dropped"] == 1 and first["quarantined"] == 1
    assert first["key"].startswith("cleaned/") and first["key"].endswith("/data.parquet")
    stored = _read(file_store, first["key"])
    assert stored["text"].tolist() == ["good one", "bad", "fine", "awful", "nice", "poor"]
    assert stored["label"].tolist() == ["1", "0", "1", "0", "1", "0"]
    # Same input and arguments -> same key; other arguments -> another key.
    assert clean_snapshot(file_store, snapshot, text_col="text", label_col="label") == first
    other = clean_snapshot(file_store, snapshot, text_col="text", label_col="label", test_fraction=0.3)
    assert other["key"] != first["key"]


def test_clean_snapshot_errors_say_what_to_do(file_store):
    snapshot = put_parquet(file_store, "snapshots/b/data.parquet", pd.DataFrame({"text": ["<br />"], "label": ["x"]}))
    with pytest.raises(ValueError, match="no row has both a label and non-empty text"):
        clean_snapshot(file_store, snapshot, text_col="text", label_col="label")
    with pytest.raises(ValueError, match=r"reviews.csv: column\(s\) 'review' are not in the table; it has: text, "
                                         "label"):
        clean_snapshots(file_store, [{"key": snapshot, "quarantine_key": None, "source": "reviews.csv"}],
                        text_col="review", label_col="label")
    # 50 classes of 3 rows: some class has no row in train, and the message says what to change.
    many = pd.DataFrame({"text": [f"text {i}" for i in range(150)], "label": [f"c{i % 50:02d}" for i in range(150)]})
    crowded = put_parquet(file_store, "snapshots/c/data.parquet", many)
    with pytest.raises(ValueError) as caught:
        clean_snapshots(file_store, [{"key": crowded, "quarantine_key": None, "source": "classes.csv"}],
                        text_col="text", label_col="label")
    message = str(caught.value)
    assert message.startswith("classes.csv: ") and "have no row in the train split" in message
    assert "add rows of these classes" in message and "seed" not in message and "snapshots/" not in message


def test_registry_snapshots_become_batches(file_store, pg_dsn):
    from maas_tasks.registry import Registry
    from maas_tasks.storage import store_key

    with Registry.connect(pg_dsn) as registry:
        whole = registry.record_snapshot(file_store.uri("snapshots/x/data.parquet"), "f" * 64, 10, "a.csv",
                                         source_uri="/data/a.csv")
        registry.set_snapshot_reports(whole, quarantine_uri=file_store.uri("quarantine/x/rows.parquet"))
        assert snapshot_batch(file_store, registry.get_snapshot(whole)) == {
            "key": "snapshots/x/data.parquet", "quarantine_key": "quarantine/x/rows.parquet",
            "sha256": "f" * 64, "source": "a.csv"}
        with pytest.raises(ValueError, match="is not in the configured store"):
            store_key(file_store, "s3://elsewhere/snapshots/x/data.parquet")
        table = "postgresql://u@db:5432/shop?table=reviews"
        batches = [registry.record_snapshot(file_store.uri(f"snapshots/{i}/data.parquet"), str(i) * 64, 5, "reviews",
                                            source_uri=table, watermark=("id", str(i * 10))) for i in (1, 2, 3)]

        # A whole-file snapshot is trained on alone; a watermarked source on its batches (or the newest few).
        assert [b["key"] for b in training_batches(file_store, registry, {"snapshot_id": whole})] == [
            "snapshots/x/data.parquet"]
        keys = [b["key"] for b in training_batches(file_store, registry, {"snapshot_id": batches[-1]})]
        assert keys == [f"snapshots/{i}/data.parquet" for i in (1, 2, 3)]
        assert [b["key"] for b in training_batches(file_store, registry, {"snapshot_id": batches[-1]}, window=2)] == keys[1:]


def test_clean_batches_cleans_without_splitting_or_writing(file_store):
    put_parquet(file_store, "snapshots/d/data.parquet", pd.DataFrame({"t": ["a<br>b", "", "c"], "y": ["1", "0", "2"]}))
    put_parquet(file_store, "quarantine/d/rows.parquet", pd.DataFrame({"row": [2], "reason": ["label 2"]}))
    batch = {"key": "snapshots/d/data.parquet", "quarantine_key": "quarantine/d/rows.parquet"}
    out = clean_batches(file_store, [batch], text_col="t", label_col="y", label_map={"0": "no", "1": "yes"})
    assert out.to_dict("records") == [{"text": "a b", "label": "yes"}]
    assert file_store.list_keys("cleaned") == []
