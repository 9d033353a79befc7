"""Training stage: fit the linear layer of the served n-gram model (:mod:`maas_tasks.model`) on the train split.

The texts are featurised once, with the served model's own ``features`` (sparse, weighted n-gram presence
of unit length), and L2-regularised softmax regression over them is fitted by full-batch L-BFGS: a convex
problem, so the model does not depend on a seed, a batch order or a learning rate. (Minibatch SGD reached the
same accuracy only on lucky seeds: on IMDB its epoch-to-epoch noise moved held-out accuracy by up to 3
points, docs/model.md.) The clean stage's validation split (whole groups) is held out of the fit: training
stops early when its loss stops improving and keeps the best epoch, and a temperature is fitted on it (Guo et
al. 2017), so scores read as probabilities: a length-aware one, fitted on the validation texts and on their
first words, because one temperature leaves short texts overconfident.

Runs are deterministic (TensorFlow's deterministic ops, a deterministic optimiser). On a machine with several
GPUs the loss and gradient are computed under ``tf.distribute.MirroredStrategy`` (each GPU a block of rows),
on one GPU on that GPU, else on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from maas_tasks.config import DEVICE_CHOICES
from maas_tasks.features import load_vectorizer
from maas_tasks.model import TEMPERATURE_BOUNDS, Artifact, build_classifier, first_words, save_artifact
from maas_tasks.storage import Store
from maas_tasks.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
# Inverse L2 strength (liblinear's C), chosen per run on the validation side from this grid: long reviews
# want little regularisation (IMDB: C 30 to 100), short sentences much more (C 1): docs/model.md.
C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
# Used when the data are too few for a validation side.
DEFAULT_C = 30.0
# One epoch is this many L-BFGS iterations, each a full pass over the rows; IMDB converges in about 100.
ITERATIONS_PER_EPOCH = 25
LBFGS_MEMORY = 10
DEFAULT_PATIENCE = 2
# Early stopping treats a validation loss within this share of the best as no worse (it is noise).
VALIDATION_LOSS_TOLERANCE = 0.005
# Below this many validation rows a fitted temperature is noise (and a separable slice drives it to zero).
MIN_CALIBRATION_ROWS = 200
# The validation texts are also cut to their first words at these lengths to fit the length-aware temperature.
CALIBRATION_PREFIX_WORDS = (6, 12, 25, 50)


@dataclass(frozen=True)
class DevicePlan:
    """Where training runs: ``strategy`` is ``mirrored`` (all GPUs), ``one_device`` (one GPU) or ``default``."""

    strategy: str
    devices: tuple[str, ...]

    def describe(self) -> str:
        if self.strategy == "mirrored":
            return f"MirroredStrategy over {len(self.devices)} GPUs ({', '.join(self.devices)})"
        return self.devices[0]


def select_device(preference: str = "auto", devices: Sequence[Any] | None = None) -> str:
    """Pick the TensorFlow device to train on.

    Args:
        preference: ``auto`` (GPU when there is one), ``gpu`` (must have one) or ``cpu``.
        devices: the physical devices to choose from (objects with ``device_type`` or names such as
            ``/physical_device:GPU:0``); default ``tf.config.list_physical_devices()``.

    Returns:
        ``"/GPU:0"`` or ``"/CPU:0"``.

    Raises:
        ValueError: ``preference`` is not one of auto, cpu, gpu, or it is gpu and no GPU is visible.
    """
    preference = preference.strip().lower()
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device preference {preference!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if preference == "cpu":
        return "/CPU:0"
    if devices is None:
        tf = import_tensorflow()

        devices = tf.config.list_physical_devices()
    has_gpu = any("GPU" in str(getattr(d, "device_type", d)).upper() for d in devices)
    if has_gpu:
        return "/GPU:0"
    if preference == "gpu":
        raise ValueError(
            "device 'gpu' was requested but TensorFlow sees no GPU (visible devices: "
            f"{', '.join(str(getattr(d, 'name', d)) for d in devices) or 'none'}); install the CUDA build "
            "of TensorFlow and the NVIDIA driver, or use device 'auto' or 'cpu'"
        )
    return "/CPU:0"


def plan_devices(preference: str = "auto", devices: Sequence[Any] | None = None) -> DevicePlan:
    """The distribution strategy and devices to train on (see :func:`select_device` for ``preference``).

    Several GPUs: ``MirroredStrategy`` over all of them (each step's batch is split between them and the
    gradients summed). Mixed precision is not used: a sparse linear layer is bound by memory traffic, not
    arithmetic, and float16 sparse matmuls are not supported on every device.
    """
    device = select_device(preference, devices)
    if device == "/CPU:0":
        return DevicePlan("default", ("/CPU:0",))
    if devices is None:
        tf = import_tensorflow()

        devices = tf.config.list_physical_devices("GPU")
    gpus = [d for d in devices if "GPU" in str(getattr(d, "device_type", d)).upper()]
    names = tuple(f"/GPU:{i}" for i in range(len(gpus)))
    return DevicePlan("mirrored", names) if len(names) > 1 else DevicePlan("one_device", ("/GPU:0",))


def make_strategy(plan: DevicePlan) -> Any:
    """The ``tf.distribute`` strategy of ``plan``."""
    tf = import_tensorflow()

    if plan.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(plan.devices))
    if plan.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy(plan.devices[0])
    return tf.distribute.get_strategy()


def deterministic_ops(plan: DevicePlan) -> bool:
    """Whether to switch on TensorFlow's deterministic ops for ``plan``: on the CPU only.

    TensorFlow has no deterministic GPU kernel for the sparse matmuls the fit is made of: with determinism on,
    they fail (UnimplementedError) instead of running. On GPUs a run is therefore repeatable up to the order of
    floating-point sums (the fit itself has no randomness); on the CPU it is identical to the last digit.
    """
    return plan.strategy == "default"


def _read_parquet(store: Store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` that minimises the log loss of ``softmax(logits / T)`` on ``labels``.

    The log loss is convex in ``1/T``, so a golden-section search over ``log T`` finds its minimum;
    ``T`` is kept within [0.1, 10] so that a slice the model separates perfectly cannot push it to 0.

    Args:
        logits: n x K pre-softmax scores. labels: n class indices.

    Raises:
        ValueError: shapes disagree or there are no rows.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need n x K logits and n labels with n > 0, got {logits.shape} and {labels.shape}")
    picked = logits[np.arange(len(labels)), labels]

    def log_loss(log_t: float) -> float:
        z = logits / np.exp(log_t)
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - picked / np.exp(log_t)))

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):  # shrinks the bracket by 0.618**60: far below any useful precision
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if log_loss(left) <= log_loss(right):
            high = right
        else:
            low = left
    return float(np.exp((low + high) / 2))


def fit_length_calibration(logits: np.ndarray, known: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` minimising the log loss of ``softmax(logits / exp(a + b / sqrt(1 + known)))``.

    One temperature for every text leaves short texts overconfident: a dozen words give few n-grams, each
    of which weighs much after the unit-length scaling. ``known`` (each row's number of known n-grams) lets
    the temperature grow for short texts. Starts from the best single temperature (``b = 0``), so the fit
    is never worse than it on these rows; the temperature stays within [0.1, 10] for every length.
    """
    from scipy.optimize import minimize

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    scale = 1.0 / np.sqrt(1.0 + np.asarray(known, dtype=np.float64))
    picked = logits[np.arange(len(labels)), labels]
    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])

    def log_loss(params: np.ndarray) -> float:
        log_t = np.clip(params[0] + params[1] * scale, low, high)
        z = logits / np.exp(log_t)[:, None]
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - picked / np.exp(log_t)))

    start = np.array([np.log(fit_temperature(logits, labels)), 0.0])
    best = minimize(log_loss, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 400})
    a, b = (best.x if best.fun <= log_loss(start) else start).tolist()
    return float(a), float(b)


