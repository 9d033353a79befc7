"""Loaded model versions, as TF Serving holds them: a TensorFlow session over the SavedModel's graph.

TF Serving loads every SavedModel with the session-based loader (``LoadSavedModel``), whatever wrote
it: a TF1 graph with reference variables, an Estimator export, or a Keras 3 ``model.export``. So does
this module (``tf.compat.v1.saved_model.loader.load`` into a ``tf.compat.v1.Session``), which is what
lets the embedded server load the same models as ``tensorflow_model_server`` and run them the same
way: the signature's tensors are fed as sent (no Python-side shape check; the graph decides), and a
run fails with TensorFlow's own status.

Also here: TensorProto conversion with TF Serving's typed ``*_val`` fields, and the warm-up replay
(``assets.extra/tf_serving_warmup_requests``) a version goes through before it serves.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.python.util import deprecation  # silences the loader's "use tf.saved_model.load" notice

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
SERVE_TAG = "serve"

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failed with a TF Serving status: a gRPC code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The gRPC code for a TensorFlow/absl error number (both use the same numbering)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def invalid_argument(message: str) -> ServingError:
    """An INVALID_ARGUMENT error, the status of most bad requests."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# --- TensorProto <-> numpy, with TF Serving's typed fields -------------------------------------

_TYPED_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
}


def tensor_to_proto(array: Any) -> tensor_pb2.TensorProto:
    """``array`` as a TensorProto with its values in the typed field (``float_val``, ``string_val``, ...),
    as TF Serving's ``Tensor::AsProtoField`` writes them; other dtypes fall back to ``tensor_content``."""
    array = np.asarray(array)
    if array.dtype.kind in "SUO":
        dtype = types_pb2.DT_STRING
    else:
        dtype = tf.as_dtype(array.dtype).as_datatype_enum
    field_name = _TYPED_FIELD.get(dtype)
    if field_name is None:
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    flat = array.ravel()
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat)
    else:
        getattr(proto, field_name).extend(flat.tolist())
    return proto


MAX_TENSOR_BYTES = 2**31 - 1  # as large as a gRPC message may be


def tensor_from_proto(proto: tensor_pb2.TensorProto, alias: str) -> np.ndarray:
    """The numpy value of a request's TensorProto.

    A proto may declare a large shape and send one value, which fills the tensor; a declared size whose
    memory would exceed :data:`MAX_TENSOR_BYTES` is refused before anything is allocated.

    Raises:
        ServingError: INVALID_ARGUMENT when the proto does not describe a tensor, or one that large.
    """
    elements = 1
    for dim in proto.tensor_shape.dim:
        if dim.size < 0:
            raise invalid_argument(f"tensor parsing error: {alias} (dimension {dim.size} is negative)")
        elements *= dim.size
    item_bytes = 8 if proto.dtype == types_pb2.DT_STRING else max(tf.as_dtype(proto.dtype).size, 1) if proto.dtype else 1
    if elements * item_bytes > MAX_TENSOR_BYTES:
        raise invalid_argument(
            f"tensor parsing error: {alias} (its shape declares {elements} elements, over {MAX_TENSOR_BYTES} bytes)"
        )
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError, MemoryError, tf.errors.OpError) as exc:
        raise invalid_argument(f"tensor parsing error: {alias} ({type(exc).__name__}: {exc})") from None


def _feed_value(array: np.ndarray) -> np.ndarray:
    # The session takes strings as an object array of bytes; fixed-width numpy strings are converted.
    if array.dtype.kind == "U":
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array) if array.size else array.astype(object)
    if array.dtype.kind == "S":
        return array.astype(object)
    return array


# --- signatures and servables ------------------------------------------------------------------


