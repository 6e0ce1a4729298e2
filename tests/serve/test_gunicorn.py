"""The real deployment: gunicorn workers, concurrent clients, shared Prometheus metrics."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def test_clients_that_send_their_headers_slowly_do_not_hold_the_workers(gunicorn_server, data_dir):
    """Two such clients held both sync workers until gunicorn's 120 s timeout (benchmarks/slow_clients.py: 0 of 20
    photos answered); the default gevent workers serve around them."""
    host, port = gunicorn_server.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port))) for _ in range(8)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: maskwatch\r\n")  # and never the rest
        photo = (data_dir / "images" / "maksssksksss1.jpg").read_bytes()
        answers = [post(gunicorn_server + "/v1/predict", photo, timeout=20) for _ in range(4)]
        assert [status for status, _ in answers] == [200] * 4
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize("worker_class, keep_alive", [("gevent", ["--keep-alive", "0"]), ("sync", [])])
def test_gunicorn_command_names_the_worker_class(worker_class, keep_alive):
    from maskwatch.serve import gunicorn_command

    command = gunicorn_command("127.0.0.1:8000", 2, worker_class, "/run/maskwatch/gunicorn.ctl")
    at = command.index("--worker-class")
    assert command[at + 1] == worker_class
    assert command[at + 2:at + 2 + len(keep_alive)] == keep_alive and ("--keep-alive" in command) == bool(keep_alive)
    assert command[command.index("--control-socket") + 1] == "/run/maskwatch/gunicorn.ctl"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_maskwatch_serve_alone_stops_gunicorn_and_cleans_up(stop_signal, tiny_bundle, tmp_path):
    """`docker stop` or a service manager signals the CLI's process only; it used to die at once, leaving gunicorn
    running orphaned (or, with the group signalled, its temporary folder behind: 60 of them in /tmp)."""
    from conftest import start_maskwatch_serve, stop_server

    temp = tmp_path / "temp"
    temp.mkdir()
    url, proc = start_maskwatch_serve(["--model", str(tiny_bundle)], tmp_path / "serve.log", env={"TMPDIR": str(temp)})
    try:
        assert len(list(temp.glob("maskwatch-*"))) == 1
        os.kill(proc.pid, stop_signal)  # not the process group: only the CLI gets it
        assert proc.wait(timeout=60) == 0
    finally:
        stop_server(proc)  # whatever is left of the group, if the test failed
    assert list(temp.glob("maskwatch-*")) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_two_servers_each_answer_on_their_own_control_socket(tiny_bundle, tmp_path):
    """gunicorn 25.1+ opens a control socket for gunicornc, by default one per user (~/.gunicorn/gunicorn.ctl): a
    second `maskwatch serve` took it over, and when that one stopped it deleted the path, leaving the first
    server unmanageable. Each server now has its own, in its private folder, and nothing is written to HOME."""
    from conftest import start_maskwatch_serve, stop_server

    gunicornc = str(Path(sys.executable).parent / "gunicornc")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": ""}
    servers = {}
    try:
        for name in ("first", "second"):
            log = tmp_path / f"{name}.log"
            _, proc = start_maskwatch_serve(["--model", str(tiny_bundle)], log, env=env)
            text = log.read_text()
            servers[name] = (proc, re.search(r"gunicornc -s (\S+)", text).group(1),
                             int(re.search(r"Listening at: \S+ \((\d+)\)", text).group(1)))

        def master_pid_on(control_socket: str) -> int:
            out = subprocess.run([gunicornc, "-s", control_socket, "-c", "show stats", "-j"], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stdout + out.stderr
            return json.loads(out.stdout)["pid"]

        (_, first_socket, first_pid), (second, second_socket, second_pid) = servers["first"], servers["second"]
        assert first_socket != second_socket and Path(first_socket).parent.name.startswith("maskwatch-serve-")
        assert master_pid_on(first_socket) == first_pid and master_pid_on(second_socket) == second_pid
        stop_server(second)
        assert not Path(second_socket).exists() and master_pid_on(first_socket) == first_pid
        assert list(home.iterdir()) == []
    finally:
        for proc, _, _ in servers.values():
            stop_server(proc)


@pytest.mark.parametrize(("args", "env_change", "damaged", "message"), [
    (["--runtime", "onnx"], {}, None, "no onnx export at"),
    ([], {"MASKWATCH_YUNET_PATH": "/nowhere/yunet.onnx"}, None, "YuNet model /nowhere/yunet.onnx does not exist"),
    (["--set", "detector.backend=centernet"], {}, None, "detector.trained_model_path (None) is not a file"),
    ([], {}, "model_float.tflite", "cannot load the classifier"),
    (["--runtime", "keras"], {}, "model.keras", "cannot load the classifier")],
    ids=["no export for the runtime", "no YuNet file", "no trained detector", "a truncated LiteRT export",
         "a truncated model.keras"])
def test_serve_does_not_start_workers_that_cannot_load_their_model(tiny_bundle, tmp_path, args, env_change, damaged,
                                                                   message):
    """Each of these used to start gunicorn, whose workers then logged a traceback per request and answered 503
    (and /ready false) for as long as the server ran. A damaged file is what an interrupted copy leaves."""
    from conftest import YUNET_PATH, free_port, stop_server

    env = {k: v for k, v in os.environ.items() if k != "MASKWATCH_DETECTOR_PATH"}
    env.update({"MASKWATCH_YUNET_PATH": str(YUNET_PATH), **env_change})
    bundle = tiny_bundle
    if damaged:
        bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
        whole = (bundle / damaged).read_bytes()
        (bundle / damaged).write_bytes(whole[: len(whole) // 2])
    proc = subprocess.Popen([str(Path(sys.executable).parent / "maskwatch"), "serve", "--model", str(bundle),
                             "--port", str(free_port()), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_server(proc)
        pytest.fail("maskwatch serve started a server whose workers cannot load the model")
    assert proc.returncode == 2 and message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "Booting worker" not in stderr
