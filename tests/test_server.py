"""``fastlstm serve`` as a real server process on loopback, spoken to by real HTTP and WebSocket clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
websockets_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402

import fastlstm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPOTTER = ROOT / "examples" / "models" / "keyword_spotter.pt"
TAGGER = ROOT / "examples" / "models" / "intent_tagger.pt"
STREAM_TOLERANCE = 1e-5  # a stream's steps against predict on the whole sequence (float32)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server:
    """A ``fastlstm serve`` subprocess on a free loopback port."""

    def __init__(self, model: Path, *options: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastlstm", "serve", str(model), "--port", str(self.port), "--backend", "cython",
             *options], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 90.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                         headers={"Content-Type": content_type})
        try:
            with _NO_PROXY.open(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str):
        return self.request("GET", path)

    def post_json(self, path: str, document) -> tuple[int, dict]:
        status, body = self.request("POST", path, json.dumps(document).encode())
        return status, json.loads(body)

    def connect(self, stream_id: str, **options):
        return websockets_client.connect(f"ws://127.0.0.1:{self.port}/v1/streams/{stream_id}", proxy=None, **options)

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1].decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process.stderr.close()


def assert_same_output(actual, expected):
    """Outputs of the same model computed in another process: equal to float32 rounding. A process takes its
    own summation path (BLAS or the hand loops, by its BLAS thread setting; one thread or two), which may
    move a float32 result by an ulp."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def bidirectional(tmp_path_factory):
    """An ONNX file of a bidirectional LSTM: a model that predicts but does not stream."""
    onnx = pytest.importorskip("onnx")
    from test_onnx_import import lstm_model

    path = tmp_path_factory.mktemp("models") / "bidirectional.onnx"
    onnx.save(lstm_model("bidirectional", hidden=5, input_size=4), path)
    return path


@pytest.fixture(scope="module")
def servers(bidirectional):
    """Every server process the tests use, started together (each loads its model once)."""
    started = {
        "main": Server(SPOTTER, "--max-message-bytes", "4096"),
        "replica": Server(SPOTTER),
        "small": Server(SPOTTER, "--capacity", "2", "--idle-timeout", "1"),
        "tokens": Server(TAGGER, "--head-activations", "softmax"),
        "bidirectional": Server(bidirectional),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def spotter():
    return fastlstm.load(SPOTTER, backend="cython")


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(7).standard_normal((3, 12, 32)).astype(np.float32)


def steps_binary(ws, steps: np.ndarray, outputs: int = 12) -> np.ndarray:
    ws.send(np.ascontiguousarray(steps, "<f4").tobytes())
    reply = ws.recv(timeout=30)
    assert isinstance(reply, bytes), reply
    return np.frombuffer(reply, "<f4").reshape(len(steps), outputs)


def test_model_description(servers, spotter):
    status, body = servers["main"].get("/v1/model")
    described = json.loads(body)
    assert status == 200
    assert (described["input_size"], described["output_size"], described["dtype"]) == (32, 12, "float32")
    assert described["input_kind"] == "features" and described["streams"] is True
    assert described["fingerprint"] == spotter.fingerprint
    assert json.loads(servers["tokens"].get("/v1/model")[1])["input_kind"] == "token_ids"


def test_predict_json_and_npy_equal_model_predict(servers, spotter, x):
    server = servers["replica"]
    status, reply = server.post_json("/v1/predict", {"x": x.tolist(), "lengths": [12, 5, 1]})
    assert status == 200
    assert_same_output(np.array(reply["y"], np.float32), spotter.predict(x, lengths=[12, 5, 1]))
    import io

    body = io.BytesIO()
    np.save(body, x[:1])
    status, reply = server.request("POST", "/v1/predict?lengths=4", body.getvalue(), "application/x-npy")
    assert status == 200
    assert_same_output(np.load(io.BytesIO(reply)), spotter.predict(x[:1], lengths=[4]))
    header = io.BytesIO()  # a header declaring far more data than the body holds: refused before allocating
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 10**9)})
    status, reply = server.request("POST", "/v1/predict", header.getvalue() + bytes(8), "application/x-npy")
    assert status == 400 and "declares 4000000000000000000 bytes" in json.loads(reply)["error"]


