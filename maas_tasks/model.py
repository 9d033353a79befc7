"""The served model: raw strings in, class probabilities out, sparse from the first n-gram to the last score.

One definition is used three times: the feature stage counts n-grams with :func:`ngram_tokens`, training
featurises its texts with :meth:`NgramClassifier.features`, and the SavedModel that TF Serving loads calls
:meth:`NgramClassifier.call`. So the served graph sees exactly the features training saw.

The model is linear over weighted binary n-gram presence: each text's n-grams (1 to ``ngrams`` words) that
are in the vocabulary count once, each weighs its term weight (Naive-Bayes log-count ratio by default, see
:mod:`maas_tasks.features`), the vector is scaled to unit length and a ``[vocabulary, K]`` kernel maps it to
logits. Nothing is ever a dense ``[batch, vocabulary]`` tensor: a batch of 256 reviews over a million
n-grams would be 1 GB dense, while its non-zeros are a few hundred per text. Keras 3's functional API drops
sparseness, so this is a subclassed model whose ``call`` is plain TensorFlow sparse ops.

A trained model is stored as three objects (:func:`save_artifact`): ``model.json`` (classes, n-gram width,
temperature), ``vocabulary.txt`` (one token per line; tokens never hold a newline, see
:func:`standardize`) and ``weights.npz`` (term weights, kernel, bias, length-aware temperature).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

MODEL_JSON = "model.json"
VOCABULARY_FILE = "vocabulary.txt"
WEIGHTS_FILE = "weights.npz"
ARTIFACT_FILES = (MODEL_JSON, VOCABULARY_FILE, WEIGHTS_FILE)
# Bumped when standardize/ngram_tokens change, so a model is never served with another tokenizer than it
# was trained with (load_artifact refuses a mismatch).
TOKENIZER_VERSION = 1
# The length-aware temperature stays within these bounds for every length, as it did when it was fitted.
TEMPERATURE_BOUNDS = (0.1, 10.0)


# The served tokenizer's patterns (maas_tasks.drift cuts words the same way with Arrow): HTML tags go, "!" and
# "?" become words, and every character outside WORD_CHARS separates words.
TAG_PATTERN = r"<[^>]*>"
MARK_PATTERN = r"([!?])"
WORD_CHARS = r"\p{L}\p{N}!?'"


def standardize(texts: Any) -> Any:
    """Lower-case, drop HTML tags, keep ``!`` and ``?`` as words, turn other punctuation into spaces.

    Letters and digits of every script survive (``\\p{L}``, ``\\p{N}``); apostrophes stay inside words
    ("don't"). All whitespace becomes single spaces, so a token never holds a newline.
    """
    tf = import_tensorflow()

    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf.strings.regex_replace(texts, TAG_PATTERN, " ")
    texts = tf.strings.regex_replace(texts, MARK_PATTERN, r" \1 ")
    texts = tf.strings.regex_replace(texts, f"[^{WORD_CHARS}]+", " ")
    return tf.strings.strip(texts)


def ngram_tokens(texts: Any, ngrams: int) -> Any:
    """A ragged ``[batch, None]`` tensor of each text's 1- to ``ngrams``-word n-grams (joined by spaces)."""
    tf = import_tensorflow()

    words = tf.strings.split(standardize(texts), sep=" ")
    # "".split(" ") is [""]: an empty word, which no vocabulary holds.
    widths = tuple(range(1, ngrams + 1))
    return tf.strings.ngrams(words, ngram_width=widths, separator=" ") if ngrams > 1 else words


def first_words(texts: Sequence[str], n: int) -> list[str]:
    """Each text cut to its first ``n`` whitespace-separated words (to probe and calibrate short inputs)."""
    return [" ".join(str(text).split()[:n]) for text in texts]


@dataclass(frozen=True)
class Artifact:
    """Everything a trained model is: what :class:`NgramClassifier` is built from."""

    classes: list[str]
    ngrams: int
    vocabulary: list[str]
    term_weights: np.ndarray  # [V] float32, one per vocabulary token
    kernel: np.ndarray  # [V + 1, K]; row 0 belongs to out-of-vocabulary n-grams and stays unused
    bias: np.ndarray  # [K]
    info: dict[str, Any]  # anything else recorded with the model (parameters, where it came from)
    # Length-aware temperature (a, b): logits are divided by exp(a + b / sqrt(1 + known n-grams)), so short
    # texts, whose few n-grams say less, are not scored as confidently as long ones. (0, 0): no scaling.
    calibration: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float32))


