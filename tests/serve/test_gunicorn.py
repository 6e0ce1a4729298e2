"""The real deployment: gunicorn workers, concurrent clients, shared Prometheus metrics."""

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest


def post(url, data, content_type="image/jpeg", timeout=60):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_concurrent_requests_are_all_answered_correctly(gunicorn_server, data_dir):
    photos = [(data_dir / "images" / f"maksssksksss{n}.jpg").read_bytes() for n in (0, 1, 4, 7)]
    reference = [post(gunicorn_server + "/v1/predict", p)[1]["detections"] for p in photos]
    jobs = [i % len(photos) for i in range(48)] + [-1] * 8  # plus a few broken uploads mixed in
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: post(gunicorn_server + "/v1/predict", photos[i] if i >= 0 else b"junk"),
                                jobs))
    for i, (status, body) in zip(jobs, answers):
        if i < 0:
            assert status == 400 and body["error"]["code"] == "not_an_image"
            continue
        assert status == 200
        got = body["detections"]
        assert [d["box"] for d in got] == [d["box"] for d in reference[i]]
        assert [d["label"] for d in got] == [d["label"] for d in reference[i]]
        for a, b in zip(got, reference[i]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_metrics_are_aggregated_across_workers(gunicorn_server, data_dir):
    photo = (data_dir / "images" / "maksssksksss1.jpg").read_bytes()

    def predicted() -> float:
        text = urllib.request.urlopen(gunicorn_server + "/metrics", timeout=10).read().decode()
        counts = re.findall(r'maskwatch_requests_total\{route="/v1/predict",status="200"\} ([0-9.e+]+)', text)
        return sum(float(c) for c in counts)

    before = predicted()
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = [s for s, _ in pool.map(lambda _: post(gunicorn_server + "/v1/predict", photo), range(12))]
    assert statuses == [200] * 12
    assert predicted() - before == 12