def featurize(model: Any, texts: Sequence[str], batch_size: int = 512) -> Any:
    """``texts`` through the model's own ``features``, as one ``[len(texts), V + 1]`` SparseTensor."""
    tf = import_tensorflow()

    parts = [
        model.features(tf.constant(list(texts[start:start + batch_size]), dtype=tf.string))
        for start in range(0, len(texts), batch_size)
    ]
    if not parts:
        return tf.SparseTensor(tf.zeros([0, 2], tf.int64), tf.zeros([0]), [0, model.width])
    return tf.sparse.concat(axis=0, sp_inputs=parts)


def _log_epoch(label: str, epoch: int, epochs: int, record: dict[str, float], seconds: list[float]) -> None:
    """One progress line: the epoch, its losses and accuracies (train and validation), its time and the time left."""
    validation = (
        f"; validation loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.4f}" if "val_loss" in record else ""
    )
    log.info(
        "%s %d/%d: loss %.4f, accuracy %.4f%s (%.1f s; at most %.0f s left)", label, epoch, epochs, record["loss"],
        record["accuracy"], validation, seconds[-1], (epochs - epoch) * float(np.mean(seconds)),
    )


def _shard_rows(x: Any, y: np.ndarray, replicas: int) -> list[tuple[Any, Any]]:
    """``x`` (float64) and ``y`` cut into ``replicas`` consecutive row blocks, one per replica."""
    tf = import_tensorflow()

    width = x.dense_shape[1]
    bounds = np.linspace(0, len(y), replicas + 1).astype(np.int64)
    return [
        (tf.sparse.slice(x, [int(lo), 0], [int(hi - lo), width]), tf.constant(y[lo:hi], dtype=tf.int64))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def _kept_epoch(val_losses: Sequence[float]) -> int:
    """The epoch (1-based) :func:`_fit_softmax` keeps: the last one within the tolerance of the best so far."""
    kept, best = 1, float("inf")
    for epoch, loss in enumerate(val_losses, start=1):
        if loss <= best * (1 + VALIDATION_LOSS_TOLERANCE):
            kept, best = epoch, min(best, loss)
    return kept


def _fit_softmax(
    plan: DevicePlan,
    x: Any,
    y: np.ndarray,
    *,
    n_classes: int,
    c: float,
    epochs: int,
    validation: tuple[Any, np.ndarray] | None = None,
    patience: int = DEFAULT_PATIENCE,
    label: str = "epoch",
    initial: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]], str | None]:
    """Fit L2-regularised softmax regression ``softmax(x @ kernel + bias)`` to ``y`` by full-batch L-BFGS.

    The objective is the mean cross-entropy plus ``||kernel||² / (2 c n)`` (liblinear's ``C``, per row), a
    convex problem: the answer does not depend on a seed, a batch order or a learning rate. Each epoch is
    :data:`ITERATIONS_PER_EPOCH` L-BFGS iterations (each a full pass over the rows). The loss and its
    gradient are computed by TensorFlow under the plan's distribution strategy: with several GPUs, each
    replica takes a block of rows and the sums are reduced across them. With ``validation``, training stops
    when the validation loss has not improved for ``patience`` epochs and the best epoch's weights are kept;
    it also stops when L-BFGS has converged. ``initial`` (kernel, bias) warm-starts the fit, e.g. from the
    solution for a neighbouring ``c``.

    Returns:
        The kernel ``[width, K]`` and bias ``[K]`` (float32), the per-epoch history and why it stopped before
        ``epochs`` (``"converged"``, ``"validation loss stopped improving"``, or None).
    """
    tf = import_tensorflow()
    from scipy.optimize import minimize

    n, width = len(y), int(x.dense_shape[1])
    x = tf.SparseTensor(x.indices, tf.cast(x.values, tf.float64), x.dense_shape)
    strategy = make_strategy(plan)
    shards = _shard_rows(x, y, strategy.num_replicas_in_sync)
    data = strategy.experimental_distribute_values_from_function(lambda ctx: shards[ctx.replica_id_in_sync_group])
    l2 = 1.0 / (c * n)

    def replica_sums(part: tuple[Any, Any], kernel: Any, bias: Any) -> tuple[Any, Any, Any]:
        rows, labels = part
        with tf.GradientTape() as tape:
            tape.watch([kernel, bias])
            logits = tf.sparse.sparse_dense_matmul(rows, kernel) + bias
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grad_kernel, grad_bias = tape.gradient(loss, [kernel, bias])
        return loss, grad_kernel, grad_bias

    @tf.function
    def objective(kernel: Any, bias: Any) -> tuple[Any, Any, Any]:
        sums = strategy.run(replica_sums, args=(data, kernel, bias))
        loss, grad_kernel, grad_bias = (strategy.reduce("SUM", v, axis=None) for v in sums)
        return loss / n + 0.5 * l2 * tf.reduce_sum(kernel * kernel), grad_kernel / n + l2 * kernel, grad_bias / n

    def unpack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w[: width * n_classes].reshape(width, n_classes), w[width * n_classes:]

    def value_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        kernel, bias = unpack(w)
        loss, grad_kernel, grad_bias = objective(tf.constant(kernel), tf.constant(bias))
        return float(loss), np.concatenate([grad_kernel.numpy().ravel(), grad_bias.numpy()])

    def scored(rows: Any, labels: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy (no penalty) and accuracy of ``w`` on these rows."""
        kernel, bias = unpack(w)
        logits = tf.sparse.sparse_dense_matmul(rows, tf.constant(kernel)) + bias
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(labels, tf.int64), logits))
        return float(loss), float(np.mean(np.argmax(logits.numpy(), axis=1) == labels))

    if validation is not None:
        validation = (tf.SparseTensor(validation[0].indices, tf.cast(validation[0].values, tf.float64),
                                      validation[0].dense_shape), np.asarray(validation[1]))
    w = np.zeros(width * n_classes + n_classes)
    if initial is not None:
        w = np.concatenate([np.asarray(initial[0], np.float64).ravel(), np.asarray(initial[1], np.float64)])
    best_w, best_loss, waited, stopped = w, np.inf, 0, None
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    seconds: list[float] = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        result = minimize(value_and_grad, w, jac=True, method="L-BFGS-B",
                          options={"maxiter": ITERATIONS_PER_EPOCH, "maxcor": LBFGS_MEMORY})
        w = result.x
        record = {"loss": float(result.fun), "accuracy": scored(x, y, w)[1]}
        if validation is not None:
            record["val_loss"], record["val_accuracy"] = scored(*validation, w)
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        seconds.append(time.perf_counter() - started)
        _log_epoch(label, epoch, epochs, record, seconds)
        # A later epoch within the tolerance of the best is kept: on a flat validation loss, the more converged fit.
        if validation is None or record["val_loss"] <= best_loss * (1 + VALIDATION_LOSS_TOLERANCE):
            best_w, best_loss, waited = w, min(best_loss, record.get("val_loss", best_loss)), 0
        else:
            waited += 1
            if waited >= patience:
                stopped = "validation loss stopped improving"
                break
        if result.nit < ITERATIONS_PER_EPOCH and epoch < epochs:  # converged: more iterations would not move it
            stopped = "converged"
            break
    kernel, bias = unpack(best_w)
    return kernel.astype(np.float32), bias.astype(np.float32), history, stopped


def fit_side_weights(vectorizer: dict[str, Any], validation_x: Any, validation_y: np.ndarray) -> np.ndarray:
    """The term weights of the feature stage, recomputed without the validation rows.

    The feature stage weighs each term from the class counts of the whole train side. Naive-Bayes weights
    carry the labels of the texts they were counted on, so on the validation rows they would be fitted to
    those rows' own labels: the validation loss would read too low (early stopping misled) and the temperature
    fitted on it too confident (on short texts, ECE 0.11 instead of 0.05). The validation rows' counts come
    from their features (each known n-gram once per row), so no text is tokenised again.
    """
    from maas_tasks.features import term_weights

    counts = np.asarray(vectorizer["class_counts"], dtype=np.int64).copy()
    indices = validation_x.indices.numpy()
    np.add.at(counts, (indices[:, 1] - 1, np.asarray(validation_y)[indices[:, 0]]), -1)  # id 0 is out of vocabulary
    sizes = np.asarray(vectorizer["class_sizes"], dtype=np.int64) - np.bincount(validation_y, minlength=counts.shape[1])
    return term_weights(counts, sizes, vectorizer["weighting"])


def _split_validation(train_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows to fit on and the validation rows: those of the train side whose ``split`` is ``validation``.

    The validation side is empty (no early stopping, no temperature; every row is fitted on) when it holds
    fewer than :data:`MIN_CALIBRATION_ROWS` rows, or when the table has no ``split`` column (features built
    before the clean stage chose the splits).
    """
    if "split" not in train_df.columns:
        return train_df, train_df.iloc[:0]
    held = train_df["split"] == "validation"
    if held.sum() < MIN_CALIBRATION_ROWS:
        return train_df, train_df.iloc[:0]
    return train_df.loc[~held].reset_index(drop=True), train_df.loc[held].reset_index(drop=True)


def _labels(df: pd.DataFrame, classes: list[Any]) -> np.ndarray:
    index = {label: i for i, label in enumerate(classes)}
    return np.asarray([index[label] for label in df["label"]], dtype=np.int32)


def train_model(
    store: Store,
    features_key: str,
    *,
    epochs: int = 5,
    batch_size: int = 512,
    c: float | None = None,
    patience: int = DEFAULT_PATIENCE,
    refit: bool = True,
    device: str = "auto",
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Train the classifier on ``features_key``'s train split and store it (``trained/<hash>/``).

    The rows of the train side whose ``split`` is ``validation`` are held out for early stopping, the choice
    of C and the temperature (:func:`_split_validation`: under :data:`MIN_CALIBRATION_ROWS` of them, every
    row is fitted on for every epoch, with temperature 1); the clean stage chose them, whole groups.

    Writes the model (:func:`maas_tasks.model.save_artifact`) and then ``history.json`` (per-epoch loss and
    accuracy, the epoch kept, the temperature, the parameters, the device). The hash covers the features key
    (itself a content hash) and the training parameters, so a re-run writes the same prefix.

    Args:
        epochs: the most epochs (each :data:`ITERATIONS_PER_EPOCH` L-BFGS iterations) to run; fewer when the
            validation loss stops improving for ``patience`` epochs or the fit has converged.
        batch_size: texts featurised at a time (it bounds the memory of featurising, not the fit).
        c: inverse L2 strength (liblinear's C), see :func:`_fit_softmax`; None: the value of :data:`C_GRID`
            with the lowest validation loss (recorded with the model), or :data:`DEFAULT_C` when the data
            are too few to hold out a validation side.
        refit: once the validation side has chosen the epoch count and the temperature, fit again on every
            train row (validation side included) and ship that model.
        device: ``auto``, ``cpu`` or ``gpu`` (see :func:`select_device`); ``devices`` injects the device list.

    Returns:
        ``key`` (the ``trained/<hash>`` prefix), ``device``, ``history``, ``best_epoch``, ``temperature`` and
        ``train_seconds``.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """
    tf = import_tensorflow()

    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size} and patience={patience} must all be at least 1")
    if c is not None and not c > 0:
        raise ValueError(f"c={c} must be positive")
    plan = plan_devices(device, devices)
    features_key = features_key.rstrip("/")
    vectorizer = load_vectorizer(store, features_key)
    classes = vectorizer["classes"]
    fit_df, validation_df = _split_validation(_read_parquet(store, f"{features_key}/train.parquet"))
    if deterministic_ops(plan):
        tf.config.experimental.enable_op_determinism()

    started = time.perf_counter()
    artifact = Artifact(
        classes=[str(name) for name in classes], ngrams=int(vectorizer["ngrams"]), vocabulary=vectorizer["vocabulary"],
        term_weights=np.asarray(vectorizer["term_weights"], dtype=np.float32),
        kernel=np.zeros((len(vectorizer["vocabulary"]) + 1, len(classes)), dtype=np.float32),
        bias=np.zeros(len(classes), dtype=np.float32), info={},
    )
    has_validation = len(validation_df) > 0
    shipped = artifact  # term weights from every train row
    if has_validation:
        artifact = replace(artifact, term_weights=fit_side_weights(
            vectorizer, featurize(build_classifier(artifact), validation_df["text"].tolist(), batch_size),
            _labels(validation_df, classes),
        ))
    model = build_classifier(artifact)
    fit_x, fit_y = featurize(model, fit_df["text"].tolist(), batch_size), _labels(fit_df, classes)
    validation = (featurize(model, validation_df["text"].tolist(), batch_size), _labels(validation_df, classes))
    featurize_seconds = time.perf_counter() - started
    requested_c = c
    # Without a validation side there is nothing to choose C on: the default serves.
    grid = [c] if c is not None else list(C_GRID) if has_validation else [DEFAULT_C]
    log.info(
        "training on %s: %d rows (featurised in %.1f s), %d for validation, %d classes, %d n-gram features; at most "
        "%d epochs of %d L-BFGS iterations, C %s", plan.describe(), len(fit_df), featurize_seconds,
        len(validation_df), len(classes), model.width - 1, epochs, ITERATIONS_PER_EPOCH,
        " or ".join(f"{value:g}" for value in grid) + (" (the lowest validation loss)" if len(grid) > 1 else ""),
    )
    fits: list[tuple[float, float, Any]] = []  # (validation loss, C, _fit_softmax's result)
    initial = None
    # From strong regularisation to weak, each fit warm-started from the previous one, until the validation
    # loss turns up (weaker regularisation past the best C only overfits more).
    for value in grid:
        fitted = _fit_softmax(
            plan, fit_x, fit_y, n_classes=len(classes), c=value, epochs=epochs,
            validation=validation if has_validation else None, patience=patience,
            label=f"C={value:g} epoch" if len(grid) > 1 else "epoch", initial=initial,
        )
        fits.append((min(fitted[2]["val_loss"]) if has_validation else 0.0, value, fitted))
        initial = fitted[:2]
        if fits[-1][0] > min(f[0] for f in fits):
            break
    _, c, (kernel, bias, history, stopped) = min(fits, key=lambda f: f[0])
    selection = {f"{value:g}": loss for loss, value, _ in fits} if has_validation else {}
    if len(fits) > 1:
        log.info(
            "chose C %g: the lowest validation loss (%s)", c,
            ", ".join(f"C={name}: {loss:.4f}" for name, loss in selection.items()),
        )
    best_epoch = _kept_epoch(history["val_loss"]) if has_validation else len(history["loss"])
    calibration = np.zeros(2, dtype=np.float32)
    calibration_rows = 0
    if has_validation:
        # The validation texts and their first words: the temperature must also fit short inputs.
        texts, labels = validation_df["text"].tolist(), validation[1]
        xs = [validation[0], *(featurize(model, first_words(texts, n)) for n in CALIBRATION_PREFIX_WORDS)]
        logits = np.concatenate([tf.sparse.sparse_dense_matmul(x, kernel).numpy() + bias for x in xs])
        known = np.concatenate([
            tf.math.unsorted_segment_sum(tf.ones_like(x.values), x.indices[:, 0], x.dense_shape[0]).numpy() for x in xs
        ])
        calibration = np.asarray(fit_length_calibration(logits, known, np.tile(labels, len(xs))), dtype=np.float32)
        calibration_rows = len(known)
    refit_history = None
    if refit and has_validation:
        # The validation side has chosen C and the temperature; the model that ships learns from its rows too:
        # term weights and kernel from every train row, fitted with that C until converged (the problem is
        # convex). The held-out eval split, which none of this saw, measures that shipped model, calibration
        # included.
        model = build_classifier(shipped)
        all_x = featurize(model, [*fit_df["text"], *validation_df["text"]], batch_size)
        kernel, bias, refit_history, _ = _fit_softmax(
            plan, all_x, np.concatenate([fit_y, validation[1]]), n_classes=len(classes), c=c, epochs=epochs,
            label="refit epoch", initial=(kernel, bias),
        )
        artifact = shipped
        log.info(
            "refitted on all %d train rows with C %g, from the chosen fit, in %d epoch(s)",
            len(fit_df) + len(validation_df), c, len(refit_history["loss"]),
        )
    temperature = float(np.exp(calibration[0]))
    train_seconds = time.perf_counter() - started
    log.info(
        "trained on %s: %d rows, %d epoch(s)%s, kept epoch %d, in %.1f s; score temperature %.3f for long texts, "
        "%.3f for 10 n-grams%s", plan.describe(), len(fit_df), len(history["loss"]),
        f" (stopped early: {stopped})" if stopped else "", best_epoch, train_seconds,
        temperature, float(np.exp(calibration[0] + calibration[1] / np.sqrt(11.0))),
        "" if has_validation else f" (no validation side: fewer than {MIN_CALIBRATION_ROWS} validation rows)",
    )

    params = {
        "epochs": epochs, "batch_size": batch_size, "c": c, "patience": patience, "refit": refit,
    }
    # The prefix names what was asked for (C chosen or given), so two different models never share one.
    digest = hashlib.sha256(json.dumps({"features": features_key, **params, "c": requested_c}, sort_keys=True).encode())
    prefix = f"trained/{digest.hexdigest()[:16]}"
    calibration_record = {
        "temperature": temperature, "length_coefficient": float(calibration[1]), "fit_rows": len(fit_df),
        "calibration_rows": len(validation_df), "calibration_texts": calibration_rows,
    }
    info = {
        "calibration": calibration_record, "weighting": vectorizer["weighting"], "min_df": vectorizer["min_df"],
        "max_tokens": vectorizer["max_tokens"], "features_key": features_key, "params": params,
        "c_selection": selection,
    }
    save_artifact(store, prefix, Artifact(**{
        **artifact.__dict__, "kernel": kernel, "bias": bias, "info": info, "calibration": calibration,
    }))
    record = {
        "history": history, "best_epoch": best_epoch, "params": params, "calibration": calibration_record,
        "device": plan.describe(), "train_seconds": train_seconds, "features_key": features_key, "classes": classes,
        "vocab_size": model.width - 1, "refit_history": refit_history, "c_selection": selection,
    }
    store.put_bytes(f"{prefix}/{HISTORY_FILE}", json.dumps(record, indent=2).encode())
    return {
        "key": prefix,
        "prefix": prefix,
        "device": plan.describe(),
        "history": history,
        "best_epoch": best_epoch,
        "temperature": temperature,
        "train_seconds": train_seconds,
    }
