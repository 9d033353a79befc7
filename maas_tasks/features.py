"""Feature stage: the train/validation/test split rule, and the n-gram vocabulary and term weights fit on the
training rows.

The split (:func:`assign_splits`, applied by the clean stage) keeps every row of a ``group`` (e.g. all reviews
of one movie) in one split: a random split leaks group-specific words (names, titles) into evaluation and
overstates accuracy. Each unit's split comes from a hash of the unit alone, so a weekly batch of new rows
never moves an old row to the other side (the model would then be scored on texts an earlier version
trained on). The vocabulary is counted with the served model's own tokenizer (:mod:`maas_tasks.model`), so
training and serving see the same n-grams; each term gets a weight (Naive-Bayes log-count ratio by default,
the TF-IDF-style weighting that suits sentiment best, Wang & Manning 2012). TensorFlow is imported inside the
functions so DAG parsing stays cheap.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from maas_tasks.model import VOCABULARY_FILE, ngram_tokens, read_vocabulary
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

TERM_WEIGHTS_FILE = "term_weights.npy"
# Per vocabulary token and class, how many train texts contain it: training re-weighs the terms from these
# without its validation rows, so that held-out side never sees weights computed from its own labels.
CLASS_COUNTS_FILE = "class_document_counts.npy"
WEIGHTINGS = ("nb", "idf", "binary")
# Chosen on a movie-disjoint split of the IMDB train set (docs/model.md): 1- to 3-grams found in at
# least two texts, Naive-Bayes weighted. The cap only bites on large corpora (IMDB keeps ~0.8M).
DEFAULT_NGRAMS = 3
DEFAULT_MIN_DF = 2
DEFAULT_MAX_TOKENS = 1_000_000
DEFAULT_WEIGHTING = "nb"
# The cleaned table's ``split`` values; train.py holds out the validation rows, evaluation scores the test rows.
SPLITS = ("train", "validation", "test")


def _positions(units: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row's unit number and each unit's stable position in [0, 1): the first 8 bytes of its SHA-256."""
    codes, uniques = pd.factorize(units, sort=False)
    positions = np.fromiter(
        (int.from_bytes(hashlib.sha256(unit.encode("utf-8")).digest()[:8], "big") for unit in uniques),
        dtype=np.float64, count=len(uniques),
    ) / 2.0**64
    return codes, positions


def split_units(df: pd.DataFrame) -> tuple[str, pd.Series]:
    """What the split keeps together, and each row's unit: its ``group`` when the table has one, else its
    ``id``, else its text. A row whose group (or id) is empty is a unit of its own, named by its id or text."""
    units, kind = "text:" + df["text"].astype(str), "text"
    if "id" in df.columns:
        ids = df["id"].astype(str)
        units = ("id:" + ids).where(ids != "", units)
        kind = "id"
    if "group" in df.columns:
        groups = df["group"].astype(str)
        units = ("group:" + groups).where(groups != "", units)
        kind = "group"
    return kind, units


def assign_splits(
    df: pd.DataFrame, *, validation_fraction: float = 0.1, test_fraction: float = 0.2
) -> pd.Series:
    """The split (``train``, ``validation`` or ``test``) of every row of a cleaned table.

    Rows are split by unit (:func:`split_units`: whole groups, else ids, else texts). A unit's position is
    a hash of the unit alone, in [0, 1): below ``test_fraction`` it is test, below ``test_fraction +
    validation_fraction`` validation, else train. So the split of a unit never depends on the other rows:
    adding rows (a new batch) never moves an existing unit between splits, on any machine.

    Tiny data: when these thresholds leave a side empty (likely below about 20 units), the fewest units
    move to fill it, in hash order: the highest-positioned unit becomes train, the lowest test, and the
    unit next to the validation range validation (that last needs 3 units). Those few units can move back
    once more data fills the side by the plain rule.

    Raises:
        ValueError: a fraction is out of range, or there are fewer than 2 units.
    """
    if not (0 < test_fraction < 1 and 0 <= validation_fraction < 1 and test_fraction + validation_fraction < 1):
        raise ValueError(
            f"the test share ({test_fraction}) must be between 0 and 1, the validation share ({validation_fraction}) "
            "at least 0, and together less than 1 (e.g. 0.2 and 0.1)"
        )
    kind, units = split_units(df)
    codes, positions = _positions(units)
    if len(positions) < 2:
        raise ValueError(
            f"cannot split {len(df)} rows: they form {len(positions)} distinct {kind}(s); at least 2 are needed so "
            "that training and testing both get rows: add data"
            + (", or do not set a group column" if kind == "group" else "")
        )
    side = np.where(positions < test_fraction, 2, np.where(positions < test_fraction + validation_fraction, 1, 0))
    order = np.argsort(positions, kind="stable")
    if not (side == 0).any():
        side[order[-1]] = 0
    if not (side == 2).any():
        side[order[0]] = 2
    if validation_fraction > 0 and not (side == 1).any() and len(positions) >= 3:
        train, test = order[side[order] == 0], order[side[order] == 2]
        side[train[0] if len(train) > 1 else test[-1]] = 1
    return pd.Series(np.asarray(SPLITS, dtype=object)[side[codes]], index=df.index, dtype="str")


