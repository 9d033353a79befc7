"""Tests of the group-aware split, the n-gram vocabulary and its term weights."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from maas_tasks.clean import clean_frame
from maas_tasks.features import build_features, fit_vectorizer, load_vectorizer, split_frame, term_weights
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


def test_fit_vectorizer_vocabulary_document_frequency_and_nb_weights():
    texts = ["Good film!", "bad film", "not good", "good, good story", "bad bad acting"]
    labels = ["pos", "neg", "neg", "pos", "neg"]
    vec = fit_vectorizer(texts, labels, ["neg", "pos"], max_tokens=50, ngrams=2, min_df=1)
    df = dict(zip(vec["vocabulary"], vec["document_frequency"].tolist()))
    # Lower-cased, punctuation gone but "!" kept as a word, n-grams up to 2; a term counts once per text.
    assert df["good"] == 3 and df["film"] == 2 and df["!"] == 1 and df["film !"] == 1 and df["bad"] == 2
    assert "good," not in df and "" not in df
    assert vec["vocabulary"][:3] == ["good", "bad", "film"]  # most frequent first, ties by token
    weights = dict(zip(vec["vocabulary"], vec["term_weights"].tolist()))
    # |log-count ratio|: "film" is in one text of each class, so it says little; "bad" only in negatives.
    assert weights["bad"] > weights["film"] and weights["good"] > weights["film"]
    assert all(w >= 0 for w in weights.values())
    assert fit_vectorizer(texts, labels, ["neg", "pos"], ngrams=2, min_df=2)["vocabulary"] == ["good", "bad", "film"]


def test_term_weights_match_the_nbsvm_ratio_for_two_classes():
    counts = np.array([[3, 0], [1, 1], [0, 2]])
    p = (counts[:, 1] + 1) / (counts[:, 1] + 1).sum()
    q = (counts[:, 0] + 1) / (counts[:, 0] + 1).sum()
    assert np.allclose(term_weights(counts, np.array([4, 4]), "nb"), np.abs(np.log(p / q)), atol=1e-6)
    idf = term_weights(counts, np.array([4, 4]), "idf")
    assert idf[0] < idf[1] or np.isclose(idf[0], idf[1])  # df 3 vs 2: the commoner term weighs less
    assert np.all(term_weights(counts, np.array([4, 4]), "binary") == 1)
    with pytest.raises(ValueError, match="weighting"):
        term_weights(counts, np.array([4, 4]), "tfidf2")


def test_fit_vectorizer_handles_any_script_and_many_classes():
    texts = ["très bien été", "ça va mal", "très mal", "so-so okay"]
    vec = fit_vectorizer(texts, ["a", "b", "b", "c"], ["a", "b", "c"], ngrams=1, min_df=1)
    assert {"très", "été", "ça", "so", "okay"} <= set(vec["vocabulary"])
    assert len(vec["term_weights"]) == len(vec["vocabulary"])


def test_fit_vectorizer_respects_max_tokens_and_checks_arguments():
    texts = [f"word{i} word{i + 1}" for i in range(40)]
    vec = fit_vectorizer(texts, ["a", "b"] * 20, ["a", "b"], max_tokens=10, ngrams=1, min_df=1)
    assert len(vec["vocabulary"]) == 10
    with pytest.raises(ValueError, match="ngrams=4"):
        fit_vectorizer(texts, ["a", "b"] * 20, ["a", "b"], ngrams=4)
    with pytest.raises(ValueError, match="no texts"):
        fit_vectorizer([], [], ["a", "b"])


def test_build_features_writes_split_and_vectorizer(file_store, cleaned):
    key = put_parquet(file_store, "cleaned/c1/data.parquet", cleaned)
    result = build_features(file_store, key, max_tokens=500, eval_fraction=0.2, seed=1)
    prefix = result["key"]
    assert prefix.startswith("features/")
    names = ("class_document_counts.npy", "eval.parquet", "term_weights.npy", "train.parquet", "vectorizer.json",
             "vocabulary.txt")
    assert file_store.list_keys(prefix) == [f"{prefix}/{name}" for name in names]
    train = pd.read_parquet(io.BytesIO(file_store.get_bytes(f"{prefix}/train.parquet")))
    evaluation = pd.read_parquet(io.BytesIO(file_store.get_bytes(f"{prefix}/eval.parquet")))
    assert (len(train), len(evaluation)) == (result["train_rows"], result["eval_rows"])
    vec = load_vectorizer(file_store, prefix)
    assert vec["classes"] == result["classes"] == ["negative", "positive"]
    assert len(vec["vocabulary"]) == result["vocab_size"] == vec["vocab_size"] <= 500
    assert len(vec["term_weights"]) == len(vec["vocabulary"])
    # Fit on the train side only: the same as fitting on the train texts alone.
    alone = fit_vectorizer(train["text"].tolist(), train["label"].tolist(), vec["classes"], max_tokens=500)
    assert alone["vocabulary"] == vec["vocabulary"]
    assert np.allclose(alone["term_weights"], vec["term_weights"])
    # The per-class document counts give the weights back (training re-weighs from them without its validation rows).
    assert vec["class_counts"].shape == (len(vec["vocabulary"]), 2)
    assert np.array_equal(vec["class_counts"].sum(axis=1), alone["document_frequency"])
    assert np.allclose(term_weights(vec["class_counts"], np.asarray(vec["class_sizes"]), "nb"), vec["term_weights"])
    assert sum(vec["class_sizes"]) == len(train)
    assert build_features(file_store, key, max_tokens=500, eval_fraction=0.2, seed=1) == result
    assert build_features(file_store, key, max_tokens=400, eval_fraction=0.2, seed=1)["key"] != prefix