def _classifier_class() -> type:
    """Define the Keras model class on first use (Keras is imported lazily, like TensorFlow)."""
    global _CLASSIFIER
    if _CLASSIFIER is not None:
        return _CLASSIFIER
    tf = import_tensorflow()
    import keras

    class NgramClassifier(keras.Model):
        """Raw strings → sparse weighted n-gram presence (unit length) → linear → softmax."""

        def __init__(self, vocabulary: list[str], n_classes: int, ngrams: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ngrams = ngrams
            self.n_classes = n_classes
            self.lookup = keras.layers.StringLookup(
                vocabulary=vocabulary, num_oov_indices=1, mask_token=None, name="ngram_lookup"
            )
            width = len(vocabulary) + 1  # index 0: out of vocabulary
            self.width = width
            self.term_weights = self.add_weight(
                shape=(width,), initializer="zeros", trainable=False, name="term_weights"
            )
            self.kernel = self.add_weight(shape=(width, n_classes), initializer="zeros", name="kernel")
            self.bias = self.add_weight(shape=(n_classes,), initializer="zeros", name="bias")
            self.calibration = self.add_weight(shape=(2,), initializer="zeros", trainable=False, name="calibration")

        def features(self, texts: Any) -> Any:
            """``[batch, V + 1]`` SparseTensor: each known n-gram once, weighted, rows of unit length."""
            grams = ngram_tokens(texts, self.ngrams)
            batch = tf.shape(texts, out_type=tf.int64)[0]
            ids = tf.cast(self.lookup(grams.flat_values), tf.int64)
            rows = grams.value_rowids()
            known = ids > 0
            # Presence, not counts: one key per (row, n-gram), duplicates dropped.
            keys, _ = tf.unique(tf.boolean_mask(rows * self.width + ids, known))
            keys = tf.sort(keys)
            rows, ids = keys // self.width, keys % self.width
            values = tf.gather(tf.convert_to_tensor(self.term_weights), ids)
            norms = tf.sqrt(tf.math.unsorted_segment_sum(tf.square(values), rows, batch))
            values = values / tf.maximum(tf.gather(norms, rows), 1e-12)
            return tf.SparseTensor(tf.stack([rows, ids], axis=1), values, tf.stack([batch, self.width]))

        def logits(self, features: Any) -> Any:
            return tf.sparse.sparse_dense_matmul(features, tf.convert_to_tensor(self.kernel)) + self.bias

        def temperature(self, features: Any) -> Any:
            """``[batch]``: each text's temperature, from how many known n-grams it has."""
            known = tf.math.unsorted_segment_sum(
                tf.ones_like(features.values), features.indices[:, 0], features.dense_shape[0]
            )
            a, b = tf.unstack(tf.convert_to_tensor(self.calibration))
            low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
            return tf.exp(tf.clip_by_value(a + b * tf.math.rsqrt(known + 1.0), low, high))

        def call(self, texts: Any, training: bool = False) -> Any:
            features = self.features(texts)
            return tf.nn.softmax(self.logits(features) / self.temperature(features)[:, tf.newaxis], axis=-1)

    _CLASSIFIER = NgramClassifier
    return NgramClassifier


_CLASSIFIER: type | None = None


def build_classifier(artifact: Artifact) -> Any:
    """The Keras model of ``artifact``, with its weights set, ready to call on a batch of strings."""
    tf = import_tensorflow()

    model = _classifier_class()(artifact.vocabulary, len(artifact.classes), artifact.ngrams, name="ngram_classifier")
    model(tf.constant([""]))  # build
    model.term_weights.assign(np.concatenate([[0.0], artifact.term_weights]).astype(np.float32))
    model.kernel.assign(artifact.kernel.astype(np.float32))
    model.bias.assign(artifact.bias.astype(np.float32))
    model.calibration.assign(np.asarray(artifact.calibration, dtype=np.float32))
    return model


def save_artifact(store: Store, prefix: str, artifact: Artifact) -> list[str]:
    """Write ``artifact`` under ``prefix``; ``model.json`` last, so a reader that finds it finds the rest."""
    buffer = io.BytesIO()
    np.savez(
        buffer, term_weights=artifact.term_weights, kernel=artifact.kernel, bias=artifact.bias,
        calibration=np.asarray(artifact.calibration, dtype=np.float32),
    )
    store.put_bytes(f"{prefix}/{WEIGHTS_FILE}", buffer.getvalue())
    store.put_bytes(f"{prefix}/{VOCABULARY_FILE}", "\n".join(artifact.vocabulary).encode("utf-8"))
    record = {
        "classes": artifact.classes, "ngrams": artifact.ngrams, "vocab_size": len(artifact.vocabulary),
        "tokenizer_version": TOKENIZER_VERSION, **artifact.info,
    }
    store.put_bytes(f"{prefix}/{MODEL_JSON}", json.dumps(record, indent=2, sort_keys=True).encode())
    return [f"{prefix}/{name}" for name in ARTIFACT_FILES]


def read_vocabulary(raw: bytes) -> list[str]:
    """A ``vocabulary.txt``'s tokens (split on newlines only: other line breaks may be inside tokens)."""
    text = raw.decode("utf-8")
    return text.split("\n") if text else []


def load_artifact(store: Store, prefix: str) -> Artifact:
    """Read a trained model written by :func:`save_artifact`.

    Raises:
        ValueError: the files disagree (vocabulary size, class count) or the tokenizer changed since.
    """
    prefix = prefix.rstrip("/")
    record = json.loads(store.get_bytes(f"{prefix}/{MODEL_JSON}"))
    vocabulary = read_vocabulary(store.get_bytes(f"{prefix}/{VOCABULARY_FILE}"))
    with np.load(io.BytesIO(store.get_bytes(f"{prefix}/{WEIGHTS_FILE}"))) as weights:
        term_weights, kernel, bias = weights["term_weights"], weights["kernel"], weights["bias"]
        calibration = weights["calibration"]
    classes = [str(c) for c in record["classes"]]
    if record.get("tokenizer_version") != TOKENIZER_VERSION:
        raise ValueError(
            f"{store.uri(prefix)} was trained with tokenizer version {record.get('tokenizer_version')}, this code "
            f"has version {TOKENIZER_VERSION}: retrain the model"
        )
    if not (len(vocabulary) == record["vocab_size"] == len(term_weights) == kernel.shape[0] - 1) or (
        kernel.shape[1] != len(classes) or bias.shape != (len(classes),)
    ):
        raise ValueError(
            f"{store.uri(prefix)}: the model files disagree ({len(vocabulary)} tokens, {len(term_weights)} term "
            f"weights, kernel {kernel.shape}, {len(classes)} classes); retrain the model"
        )
    info = {k: v for k, v in record.items() if k not in ("classes", "ngrams", "vocab_size", "tokenizer_version")}
    return Artifact(classes, int(record["ngrams"]), vocabulary, term_weights, kernel, bias, info, calibration)
