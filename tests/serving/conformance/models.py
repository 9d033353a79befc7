"""The conformance suite's test models and the ``models.config`` that serves them.

TF Serving's tests run against tiny models it ships as binary test data (``half_plus_two`` as a TF1 graph
and as a TF2 module, two versions of it, ...). The suite builds equivalent models here with TensorFlow, so
that the files the embedded server is tested with are the files a real ``tensorflow_model_server`` can be
given, and no binary test data is checked in:

- ``half_plus_two`` (version 123, directory ``00000123``): a TF1 graph with reference variables and the
  signatures of TF Serving's ``saved_model_half_plus_two_2_versions`` (predict, classify and regress).
- ``half_plus_two_tf2`` (version 123): TF Serving's native TF2 ``HalfPlusTwoModel``; its classify and
  regress signatures carry the predict method name, as every ``tf.saved_model.save`` signature does.
- ``half_plus_n`` (versions 1, 2, 3; version v computes ``0.5 * x + v``), served under four names with
  different version policies; ``polled`` starts with version 1 and the suite adds and removes versions.
- ``assorted``: the tensor kinds the others lack (bytes in and out, int64 out, two inputs, a classifier
  with class labels).
- ``sentiment``: the MaaS serving contract, exported by Keras as the training pipeline does.
- ``broken``: a version whose ``saved_model.pb`` is not a SavedModel; it is not in ``models.config``
  (TF Serving does not start when a configured model fails to load), the suite loads it by a reload.

Run ``python -m tests.serving.conformance.models OUT_DIR [--base-path-prefix /models]``; the prefix is the
directory as the server will see it (e.g. a Docker volume's mount point).
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig

HALF_PLUS_TWO = "half_plus_two"
HALF_PLUS_TWO_TF2 = "half_plus_two_tf2"
HALF_PLUS_TWO_VERSION = 123
HALF_PLUS_N = "half_plus_n"
HALF_PLUS_N_VERSIONS = (1, 2, 3)
HALF_PLUS_N_ALL = "half_plus_n_all"
HALF_PLUS_N_SPECIFIC = "half_plus_n_specific"
HALF_PLUS_N_SPECIFIC_VERSIONS = (1, 2)
HALF_PLUS_N_LATEST_TWO = "half_plus_n_latest2"
POLLED = "polled"
ASSORTED = "assorted"
SENTIMENT = "sentiment"
BROKEN = "broken"
TENSORFLOW_PLATFORM = "tensorflow"

MODEL_CONFIG_FILE = "models.config"
MONITORING_CONFIG_FILE = "monitoring.config"
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
MONITORING_CONFIG = f'prometheus_config {{ enable: true, path: "{PROMETHEUS_PATH}" }}\n'

# TF Serving's test data names version 123 this way; version directories are parsed as int64.
_HALF_PLUS_TWO_DIR = f"{HALF_PLUS_TWO_VERSION:08d}"


def write_half_plus_two(export_dir: Path) -> None:
    """Write TF Serving's TF1 ``half_plus_two``: ``y = 0.5 * x + 2``, ``y2 = 0.5 * x + 3``, ``y3 = 0.5 * x2 + 3``.

    The predict signatures feed ``x``/``x2`` (the parsed features) directly, so a request's tensor
    reaches the graph with the shape it was sent in; the classify and regress signatures take
    serialized ``tf.Example`` protos (feature ``x``, and ``x2`` defaulting to 0).
    """
    import tensorflow as tf

    tf1 = tf.compat.v1
    build_info = tf1.saved_model.utils.build_tensor_info
    constants = tf1.saved_model.signature_constants

    def signature(inputs: dict, outputs: dict, method: str):
        return tf1.saved_model.signature_def_utils.build_signature_def(
            {key: build_info(tensor) for key, tensor in inputs.items()},
            {key: build_info(tensor) for key, tensor in outputs.items()},
            method,
        )

    graph = tf.Graph()
    with graph.as_default(), tf1.Session(graph=graph) as session:
        # Reference (non-resource) variables, as graphs exported by TF1 code have.
        a, b, c, a2, c2 = (
            tf1.get_variable(name, initializer=value, use_resource=False)
            for name, value in (("a", 0.5), ("b", 2.0), ("c", 3.0), ("a2", 0.5), ("c2", 3.0))
        )
        # Unknown rank, as in TF Serving's exported model (its metadata says so).
        serialized = tf1.placeholder(tf.string, name="tf_example")
        features = tf1.io.parse_example(
            serialized,
            {
                "x": tf1.io.FixedLenFeature([1], tf.float32),
                "x2": tf1.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
            },
        )
        # The parsed features get their static shape back ([-1, 1], as TF Serving's metadata shows) before
        # the identities the predict signatures feed.
        x = tf.identity(tf.ensure_shape(features["x"], [None, 1]), name="x")
        x2 = tf.identity(tf.ensure_shape(features["x2"], [None, 1]), name="x2")
        y = tf.identity(tf.add(tf.multiply(a, x), b), name="y")
        y2 = tf.identity(tf.add(tf.multiply(a, x), c), name="y2")
        y3 = tf.identity(tf.add(tf.multiply(a2, x2), c2), name="y3")
        session.run(tf1.global_variables_initializer())

        regress, classify = constants.REGRESS_METHOD_NAME, constants.CLASSIFY_METHOD_NAME
        signatures = {
            constants.DEFAULT_SERVING_SIGNATURE_DEF_KEY: signature({"x": x}, {"y": y}, constants.PREDICT_METHOD_NAME),
            "regress_x_to_y": signature({"inputs": serialized}, {"outputs": y}, regress),
            "regress_x_to_y2": signature({"inputs": serialized}, {"outputs": y2}, regress),
            "regress_x2_to_y3": signature({"inputs": x2}, {"outputs": y3}, regress),
            "classify_x_to_y": signature({"inputs": serialized}, {"scores": y}, classify),
            "classify_x2_to_y3": signature({"inputs": x2}, {"scores": y3}, classify),
        }
        builder = tf1.saved_model.Builder(str(export_dir))
        builder.add_meta_graph_and_variables(
            session, [tf1.saved_model.tag_constants.SERVING], signature_def_map=signatures
        )
        builder.save()


def write_half_plus_two_tf2(export_dir: Path) -> None:
    """Write TF Serving's native TF2 ``half_plus_two`` (its ``HalfPlusTwoModel``): same maths, TF2 signatures."""
    import tensorflow as tf

    feature_spec = {
        "x": tf.io.FixedLenFeature([1], tf.float32),
        "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
    }
    examples = tf.TensorSpec([None], tf.string, name="inputs")
    one_float = tf.TensorSpec([1], tf.float32, name="inputs")

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(0.5, name="a")
            self.b = tf.Variable(2.0, name="b")
            self.c = tf.Variable(3.0, name="c")

        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
        def predict(self, x):
            return {"y": self.a * x + self.b}

        @tf.function(input_signature=[examples])
        def regress_xy(self, inputs):
            return {"outputs": self.a * tf.io.parse_example(inputs, feature_spec)["x"] + self.b}

        @tf.function(input_signature=[examples])
        def regress_xy2(self, inputs):
            return {"outputs": self.a * tf.io.parse_example(inputs, feature_spec)["x"] + self.c}

        @tf.function(input_signature=[one_float])
        def regress_x2y3(self, inputs):
            return {"outputs": self.a * inputs + self.c}

        @tf.function(input_signature=[examples])
        def classify_xy(self, inputs):
            return {"scores": self.a * tf.io.parse_example(inputs, feature_spec)["x"] + self.b}

        @tf.function(input_signature=[one_float])
        def classify_x2y3(self, inputs):
            return {"scores": self.a * inputs + self.c}

    module = HalfPlusTwo()
    tf.saved_model.save(
        module,
        str(export_dir),
        signatures={
            "serving_default": module.predict,
            "regress_x_to_y": module.regress_xy,
            "regress_x_to_y2": module.regress_xy2,
            "regress_x2_to_y3": module.regress_x2y3,
            "classify_x_to_y": module.classify_xy,
            "classify_x2_to_y3": module.classify_x2y3,
        },
    )


