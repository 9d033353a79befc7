"""Tests of the review generator and of the committed demo CSV."""

from __future__ import annotations

import pandas as pd
import pytest

from maas_tasks.sample_data import SAMPLE_CSV, SAMPLE_ROWS, SAMPLE_SEED, generate_reviews, main, sample_data_path
from tests.maas_tasks.conftest import put_parquet


def test_generation_is_deterministic_per_seed():
    first = generate_reviews(50, seed=1)
    pd.testing.assert_frame_equal(first, generate_reviews(50, seed=1))
    assert not first["text"].equals(generate_reviews(50, seed=2)["text"])


def test_generated_frame_looks_like_raw_reviews():
    df = generate_reviews(300, seed=4)
    assert list(df.columns) == ["review_id", "movie_id", "text", "label"]
    assert df["review_id"].is_unique
    assert set(df["label"]) == {"positive", "negative"}
    assert abs((df["label"] == "positive").mean() - 0.5) < 0.1
    assert 20 <= df["movie_id"].nunique() <= 40  # several reviews per movie, for group splits
    text = df["text"]
    assert text.str.contains("<br />").mean() > 0.2
    assert text.str.contains("&#39;|&amp;|&quot;").any()
    assert text.str.contains(r"\bnot\b|\bnever\b").mean() > 0.1
    assert text.str.len().min() > 20


def test_labels_are_noisy_but_informative():
    df = generate_reviews(2000, seed=9)
    # "Highly recommended." only comes from positive templates, so its negative labels are the noise.
    praise = df.loc[df["text"].str.contains("Highly recommended"), "label"]
    assert len(praise) > 100
    assert 0.01 < (praise == "negative").mean() < 0.12


def test_committed_csv_matches_the_generator(tmp_path):
    assert sample_data_path() == SAMPLE_CSV and SAMPLE_CSV.is_file()
    committed = pd.read_csv(SAMPLE_CSV)
    assert len(committed) == SAMPLE_ROWS
    pd.testing.assert_frame_equal(committed, generate_reviews(SAMPLE_ROWS, seed=SAMPLE_SEED))
    out = tmp_path / "reviews.csv"
    main(["--out", str(out), "--rows", "12", "--seed", "3"])
    pd.testing.assert_frame_equal(pd.read_csv(out), generate_reviews(12, seed=3))


def test_rejects_no_rows():
    with pytest.raises(ValueError, match="at least one"):
        generate_reviews(0, seed=1)


@pytest.mark.slow
def test_demo_csv_trains_a_model_well_above_chance(file_store):
    from maas_tasks.clean import clean_snapshot
    from maas_tasks.evaluate import evaluate_model
    from maas_tasks.features import build_features
    from maas_tasks.train import train_model
    from maas_tasks.validate import validate_snapshot

    snapshot = put_parquet(file_store, "snapshots/demo/data.parquet", pd.read_csv(SAMPLE_CSV))
    validate_snapshot(file_store, snapshot, text_col="text", label_col="label",
                      label_map={"negative": "negative", "positive": "positive"})
    cleaned = clean_snapshot(file_store, snapshot, text_col="text", label_col="label", group_col="movie_id")
    features = build_features(file_store, cleaned["key"])
    trained = train_model(file_store, features["key"], device="cpu")
    metrics = evaluate_model(file_store, trained["key"], features["key"])
    assert metrics["accuracy"] > 0.75
    assert trained["train_seconds"] < 30