@pytest.mark.parametrize("body, fragment", [
    (b"not json", "not valid JSON"),
    (b'{"x": [[1, 2], [3]]}', "could not be read"),
    (b'{"x": [["a", "b"]]}', "expected numbers"),
    (b'{"x": [[[1.0, 2.0]]]}', "expected 32 features"),
    (b'{"y": 1}', "expected a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (RecursionError"),
    (b"[" * 600_000 + b"]" * 600_000, "the body is larger than 1048576 bytes"),
])
def test_predict_bad_requests(servers, body, fragment):
    status, reply = servers["replica"].request("POST", "/v1/predict", body)
    assert status == (413 if b"[" * 600_000 in body else 400)
    assert fragment in json.loads(reply)["error"]
    assert servers["replica"].get("/healthz")[0] == 200


def test_streams_equal_predict_and_resume_after_reconnect(servers, spotter, x):
    server = servers["main"]
    expected = spotter.predict(x[:2])
    with server.connect("resume-a") as a, server.connect("resume-b") as b:
        got_a = [steps_binary(a, x[0, :3])]
        got_b = [steps_binary(b, x[1, :5])]
        a.send(json.dumps({"x": x[0, 3].tolist()}))  # one step as JSON: answered with one output
        got_a.append(np.array(json.loads(a.recv(timeout=30))["y"], np.float32)[None])
        a.send(json.dumps({"x": x[0, 4:6].tolist()}))  # a list of steps as JSON
        got_a.append(np.array(json.loads(a.recv(timeout=30))["y"], np.float32))
    with server.connect("resume-a") as a, server.connect("resume-b") as b:  # the state waited for them
        got_a.append(steps_binary(a, x[0, 6:]))
        got_b.append(steps_binary(b, x[1, 5:]))
    np.testing.assert_allclose(np.concatenate(got_a), expected[0], atol=STREAM_TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.concatenate(got_b), expected[1], atol=STREAM_TOLERANCE, rtol=0)
    assert server.request("DELETE", "/v1/streams/resume-a")[0] == 204
    assert server.get("/v1/streams/resume-a/state")[0] == 404
    with server.connect("resume-a") as a:  # a new stream under the old id starts from zero state
        np.testing.assert_allclose(steps_binary(a, x[0, :2]), expected[0, :2], atol=STREAM_TOLERANCE, rtol=0)


def test_bad_messages_change_no_state_and_keep_the_server_up(servers, spotter, x):
    server = servers["main"]
    expected = spotter.predict(x[2])
    bad = [b"\x00" * 100, b"", json.dumps({"x": [1.0, 2.0]}), "not json", json.dumps({"x": "abc"}),
           json.dumps({"x": [[0.0] * 32, [0.0] * 31]}), json.dumps({"z": 1}),
           np.full(32, np.nan, "<f4").tobytes(), np.concatenate([x[2, 0], [np.inf] * 32]).astype("<f4").tobytes()]
    with server.connect("bad") as ws:
        got = [steps_binary(ws, x[2, :2])]
        snapshot = server.get("/v1/streams/bad/state")[1]
        for message in bad:
            ws.send(message)
            assert "error" in json.loads(ws.recv(timeout=30)), message
        assert server.get("/v1/streams/bad/state")[1] == snapshot
        got.append(steps_binary(ws, x[2, 2:]))
    np.testing.assert_allclose(np.concatenate(got), expected, atol=STREAM_TOLERANCE, rtol=0)
    assert server.metric("fastlstm_refusals_total") >= len(bad)


def test_an_oversized_message_closes_only_its_connection(servers, spotter, x):
    server = servers["main"]  # --max-message-bytes 4096: 32 steps of 128 bytes fit, 33 do not
    with server.connect("big") as ws:
        first = steps_binary(ws, x[0, :4])
        ws.send(np.zeros((33, 32), "<f4").tobytes())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1009
    with server.connect("big") as ws:
        rest = steps_binary(ws, x[0, 4:])
    np.testing.assert_allclose(np.concatenate([first, rest]), spotter.predict(x[0]), atol=STREAM_TOLERANCE, rtol=0)


def test_one_connection_per_stream(servers, x):
    server = servers["main"]
    with server.connect("once") as ws:
        steps_binary(ws, x[0, :1])
        with server.connect("once") as second:
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=30)
            assert closed.value.rcvd.code == 4409
        assert server.request("DELETE", "/v1/streams/once")[0] == 409
        steps_binary(ws, x[0, 1:2])  # the first connection is unaffected


