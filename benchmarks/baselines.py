"""The project's featurisation and model beside scikit-learn's, measured in the same run on the same rows.

Featurisation: the feature stage's own functions (:func:`maas_tasks.features.fit_vectorizer` to choose the
n-gram vocabulary and weigh it, then :meth:`NgramClassifier.features` through
:func:`maas_tasks.train.featurize`, the path training and serving take) against scikit-learn's
``TfidfVectorizer`` with the same n-gram range, the same minimum document frequency and as many features as
the project's vocabulary holds. Fit and transform are timed apart, in documents per second. The project's
fit includes building the model's lookup table from the vocabulary (``build_classifier``), which is what
makes the vocabulary usable, as the end of scikit-learn's ``fit`` is its ``vocabulary_`` dict.

Quality: scikit-learn TF-IDF + ``LogisticRegression`` trained on the rows the project's model trains on
(the feature stage's ``train.parquet``: the train and validation splits) and scored on the rows its
evaluation scores (``eval.parquet``: the test split), with the project's metric code. C is chosen as the
project's training chooses it: from :data:`maas_tasks.train.C_GRID`, weakest regularisation last, by the
validation rows' log loss, then refitted on every train row. scikit-learn is a benchmark-only comparison:
nothing in the pipeline uses it for features or models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.memory import PeakMemory


def _measured(run: Callable[[], Any], docs: int) -> tuple[Any, dict[str, Any]]:
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
    return result, {"seconds": seconds, "docs_per_s": docs / seconds if seconds > 0 else None, **memory.summary()}


def _ratio(project: float | None, sklearn: float | None) -> float | None:
    return project / sklearn if project and sklearn else None


def compare_featurisation(
    texts: Sequence[str], labels: Sequence[Any], classes: Sequence[Any], *, max_tokens: int | None,
    batch_size: int = 512, on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Any, Any]:
    """Fit and transform ``texts`` the project's way and scikit-learn's, each timed and its memory sampled.

    Returns:
        The figures (``texts``, ``settings``, ``project`` and ``sklearn``: ``fit`` and ``transform`` with
        seconds, docs_per_s and memory, plus ``vocab_size`` and ``nonzeros``; the project's ``fit`` also
        has ``lookup_seconds``; ``ratios``: project docs/s over scikit-learn's for ``fit``,
        ``transform`` and both together; ``no_slower``: whether the project is at least as fast in both),
        and scikit-learn's fitted vectorizer and transformed matrix (for :func:`compare_quality`).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    from maas_tasks.features import DEFAULT_MIN_DF, DEFAULT_NGRAMS, fit_vectorizer
    from maas_tasks.model import Artifact, build_classifier
    from maas_tasks.train import featurize

    step = on_step or (lambda _: None)
    texts, n = list(texts), len(texts)
    step(f"featurisation: project fit on {n:,} texts")

    def project_fit() -> tuple[dict[str, Any], Any, float]:
        fitted = fit_vectorizer(texts, labels, classes, max_tokens=max_tokens, ngrams=DEFAULT_NGRAMS, min_df=DEFAULT_MIN_DF)
        started = time.perf_counter()
        model = build_classifier(Artifact(
            classes=[str(c) for c in classes], ngrams=DEFAULT_NGRAMS, vocabulary=fitted["vocabulary"],
            term_weights=fitted["term_weights"], kernel=np.zeros((len(fitted["vocabulary"]) + 1, len(classes)), np.float32),
            bias=np.zeros(len(classes), np.float32), info={},
        ))
        return fitted, model, time.perf_counter() - started

    (fitted, model, lookup_seconds), fit = _measured(project_fit, n)
    step(f"featurisation: project transform of {n:,} texts")
    features, transform = _measured(lambda: featurize(model, texts, batch_size), n)
    vocab_size = len(fitted["vocabulary"])
    project = {"fit": {**fit, "lookup_seconds": lookup_seconds}, "transform": transform, "vocab_size": vocab_size,
               "nonzeros": int(features.values.shape[0])}
    del features  # the scikit-learn side should not run beside the project's matrix

    vectorizer = TfidfVectorizer(ngram_range=(1, DEFAULT_NGRAMS), min_df=DEFAULT_MIN_DF, max_features=vocab_size or None)
    step(f"featurisation: scikit-learn TfidfVectorizer fit on {n:,} texts")
    _, sk_fit = _measured(lambda: vectorizer.fit(texts), n)
    step(f"featurisation: scikit-learn TfidfVectorizer transform of {n:,} texts")
    matrix, sk_transform = _measured(lambda: vectorizer.transform(texts), n)
    sklearn = {"fit": sk_fit, "transform": sk_transform, "vocab_size": len(vectorizer.vocabulary_), "nonzeros": int(matrix.nnz)}
    total = {
        side: n / (figures["fit"]["seconds"] + figures["transform"]["seconds"]) for side, figures in
        (("project", project), ("sklearn", sklearn))
    }
    ratios = {
        "fit": _ratio(fit["docs_per_s"], sk_fit["docs_per_s"]),
        "transform": _ratio(transform["docs_per_s"], sk_transform["docs_per_s"]),
        "fit_transform": _ratio(total["project"], total["sklearn"]),
    }
    result = {
        "texts": n,
        "settings": {"ngram_range": [1, DEFAULT_NGRAMS], "min_df": DEFAULT_MIN_DF, "max_features": vocab_size,
                     "max_tokens": max_tokens, "batch_size": batch_size},
        "project": project,
        "sklearn": sklearn,
        "ratios": ratios,
        "no_slower": None if None in (ratios["fit"], ratios["transform"]) else min(ratios["fit"], ratios["transform"]) >= 1.0,
    }
    return result, vectorizer, matrix


