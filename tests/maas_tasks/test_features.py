"""Tests of the hash-based split and its checks, the n-gram vocabulary and its term weights."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from maas_tasks.clean import clean_frame
from maas_tasks.features import (
    assign_splits,
    build_features,
    check_splits,
    fit_vectorizer,
    load_vectorizer,
    split_units,
    term_weights,
)
from maas_tasks.sample_data import generate_reviews
from tests.maas_tasks.conftest import put_parquet


@pytest.fixture(scope="module")
def cleaned() -> pd.DataFrame:
    df = clean_frame(generate_reviews(200, seed=11), text_col="text", label_col="label", group_col="movie_id")
    df.insert(2, "split", assign_splits(df))
    return df


def test_split_is_deterministic_keeps_groups_whole_and_holds_the_asked_shares(cleaned):
    again = assign_splits(cleaned.drop(columns="split"))
    assert again.tolist() == cleaned["split"].tolist()
    assert cleaned.groupby("group")["split"].nunique().max() == 1
    shares = cleaned.drop_duplicates("group")["split"].value_counts(normalize=True)
    assert set(shares.index) == {"train", "validation", "test"}
    assert 0.05 <= shares["test"] <= 0.4 and shares["validation"] <= 0.3
    assert set(cleaned.loc[cleaned["split"] == "train", "label"]) == set(cleaned["label"])
    check_splits(cleaned)
    wider = assign_splits(cleaned, validation_fraction=0.1, test_fraction=0.4)
    # A wider test share only takes units from validation and train: no unit leaves test.
    assert (wider[cleaned["split"] == "test"] == "test").all()


def test_a_units_split_depends_on_that_unit_alone():
    """The property that keeps a model's test rows out of the next version's training rows."""
    df = pd.DataFrame({"text": [f"review {i}" for i in range(400)], "label": ["a", "b"] * 200})
    alone = assign_splits(df.head(100))
    among_more = assign_splits(df)
    shuffled = assign_splits(df.sample(frac=1, random_state=0))
    assert among_more.head(100).tolist() == alone.tolist()
    assert shuffled.sort_index().tolist() == among_more.tolist()
    shares = among_more.value_counts(normalize=True)
    assert abs(shares["test"] - 0.2) < 0.07 and abs(shares["validation"] - 0.1) < 0.06


def test_split_units_are_groups_else_ids_else_texts():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x"] * 3, "id": ["1", "", "3"], "group": ["g", "g", ""]})
    assert split_units(df)[0] == "group"
    assert split_units(df)[1].tolist() == ["group:g", "group:g", "id:3"]
    assert split_units(df.drop(columns="group"))[1].tolist() == ["id:1", "text:b", "id:3"]
    assert split_units(df[["text", "label"]])[1].tolist() == ["text:a", "text:b", "text:c"]


@pytest.mark.parametrize("n_units", [2, 3, 4, 6, 10])
def test_tiny_data_still_gets_train_and_test_and_validation_from_three_units(n_units):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(n_units)], "label": ["x"] * n_units})
    counts = assign_splits(df).value_counts()
    assert counts.get("train", 0) >= 1 and counts.get("test", 0) >= 1
    assert (counts.get("validation", 0) >= 1) == (n_units >= 3)
    assert "validation" not in assign_splits(df, validation_fraction=0).tolist()


def test_split_errors_on_too_little_data_and_bad_shares():
    one_group = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "group": ["g", "g"]})
    with pytest.raises(ValueError, match=r"1 distinct group\(s\); at least 2 are needed.*do not set a group column"):
        assign_splits(one_group)
    with pytest.raises(ValueError, match="the test share"):
        assign_splits(one_group, test_fraction=0)
    with pytest.raises(ValueError, match="together less than 1"):
        assign_splits(one_group, validation_fraction=0.5, test_fraction=0.5)


def test_check_splits_refuses_leaks_empty_sides_and_classes_missing_from_train():
    ok = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"], "split": ["train", "train", "test"],
                       "group": ["g1", "g2", "g3"]})
    check_splits(ok)
    leaked = pd.concat([ok, ok.iloc[[0]].assign(split="test", group="g9")], ignore_index=True)
    with pytest.raises(ValueError, match=r"1 text\(s\) appear identically in more than one split \('a' in test, "
                                         r"train\).*several groups"):
        check_splits(leaked)
    with pytest.raises(ValueError, match="the test split is empty"):
        check_splits(ok.assign(split="train"))
    lonely = ok.assign(split=["train", "test", "test"], text=["a", "b", "d"])
    with pytest.raises(ValueError) as caught:
        check_splits(lonely)
    assert "1 class(es) have no row in the train split: 'y' (1 row)" in str(caught.value)
    assert "seed" not in str(caught.value)


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


def test_build_features_fits_on_train_and_validation_and_holds_out_test(file_store, cleaned):
    key = put_parquet(file_store, "cleaned/c1/data.parquet", cleaned)
    result = build_features(file_store, key, max_tokens=500)
    prefix = result["key"]
    assert prefix.startswith("features/")
    names = ("class_document_counts.npy", "eval.parquet", "term_weights.npy", "train.parquet", "vectorizer.json",
             "vocabulary.txt")
    assert file_store.list_keys(prefix) == [f"{prefix}/{name}" for name in names]
    train = pd.read_parquet(io.BytesIO(file_store.get_bytes(f"{prefix}/train.parquet")))
    evaluation = pd.read_parquet(io.BytesIO(file_store.get_bytes(f"{prefix}/eval.parquet")))
    assert (len(train), len(evaluation)) == (result["train_rows"], result["eval_rows"])
    assert set(evaluation["split"]) == {"test"} and set(train["split"]) == {"train", "validation"}
    assert result["validation_rows"] == (cleaned["split"] == "validation").sum() > 0
    assert result["eval_rows"] == (cleaned["split"] == "test").sum()
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
    assert build_features(file_store, key, max_tokens=500) == result
    assert build_features(file_store, key, max_tokens=400)["key"] != prefix


def test_build_features_refuses_a_table_without_a_sound_split(file_store, cleaned):
    unsplit = put_parquet(file_store, "cleaned/c2/data.parquet", cleaned.drop(columns="split"))
    with pytest.raises(ValueError, match="has no 'split' column.*clean the snapshot again"):
        build_features(file_store, unsplit)
    leaky = cleaned.copy()
    leaky.loc[leaky.index[-1], "text"] = leaky.loc[leaky["split"] != leaky["split"].iloc[-1], "text"].iloc[0]
    with pytest.raises(ValueError, match="appear identically in more than one split"):
        build_features(file_store, put_parquet(file_store, "cleaned/c3/data.parquet", leaky))