def check_splits(df: pd.DataFrame) -> None:
    """Check a split cleaned table before anything trains on it.

    Raises:
        ValueError: an identical text lies in two splits (the model would be tested on what it learnt),
            the train or test side is empty, or a class has no train rows; the message says what to do.
    """
    kind, _ = split_units(df)
    split = df["split"].astype(str)
    spread = df.groupby("text", sort=False)["split"].nunique()
    leaked = spread[spread > 1]
    if len(leaked):
        shown = "; ".join(
            f"{text[:60]!r}{'...' if len(text) > 60 else ''} in {', '.join(sorted(set(split[df['text'] == text])))}"
            for text in leaked.index[:3]
        )
        raise ValueError(
            f"{len(leaked)} text(s) appear identically in more than one split ({shown}): the model would be "
            f"scored on texts it was trained on. The same text has several {kind}s; remove the copies from the "
            "data, or give them one " + kind
        )
    counts = split.value_counts()
    for side in ("train", "test"):
        if not counts.get(side):
            raise ValueError(
                f"the {side} split is empty ({len(df)} rows in {', '.join(f'{n} {s}' for s, n in counts.items())}); "
                "add data"
            )
    in_train = set(df.loc[split == "train", "label"])
    missing = df.loc[~df["label"].isin(in_train), "label"].value_counts()
    if len(missing):
        shown = ", ".join(f"{label!r} ({n} row{'s' if n > 1 else ''})" for label, n in missing.head(5).items())
        raise ValueError(
            f"{len(missing)} class(es) have no row in the train split: {shown}"
            f"{' and more' if len(missing) > 5 else ''}. "
            f"Each {kind} goes to train, validation or test by a hash of it, and every {kind} of these classes fell "
            f"outside train. Every class needs training rows: add rows of these classes (in more {kind}s), or hold "
            "out smaller validation and test shares"
        )