def _logistic_regression(c: float, n_classes: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    # liblinear is scikit-learn's solver for sparse binary problems; lbfgs handles several classes.
    return LogisticRegression(C=c, solver="liblinear" if n_classes == 2 else "lbfgs", max_iter=1000)


def compare_quality(
    vectorizer: Any, train_matrix: Any, train_df: pd.DataFrame, eval_df: pd.DataFrame, classes: Sequence[Any],
    project_metrics: dict[str, Any],
) -> dict[str, Any]:
    """scikit-learn TF-IDF + logistic regression on the project's split, beside the project's metrics.

    ``train_matrix`` is ``vectorizer.transform`` of ``train_df``'s texts, in its row order.

    Returns:
        ``sklearn`` (accuracy, f1, roc_auc, log_loss and n_eval from
        :func:`maas_tasks.evaluate.compute_metrics`; ``c`` and ``c_selection``: validation log loss per C
        tried; empty when the validation rows are too few to choose, as in training), ``project`` (the same
        figures from the pipeline's evaluation), ``rows`` (``train``: every train-side row, the final fit's;
        ``validation``: those of them C was chosen on; ``eval``) and ``accuracy_difference`` (project minus
        scikit-learn).
    """
    from sklearn.metrics import log_loss

    from maas_tasks.evaluate import compute_metrics
    from maas_tasks.train import C_GRID, DEFAULT_C, MIN_CALIBRATION_ROWS

    index = {str(label): i for i, label in enumerate(classes)}
    y = np.asarray([index[str(label)] for label in train_df["label"]])
    held = (train_df["split"] == "validation").to_numpy() if "split" in train_df.columns else np.zeros(len(y), bool)
    selection: dict[str, float] = {}
    c = DEFAULT_C
    if held.sum() >= MIN_CALIBRATION_ROWS:
        # As training does: from strong regularisation to weak, until the validation loss turns up.
        for value in C_GRID:
            model = _logistic_regression(value, len(classes)).fit(train_matrix[~held], y[~held])
            selection[f"{value:g}"] = float(log_loss(y[held], model.predict_proba(train_matrix[held]),
                                                     labels=list(range(len(classes)))))
            if selection[f"{value:g}"] > min(selection.values()):
                break
        c = float(min(selection, key=selection.get))
    model = _logistic_regression(c, len(classes)).fit(train_matrix, y)
    scores = np.zeros((len(eval_df), len(classes)))
    scores[:, model.classes_] = model.predict_proba(vectorizer.transform(eval_df["text"].tolist()))
    metrics = compute_metrics([index[str(label)] for label in eval_df["label"]], scores, [str(c) for c in classes])
    keys = ("accuracy", "f1", "roc_auc", "log_loss", "n_eval")
    sklearn = {k: metrics[k] for k in keys}
    project = {k: project_metrics.get(k) for k in keys}
    return {
        "sklearn": {**sklearn, "c": c, "c_selection": selection},
        "project": project,
        "rows": {"train": len(train_df), "validation": int(held.sum()), "eval": len(eval_df)},
        "accuracy_difference": project["accuracy"] - sklearn["accuracy"],
    }
