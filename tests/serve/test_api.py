"""The Flask API with the real model, YuNet and data-set photos; every bad-input case gets clean JSON."""

import base64
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from conftest import BMP_TOO_WIDE, PNG_CHUNK_BOMB, tiff_with_huge_tiles

from maskwatch.serve import create_app

def png_bytes(array):
    ok, encoded = cv2.imencode(".png", array)
    return encoded.tobytes()


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_health_ready_and_model(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/ready").get_json() == {"ready": True}
    info = client.get("/v1/model").get_json()
    assert info["classes"] == ["with_mask", "without_mask", "mask_weared_incorrect"]
    assert info["version"] == "test" and info["input_size"] == 160 and info["test_metrics"]["test_macro_f1"] == 0.5


def check_detections(body, width, height, minimum):
    detections = body["detections"]
    assert len(detections) >= minimum
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert det["label"] in det["probabilities"]
        assert abs(sum(det["probabilities"].values()) - 1) < 1e-4
        assert det["score"] == max(det["probabilities"].values()) and 0 < det["face_score"] <= 1


def test_predict_multipart_finds_several_faces(client, photo_bytes):
    response = client.post("/v1/predict", data={"image": (io.BytesIO(photo_bytes), "photo.jpg")})
    assert response.status_code == 200
    body = response.get_json()
    assert body["image"] == {"width": 512, "height": 366}
    check_detections(body, 512, 366, minimum=3)
    assert set(body["timings_ms"]) == {"decode", "detect", "classify"}


def test_predict_json_base64_raw_body_and_annotation(client, photo_bytes):
    via_json = client.post("/v1/predict?annotate=1", json={"image": base64.b64encode(photo_bytes).decode()})
    raw = client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg")
    assert via_json.status_code == raw.status_code == 200
    assert [d["box"] for d in via_json.get_json()["detections"]] == [d["box"] for d in raw.get_json()["detections"]]
    annotated = via_json.get_json()["annotated_image"]
    assert annotated.startswith("data:image/jpeg;base64,")
    image = cv2.imdecode(np.frombuffer(base64.b64decode(annotated.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (366, 512, 3)


def test_original_rgba_png_is_accepted(client, png_sample_dir):
    data = (png_sample_dir / "images" / "maksssksksss0.png").read_bytes()
    response = client.post("/v1/predict", data={"image": (io.BytesIO(data), "a.png")})
    assert response.status_code == 200 and len(response.get_json()["detections"]) >= 3


def test_classify_matches_the_training_pipeline(client, small_prepared, tiny_bundle):
    """Predictor parity: a face through the tf.data training pipeline and through the API."""
    import keras

    from maskwatch.evaluate import predict_probabilities

    faces = small_prepared.test_df.head(5)
    expected = predict_probabilities(keras.models.load_model(tiny_bundle / "model.keras"), faces)
    files = [(io.BytesIO(open(p, "rb").read()), f"{i}.png") for i, p in enumerate(faces.crop_path)]
    response = client.post("/v1/classify", data={"images": files})
    assert response.status_code == 200
    got = np.array([[r["probabilities"][c] for c in ("with_mask", "without_mask", "mask_weared_incorrect")]
                    for r in response.get_json()["results"]])
    np.testing.assert_allclose(got, expected, atol=1e-4)  # float LiteRT vs Keras
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_the_faces_of_one_classify_request_share_one_photos_pixel_budget(client, serve_settings):
    """64 faces of 40 M pixels each fit in a 7 MB upload; decoded side by side they took 7.6 GB."""
    assert serve_settings.serve.max_pixels == 8_000_000
    face = png_bytes(np.zeros((1000, 3000, 3), np.uint8))  # 3 M pixels, 9 kB
    two = client.post("/v1/classify", data={"images": [(io.BytesIO(face), f"{i}.png") for i in range(2)]})
    assert two.status_code == 200 and len(two.get_json()["results"]) == 2
    three = client.post("/v1/classify", data={"images": [(io.BytesIO(face), f"{i}.png") for i in range(3)]})
    assert_error(three, 413, "too_many_pixels")
    assert "face 2 takes the faces of this request over 8000000 pixels together" in three.get_json()["error"]["message"]


def test_predictor_crops_like_the_training_stem(mask_detector, small_prepared):
    from maskwatch.preprocessing import extract_face, read_image

    face = small_prepared.test_df.iloc[0]
    photo = read_image(face.image_path)
    crop = extract_face(photo, (face.xmin, face.ymin, face.xmax, face.ymax), mask_detector.predictor.crop_spec)
    np.testing.assert_array_equal(crop, read_image(face.crop_path))


def test_predictor_in_batches_gives_the_same_probabilities(mask_detector, small_prepared):
    from maskwatch.preprocessing import read_image

    crops = np.stack([read_image(path) for path in small_prepared.test_df["crop_path"]])
    predictor = mask_detector.predictor
    whole = predictor.predict_inputs(crops)
    assert len(crops) > 4 and whole.shape == (len(crops), 3)
    np.testing.assert_allclose(predictor.predict_inputs(crops, batch_size=4), whole, atol=1e-6)


def bomb_png(width=60000, height=60000) -> bytes:
    """A tiny PNG whose header claims 3.6 billion pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": b"", "content_type": "image/jpeg"}, 400, "empty_image"),
    ({}, 400, "empty_body"),
    ({"data": {"image": (io.BytesIO(b"hello, not a photo"), "x.jpg")}}, 400, "not_an_image"),
    ({"data": {"image": (io.BytesIO(b"GIF89a" + b"\x00" * 50), "x.gif")}}, 415, "unsupported_media_type"),
    ({"data": "just text", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ({"data": {"picture": (io.BytesIO(b"\xff\xd8\xff"), "x.jpg")}}, 400, "missing_field"),
    ({"json": {"img": "abc"}}, 400, "missing_field"),
    # A line break in a part's name makes werkzeug name it None; beside a named part, listing the names sent
    # compared None with a string (found by the schema fuzz test: it was a 500).
    ({"data": b'--B\r\nContent-Disposition: form-data; name="a\nb"\r\n\r\nv\r\n'
              b'--B\r\nContent-Disposition: form-data; name="c"\r\n\r\nv\r\n--B--\r\n',
      "content_type": "multipart/form-data; boundary=B"}, 400, "missing_field"),
    ({"json": {"image": "@@not base64@@"}}, 400, "malformed_base64"),
    ({"json": {"image": 12}}, 400, "malformed_field"),
    ({"data": "{not json", "content_type": "application/json"}, 400, "malformed_json"),
    ({"data": bomb_png(), "content_type": "image/png"}, 413, "too_many_pixels"),
    ({"data": PNG_CHUNK_BOMB, "content_type": "image/png"}, 400, "corrupt_image"),
    ({"data": BMP_TOO_WIDE, "content_type": "image/bmp"}, 400, "corrupt_image"),
    ({"data": tiff_with_huge_tiles(), "content_type": "image/tiff"}, 415, "unsupported_media_type"),
    ({"data": b"\xff\xd8\xff" + b"\x00" * 2_100_000, "content_type": "image/jpeg"}, 413, "payload_too_large"),
])
def test_bad_input_gets_a_clear_json_error(client, kwargs, status, code):
    assert_error(client.post("/v1/predict", **kwargs), status, code)


def test_truncated_and_corrupt_images(client, photo_bytes):
    assert_error(client.post("/v1/predict", data=photo_bytes[:300], content_type="image/jpeg"), 400, "corrupt_image")
    corrupt = photo_bytes[:20] + bytes(len(photo_bytes) - 20)
    assert_error(client.post("/v1/predict", data=corrupt, content_type="image/jpeg"), 400, "corrupt_image")


def test_wrong_method_and_unknown_route_are_json(client):
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")
    assert_error(client.get("/nope"), 404, "not_found")


def test_api_key_protects_prediction_routes(serve_settings, mask_detector, photo_bytes):
    settings = serve_settings.model_copy(deep=True)
    settings.serve.api_key = "s3cret"
    client = create_app(settings, mask_detector=mask_detector).test_client()
    assert_error(client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg"), 401, "unauthorized")
    assert_error(client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg",
                             headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    # A non-ASCII header was a 500: hmac.compare_digest refuses non-ASCII text.
    assert_error(client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg",
                             headers={"X-API-Key": "s3cr\xe9t"}), 401, "unauthorized")
    ok = client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg", headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # health stays open


def test_prometheus_metrics_count_requests_and_classes(client, photo_bytes):
    client.post("/v1/predict", data=photo_bytes, content_type="image/jpeg")
    client.post("/v1/predict", data=b"junk", content_type="image/jpeg")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'maskwatch_requests_total{route="/v1/predict",status="200"}' in text
    assert 'maskwatch_errors_total{code="not_an_image"}' in text
    assert "maskwatch_request_seconds_bucket" in text and "maskwatch_predictions_total{label=" in text


def test_missing_model_starts_but_is_not_ready(tmp_path, serve_settings):
    settings = serve_settings.model_copy(deep=True)
    settings.serve.model_uri = str(tmp_path / "absent")
    client = create_app(settings).test_client()
    assert client.get("/health").status_code == 200
    ready = client.get("/ready")
    assert ready.status_code == 503 and "absent" in ready.get_json()["reason"]
    assert_error(client.post("/v1/predict", data=b"\xff\xd8\xff", content_type="image/jpeg"), 503, "not_ready")


@pytest.mark.parametrize("engine", ["onnxruntime", "opencv"])
def test_missing_or_corrupt_detector_is_a_clear_error(tmp_path, serve_settings, engine):
    from maskwatch.detect import DetectorModelError, create_face_detector

    config = serve_settings.detector.model_copy(update={"model_path": tmp_path / "none.onnx", "engine": engine})
    with pytest.raises(DetectorModelError, match="does not exist"):
        create_face_detector(config)
    corrupt = tmp_path / "face_detection_yunet_2026may.onnx"
    corrupt.write_bytes(b"\x00" * 1000)
    with pytest.raises(DetectorModelError, match="corrupt"):
        create_face_detector(config.model_copy(update={"model_path": corrupt}))
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not onnx")
    with pytest.raises(DetectorModelError, match="cannot load"):
        create_face_detector(config.model_copy(update={"model_path": other}))
