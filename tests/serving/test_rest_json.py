"""Property-based tests (Hypothesis) of the REST body parser: whatever bytes or JSON a client sends,
the parser returns tensors shaped as sent or a TF Serving INVALID_ARGUMENT error, never another
exception; and a well-formed body round-trips its values."""

from __future__ import annotations

import json

import grpc
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import rest_json
from serving.servable import ServingError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


class EchoSignature:
    """A signature whose run returns its inputs (as ``out_<name>``), so the parser's tensors are visible."""

    name = "serving_default"
    method_name = "tensorflow/serving/predict"
    defaults: dict = {}
    batcher = None

    def __init__(self, dtypes: dict[str, tf.DType]) -> None:
        self._dtypes = dtypes
        self.input_names = sorted(dtypes)

    def input_dtype(self, name: str) -> tf.DType:
        return self._dtypes[name]

    def prepare(self, inputs, output_filter=None):
        return inputs, [f"out_{k}" for k in inputs]

    def run_session(self, values, aliases):
        return {f"out_{k}": v for k, v in values.items()}

    def execute(self, values, aliases):
        return self.run_session(values, aliases)


class EchoServable:
    version = 1

    def __init__(self, **dtypes: tf.DType) -> None:
        self.signatures = {"serving_default": EchoSignature(dtypes)}


def _answer_or_invalid(call) -> dict | None:
    try:
        return call()
    except ServingError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
        assert exc.message
        return None


@given(st.binary(max_size=200))
def test_any_bytes_parse_to_an_object_or_a_json_parse_error(body):
    result = _answer_or_invalid(lambda: rest_json.parse_json_object(body))
    assert result is None or isinstance(result, dict)


@given(json_values)
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
def test_any_json_body_is_answered_or_refused_with_invalid_argument(value):
    for servable in (EchoServable(text=tf.string), EchoServable(x=tf.float32), EchoServable(a=tf.int64, b=tf.string)):
        for body in ({"instances": value}, {"inputs": value}, value if isinstance(value, dict) else {"x": value}):
            _answer_or_invalid(lambda: rest_json.predict_json(servable, body))
        _answer_or_invalid(lambda: rest_json.input_from_json({"examples": value}, "classify"))
        _answer_or_invalid(lambda: rest_json.input_from_json({"context": value, "examples": [value]}, "regress"))


@given(st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=2, max_size=2), min_size=1, max_size=8))
def test_float_rows_are_fed_with_the_shape_sent(rows):
    answer = rest_json.predict_json(EchoServable(x=tf.float32), {"instances": rows})
    assert np.array(answer["predictions"], dtype=np.float32).shape == (len(rows), 2)
    assert np.allclose(answer["predictions"], rows)


@given(st.lists(st.text(), min_size=1, max_size=8))
def test_strings_round_trip_through_instances_and_inputs(texts):
    servable = EchoServable(text=tf.string)
    rows = rest_json.predict_json(servable, {"instances": texts})["predictions"]
    columns = rest_json.predict_json(servable, {"inputs": {"text": texts}})["outputs"]
    expected = [t.encode("utf-8", "surrogatepass") for t in texts]

    def decoded(item):
        return item.encode("utf-8", "surrogatepass") if isinstance(item, str) else __import__("base64").b64decode(item["b64"])

    assert [decoded(r) for r in rows] == expected == [decoded(c) for c in columns]


def test_a_scalar_input_gives_a_scalar_output_in_columnar_form():
    assert rest_json.predict_json(EchoServable(x=tf.float32), {"inputs": 2.5}) == {"outputs": 2.5}
    refused = _answer_or_invalid(lambda: rest_json.predict_json(EchoServable(x=tf.float32), {"instances": 2.5}))
    assert refused is None


def test_json_examples_follow_tf_servings_feature_kinds():
    model_input = rest_json.input_from_json(
        {"context": {"lang": "en"}, "examples": [{"x": 1.5, "n": [1, 2], "flag": True, "raw": {"b64": "aGk="}}]}, "classify"
    )
    example = model_input.example_list_with_context.examples[0]
    assert list(example.features.feature["x"].float_list.value) == [1.5]
    assert list(example.features.feature["n"].int64_list.value) == [1, 2]
    assert list(example.features.feature["flag"].int64_list.value) == [1]
    assert list(example.features.feature["raw"].bytes_list.value) == [b"hi"]
    assert list(model_input.example_list_with_context.context.features.feature["lang"].bytes_list.value) == [b"en"]
    for bad, message in [
        ({"examples": [{"x": [1, 2.5]}]}, "Unexpected element type in feature: x expecting type: int64"),
        ({"examples": [{"x": None}]}, "has element with unexpected JSON type: Null"),
        ({"examples": [{"x": 2**64}]}, "uint64_t element"),
        ({"examples": ["x"]}, "Example must be JSON object but got JSON String"),
        ({"examples": []}, "'examples' value is an empty array"),
        ({}, "key 'examples' is expected"),
    ]:
        try:
            rest_json.input_from_json(bad, "classify")
        except ServingError as exc:
            assert message in exc.message
        else:
            raise AssertionError(f"{bad} was accepted")


def test_parse_errors_use_rapidjson_wording():
    for body, message in [
        (b"", "JSON Parse error: The document is empty"),
        (b"nope", "JSON Parse error: Invalid value. at offset: 0"),
        (b'{"a": 1,}', "Missing a name for object member."),
        (b'{"a": [1 2]}', "Missing a comma or ']' after an array element."),
        (b'{"a": 1 "b": 2}', "Missing a comma or '}' after an object member."),
        (b'{"a": 1} x', "The document root must not be followed by other values."),
        (b"[1]", "Is not object"),
        (json.dumps({"a": "\ud800"}).encode(), None),
    ]:
        try:
            rest_json.parse_json_object(body)
        except ServingError as exc:
            assert message is not None and message in exc.message, exc.message
        else:
            assert message is None
