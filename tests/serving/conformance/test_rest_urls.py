"""The REST API's URL forms: TF Serving's UnsupportedApiCalls and PredictModelNameVersionErrors cases from
http_rest_api_handler_test.cc.

TF Serving matches ``GET /v1/models/{name}[/versions/{v}|/labels/{l}][/metadata]`` and
``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:(predict|classify|regress)``; any other ``/v1/`` path or
method pairing is a 400 "Malformed request", before any model is looked up.
"""

from __future__ import annotations

import pytest

from tests.serving.conformance.api import assert_rest_error, send_http

pytestmark = pytest.mark.integration

_UINT64_MAX = 2**64 - 1


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "/v1/foo", "Malformed request: GET /v1/foo"),
        ("POST", "/v1/foo", "Malformed request: POST /v1/foo"),
        ("GET", "/v1/models", "Missing model name in request."),
        ("GET", "/v1/models/debug/model_name", "Malformed request"),
        ("POST", "/v1/models", "Malformed request"),
        ("GET", "/v1/models/foo:predict", "Malformed request"),
        ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
        ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
        ("POST", f"/v1/models/foo/versions/{_UINT64_MAX}:regress", f"Failed to convert version: {_UINT64_MAX} to numeric."),
        ("POST", "/v1/models/foo/metadata", "Malformed request"),
        ("POST", "/v1/models/foo/label/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/50/labels/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo:explain", "Malformed request"),
    ],
)  # fmt: skip
def test_unsupported_url_is_400(server, method, path, message):
    body = b"{}" if method == "POST" else None
    assert_rest_error(send_http(server.rest_url + path, method, body), 400, message)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v1/models/foo:predict", "Servable not found for request: Latest(foo)"),
        ("/v1/models/foo/versions/50:predict", "Servable not found for request: Specific(foo, 50)"),
    ],
)
def test_unknown_model_in_a_well_formed_url_is_404(server, path, message):
    assert_rest_error(send_http(server.rest_url + path, "POST", b'{"instances": [1]}'), 404, message)
