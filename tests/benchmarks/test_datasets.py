"""Tests of the scaling benchmark's data: deterministic subsamples and synthetic rows built only from the
input's sentences, written in the input's format."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.datasets import (
    data_suffix,
    prepare_size,
    read_reviews,
    split_sentences,
    subsample_reviews,
    synthesize_reviews,
    write_reviews,
)


def make_reviews() -> pd.DataFrame:
    """Six movies, two labels in a 2:1 share, each text two or three sentences naming its movie and label."""
    rows = []
    for i in range(30):
        movie, label = f"m{i % 6}", "pos" if i % 3 else "neg"
        sentences = [f"Review {i} of {movie} is {label}.", f"Line two of {i}!", f"And {movie} {label} {i}?"][: 2 + i % 2]
        rows.append({"review_id": f"r{i}", "movie_id": movie, "label": label, "text": " ".join(sentences)})
    return pd.DataFrame(rows).astype("string")


def test_sentences_split_at_end_marks_and_html_breaks():
    assert split_sentences("Good. Really good! Why?<br /><br />Because") == ["Good.", "Really good!", "Why?", "Because"]
    assert split_sentences("no end mark") == ["no end mark"]


def test_synthetic_rows_are_deterministic_balanced_and_made_of_the_inputs_sentences():
    df = make_reviews()
    out = synthesize_reviews(df, 100, seed=7)
    assert len(out) == 100 and list(out.columns) == list(df.columns)
    assert out["label"].value_counts().to_dict() == {"pos": 67, "neg": 33}  # the input's 2:1, rounded
    assert out.equals(synthesize_reviews(df, 100, seed=7))
    assert not out["text"].equals(synthesize_reviews(df, 100, seed=8)["text"])
    assert out["review_id"].is_unique and out["review_id"].str.startswith("synthetic-").all()
    # Every sentence comes from an input review of the same movie and label, so the split (by movie)
    # never puts one sentence on both sides.
    source = {(m, lab): set() for m, lab in zip(df["movie_id"], df["label"])}
    for movie, label, text in zip(df["movie_id"], df["label"], df["text"]):
        source[(movie, label)].update(split_sentences(text))
    for movie, label, text in zip(out["movie_id"], out["label"], out["text"]):
        assert set(split_sentences(text)) <= source[(movie, label)]


def test_synthetic_rows_skip_unlabeled_and_empty_rows():
    df = pd.DataFrame({"label": ["a", None, "b", "a"], "text": ["One. Two.", "Lost.", "  ", "Three."]}).astype("string")
    out = synthesize_reviews(df, 10, seed=0, group_col=None, id_col=None)
    assert set(out["label"]) == {"a"} and set(" ".join(out["text"]).split()) <= {"One.", "Two.", "Three."}
    with pytest.raises(ValueError, match="cannot build"):
        synthesize_reviews(df.iloc[[1, 2]], 10, seed=0, group_col=None, id_col=None)


def test_subsample_is_deterministic_and_in_file_order():
    df = make_reviews()
    part = subsample_reviews(df, 10, seed=3)
    assert len(part) == 10 and part.equals(subsample_reviews(df, 10, seed=3))
    order = [int(r[1:]) for r in part["review_id"]]
    assert order == sorted(order) and set(part["review_id"]) <= set(df["review_id"])
    with pytest.raises(ValueError):
        subsample_reviews(df, 31, seed=3)


def test_each_size_is_the_file_a_subsample_or_synthetic_in_the_files_format(tmp_path):
    df = make_reviews()
    source = write_reviews(df, tmp_path / "reviews.csv.gz")
    assert read_reviews(source).equals(df)
    assert prepare_size(df, source, 30, tmp_path / "w", seed=0) == {"path": source, "rows": 30, "synthetic": False}
    smaller = prepare_size(df, source, 12, tmp_path / "w", seed=0)
    larger = prepare_size(df, source, 50, tmp_path / "w", seed=0)
    assert smaller["synthetic"] is False and larger["synthetic"] is True
    assert smaller["path"].name == "reviews-12.csv.gz" and len(read_reviews(smaller["path"])) == 12
    assert len(read_reviews(larger["path"])) == 50
    assert data_suffix(tmp_path / "x.TSV") == ".tsv" and data_suffix(tmp_path / "x.jsonl") == ".csv.gz"