def write_half_plus_n(export_dir: Path, n: int) -> None:
    """Write version ``n`` of ``half_plus_n``: ``y = 0.5 * x + n`` for ``x`` of shape [-1]."""
    import tensorflow as tf

    class HalfPlusN(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n = tf.Variable(float(n), name="n")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def predict(self, x):
            return {"y": 0.5 * x + self.n}

    module = HalfPlusN()
    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.predict})


def write_assorted(export_dir: Path) -> None:
    """Write ``assorted``: its signatures exercise the JSON and tensor encodings the other models do not.

    - ``serving_default``: ``payload_bytes`` (string [-1]) in; the same bytes as ``payload_bytes`` and
      their ``length`` (int64 [-1]) out. A ``_bytes`` suffix makes the REST API use base64.
    - ``sum_pair``: ``a`` (float [-1]) and ``b`` (float [-1, 2]) in; ``total = a + sum(b)`` and
      ``doubled = 2 * b`` out.
    - ``classify_labels``: serialized ``tf.Example`` protos (feature ``x``) in; ``classes`` ``neg``/``pos``
      and ``scores`` ``x / 4``, ``1 - x / 4`` out.
    """
    import tensorflow as tf

    class Assorted(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="payload_bytes")])
        def echo(self, payload_bytes):
            return {
                "payload_bytes": tf.identity(payload_bytes),
                "length": tf.cast(tf.strings.length(payload_bytes), tf.int64),
            }

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.float32, name="a"),
                tf.TensorSpec([None, 2], tf.float32, name="b"),
            ]
        )
        def sum_pair(self, a, b):
            return {"total": a + tf.reduce_sum(b, axis=1), "doubled": 2.0 * b}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify_labels(self, inputs):
            x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
            scores = tf.concat([x / 4.0, 1.0 - x / 4.0], axis=1)
            classes = tf.tile(tf.constant([["neg", "pos"]]), [tf.shape(x)[0], 1])
            return {"classes": classes, "scores": scores}

    module = Assorted()
    tf.saved_model.save(
        module,
        str(export_dir),
        signatures={
            "serving_default": module.echo,
            "sum_pair": module.sum_pair,
            "classify_labels": module.classify_labels,
        },
    )


