"""REST ``:predict``: the row ("instances") and columnar ("inputs") formats of TF Serving's api_rest.md, with
the cases of http_rest_api_handler_test.cc and tensorflow_model_server_test.py.

A row request batches its instances into one tensor per input and answers ``predictions`` (a list of
values, or of objects when there are several outputs); a columnar request sends each input whole and
answers ``outputs`` (a value, or an object). Tensors are fed with the shape they were sent in, floats are
written as JSON decimals (``3.0``, never ``3``), ``NaN`` and ``Infinity`` are accepted and written, and
strings whose tensor name ends in ``_bytes`` travel as ``{"b64": ...}``.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.serving.conformance.api import assert_rest_error, post_json
from tests.serving.conformance.models import (
    ASSORTED,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_VERSION,
    SENTIMENT,
)
from tests.serving.conftest import CLASSES, WEIGHTS

pytestmark = pytest.mark.integration


def _predict(models_url: str, model: str, body, suffix: str = "") -> dict:
    reply = post_json(f"{models_url}/{model}{suffix}:predict", body)
    assert reply.status == 200, reply.text
    assert reply.headers.get_content_type() == "application/json"
    return reply.json


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def _softmax_row(word_index: int) -> list[float]:
    # A one-word text's logits are its row of the dense kernel (row 0 is out-of-vocabulary).
    logits = np.array(WEIGHTS[1][word_index], dtype=np.float32)
    return list(np.exp(logits) / np.exp(logits).sum())


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"instances": [2.0, 3.0, 4.0]}, {"predictions": [3.0, 3.5, 4.0]}),
        ({"inputs": [2.0, 3.0, 4.0]}, {"outputs": [3.0, 3.5, 4.0]}),
        ({"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"predictions": [[2.5, 3.0], [3.5, 4.0]]}),
        ({"instances": [[2.0], [3.0]]}, {"predictions": [[3.0], [3.5]]}),
        ({"instances": [2, 3, 4]}, {"predictions": [3.0, 3.5, 4.0]}),
        ({"signature_name": "serving_default", "inputs": [3.0, 4.0]}, {"outputs": [3.5, 4.0]}),
        ({"instances": [1e1]}, {"predictions": [7.0]}),
    ],
    ids=["rows", "columns", "rows-of-pairs", "declared-shape", "json-integers", "signature", "exponent"],
)
def test_predict_half_plus_two(models_url, body, expected):
    # x is declared [-1, 1]; TF Serving feeds what was sent, so [3] and [2, 2] tensors work too.
    assert _predict(models_url, HALF_PLUS_TWO, body) == expected


def test_scalar_input_gives_scalar_output(models_url):
    assert _predict(models_url, HALF_PLUS_TWO, {"inputs": 2.0}) == {"outputs": 3.0}


def test_specific_version(models_url):
    body = {"instances": [1.0, 2.0]}
    assert _predict(models_url, HALF_PLUS_TWO, body, f"/versions/{HALF_PLUS_TWO_VERSION}") == {
        "predictions": [2.5, 3.0]
    }


def test_whole_floats_are_written_as_decimals(models_url):
    reply = post_json(f"{models_url}/{HALF_PLUS_TWO}:predict", {"instances": [2.0, 4.0]})
    # parse_int sees only numbers written without a fraction or exponent.
    predictions = json.loads(reply.text, parse_int=lambda text: pytest.fail(f"float written as integer {text}"))
    assert predictions == {"predictions": [3.0, 4.0]}


def test_non_finite_floats_round_trip(models_url):
    body = '{"instances": [NaN, Infinity, -Infinity]}'
    nan, plus, minus = _predict(models_url, HALF_PLUS_TWO, body)["predictions"]
    assert np.isnan(nan) and plus == float("inf") and minus == float("-inf")


def test_floats_keep_their_float32_value(models_url):
    values = [0.1, 1.0 / 3.0, 123456.789]
    predictions = _predict(models_url, HALF_PLUS_TWO, {"instances": values})["predictions"]
    expected = 0.5 * np.array(values, dtype=np.float32) + np.float32(2.0)
    assert np.array(predictions, dtype=np.float32).tolist() == expected.tolist()


def test_rows_of_a_model_with_several_outputs_are_objects(models_url):
    predictions = _predict(models_url, SENTIMENT, {"instances": ["good", "bad"]})["predictions"]
    assert [set(row) for row in predictions] == [{"scores", "classes", "label"}] * 2
    assert [row["label"] for row in predictions] == ["positive", "negative"]
    assert predictions[0]["classes"] == CLASSES
    np.testing.assert_allclose(predictions[0]["scores"], _softmax_row(1), rtol=1e-5)
    np.testing.assert_allclose(predictions[1]["scores"], _softmax_row(2), rtol=1e-5)


def test_columns_of_a_model_with_several_outputs_are_one_object(models_url):
    outputs = _predict(models_url, SENTIMENT, {"inputs": {"text": ["good", "bad"]}})["outputs"]
    assert set(outputs) == {"scores", "classes", "label"}
    assert outputs["label"] == ["positive", "negative"]
    assert outputs["classes"] == [CLASSES, CLASSES]
    np.testing.assert_allclose(outputs["scores"], [_softmax_row(1), _softmax_row(2)], rtol=1e-5)


def test_a_single_input_may_be_named_in_each_row(models_url):
    predictions = _predict(models_url, SENTIMENT, {"instances": [{"text": "good"}]})["predictions"]
    assert predictions[0]["label"] == "positive"


def test_base64_strings_are_decoded(models_url):
    predictions = _predict(models_url, SENTIMENT, {"instances": [_b64(b"good"), "bad"]})["predictions"]
    assert [row["label"] for row in predictions] == ["positive", "negative"]


def test_bytes_outputs_are_base64_and_int64_outputs_are_integers(models_url):
    predictions = _predict(models_url, ASSORTED, {"instances": [_b64(b"\x00\xff"), _b64(b"abc")]})["predictions"]
    assert predictions == [
        {"payload_bytes": _b64(b"\x00\xff"), "length": 2},
        {"payload_bytes": _b64(b"abc"), "length": 3},
    ]
    assert all(isinstance(row["length"], int) for row in predictions)


def test_rows_with_two_inputs(models_url):
    body = {"signature_name": "sum_pair", "instances": [{"a": 1.0, "b": [1.0, 2.0]}, {"a": 0.5, "b": [0.0, 1.0]}]}
    assert _predict(models_url, ASSORTED, body) == {
        "predictions": [{"total": 4.0, "doubled": [2.0, 4.0]}, {"total": 1.5, "doubled": [0.0, 2.0]}]
    }


def test_columns_with_two_inputs(models_url):
    body = {"signature_name": "sum_pair", "inputs": {"a": [1.0, 0.5], "b": [[1.0, 2.0], [0.0, 1.0]]}}
    assert _predict(models_url, ASSORTED, body) == {
        "outputs": {"total": [4.0, 1.5], "doubled": [[2.0, 4.0], [0.0, 2.0]]}
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "JSON Parse error: The document is empty"),
        ("instances = [1, 2]", "JSON Parse error: Invalid value"),
        ("[1, 2]", "Is not object"),
        ({"instances": ["x", "y"]}, "not of expected type: float"),
        ({"signature_name": 100}, "'signature_name' key must be a string value."),
        ({"signature_name": "serving_default"}, "Missing 'inputs' or 'instances' key"),
        ({"instances": [1.0], "inputs": [1.0]}, "expecting only one of 'inputs' or 'instances' keys to exist"),
        ({"instances": 1.0}, "Expecting 'instances' to be an list/array"),
        ({"instances": []}, "No values in 'instances' array"),
        ({"signature_name": "nope", "instances": [1.0]}, 'Serving signature name: "nope" not found in signature def'),
        ({"instances": [[1.0, 2.0], [3.0]]}, "Failed to process element: 1 of 'instances' list."),
        ({"instances": [{"y": 1.0}]}, "JSON object: does not have named input: y"),
        ({"inputs": {"y": [1.0]}}, "Missing named input: x in 'inputs' object."),
    ],
    ids=[
        "empty", "not-json", "not-object", "wrong-type", "signature-not-string", "no-tensors", "both-formats",
        "instances-not-list", "no-instances", "unknown-signature", "ragged-rows", "unknown-row-key", "unknown-column",
    ],
)  # fmt: skip
def test_bad_predict_requests_are_400(models_url, body, message):
    assert_rest_error(post_json(f"{models_url}/{HALF_PLUS_TWO}:predict", body), 400, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"signature_name": "sum_pair", "instances": [1.0, 2.0]},
            "instances is a plain list, but expecting list of objects as multiple input tensors required as per tensorinfo_map",
        ),
        (
            {"signature_name": "sum_pair", "instances": [{"a": 1.0}]},
            "keys must be equal to: a,b",
        ),
        (
            {"signature_name": "sum_pair", "inputs": [1.0, 2.0]},
            "inputs is a plain value/list, but expecting an object as multiple input tensors required as per tensorinfo_map",
        ),
        (
            {"signature_name": "sum_pair", "inputs": {"a": [1.0]}},
            "Missing named input: b in 'inputs' object.",
        ),
        (
            {"instances": [{"b64": "not base64!"}]},
            "Unable to base64 decode",
        ),
    ],
    ids=["plain-rows-for-two-inputs", "row-missing-input", "plain-columns-for-two-inputs", "missing-column", "bad-b64"],
)
def test_bad_requests_for_several_inputs_are_400(models_url, body, message):
    assert_rest_error(post_json(f"{models_url}/{ASSORTED}:predict", body), 400, message)


def test_unknown_model_is_404(models_url):
    reply = post_json(f"{models_url}/missing_model:predict", {"instances": [1.0]})
    assert_rest_error(reply, 404, "Servable not found for request: Latest(missing_model)")


@pytest.mark.parametrize("path", ["/missing_model/versions/50:predict", f"/{HALF_PLUS_TWO}/versions/99:predict"])
def test_unknown_version_is_404(models_url, path):
    assert_rest_error(
        post_json(models_url + path, {"instances": [1.0]}), 404, "Servable not found for request: Specific("
    )


def test_model_name_is_not_split_from_a_trailing_number(models_url):
    reply = post_json(f"{models_url}/{HALF_PLUS_TWO}99:predict", {"instances": [1.0]})
    assert_rest_error(reply, 404, f"Servable not found for request: Latest({HALF_PLUS_TWO}99)")


def test_percent_encoded_model_name_is_decoded(models_url):
    encoded = HALF_PLUS_TWO.replace("_", "%5F")
    assert _predict(models_url, encoded, {"instances": [2.0]}) == {"predictions": [3.0]}
