"""Fixtures for the serving tests: two tiny exported sentiment models, in-process model servers, and a
registry with a store of published versions for the node agent and the rollout protocol.

The models follow the serving contract (signature ``serving_default``: ``text`` in; ``scores``,
``classes``, ``label`` out) and are written with Keras' ``ExportArchive`` as the training side does.
Version 1 and version 2 give different scores for the same text, so a test can tell which answered.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maas_tasks.registry import Registry
from maas_tasks.storage import FileStore, upload_tree

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

    def start(config, poll_wait_seconds: float = 0.0, **options) -> ModelServer:
        server = ModelServer(config, grpc_port=0, rest_port=0, poll_wait_seconds=poll_wait_seconds, **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0.5)


GOLDEN_TEXTS = ["good", "bad film", "great and awful", ""]


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


@pytest.fixture
def published(tmp_path, saved_models, registry):
    """Publish exported models as versions of ``sentiment`` (with golden requests) and register them.

    Returns ``publish(source)`` -> the new version number; ``source`` picks one of the test models.
    """
    from maas_tasks.export import write_golden_requests

    store = FileStore(tmp_path / "store")

    def publish(source: int, model: str = "sentiment", *, golden: bool = True) -> int:
        version = registry.register_version(model, status="candidate")
        local = tmp_path / "export" / model / str(version)
        shutil.copytree(saved_models[source], local)
        if golden:
            write_golden_requests(local, GOLDEN_TEXTS)
        upload_tree(store, local, f"models/{model}/{version}")
        registry.set_artifact(model, version, store.uri(f"models/{model}/{version}"))
        return version

    publish.store = store
    return publish


@pytest.fixture
def node(tmp_path, start_server):
    """An in-process model server started from an empty config file, as the node ``n1``."""
    from serving.model_config import ModelServerConfig, read_model_config, write_model_config
    from serving.sync import Node

    serving_dir = tmp_path / "serving"
    config_path = serving_dir / "models.config"
    write_model_config(config_path, ModelServerConfig())
    server = start_server(read_model_config(config_path))
    return Node("n1", serving_dir, config_path, server.grpc_target, server.rest_url)


