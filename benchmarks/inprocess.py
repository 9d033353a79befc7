"""The served SavedModel called in process, with no server in between: the upper bound of the load benchmark.

Two ways of calling it, both measured, since neither is obviously the ceiling:

- ``session``: the way TF Serving runs a model. ``tf.compat.v1.saved_model.loader.load`` imports the graph
  into a ``tf.compat.v1.Session``, and ``Session.make_callable`` binds the ``serving_default`` signature's
  input and output tensor names once, so a call is one ``TF_SessionRun`` that releases the GIL for the
  whole graph.
- ``function``: ``tf.saved_model.load`` and the signature's concrete function, the way the embedded server
  and a hand-written Flask app call it. Every call goes through TF's eager dispatch in Python.

Neither is faster everywhere (on a 2-core machine the session wins with few clients, where it saves the
eager dispatch, and the function can win with 64, where N threads oversubscribe the cores anyway), so the
upper bound of a cell is whichever of the two was faster in it. It bounds serving without batching: a server
that merges concurrent requests into larger batches can beat it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNATURE = "serving_default"
INPUT = "text"
SCORES = "scores"



@dataclass
class InProcessModel:
    """A loaded model as the load generator drives it.

    ``prepare(texts)`` builds one call's input ahead of timing; ``predict(input)`` runs the signature and
    returns how many rows of scores came back, so every answer can be checked. ``handle`` (the session or
    the loaded SavedModel) keeps the model alive: a signature function holds its variables only weakly.
    """

    predict: Callable[[Any], int]
    prepare: Callable[[Sequence[str]], Any]
    handle: Any


def load_session_model(model_dir: Path) -> InProcessModel:
    """Load ``model_dir`` into a TF1 session, as TF Serving does, fed with numpy arrays of bytes."""
    import numpy as np

    from maas_tasks.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(session, [tf.saved_model.SERVING], str(model_dir))
    signature = meta_graph.signature_def[SIGNATURE]
    run = session.make_callable(signature.outputs[SCORES].name, [signature.inputs[INPUT].name])

    def predict(texts: Any) -> int:
        return len(run(texts))

    def prepare(texts: Sequence[str]) -> Any:
        return np.array([t.encode() for t in texts], dtype=object)

    return InProcessModel(predict, prepare, session)


def load_function_model(model_dir: Path) -> InProcessModel:
    """Load ``model_dir`` with ``tf.saved_model.load``, fed with eager string tensors."""
    from maas_tasks.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    loaded = tf.saved_model.load(str(model_dir))
    function = loaded.signatures[SIGNATURE]

    def predict(texts: Any) -> int:
        return int(function(**{INPUT: texts})[SCORES].shape[0])

    def prepare(texts: Sequence[str]) -> Any:
        return tf.constant(list(texts), dtype=tf.string)

    return InProcessModel(predict, prepare, loaded)


MODEL_LOADERS: dict[str, Callable[[Path], InProcessModel]] = {
    "session": load_session_model,
    "function": load_function_model,
}
