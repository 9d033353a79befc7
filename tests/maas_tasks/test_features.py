"""Tests of the group-aware split and the TF-IDF vectorizer fit."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from maas_tasks.clean import clean_frame
from maas_tasks.features import build_features, fit_vectorizer, split_frame
from maas_tasks.sample_data import generate_reviews
from tests.maas_tasks.conftest import put_parquet


@pytest.fixture(scope="module")
def cleaned() -> pd.DataFrame:
    return clean_frame(generate_reviews(200, seed=11), text_col="text", label_col="label", group_col="movie_id")


def test_split_is_deterministic_and_keeps_groups_whole(cleaned):
    train_a, eval_a = split_frame(cleaned, eval_fraction=0.25, seed=3)
    train_b, eval_b = split_frame(cleaned, eval_fraction=0.25, seed=3)
    pd.testing.assert_frame_equal(train_a, train_b)
    pd.testing.assert_frame_equal(eval_a, eval_b)
    assert set(train_a["group"]).isdisjoint(eval_a["group"])
    assert len(train_a) + len(eval_a) == len(cleaned)
    assert 0.2 <= len(eval_a) / len(cleaned) <= 0.4
    assert set(train_a["label"]) == set(cleaned["label"])
    _, eval_other = split_frame(cleaned, eval_fraction=0.25, seed=4)
    assert set(eval_other["group"]) != set(eval_a["group"])


def test_split_without_groups_keeps_duplicate_texts_together():
    df = pd.DataFrame({"text": ["same", "same", "a", "b", "c", "d"], "label": ["x", "x", "y", "x", "y", "y"]})
    train, evaluation = split_frame(df, eval_fraction=0.3)
    assert set(train["text"]).isdisjoint(evaluation["text"])
    assert len(train) and len(evaluation)


def test_split_errors_on_too_little_data():
    one_group = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "group": ["g", "g"]})
    with pytest.raises(ValueError, match="1 distinct 'group' value"):
        split_frame(one_group)
    # With two groups the class held by the eval group alone would be missing from train.
    lonely = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "y"], "group": ["g1", "g1", "g2"]})
    with pytest.raises(ValueError, match="train side has no rows of class"):
        for seed in range(20):  # some seed puts g2 on the eval side
            split_frame(lonely, eval_fraction=0.5, seed=seed)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_frame(lonely, eval_fraction=1.0)


def test_fit_vectorizer_vocabulary_and_idf():
    vec = fit_vectorizer(["good film", "bad film", "not good"], max_tokens=50, ngrams=2)
    assert "[UNK]" not in vec["vocabulary"]
    assert {"good", "film", "not good", "good film"} <= set(vec["vocabulary"])
    assert len(vec["idf_weights"]) == len(vec["vocabulary"])
    idf = dict(zip(vec["vocabulary"], vec["idf_weights"]))
    assert idf["film"] < idf["bad"]  # in 2 documents vs 1: rarer terms weigh more
    assert np.isclose(idf["bad"], np.log(1 + 3 / 2))  # Keras's idf: log(1 + docs / (1 + docs with term))
    assert vec["ngrams"] == 2 and vec["max_tokens"] == 50


def test_fit_vectorizer_respects_max_tokens():
    vec = fit_vectorizer([f"word{i} word{i + 1}" for i in range(40)], max_tokens=10, ngrams=1)
    assert len(vec["vocabulary"]) == 9  # max_tokens counts the OOV token


def test_build_features_writes_split_and_vectorizer(file_store, cleaned):
    key = put_parquet(file_store, "cleaned/c1/data.parquet", cleaned)
    result = build_features(file_store, key, max_tokens=500, eval_fraction=0.2, seed=1)
    prefix = result["key"]
    assert prefix.startswith("features/")
    names = ("eval.parquet", "train.parquet", "vectorizer.json")
    assert file_store.list_keys(prefix) == [f"{prefix}/{name}" for name in names]
    train = pd.read_parquet(io.BytesIO(file_store.get_bytes(f"{prefix}/train.parquet")))
    evaluation = pd.read_parquet(io.BytesIO(file_store.get_bytes(f"{prefix}/eval.parquet")))
    assert (len(train), len(evaluation)) == (result["train_rows"], result["eval_rows"])
    vec = json.loads(file_store.get_bytes(f"{prefix}/vectorizer.json"))
    assert vec["classes"] == result["classes"] == ["negative", "positive"]
    assert len(vec["vocabulary"]) == result["vocab_size"] <= 499
    # Fit on the train side only: the same as fitting on the train texts alone.
    assert fit_vectorizer(train["text"].tolist(), max_tokens=500)["vocabulary"] == vec["vocabulary"]
    assert build_features(file_store, key, max_tokens=500, eval_fraction=0.2, seed=1) == result
    assert build_features(file_store, key, max_tokens=400, eval_fraction=0.2, seed=1)["key"] != prefix