def count_ngrams(
    texts: Sequence[str], labels: Sequence[int], n_classes: int, *, ngrams: int, batch_size: int = 512
) -> tuple[list[str], np.ndarray]:
    """Every n-gram of ``texts`` and, per class, the number of texts of that class that contain it.

    Counting runs in TensorFlow (the served model's own tokenizer, :func:`maas_tasks.model.ngram_tokens`);
    the partial tables are merged every few batches so memory follows the number of distinct n-grams,
    not the number of texts.

    Returns:
        The n-grams (unsorted) and an ``[n-grams, n_classes]`` int64 array of document counts.
    """
    tf = import_tensorflow()

    labels = np.asarray(labels, dtype=np.int64)
    tokens: list[Any] = []
    counts: list[Any] = []

    def merge() -> None:
        unique, index = tf.unique(tf.concat(tokens, axis=0))
        merged = tf.math.unsorted_segment_sum(tf.concat(counts, axis=0), index, tf.size(unique))
        tokens[:], counts[:] = [unique], [merged]

    for start in range(0, len(texts), batch_size):
        grams = ngram_tokens(tf.constant(list(texts[start:start + batch_size]), dtype=tf.string), ngrams)
        unique, index = tf.unique(grams.flat_values)
        n_unique = tf.size(unique, out_type=tf.int64)
        pairs, _ = tf.unique(grams.value_rowids() * n_unique + tf.cast(index, tf.int64))  # (text, n-gram) once
        classes = tf.gather(tf.constant(labels[start:start + batch_size]), pairs // n_unique)
        cells = (pairs % n_unique) * n_classes + classes
        table = tf.math.bincount(cells, minlength=n_unique * n_classes, maxlength=n_unique * n_classes, dtype=tf.int64)
        tokens.append(unique)
        counts.append(tf.reshape(table, [-1, n_classes]))
        if len(tokens) >= 8:
            merge()
    if not tokens:
        return [], np.zeros((0, n_classes), dtype=np.int64)
    merge()
    names = [token.decode("utf-8") for token in tokens[0].numpy()]
    return names, counts[0].numpy()


def term_weights(counts: np.ndarray, class_sizes: np.ndarray, weighting: str, *, alpha: float = 1.0) -> np.ndarray:
    """One weight per term from its per-class document counts.

    ``nb``: the Naive-Bayes log-count ratio (Wang & Manning 2012) of the class the term speaks for most,
    ``max_k |log(p_k / q_k)|`` where ``p_k`` is the term's smoothed share among class ``k``'s n-gram
    occurrences and ``q_k`` the same among the other classes' (for two classes: ``|r|`` of NBSVM; the sign
    is the linear layer's to learn). ``idf``: ``log((1 + n) / (1 + df)) + 1``. ``binary``: 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if weighting == "binary":
        return np.ones(len(counts), dtype=np.float32)
    if weighting == "idf":
        n = float(np.sum(class_sizes))
        return (np.log((1 + n) / (1 + counts.sum(axis=1))) + 1).astype(np.float32)
    if weighting != "nb":
        raise ValueError(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    p = counts + alpha
    p = p / p.sum(axis=0, keepdims=True)
    rest = counts.sum(axis=1, keepdims=True) - counts + alpha
    q = rest / rest.sum(axis=0, keepdims=True)
    return np.abs(np.log(p) - np.log(q)).max(axis=1).astype(np.float32)


def fit_vectorizer(
    texts: Sequence[str],
    labels: Sequence[Any],
    classes: Sequence[Any],
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ngrams: int = DEFAULT_NGRAMS,
    min_df: int = DEFAULT_MIN_DF,
    weighting: str = DEFAULT_WEIGHTING,
) -> dict[str, Any]:
    """Choose the vocabulary on ``texts`` (the train side only) and weigh its terms.

    The vocabulary is every 1- to ``ngrams``-gram found in at least ``min_df`` texts, the most frequent
    first (ties by the token, so the order is the same on every machine), at most ``max_tokens`` of them.

    Returns:
        ``vocabulary``, ``term_weights`` (one per token, see :func:`term_weights`), ``document_frequency``,
        ``class_counts`` (``[tokens, classes]`` document counts), ``class_sizes`` (texts per class),
        ``ngrams``, ``min_df``, ``max_tokens`` and ``weighting``.

    Raises:
        ValueError: ``texts`` is empty, or a parameter is out of range.
    """
    if len(texts) == 0:
        raise ValueError("cannot fit a vectorizer on no texts; the train side is empty")
    if not 1 <= ngrams <= 3 or min_df < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(
            f"ngrams={ngrams} must be 1 to 3, min_df={min_df} at least 1 and max_tokens={max_tokens} at least 1"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    index = {label: i for i, label in enumerate(classes)}
    label_ids = np.asarray([index[label] for label in labels], dtype=np.int64)
    tokens, counts = count_ngrams(texts, label_ids, len(classes), ngrams=ngrams)
    df = counts.sum(axis=1)
    kept = [i for i in np.flatnonzero(df >= min_df) if tokens[i]]
    kept.sort(key=lambda i: (-int(df[i]), tokens[i]))
    kept = kept[:max_tokens] if max_tokens is not None else kept
    class_sizes = np.bincount(label_ids, minlength=len(classes))
    weights = term_weights(counts[kept], class_sizes, weighting) if kept else np.zeros(0, dtype=np.float32)
    return {
        "vocabulary": [tokens[i] for i in kept],
        "term_weights": weights,
        "document_frequency": df[kept],
        "class_counts": counts[kept] if kept else np.zeros((0, len(classes)), dtype=np.int64),
        "class_sizes": class_sizes,
        "ngrams": ngrams,
        "min_df": min_df,
        "max_tokens": max_tokens,
        "weighting": weighting,
    }


def _to_parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return buffer.getvalue()


def build_features(
    store: Store,
    cleaned_key: str,
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ngrams: int = DEFAULT_NGRAMS,
    min_df: int = DEFAULT_MIN_DF,
    weighting: str = DEFAULT_WEIGHTING,
) -> dict[str, Any]:
    """Fit the vocabulary and term weights on the cleaned table's training rows; write ``features/<hash>/``.

    The cleaned table's ``split`` column decides (:func:`maas_tasks.clean.clean_snapshots`): its ``train`` and
    ``validation`` rows go to ``train.parquet`` (the vocabulary is counted on both; training holds the
    validation rows out again by that column), its ``test`` rows to ``eval.parquet``. Also writes
    ``vocabulary.txt``, ``term_weights.npy``, ``class_document_counts.npy`` and, last (the commit point),
    ``vectorizer.json`` (ngrams, min_df, max_tokens, weighting, vocab_size, classes sorted by name,
    class_sizes). The hash covers the cleaned table's bytes and the arguments, so a re-run writes the same
    prefix.

    Returns:
        ``key`` (the prefix), ``train_rows`` (validation rows included), ``validation_rows``, ``eval_rows``,
        ``classes`` and ``vocab_size``.

    Raises:
        ValueError: the table has no ``split`` column, or fails :func:`check_splits`.
    """
    started = time.perf_counter()
    raw = store.get_bytes(cleaned_key)
    df = pd.read_parquet(io.BytesIO(raw))
    if "split" not in df.columns:
        raise ValueError(
            f"{store.uri(cleaned_key)} has no 'split' column: it was not written by the clean stage of this "
            "version; clean the snapshot again"
        )
    try:
        check_splits(df)
    except ValueError as exc:
        raise ValueError(f"{store.uri(cleaned_key)}: {exc}") from None
    held_out = df["split"] == "test"
    train_df = df.loc[~held_out].reset_index(drop=True)
    eval_df = df.loc[held_out].reset_index(drop=True)
    classes = sorted(df["label"].unique().tolist())
    fitted = fit_vectorizer(
        train_df["text"].tolist(), train_df["label"].tolist(), classes,
        max_tokens=max_tokens, ngrams=ngrams, min_df=min_df, weighting=weighting,
    )
    params = {"max_tokens": max_tokens, "ngrams": ngrams, "min_df": min_df, "weighting": weighting}
    digest = hashlib.sha256(raw)
    digest.update(json.dumps(params, sort_keys=True).encode())
    prefix = f"features/{digest.hexdigest()[:16]}"
    store.put_bytes(f"{prefix}/train.parquet", _to_parquet(train_df))
    store.put_bytes(f"{prefix}/eval.parquet", _to_parquet(eval_df))
    store.put_bytes(f"{prefix}/{VOCABULARY_FILE}", "\n".join(fitted["vocabulary"]).encode("utf-8"))
    buffer = io.BytesIO()
    np.save(buffer, fitted["term_weights"])
    store.put_bytes(f"{prefix}/{TERM_WEIGHTS_FILE}", buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, fitted["class_counts"].astype(np.int32))
    store.put_bytes(f"{prefix}/{CLASS_COUNTS_FILE}", buffer.getvalue())
    vectorizer = {
        **{k: fitted[k] for k in ("ngrams", "min_df", "max_tokens", "weighting")},
        "vocab_size": len(fitted["vocabulary"]),
        "classes": classes,
        "class_sizes": fitted["class_sizes"].tolist(),
    }
    store.put_bytes(f"{prefix}/vectorizer.json", json.dumps(vectorizer).encode())
    validation_rows = int((train_df["split"] == "validation").sum())
    log.info(
        "%d rows: %d for training (%d of them validation) and %d held out for testing, by %s; vocabulary of %d "
        "n-grams (1 to %d words, in at least %d texts%s), %s term weights; classes %s (%.1f s)", len(df),
        len(train_df), validation_rows, len(eval_df), split_units(df)[0], len(fitted["vocabulary"]), ngrams, min_df,
        f", at most {max_tokens:,}" if max_tokens else "", weighting, ", ".join(map(str, classes)),
        time.perf_counter() - started,
    )
    return {
        "key": prefix,
        "train_rows": len(train_df),
        "validation_rows": validation_rows,
        "eval_rows": len(eval_df),
        "classes": classes,
        "vocab_size": len(fitted["vocabulary"]),
    }


def load_vectorizer(store: Store, features_key: str) -> dict[str, Any]:
    """A feature prefix's ``vectorizer.json`` with its ``vocabulary``, ``term_weights`` and ``class_counts``
    read back in."""
    features_key = features_key.rstrip("/")
    vectorizer = json.loads(store.get_bytes(f"{features_key}/vectorizer.json"))
    vectorizer["vocabulary"] = read_vocabulary(store.get_bytes(f"{features_key}/{VOCABULARY_FILE}"))
    vectorizer["term_weights"] = np.load(io.BytesIO(store.get_bytes(f"{features_key}/{TERM_WEIGHTS_FILE}")))
    vectorizer["class_counts"] = np.load(io.BytesIO(store.get_bytes(f"{features_key}/{CLASS_COUNTS_FILE}")))
    return vectorizer
