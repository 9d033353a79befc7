"""Tests of text cleaning and label normalisation."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from maas_tasks.clean import clean_frame, clean_snapshot, clean_text, normalize_label
from tests.maas_tasks.conftest import put_parquet


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Great film.<br /><br />Loved it", "Great film. Loved it"),
        ("<i>so</i> <b>good</b>", "so good"),
        ("Tom &amp; Jerry &quot;rock&quot; &#39;n&#39; roll &lt;3", "Tom & Jerry \"rock\" 'n' roll <3"),
        ("  lots \t of\n\n  space  ", "lots of space"),
        ("<br />", ""),
        ("a<br/>b", "a b"),
    ],
)
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


def test_entity_escaped_tags_are_kept_as_text():
    # "&lt;br /&gt;" is literal text the author typed, not markup of the page.
    assert clean_text("see &lt;br /&gt; here") == "see <br /> here"


@pytest.mark.parametrize(("value", "expected"), [(1, "1"), (0.0, "0"), (True, "1"), (" pos ", "pos"), (2.5, "2.5")])
def test_normalize_label(value, expected):
    assert normalize_label(value) == expected


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


def test_clean_snapshot_writes_a_content_keyed_table(file_store):
    df = pd.DataFrame({"text": ["good <b>one</b>", " ", "bad"], "label": [1, 0, 0]})
    snapshot = put_parquet(file_store, "snapshots/a/data.parquet", df)
    first = clean_snapshot(file_store, snapshot, text_col="text", label_col="label")
    assert first["rows"] == 2 and first["dropped"] == 1
    assert first["key"].startswith("cleaned/") and first["key"].endswith("/data.parquet")
    stored = pd.read_parquet(io.BytesIO(file_store.get_bytes(first["key"])))
    assert stored["text"].tolist() == ["good one", "bad"]
    assert stored["label"].tolist() == ["1", "0"]
    # Same input and arguments -> same key; other arguments -> another key.
    assert clean_snapshot(file_store, snapshot, text_col="text", label_col="label") == first
    other = clean_snapshot(file_store, snapshot, text_col="text", label_col="label", group_col="label")
    assert other["key"] != first["key"]


def test_clean_snapshot_with_nothing_left_fails_clearly(file_store):
    snapshot = put_parquet(file_store, "snapshots/b/data.parquet", pd.DataFrame({"text": ["<br />"], "label": ["x"]}))
    with pytest.raises(ValueError, match="no row has both a label and non-empty text"):
        clean_snapshot(file_store, snapshot, text_col="text", label_col="label")
