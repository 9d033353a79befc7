"""REST ``:classify`` and ``:regress``: TF Serving's JSON forms (api_rest.md) and the cases of
http_rest_api_handler_test.cc and tensorflow_model_server_test.py.

The body holds ``examples`` (JSON objects turned into ``tf.Example`` protos: numbers become float or int64
features, strings bytes features) and an optional ``context`` merged into each. Classification answers
``{"results": [[[label, score], ...], ...]}``, one list of pairs per example; regression
``{"results": [value, ...]}``.
"""

from __future__ import annotations

import pytest

from tests.serving.conformance.api import assert_rest_error, post_json
from tests.serving.conformance.models import (
    ASSORTED,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_TF2,
    HALF_PLUS_TWO_VERSION,
)

pytestmark = pytest.mark.integration

BOTH_MODELS = pytest.mark.parametrize("model", [HALF_PLUS_TWO, HALF_PLUS_TWO_TF2])


def _call(models_url: str, path: str, body) -> dict:
    reply = post_json(f"{models_url}/{path}", body)
    assert reply.status == 200, reply.text
    assert reply.headers.get_content_type() == "application/json"
    return reply.json


@BOTH_MODELS
def test_classify(models_url, model):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert _call(models_url, f"{model}:classify", body) == {"results": [[["", 3.0]]]}


@BOTH_MODELS
def test_regress(models_url, model):
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}
    assert _call(models_url, f"{model}:regress", body) == {"results": [3.0]}


@pytest.mark.parametrize(
    ("method", "signature", "x", "expected"),
    [("regress", "regress_x_to_y", 80.0, [42.0]), ("classify", "classify_x_to_y", 20.0, [[["", 12.0]]])],
)
def test_specific_version(models_url, method, signature, x, expected):
    body = {"signature_name": signature, "examples": [{"x": x}]}
    path = f"{HALF_PLUS_TWO}/versions/{HALF_PLUS_TWO_VERSION}:{method}"
    assert _call(models_url, path, body) == {"results": expected}


def test_regress_answers_every_example_in_order(models_url):
    body = {"signature_name": "regress_x_to_y2", "examples": [{"x": 1.0}, {"x": 2.0}, {"x": [5.0]}]}
    assert _call(models_url, f"{HALF_PLUS_TWO}:regress", body) == {"results": [3.5, 4.0, 5.5]}


def test_context_is_merged_into_every_example(models_url):
    body = {"signature_name": "regress_x_to_y", "context": {"x": 2.0}, "examples": [{}, {"x": 4.0}]}
    assert _call(models_url, f"{HALF_PLUS_TWO}:regress", body) == {"results": [3.0, 4.0]}


def test_classify_with_labels(models_url):
    body = {"signature_name": "classify_labels", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert _call(models_url, f"{ASSORTED}:classify", body) == {
        "results": [[["neg", 0.25], ["pos", 0.75]], [["neg", 0.5], ["pos", 0.5]]]
    }


@pytest.mark.parametrize("method", ["classify", "regress"])
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "JSON Parse error: The document is empty"),
        ("examples: []", "JSON Parse error: Invalid value"),
        ({"signature_name": 1, "examples": [{"x": 1.0}]}, "'signature_name' key must be a string value."),
        ({"signature_name": "x"}, "key 'examples' is expected and was not found"),
        ({"examples": {"x": 1.0}}, "Expecting 'examples' value to be an list/array"),
        ({"examples": []}, "'examples' value is an empty array"),
        ({"examples": [1.0]}, "Example must be JSON object but got JSON Number"),
        ({"examples": [{"x": [1.0, "a"]}]}, "Unexpected element type in feature: x expecting type: float"),
        ({"examples": [{"x": None}]}, "Feature: x has element with unexpected JSON type: Null"),
        ({"signature_name": "nope", "examples": [{"x": 1.0}]}, "No signature was found with the name: nope"),
    ],
    ids=[
        "empty", "not-json", "signature-not-string", "no-examples", "examples-not-list", "empty-examples",
        "example-not-object", "mixed-feature-types", "null-feature", "unknown-signature",
    ],
)  # fmt: skip
def test_bad_requests_are_400(models_url, method, body, message):
    assert_rest_error(post_json(f"{models_url}/{HALF_PLUS_TWO}:{method}", body), 400, message)


@pytest.mark.parametrize(
    ("method", "signature", "message"),
    [
        ("classify", "", "No classification inputs found in SignatureDef"),
        ("regress", "serving_default", "No regression inputs found in SignatureDef"),
        ("classify", "regress_x_to_y", 'Expected classification signature outputs to contain at least one of "classes" or "scores"'),
        ("regress", "classify_x_to_y", "No regression outputs found in SignatureDef"),
    ],
)  # fmt: skip
def test_signature_that_does_not_fit_the_method_is_400(models_url, method, signature, message):
    body = {"signature_name": signature, "examples": [{"x": 1.0}]}
    assert_rest_error(post_json(f"{models_url}/{HALF_PLUS_TWO}:{method}", body), 400, message)


def test_feature_of_the_wrong_type_is_400(models_url):
    # A JSON integer becomes an int64 feature; the graph parses x as float.
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2}]}
    assert_rest_error(post_json(f"{models_url}/{HALF_PLUS_TWO}:regress", body), 400, "Data types don't match")


@pytest.mark.parametrize("method", ["classify", "regress"])
def test_unknown_model_is_404(models_url, method):
    reply = post_json(f"{models_url}/missing_model:{method}", {"examples": [{"x": 1.0}]})
    assert_rest_error(reply, 404, "Servable not found for request: Latest(missing_model)")
