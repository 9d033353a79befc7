"""Feature stage: a leak-free train/eval split and the TF-IDF vocabulary fit on the train side only.

The split keeps every row of a ``group`` (e.g. all reviews of one movie) on one side: a random
split leaks group-specific words (names, titles) into evaluation and overstates accuracy. The
vectorizer is Keras's ``TextVectorization`` in TF-IDF mode; its vocabulary and idf weights are
stored as JSON so training can rebuild the identical layer inside the end-to-end model that is
finally served. TensorFlow is imported inside the functions so DAG parsing stays cheap.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import pandas as pd

from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

OOV_TOKEN = "[UNK]"


def _bucket(value: str, seed: int) -> int:
    """A stable pseudo-random position for ``value`` (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{value}".encode()).digest()[:8], "big")


def split_frame(
    df: pd.DataFrame, *, eval_fraction: float = 0.2, seed: int = 13
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a cleaned table into train and eval sides, deterministically.

    Units are the ``group`` values when that column exists, else the texts (so duplicates stay
    together). Units are ordered by a stable hash of (seed, unit) and taken into eval until it
    holds about ``eval_fraction`` of the rows.

    Raises:
        ValueError: ``eval_fraction`` is not in (0, 1), there are fewer than 2 units, or a class
            would be missing from the train side; the message says what to change.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be between 0 and 1 (e.g. 0.2)")
    unit_col = "group" if "group" in df.columns else "text"
    units = df[unit_col].astype(str)
    sizes = units.value_counts()
    if len(sizes) < 2:
        raise ValueError(
            f"cannot split {len(df)} rows: they form {len(sizes)} distinct {unit_col!r} value(s), "
            "at least 2 are needed so train and eval are both non-empty; add data"
            + (" or do not pass a group column" if unit_col == "group" else "")
        )
    order = sorted(sizes.index, key=lambda unit: (_bucket(unit, seed), unit))
    target = eval_fraction * len(df)
    eval_units: set[str] = set()
    taken = 0
    for unit in order[:-1]:  # the last unit always stays in train, so train is never empty
        if taken >= target:
            break
        eval_units.add(unit)
        taken += int(sizes[unit])
    in_eval = units.isin(eval_units)
    train_df = df.loc[~in_eval].reset_index(drop=True)
    eval_df = df.loc[in_eval].reset_index(drop=True)
    missing = sorted(set(df["label"]) - set(train_df["label"]))
    if missing:
        raise ValueError(
            f"after the split ({len(train_df)} train / {len(eval_df)} eval rows) the train side has no rows of "
            f"class(es) {', '.join(map(repr, missing))}; add more rows of those classes, lower eval_fraction "
            "or change the seed"
        )
    return train_df, eval_df


def fit_vectorizer(texts: list[str], *, max_tokens: int = 20000, ngrams: int = 2) -> dict[str, Any]:
    """Fit a TF-IDF ``TextVectorization`` on ``texts`` (the train side only).

    Returns:
        ``vocabulary`` (tokens without the OOV token, most frequent first), ``idf_weights`` (one per
        vocabulary token), ``ngrams`` and ``max_tokens``: exactly what the layer's constructor takes back.

    Raises:
        ValueError: ``texts`` is empty.
    """
    import numpy as np

    tf = import_tensorflow()
    import keras

    if len(texts) == 0:
        raise ValueError("cannot fit a vectorizer on no texts; the train side is empty")
    layer = keras.layers.TextVectorization(max_tokens=max_tokens, ngrams=ngrams, output_mode="tf_idf")
    layer.adapt(tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), dtype=tf.string)).batch(1024))
    vocabulary = [str(token) for token in layer.get_vocabulary()]
    idf_weights = np.asarray(layer._lookup_layer.idf_weights, dtype=np.float64).tolist()
    # The layer reports the OOV token (and its idf) first; its constructor wants them left out.
    if vocabulary and vocabulary[0] == OOV_TOKEN:
        vocabulary, idf_weights = vocabulary[1:], idf_weights[1:]
    return {"vocabulary": vocabulary, "idf_weights": idf_weights, "ngrams": ngrams, "max_tokens": max_tokens}


def _to_parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return buffer.getvalue()


def build_features(
    store: Store,
    cleaned_key: str,
    *,
    max_tokens: int = 20000,
    ngrams: int = 2,
    eval_fraction: float = 0.2,
    seed: int = 13,
) -> dict[str, Any]:
    """Split the cleaned table and fit the vectorizer; write ``features/<hash>/``.

    Writes ``train.parquet``, ``eval.parquet`` and, last (the commit point), ``vectorizer.json``
    (vocabulary, idf_weights, ngrams, max_tokens, classes sorted by name). The hash covers the
    cleaned table's bytes and the arguments, so a re-run writes the same prefix.

    Returns:
        ``key`` (the prefix), ``train_rows``, ``eval_rows``, ``classes`` and ``vocab_size``.
    """
    raw = store.get_bytes(cleaned_key)
    df = pd.read_parquet(io.BytesIO(raw))
    try:
        train_df, eval_df = split_frame(df, eval_fraction=eval_fraction, seed=seed)
    except ValueError as exc:
        raise ValueError(f"{store.uri(cleaned_key)}: {exc}") from None
    vectorizer = fit_vectorizer(train_df["text"].tolist(), max_tokens=max_tokens, ngrams=ngrams)
    classes = sorted(df["label"].unique().tolist())
    vectorizer["classes"] = classes
    params = {"max_tokens": max_tokens, "ngrams": ngrams, "eval_fraction": eval_fraction, "seed": seed}
    digest = hashlib.sha256(raw)
    digest.update(json.dumps(params, sort_keys=True).encode())
    prefix = f"features/{digest.hexdigest()[:16]}"
    store.put_bytes(f"{prefix}/train.parquet", _to_parquet(train_df))
    store.put_bytes(f"{prefix}/eval.parquet", _to_parquet(eval_df))
    store.put_bytes(f"{prefix}/vectorizer.json", json.dumps(vectorizer).encode())
    log.info(
        "split %d rows into %d for training and %d held out%s; vocabulary of %d terms (1- to %d-grams, at most "
        "%d); classes %s", len(df), len(train_df), len(eval_df), " (whole groups)" if "group" in df.columns else "",
        len(vectorizer["vocabulary"]), ngrams, max_tokens, ", ".join(map(str, classes)),
    )
    return {
        "key": prefix,
        "train_rows": len(train_df),
        "eval_rows": len(eval_df),
        "classes": classes,
        "vocab_size": len(vectorizer["vocabulary"]),
    }