def test_token_ids_binary_and_json(servers):
    tagger = fastlstm.load(TAGGER, head_activations=["softmax"], backend="cython")
    ids = np.random.default_rng(3).integers(0, 200, size=9)
    expected = tagger.predict(ids)
    server = servers["tokens"]
    with server.connect("text") as ws:
        got = [steps_binary(ws, ids[:4].astype("<i4").view("<f4"), outputs=5)]
        for bad in (np.array([3, 200], "<i4").tobytes(), np.array([-1], "<i4").tobytes(), json.dumps({"x": 1.5}),
                    json.dumps({"x": [[1, 2]]})):
            ws.send(bad)
            assert "error" in json.loads(ws.recv(timeout=30))
        ws.send(json.dumps({"x": int(ids[4])}))
        got.append(np.array(json.loads(ws.recv(timeout=30))["y"], np.float32)[None])
        ws.send(json.dumps({"x": ids[5:].tolist()}))
        got.append(np.array(json.loads(ws.recv(timeout=30))["y"], np.float32))
    np.testing.assert_allclose(np.concatenate(got), expected, atol=STREAM_TOLERANCE, rtol=0)


def test_a_model_that_does_not_stream_predicts_and_refuses_streams(servers, bidirectional):
    server = servers["bidirectional"]
    assert json.loads(server.get("/v1/model")[1])["streams"] is False
    x = np.random.default_rng(5).standard_normal((2, 6, 4)).astype(np.float32)
    status, reply = server.post_json("/v1/predict", {"x": x.tolist()})
    assert status == 200
    assert_same_output(np.array(reply["y"], np.float32),
                                  fastlstm.load(bidirectional, backend="cython").predict(x))
    with server.connect("s") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 4400 and "does not stream" in closed.value.rcvd.reason
    assert server.request("PUT", "/v1/streams/s/state", b"x", "application/octet-stream")[0] == 400


def test_a_snapshot_moves_between_server_processes(servers, spotter, x):
    source, target = servers["main"], servers["replica"]
    with source.connect("mover") as ws:
        first = steps_binary(ws, x[1, :7])
    status, blob = source.get("/v1/streams/mover/state")
    assert status == 200
    assert target.request("PUT", "/v1/streams/mover/state", blob, "application/octet-stream")[0] == 204
    with target.connect("mover") as ws:
        rest = steps_binary(ws, x[1, 7:])
    np.testing.assert_allclose(np.concatenate([first, rest]), spotter.predict(x[1]), atol=STREAM_TOLERANCE, rtol=0)
    status, reply = target.request("PUT", "/v1/streams/other/state", blob[:-3], "application/octet-stream")
    assert status == 400 and "error" in json.loads(reply)
    assert target.get("/v1/streams/other/state")[0] == 404
    tokens_blob = servers["tokens"]
    assert tokens_blob.request("PUT", "/v1/streams/x/state", blob, "application/octet-stream")[0] == 400


def test_capacity_and_idle_timeout(servers, x):
    server = servers["small"]  # --capacity 2 --idle-timeout 1
    with server.connect("one") as one:
        steps_binary(one, x[0, :1])
        with server.connect("two") as two:
            steps_binary(two, x[0, :1])
            with server.connect("three") as three:
                with pytest.raises(ConnectionClosed) as closed:
                    three.recv(timeout=30)
                assert closed.value.rcvd.code == 4429
            status, blob = server.get("/v1/streams/one/state")
            assert server.request("PUT", "/v1/streams/three/state", blob, "application/octet-stream")[0] == 400
            steps_binary(two, x[0, 1:2])  # the refusals took nothing from the live streams
        connected_snapshot = server.get("/v1/streams/one/state")[1]
        time.sleep(2.5)  # "two" has been closed longer than the idle timeout; "one" is still connected
        assert server.get("/v1/streams/two/state")[0] == 404
        assert server.get("/v1/streams/one/state")[1] == connected_snapshot
        assert server.metric("fastlstm_evictions_total") == 1
        with server.connect("three") as three:  # room again
            steps_binary(three, x[0, :1])
    assert server.metric("fastlstm_live_streams") == 2