def write_sentiment(export_dir: Path) -> None:
    """Write a ``sentiment`` model with the MaaS serving contract (version 1 weights of the serving tests)."""
    from tests.serving.conftest import WEIGHTS, export_sentiment_model

    export_sentiment_model(export_dir, WEIGHTS[1])


def write_broken(export_dir: Path) -> None:
    """Write a version directory that no server can load."""
    export_dir.mkdir(parents=True)
    (export_dir / "saved_model.pb").write_bytes(b"this is not a SavedModel")


def build_models(out_dir: Path) -> None:
    """Write every test model's version directories under ``out_dir`` (which must not hold them yet)."""
    write_half_plus_two(out_dir / HALF_PLUS_TWO / _HALF_PLUS_TWO_DIR)
    write_half_plus_two_tf2(out_dir / HALF_PLUS_TWO_TF2 / str(HALF_PLUS_TWO_VERSION))
    for n in HALF_PLUS_N_VERSIONS:
        write_half_plus_n(out_dir / HALF_PLUS_N / str(n), n)
    write_half_plus_n(out_dir / POLLED / "1", 1)
    write_assorted(out_dir / ASSORTED / "1")
    write_sentiment(out_dir / SENTIMENT / "1")
    write_broken(out_dir / BROKEN / "1")


def make_model_entry(name: str, base_path: str) -> ModelConfig:
    """A ``ModelConfig`` for a TensorFlow model (default version policy: the latest version)."""
    return ModelConfig(name=name, base_path=base_path, model_platform=TENSORFLOW_PLATFORM)


def make_model_config(base_path_prefix: str) -> ModelServerConfig:
    """The config the server under test starts with; base paths are ``base_path_prefix/<model directory>``."""

    def entry(name: str, directory: str) -> ModelConfig:
        return make_model_entry(name, posixpath.join(base_path_prefix, directory))

    config = ModelServerConfig()
    models = config.model_config_list.config
    models.append(entry(HALF_PLUS_TWO, HALF_PLUS_TWO))
    models.append(entry(HALF_PLUS_TWO_TF2, HALF_PLUS_TWO_TF2))
    models.append(entry(HALF_PLUS_N, HALF_PLUS_N))
    every_version = entry(HALF_PLUS_N_ALL, HALF_PLUS_N)
    every_version.model_version_policy.all.SetInParent()
    models.append(every_version)
    specific = entry(HALF_PLUS_N_SPECIFIC, HALF_PLUS_N)
    specific.model_version_policy.specific.versions.extend(HALF_PLUS_N_SPECIFIC_VERSIONS)
    models.append(specific)
    latest_two = entry(HALF_PLUS_N_LATEST_TWO, HALF_PLUS_N)
    latest_two.model_version_policy.latest.num_versions = 2
    models.append(latest_two)
    models.append(entry(POLLED, POLLED))
    models.append(entry(ASSORTED, ASSORTED))
    models.append(entry(SENTIMENT, SENTIMENT))
    return config


def read_model_config(path: Path) -> ModelServerConfig:
    """Parse a text-format ``ModelServerConfig`` file."""
    return text_format.Parse(path.read_text(), ModelServerConfig())


def find_base_path_prefix(config: ModelServerConfig) -> str:
    """The directory, as the server sees it, that ``config``'s models live in (what ``make_model_config`` was given)."""
    for model in config.model_config_list.config:
        if model.name == HALF_PLUS_TWO:
            return posixpath.dirname(model.base_path)
    raise ValueError(f"the model config has no {HALF_PLUS_TWO!r} entry: it was not written by this module")


def write_conformance_files(out_dir: Path, base_path_prefix: str | None = None) -> ModelServerConfig:
    """Build the models in ``out_dir`` and write ``models.config`` and ``monitoring.config`` beside them.

    Args:
        out_dir: a directory without the test models yet (created if missing).
        base_path_prefix: ``out_dir`` as the server will see it; defaults to ``out_dir`` itself.

    Returns:
        The model config written.
    """
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    build_models(out_dir)
    config = make_model_config(base_path_prefix or out_dir.as_posix())
    (out_dir / MODEL_CONFIG_FILE).write_text(text_format.MessageToString(config))
    (out_dir / MONITORING_CONFIG_FILE).write_text(MONITORING_CONFIG)
    return config


def main(argv: list[str] | None = None) -> int:
    """Command line: write the models and configs, print where."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.serving.conformance.models", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the models and configs to")
    parser.add_argument(
        "--base-path-prefix",
        help="OUT_DIR as the model server sees it, used in models.config's base paths (default: OUT_DIR)",
    )
    args = parser.parse_args(argv)
    write_conformance_files(args.out_dir, args.base_path_prefix)
    print(f"wrote the conformance models, {MODEL_CONFIG_FILE} and {MONITORING_CONFIG_FILE} to {args.out_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