@dataclass
class Signature:
    """One SignatureDef of a loaded version, runnable in its session."""

    name: str
    definition: meta_graph_pb2.SignatureDef
    session: Any = field(repr=False)
    feeds: dict[str, Any] = field(repr=False, default_factory=dict)  # alias -> graph output of the tensor
    fetches: dict[str, Any] = field(repr=False, default_factory=dict)
    defaults: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    model: str = ""
    version: int = 0
    # Set by the server when batching is on: a serving.batching.BatchScheduler (callable, and .submit).
    batcher: Any = None

    @property
    def method_name(self) -> str:
        """The signature's method (``tensorflow/serving/predict``, ``.../classify``, ``.../regress``)."""
        return self.definition.method_name

    @property
    def input_names(self) -> list[str]:
        """The input aliases, sorted."""
        return sorted(self.definition.inputs)

    @property
    def output_names(self) -> list[str]:
        """The output aliases, sorted."""
        return sorted(self.definition.outputs)

    def input_dtype(self, alias: str) -> tf.DType:
        """The declared dtype of input ``alias``."""
        return tf.as_dtype(self.definition.inputs[alias].dtype)

    def check_inputs(self, sent: set[str]) -> None:
        """TF Serving's check of a Predict request's input names against the signature.

        Raises:
            ServingError: INVALID_ARGUMENT naming the extra and missing inputs.
        """
        expected = set(self.definition.inputs)
        if sent == expected or (sent < expected and expected - sent <= set(self.defaults)):
            return
        if len(sent) == len(expected):
            # TF Serving's size check passes; TensorFlow's GetInputValues then names the first missing alias.
            alias = sorted(expected - sent)[0]
            raise invalid_argument(
                f"Signature input alias: {alias}(feed name: {self.definition.inputs[alias].name}) not found in request"
            )
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )

    def output_aliases(self, output_filter: list[str] | None) -> list[str]:
        """The outputs a request asks for (all, sorted, when the filter is empty).

        Raises:
            ServingError: INVALID_ARGUMENT for an unknown or repeated alias.
        """
        seen: set[str] = set()
        for alias in output_filter or []:
            if alias not in self.definition.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(self.output_names)}}}."
                )
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return list(output_filter) if output_filter else self.output_names

    def run(self, inputs: dict[str, np.ndarray], output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the signature on named input arrays (fed as sent) and return the requested outputs.

        Raises:
            ServingError: INVALID_ARGUMENT for missing/extra inputs or a bad output filter; the
                TensorFlow error's code and message when the graph rejects the inputs.
        """
        return self.execute(*self.prepare(inputs, output_filter))

    def execute(self, values: dict[str, np.ndarray], aliases: list[str]) -> dict[str, np.ndarray]:
        """Run prepared ``values`` (see :meth:`prepare`): within a batch when batching is on, else alone.

        Raises:
            ServingError: the batch queue refuses the request, or the run's TensorFlow status.
        """
        if self.batcher is not None:
            return self.batcher(self, values, aliases)
        return self.run_session(values, aliases)

    def prepare(
        self, inputs: dict[str, np.ndarray], output_filter: list[str] | None = None
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """Check a request against the signature: the values to feed (defaults filled in) and the
        outputs to fetch.

        Raises:
            ServingError: INVALID_ARGUMENT for missing/extra inputs or a bad output filter.
        """
        self.check_inputs(set(inputs))
        aliases = self.output_aliases(output_filter)
        values = {**{k: v for k, v in self.defaults.items() if k not in inputs}, **inputs}
        return {k: _feed_value(np.asarray(v)) for k, v in values.items()}, aliases

    def submit(self, values: dict[str, np.ndarray], aliases: list[str], loop: Any = None) -> Future | None:
        """Queue prepared ``values`` for a batch; the Future gives the outputs (an asyncio future of
        ``loop`` when one is given). None when this signature is not batched, or the request has no batch
        dimension: then call :meth:`run_session`.

        Raises:
            ServingError: the batch queue refuses the request (full, or the request is too large).
        """
        if self.batcher is None:
            return None
        return self.batcher.submit(self, values, aliases, loop)

    def run_session(self, inputs: dict[str, np.ndarray], aliases: list[str]) -> dict[str, np.ndarray]:
        """One ``Session::Run`` with ``inputs`` fed to the signature's tensors (no batching).

        Raises:
            ServingError: the run's TensorFlow status.
        """
        feeds = {self.feeds[alias]: value for alias, value in inputs.items()}
        fetches = [self.fetches[alias] for alias in aliases]
        if None in feeds or None in fetches:
            missing = [a for a in inputs if self.feeds[a] is None] + [a for a in aliases if self.fetches[a] is None]
            raise invalid_argument(f"signature {self.name!r} has no tensor for {', '.join(missing)}: it cannot be run")
        try:
            # The private entry point is the C API's Session::Run: Python's Session.run would reject a
            # feed whose shape differs from the placeholder's, which TF Serving (C++) feeds as is.
            results = self.session._call_tf_sessionrun(None, feeds, fetches, [], None)
        except tf.errors.OpError as exc:
            raise ServingError(status_code_from_number(exc.error_code), exc.message) from None
        except (TypeError, ValueError) as exc:
            raise invalid_argument(f"signature {self.name!r} cannot take the inputs: {exc}") from None
        return dict(zip(aliases, results))


@dataclass
class Servable:
    """A loaded model version: its session, MetaGraphDef and signatures."""

    name: str
    version: int
    path: Path
    signatures: dict[str, Signature]
    meta_graph: meta_graph_pb2.MetaGraphDef = field(repr=False)
    session: Any = field(repr=False)

    def signature(self, name: str | None) -> Signature:
        """The signature called ``name`` (empty means ``serving_default``), as Predict finds it.

        Raises:
            ServingError: FAILED_PRECONDITION when the SavedModel has no such signature.
        """
        try:
            return self.signatures[name or DEFAULT_SIGNATURE]
        except KeyError:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name or DEFAULT_SIGNATURE}" not found.'
            ) from None

    def close(self) -> None:
        """Release the session (the version is unloaded)."""
        try:
            self.session.close()
        except Exception:  # noqa: BLE001 - a session that cannot close is being dropped anyway
            log.debug("closing the session of %s version %d failed", self.name, self.version, exc_info=True)


@dataclass(frozen=True)
class LoadOptions:
    """How versions are loaded: ``--saved_model_tags``, session threads, warm-up iterations."""

    tags: tuple[str, ...] = (SERVE_TAG,)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    warmup: bool = True
    warmup_iterations: int = 1
    # Grappler (TensorFlow's graph optimizer) rewrites the whole imported graph when the session first runs
    # it: for the exported text models that cost ~340 MB of memory and made runs no faster, so it is off
    # unless asked for (--enable_grappler).
    grappler: bool = False


_load_lock = threading.Lock()


def load_servable(name: str, version: int, path: Path, options: LoadOptions | None = None) -> Servable:
    """Load the SavedModel in ``path`` with the session-based loader, as version ``version`` of ``name``,
    then replay its warm-up requests, as TF Serving does before a version serves.

    Raises:
        ServingError: a warm-up request fails (the version then does not load).
        tf.errors.OpError / OSError: the SavedModel cannot be read or restored.
    """
    options = options or LoadOptions()
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=options.intra_op_threads,
        inter_op_parallelism_threads=options.inter_op_threads,
        allow_soft_placement=True,
    )
    config.graph_options.rewrite_options.disable_meta_optimizer = not options.grappler
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=config)
    try:
        # Importing a graph touches process-wide registries (op and function libraries): one at a time.
        with _load_lock, graph.as_default(), deprecation.silence():
            meta_graph = tf.compat.v1.saved_model.loader.load(session, list(options.tags), str(path))
        signatures = {
            key: _make_signature(key, definition, session, graph, name, version)
            for key, definition in meta_graph.signature_def.items()
        }
        # Keep what GetModelMetadata reports, not the whole MetaGraphDef: its GraphDef (with any constants
        # in it) is already held by the session's graph, and a second copy costs as much memory again.
        # TF Serving trims it too (remove_unused_fields_from_bundle_metagraph).
        slim = meta_graph_pb2.MetaGraphDef()
        slim.meta_info_def.CopyFrom(meta_graph.meta_info_def)
        for key, definition in meta_graph.signature_def.items():
            slim.signature_def[key].CopyFrom(definition)
        meta_graph = slim
    except BaseException:
        session.close()
        raise
    servable = Servable(name, version, Path(path), signatures, meta_graph, session)
    if options.warmup:
        try:
            replay_warmup(servable, Path(path) / WARMUP_FILE, options.warmup_iterations)
        except BaseException:
            servable.close()
            raise
    return servable


def _make_signature(
    key: str, definition: meta_graph_pb2.SignatureDef, session: Any, graph: tf.Graph, model: str, version: int
) -> Signature:
    def graph_output(info: meta_graph_pb2.TensorInfo) -> Any:
        if info.WhichOneof("encoding") != "name":
            return None  # sparse/composite inputs are fed by component: not served over this API
        try:
            return graph.get_tensor_by_name(info.name)._as_tf_output()
        except (KeyError, ValueError):
            return None  # an operation, not a tensor (e.g. __saved_model_init_op's NoOp): nothing to feed/fetch

    defaults = {}
    for alias, proto in getattr(definition, "defaults", {}).items():
        defaults[alias] = tf.make_ndarray(proto)
    return Signature(
        key,
        definition,
        session,
        {alias: graph_output(info) for alias, info in definition.inputs.items()},
        {alias: graph_output(info) for alias, info in definition.outputs.items()},
        defaults,
        model,
        version,
    )


def replay_warmup(servable: Servable, warmup: Path, iterations: int = 1) -> int:
    """Run the requests of a warm-up file (Predict, Classify, Regress, MultiInference) through
    ``servable``; returns how many records ran.

    Raises:
        ServingError: a record cannot be parsed or its request fails (the version then does not load, as
            in TF Serving).
    """
    if not warmup.is_file():
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    from serving import inference

    replayed = 0
    try:
        for raw in tf.data.TFRecordDataset(str(warmup)).as_numpy_iterator():
            record = prediction_log_pb2.PredictionLog.FromString(raw)
            kind = record.WhichOneof("log_type")
            for _ in range(max(iterations, 1)):
                if kind == "predict_log":
                    inference.predict_with(servable, record.predict_log.request)
                elif kind == "classify_log":
                    inference.classify_with(servable, record.classify_log.request)
                elif kind == "regress_log":
                    inference.regress_with(servable, record.regress_log.request)
                elif kind == "multi_inference_log":
                    inference.multi_inference_with(servable, record.multi_inference_log.request)
                else:
                    raise invalid_argument(f"Unsupported log_type for warmup: {kind}")
            replayed += 1
    except ServingError as exc:
        raise ServingError(exc.code, f"Warm-up of {warmup} failed: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - a broken warm-up file fails the load with its reason
        raise invalid_argument(f"Warm-up of {warmup} failed: {type(exc).__name__}: {exc}") from exc
    log.info("Finished reading warmup data for model at %s. Number of warmup records read: %d.", warmup.parent.parent, replayed)
    return replayed