def test_a_connection_keeps_its_room_before_its_first_step(servers, x):
    server = servers["small"]  # --capacity 2 --idle-timeout 1
    deadline = time.monotonic() + 10
    while server.metric("fastlstm_live_streams") and time.monotonic() < deadline:  # earlier tests' streams end
        time.sleep(0.2)
    with server.connect("quiet-1") as one, server.connect("quiet-2") as two:
        one.send(json.dumps({"z": 0}))  # a refused message: the connection is open and no step has run
        assert "error" in json.loads(one.recv(timeout=30))
        two.send(json.dumps({"z": 0}))
        assert "error" in json.loads(two.recv(timeout=30))
        assert server.metric("fastlstm_live_streams") == 2
        state = server.get("/v1/streams/quiet-1/state")[1]
        status, reply = server.request("PUT", "/v1/streams/thief/state", state, "application/octet-stream")
        assert status == 400 and "capacity 2" in json.loads(reply)["error"]
        steps_binary(one, x[0, :1])  # both connected streams still have their room
        steps_binary(two, x[0, :1])
        time.sleep(1.5)  # silent past the idle timeout, but connected: kept
        assert server.get("/v1/streams/quiet-1/state")[0] == 200


def test_metrics_count_steps_and_batches(servers, x):
    server = servers["replica"]
    before_steps, before_batches = server.metric("fastlstm_steps_total"), server.metric("fastlstm_batch_size_count")
    with server.connect("m") as ws:
        steps_binary(ws, x[2, :6])
    assert server.metric("fastlstm_steps_total") - before_steps == 6
    assert server.metric("fastlstm_batch_size_count") - before_batches == 6  # one stream: one step per batch
    text = server.get("/metrics")[1].decode()
    for name in ("fastlstm_step_latency_seconds_bucket", "fastlstm_live_streams", "fastlstm_evictions_total",
                 "fastlstm_refusals_total"):
        assert name in text
    assert server.metric("fastlstm_batch_seconds_count") - before_batches == 6  # each batch timed by on_batch


def test_sigterm_finishes_queued_steps_then_exits(spotter, x):
    # Steps wait up to 1 s for a batch to fill: the signal arrives while this one is queued.
    server = Server(SPOTTER, "--max-delay-us", "1000000").wait_ready()
    try:
        with server.connect("p") as p, server.connect("q") as q:  # two clients' steps wait for one batch
            p.send(np.ascontiguousarray(x[0, :1], "<f4").tobytes())
            q.send(np.ascontiguousarray(x[1, :1], "<f4").tobytes())
            replies = [np.frombuffer(ws.recv(timeout=30), "<f4") for ws in (p, q)]
        np.testing.assert_allclose(replies, spotter.predict(x[:2, :1])[:, 0], atol=STREAM_TOLERANCE, rtol=0)
        assert (server.metric("fastlstm_batch_size_count"), server.metric("fastlstm_batch_size_sum")) == (1, 2)
        with server.connect("last") as ws:
            ws.send(np.ascontiguousarray(x[0, :1], "<f4").tobytes())
            time.sleep(0.4)
            server.process.send_signal(signal.SIGTERM)
            reply = np.frombuffer(ws.recv(timeout=30), "<f4")
            np.testing.assert_allclose(reply, spotter.predict(x[0, :1])[0], atol=STREAM_TOLERANCE, rtol=0)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
        assert server.process.wait(30) in (0, -signal.SIGTERM)
    finally:
        server.stop()


def test_concurrent_clients_share_batches_and_each_gets_its_own_streams_outputs(spotter):
    import threading

    clients, steps = 16, 6
    x = np.random.default_rng(8).standard_normal((clients, steps, 32)).astype(np.float32)
    expected = spotter.predict(x)
    # A batch runs once 8 steps wait or the oldest has waited 50 ms: the clients' steps meet in shared batches.
    server = Server(SPOTTER, "--max-batch", "8", "--max-delay-us", "50000").wait_ready()
    got, errors = {}, []
    try:
        def client(n):
            try:
                with server.connect(f"c{n}") as ws:
                    got[n] = np.concatenate([steps_binary(ws, x[n, t:t + 1]) for t in range(steps)])
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for n in range(clients):
            np.testing.assert_allclose(got[n], expected[n], atol=STREAM_TOLERANCE, rtol=0)
        batches, batched_steps = server.metric("fastlstm_batch_size_count"), server.metric("fastlstm_batch_size_sum")
        assert server.metric("fastlstm_steps_total") == batched_steps == clients * steps
        assert batches <= clients * steps / 2  # shared: two or more streams per batch on average
    finally:
        server.stop()
