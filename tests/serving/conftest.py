"""Fixtures for the serving tests: two tiny exported sentiment models and in-process model servers.

The models follow the serving contract (signature ``serving_default``: ``text`` in; ``scores``,
``classes``, ``label`` out) and are written with Keras' ``ExportArchive`` as the training side does.
Version 1 and version 2 give different scores for the same text, so a test can tell which answered.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

VOCABULARY = ["good", "bad", "great", "awful"]
CLASSES = ["negative", "positive"]
# Dense kernels (OOV row first, then one row per word): version 2 is twice as confident as version 1.
WEIGHTS = {
    1: [[0.0, 0.0], [-1.0, 1.0], [1.0, -1.0], [-2.0, 2.0], [2.0, -2.0]],
    2: [[0.0, 0.0], [-2.0, 2.0], [2.0, -2.0], [-4.0, 4.0], [4.0, -4.0]],
}


def export_sentiment_model(path: Path, kernel: list[list[float]]) -> Path:
    """Export a TF-IDF -> Dense(2, softmax) text classifier with fixed weights to ``path``."""
    import keras
    import numpy as np
    import tensorflow as tf

    vectorizer = keras.layers.TextVectorization(
        output_mode="tf_idf", vocabulary=VOCABULARY, idf_weights=[1.0] * len(VOCABULARY)
    )
    dense = keras.layers.Dense(len(CLASSES), activation="softmax")
    inputs = keras.Input(shape=(1,), dtype="string")
    model = keras.Model(inputs, dense(vectorizer(inputs)))
    dense.set_weights([np.array(kernel, dtype="float32"), np.zeros(len(CLASSES), dtype="float32")])
    class_names = tf.constant(CLASSES)

    def serve(text):
        scores = model(tf.reshape(text, [-1, 1]))
        classes = tf.tile(class_names[None, :], [tf.shape(text)[0], 1])
        return {"scores": scores, "classes": classes, "label": tf.gather(class_names, tf.argmax(scores, axis=1))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default", fn=serve, input_signature=[tf.TensorSpec([None], tf.string, name="text")]
    )
    archive.write_out(str(path), verbose=False)
    return path


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[int, Path]:
    """Version number -> an exported SavedModel directory (built once per session)."""
    root = tmp_path_factory.mktemp("exported")
    return {version: export_sentiment_model(root / str(version), kernel) for version, kernel in WEIGHTS.items()}


@pytest.fixture(scope="session")
def install_model(saved_models) -> Callable[[Path, int], Path]:
    """Copy exported version ``v`` to ``base/<v>`` (returns the version directory)."""

    def install(base: Path, version: int, source: int | None = None) -> Path:
        target = Path(base) / str(version)
        shutil.copytree(saved_models[source or version], target)
        return target

    return install


@pytest.fixture
def start_server() -> Iterator[Callable]:
    """Start in-process model servers on free loopback ports; all are stopped after the test."""
    from serving.server import ModelServer

    servers = []

    def start(config, poll_wait_seconds: float = 0.0) -> ModelServer:
        server = ModelServer(config, grpc_port=0, rest_port=0, poll_wait_seconds=poll_wait_seconds)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0.5)
