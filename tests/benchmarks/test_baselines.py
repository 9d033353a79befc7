"""Tests of the scikit-learn comparisons: the project's own featurisation timed beside TfidfVectorizer, and
logistic regression trained and scored on the project's split."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.baselines import compare_featurisation, compare_quality
from maas_tasks.sample_data import generate_reviews


@pytest.fixture(scope="module")
def reviews():
    df = generate_reviews(600, seed=4)
    df["split"] = np.repeat(["train", "validation", "test"], [300, 200, 100])
    return df


@pytest.mark.slow  # TensorFlow and the n-gram model: several seconds
def test_featurisation_times_both_sides_on_the_same_texts_and_vocabulary_size(reviews):
    train = reviews[reviews["split"] != "test"]
    steps = []
    result, vectorizer, matrix = compare_featurisation(
        train["text"].tolist(), train["label"].tolist(), ["negative", "positive"], max_tokens=1000, on_step=steps.append,
    )
    assert [s.split(":")[1].split(" on ")[0].split(" of ")[0].strip() for s in steps] == [
        "project fit", "project transform", "scikit-learn TfidfVectorizer fit", "scikit-learn TfidfVectorizer transform",
    ]
    project, sklearn = result["project"], result["sklearn"]
    assert result["texts"] == 500 and project["vocab_size"] == 1000 == result["settings"]["max_features"]
    assert sklearn["vocab_size"] <= 1000 and vectorizer.ngram_range == (1, 3) and matrix.shape == (500, sklearn["vocab_size"])
    for side in (project, sklearn):
        for part in ("fit", "transform"):
            assert side[part]["docs_per_s"] == pytest.approx(500 / side[part]["seconds"])
            assert side[part]["peak_mb"] >= side[part]["start_mb"]
    assert 0 < project["fit"]["lookup_seconds"] < project["fit"]["seconds"]
    assert project["nonzeros"] > 500 and sklearn["nonzeros"] == matrix.nnz
    assert result["ratios"]["transform"] == pytest.approx(project["transform"]["docs_per_s"] / sklearn["transform"]["docs_per_s"])
    assert result["no_slower"] == (min(result["ratios"]["fit"], result["ratios"]["transform"]) >= 1)

    eval_df = reviews[reviews["split"] == "test"]
    classes = ["negative", "positive"]
    quality = compare_quality(vectorizer, matrix, train.reset_index(drop=True), eval_df, classes, {"accuracy": 0.5, "f1": 0.5})
    assert quality["rows"] == {"train": 500, "validation": 200, "eval": 100} and quality["sklearn"]["n_eval"] == 100
    assert list(quality["sklearn"]["c_selection"])[0] == "1"  # chosen on the validation rows, strongest first
    assert quality["sklearn"]["c"] == float(min(quality["sklearn"]["c_selection"], key=quality["sklearn"]["c_selection"].get))
    assert quality["sklearn"]["accuracy"] > 0.7  # the generated reviews are easy
    assert quality["accuracy_difference"] == pytest.approx(0.5 - quality["sklearn"]["accuracy"])
    assert quality["project"]["roc_auc"] is None  # missing from the project's metrics: not made up

    few = train.assign(split=np.where(np.arange(len(train)) < 450, "train", "validation")).reset_index(drop=True)
    default = compare_quality(vectorizer, matrix, few, eval_df, classes, {"accuracy": 0.5})
    assert default["sklearn"]["c_selection"] == {} and default["sklearn"]["c"] == 30.0  # too few to choose
