"""The Flask app a user would write instead of running a model server: the baseline of the load benchmark.

``python -m benchmarks.flask_app --model_dir DIR --port P`` loads the SavedModel with ``tf.saved_model.load``
and answers ``POST /predict`` with ``{"instances": [text, ...]}`` in and ``{"predictions": [{"scores": ...,
"classes": ..., "label": ...}, ...]}`` out (TF Serving's row format, so one client checks both), on Flask's
own server with a thread per connection (Werkzeug's ``run_simple(threaded=True)``).

One setting differs from a copy-pasted tutorial: Werkzeug's per-request access log is off, as the model
server logs no requests either, so that the comparison measures serving code rather than log lines.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def _json_column(array: Any) -> list:
    """An output tensor's values as JSON-ready lists: string outputs come back as bytes (rank 1 or 2 here)."""
    values = array.tolist()
    if array.dtype != object:
        return values
    return [[v.decode() for v in row] if isinstance(row, list) else row.decode() for row in values]


def create_app(model_dir: Path) -> Any:
    """The Flask app serving ``model_dir``'s ``serving_default`` signature at ``POST /predict``."""
    from flask import Flask, jsonify, request

    from maas_tasks.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    model = tf.saved_model.load(str(model_dir))
    predict = model.signatures["serving_default"]
    app = Flask(__name__)
    app.config["model"] = model  # the signature holds the model's variables only weakly

    @app.post("/predict")
    def predict_texts() -> Any:
        payload = request.get_json(silent=True)
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances or not all(isinstance(t, str) for t in instances):
            return jsonify(error='expected {"instances": [text, ...]}'), 400
        outputs = predict(text=tf.constant(instances, dtype=tf.string))
        columns = {name: _json_column(tensor.numpy()) for name, tensor in outputs.items()}
        return jsonify(predictions=[dict(zip(columns, row)) for row in zip(*columns.values())])

    return app


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(prog="python -m benchmarks.flask_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True, help="a SavedModel directory (one version)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    run_simple(args.host, args.port, create_app(args.model_dir), threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
