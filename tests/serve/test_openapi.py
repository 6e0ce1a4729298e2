"""GET /openapi.json: a valid OpenAPI 3.1 document that names every route, and real answers (good and bad
requests) match the schemas it gives for their status."""

import base64
import io
from pathlib import Path

import pytest

import maskwatch
from maskwatch.serve import create_app


@pytest.fixture(scope="module")
def spec(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()


def response_description(spec: dict, path: str, method: str, status: int) -> dict:
    described = spec["paths"][path][method]["responses"]
    assert str(status) in described, f"{method.upper()} {path} answered {status}, which the description lacks"
    response = described[str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response


def assert_matches(spec: dict, path: str, method: str, response) -> None:
    from openapi_schema_validator import OAS31Validator

    described = response_description(spec, path, method, response.status_code)
    assert response.mimetype in described["content"], (path, response.mimetype, list(described["content"]))
    if response.mimetype != "application/json":
        return
    schema = {**described["content"]["application/json"]["schema"], "components": spec["components"]}
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in OAS31Validator(schema).iter_errors(response.get_json())]
    assert not errors, (path, response.status_code, errors)


def test_the_description_is_valid_openapi_at_the_package_version(spec):
    from openapi_spec_validator import validate

    validate(spec)
    assert spec["openapi"].startswith("3.1") and spec["info"]["version"] == maskwatch.__version__


def test_every_route_is_described_and_every_described_route_exists(client, spec):
    routes = {(rule.rule, method.lower()) for rule in client.application.url_map.iter_rules()
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(path, method) for path, operations in spec["paths"].items() for method in operations}
    assert routes == described


def test_real_answers_match_the_description(client, spec, photo_bytes, small_prepared):
    crops = [Path(path).read_bytes() for path in small_prepared.test_df["crop_path"][:2]]  # PNG files
    answers = {
        ("/health", "get"): client.get("/health"),
        ("/ready", "get"): client.get("/ready"),
        ("/v1/model", "get"): client.get("/v1/model"),
        ("/metrics", "get"): client.get("/metrics"),
        ("/", "get"): client.get("/"),
        ("/live", "get"): client.get("/live"),
        ("/v1/predict", "post"): [
            client.post("/v1/predict?annotate=1", data={"image": (io.BytesIO(photo_bytes), "photo.jpg")}),
            client.post("/v1/predict", json={"image": base64.b64encode(photo_bytes).decode()}),
            client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg"),
            client.post("/v1/predict", data=b"not a photo", content_type="image/jpeg"),
            client.post("/v1/predict", data="text", content_type="text/plain"),
            client.post("/v1/predict", data=b"\xff\xd8\xff" + bytes(2_100_000), content_type="image/jpeg"),
        ],
        ("/v1/classify", "post"): [
            client.post("/v1/classify", data={"images": [(io.BytesIO(c), f"{i}.png") for i, c in enumerate(crops)]}),
            client.post("/v1/classify", json={"images": [base64.b64encode(c).decode() for c in crops]}),
            client.post("/v1/classify", json={"faces": []}),
        ],
    }
    statuses = set()
    for (path, method), responses in answers.items():
        for response in responses if isinstance(responses, list) else [responses]:
            assert_matches(spec, path, method, response)
            statuses.add(response.status_code)
    assert statuses == {200, 400, 413, 415}
    predicted = answers[("/v1/predict", "post")][0].get_json()
    assert len(predicted["detections"]) >= 2 and predicted["annotated_image"]
    assert len(answers[("/v1/classify", "post")][0].get_json()["results"]) == 2


def test_refusals_match_the_description(serve_settings, spec, photo_bytes, tmp_path):
    locked = serve_settings.model_copy(deep=True)
    locked.serve.api_key = "s3cret"
    client = create_app(locked, mask_detector=None).test_client()  # loads the model itself
    refused = client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg")
    assert refused.status_code == 401
    assert_matches(spec, "/v1/predict", "post", refused)
    missing = serve_settings.model_copy(deep=True)
    missing.serve.model_uri = str(tmp_path / "no-such-bundle")
    broken = create_app(missing).test_client()
    for path in ("/ready", "/v1/model"):
        response = broken.get(path)
        assert response.status_code == 503
        assert_matches(spec, path, "get", response)
