"""Property-based tests of the API against its own description (/openapi.json), with schemathesis.

Schemathesis writes requests from the description: valid ones (any bytes as an image, any field values, tiny real
JPEGs) and, for the POST routes, ones that break it (wrong types, missing fields, odd field names). Every answer
must be no 5xx, a status the description lists for that route, its content type, and a body that matches its
schema. It found a 500 (a multipart part whose name holds a line break), which test_api.py now keeps as a
fixed case. The POST routes are fuzzed twice: in Flask's test client and over HTTP through gunicorn. The slow
tier sends ten times as many requests to the test client.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import checks
from schemathesis.generation import GenerationMode

from maskwatch.serve import create_app, openapi_spec

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]
# Not `negative_data_rejection`: in multipart every value is text, so a "wrong type" there is not wrong on the wire.

OPERATIONS = [(method.upper(), path) for path, operations in openapi_spec()["paths"].items() for method in operations]
INPUT_ROUTES = [(method, path) for method, path in OPERATIONS if method == "POST"]
FIXED_ROUTES = [(method, path) for method, path in OPERATIONS if method != "POST"]  # no inputs: one request each
INPUT_CASES = [(method, path, mode) for method, path in INPUT_ROUTES
               for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]


@pytest.fixture(scope="module")
def api_schema(client):
    return schemathesis.openapi.from_wsgi("/openapi.json", client.application)


@pytest.fixture(scope="module")
def served_api_schema(gunicorn_server):
    return schemathesis.openapi.from_url(gunicorn_server + "/openapi.json")


@pytest.fixture(scope="module")
def locked_api_schema(serve_settings, mask_detector):
    locked = serve_settings.model_copy(deep=True)
    locked.serve.api_key = "s3cret"
    return schemathesis.openapi.from_wsgi("/openapi.json", create_app(locked, mask_detector=mask_detector))


def fuzz(schema, method: str, path: str, mode: GenerationMode, examples: int) -> dict[int, int]:
    """Send `examples` generated requests to one route; return how many got each status."""
    statuses: dict[int, int] = {}

    # derandomize: the same requests in every run, so CI cannot turn red by luck; the slow tier sends more.
    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    def send(case):
        status = case.call_and_validate(checks=CHECKS).status_code
        statuses[status] = statuses.get(status, 0) + 1

    send()
    return statuses


@pytest.mark.parametrize("examples", [pytest.param(60, id="60"), pytest.param(600, id="600", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method, path, mode", INPUT_CASES, ids=[f"{m} {p} {g.value}" for m, p, g in INPUT_CASES])
def test_generated_requests_get_described_answers(api_schema, method, path, mode, examples):
    statuses = fuzz(api_schema, method, path, mode, examples)
    assert sum(statuses.values()) == examples  # every example was sent (none filtered away)
    assert 400 in statuses  # broken input was among them, and refused as the client's fault
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses  # and some valid images were classified


@pytest.mark.parametrize("method, path, mode", INPUT_CASES, ids=[f"{m} {p} {g.value}" for m, p, g in INPUT_CASES])
def test_through_gunicorn_generated_requests_get_described_answers(served_api_schema, method, path, mode):
    """The same over HTTP: gunicorn parses the requests, not the test client."""
    statuses = fuzz(served_api_schema, method, path, mode, 60)
    assert sum(statuses.values()) == 60 and 400 in statuses


@pytest.mark.parametrize("method, path", FIXED_ROUTES, ids=[f"{m} {p}" for m, p in FIXED_ROUTES])
def test_routes_without_inputs_get_described_answers(api_schema, method, path):
    assert fuzz(api_schema, method, path, GenerationMode.POSITIVE, 5) == {200: 1}


@pytest.mark.parametrize("method, path", INPUT_ROUTES)
def test_with_an_api_key_set_generated_requests_are_refused_cleanly(locked_api_schema, method, path):
    statuses = fuzz(locked_api_schema, method, path, GenerationMode.POSITIVE, 30)
    assert set(statuses) == {401}  # schemathesis sends no key, and the key is checked before the body is read
