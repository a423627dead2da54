"""``fastlstm serve``: a model over HTTP and WebSocket, live streams batched across clients by a ``StreamPool``.

Endpoints (needs the optional extra ``fastlstm[serve]``: Starlette on uvicorn, websockets, prometheus_client, and
uvicorn's speed-ups uvloop and httptools, used when installed):

* ``GET /v1/model``: JSON: input and output sizes, dtype, input kind, whether the model streams.
* ``POST /v1/predict``: whole sequences, JSON ``{"x": [[[...]]], "lengths": [...]}`` answered ``{"y": ...}``,
  or an ``.npy`` body (``Content-Type: application/x-npy``, lengths as ``?lengths=50,30``) answered with one.
* ``WS /v1/streams/{stream_id}``: a live stream. A binary message is k >= 1 time steps, little-endian float32,
  k*F values (int32 token ids, k values, for a model that takes them); the reply is the k outputs, float32,
  k*O values. A text message ``{"x": [...]}`` (one step, or a list of k steps) is answered ``{"y": [...]}``
  of the same nesting. Every step goes through the pool's batcher (``StreamPool.submit_async``), so the
  steps of all connections run as shared batches, and each batch's outputs reach the event loop in one call.
  A bad message is answered ``{"error": "..."}`` and changes no state; the connection stays open. A message
  over ``max_message_bytes`` closes the connection (1009).
* After the socket closes, the stream's state stays for ``idle_timeout`` seconds: reconnecting with the same
  id resumes it. A connection holds its stream in the pool (``StreamPool.hold``) from the moment it opens, so a
  connected stream is never evicted and keeps its room. One connection per stream id at a time.
* ``DELETE /v1/streams/{id}`` ends a stream; ``GET /v1/streams/{id}/state`` returns its snapshot
  (``application/octet-stream``) and ``PUT`` restores one, e.g. a stream moving between replicas.
* ``GET /healthz``; ``GET /metrics`` in Prometheus' text format.

SIGTERM (or Ctrl-C) drains: new connections and requests are refused (503, WebSocket close 1013), the steps
already queued run and are answered, then the server shuts down; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import numpy as np
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .cli.npy import load_npy
from .errors import FastLSTMError, InvalidInputError
from .pool import StreamPool

_log = logging.getLogger(__name__)
NPY = "application/x-npy"
# WebSocket close codes: the message was too big (RFC 6455), and ours (4000-4999 are the application's).
CLOSE_TOO_BIG, CLOSE_TRY_LATER = 1009, 1013
CLOSE_NOT_STREAMING, CLOSE_IN_USE, CLOSE_NO_ROOM = 4400, 4409, 4429
# Batch sizes a histogram can tell apart (the pool's internal batches are at most max_batch rows).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# A step takes microseconds to run and waits up to max_delay_us for its batch: buckets from 50 µs to 1 s.
_LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
# A batch runs in microseconds (one row) to milliseconds (a large batch of a large model).
_BATCH_SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (nothing global is touched)."""

    def __init__(self, live_streams):
        self.registry = CollectorRegistry()
        self.steps = Counter("fastlstm_steps", "Stream steps run", registry=self.registry)
        self.batch_size = Histogram("fastlstm_batch_size", "Stream steps run per batch", registry=self.registry,
                                    buckets=_BATCH_BUCKETS)
        self.batch_seconds = Histogram("fastlstm_batch_seconds", "Time to run one batch (gather, kernels, scatter)",
                                       registry=self.registry, buckets=_BATCH_SECONDS_BUCKETS)
        self.step_latency = Histogram("fastlstm_step_latency_seconds",
                                      "From a WebSocket message's arrival to the output of its last step",
                                      registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.predictions = Counter("fastlstm_predict_requests", "POST /v1/predict requests answered",
                                   registry=self.registry)
        self.live = Gauge("fastlstm_live_streams", "Streams holding state", registry=self.registry)
        self.live.set_function(live_streams)
        self.evictions = Counter("fastlstm_evictions", "Streams ended after idle_timeout without a connection",
                                 registry=self.registry)
        self.refusals = Counter("fastlstm_refusals", "Requests and messages refused", ["reason"],
                                registry=self.registry)


class StreamServer:
    """The ASGI application of one model (``app``), with its pool, metrics and drain state."""

    def __init__(self, model, *, source: str = "", max_batch: int = 64, max_delay_us: float = 200.0,
                 capacity: int = 10_000, idle_timeout: float = 300.0, max_message_bytes: int = 1 << 20):
        self.model = model
        self.source = source
        self.capacity = capacity
        self.idle_timeout = float(idle_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.streams = model.spec.is_unidirectional_forward
        self.pool = None
        self.metrics = _Metrics(lambda: len(self.pool) if self.pool is not None else 0)
        if self.streams:
            self.pool = StreamPool(model, capacity, self.idle_timeout, self._evicted, max_batch=max_batch,
                                   max_delay_us=max_delay_us, on_batch=self._batch_ran)
        self.connected: set[str] = set()
        self.in_flight = 0                   # stream steps submitted and not yet answered
        self.draining = False
        self._step_shape = () if model.takes_token_ids else (model.input_size,)
        self._wire_dtype = np.dtype("<i4") if model.takes_token_ids else np.dtype("<f4")
        self._step_bytes = self._wire_dtype.itemsize * (1 if model.takes_token_ids else model.input_size)
        self.app = Starlette(routes=[
            Route("/v1/model", self.describe, methods=["GET"]),
            Route("/v1/predict", self.predict, methods=["POST"]),
            WebSocketRoute("/v1/streams/{stream_id}", self.stream),
            Route("/v1/streams/{stream_id}", self.end_stream, methods=["DELETE"]),
            Route("/v1/streams/{stream_id}/state", self.get_state, methods=["GET"]),
            Route("/v1/streams/{stream_id}/state", self.put_state, methods=["PUT"]),
            Route("/healthz", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ], lifespan=self._lifespan)

    # ------------------------------------------------------------------ lifecycle
    def _lifespan(self, app):
        server = self

        class Lifespan:
            async def __aenter__(self):
                pass

            async def __aexit__(self, *exc_info):
                if server.pool is not None:
                    await run_in_threadpool(server.pool.close)  # runs every submitted step first

        return Lifespan()

    def _evicted(self, stream_id: str, snapshot: bytes) -> None:
        """The pool's ``on_evict``: a stream without a connection for ``idle_timeout`` seconds has ended."""
        self.metrics.evictions.inc()

    def _batch_ran(self, size: int, seconds: float) -> None:
        """The pool's ``on_batch``: the step metrics are counted per batch, not per step."""
        self.metrics.steps.inc(size)
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    def _refuse(self, reason: str, status: int, message: str) -> JSONResponse:
        self.metrics.refusals.labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status)

    # ------------------------------------------------------------------ HTTP
    async def describe(self, request: Request) -> Response:
        spec = self.model.spec
        return JSONResponse({
            "source": self.source,
            "input_size": spec.input_size,
            "output_size": spec.output_size,
            "dtype": str(self.model.dtype),
            "input_kind": "token_ids" if spec.takes_token_ids else "features",
            "vocab_size": spec.vocab_size if spec.takes_token_ids else None,
            "output": spec.output,
            "streams": self.streams,
            "wire_dtype": "int32" if spec.takes_token_ids else "float32",
            "fingerprint": self.model.fingerprint,
        })

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        if self.pool is not None:
            len(self.pool)  # the pool evicts idle streams when called: count them before reporting
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _body(self, request: Request) -> bytes | None:
        """The request body, or None when it is larger than ``max_message_bytes`` (read no further)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_message_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(self, request: Request) -> Response:
        if self.draining:
            return self._refuse("draining", 503, "the server is shutting down")
        body = await self._body(request)
        if body is None:
            return self._refuse("too_large", 413, f"the body is larger than {self.max_message_bytes} bytes")
        as_npy = request.headers.get("content-type", "").split(";")[0].strip() == NPY
        try:
            if as_npy:
                x = load_npy(io.BytesIO(body), len(body), "body")
                lengths = request.query_params.get("lengths")
                if lengths is not None:
                    try:
                        lengths = [int(n) for n in lengths.split(",")]
                    except ValueError:
                        raise InvalidInputError(f"lengths: expected whole numbers separated by commas, got {lengths!r}") from None
            else:
                document = _json(body)
                if not isinstance(document, dict) or "x" not in document or set(document) - {"x", "lengths"}:
                    raise InvalidInputError('body: expected a JSON object {"x": [...], "lengths": [...]} ("lengths" optional)')
                x, lengths = _json_array(document["x"], "x"), document.get("lengths")
                if lengths is not None:
                    lengths = _json_array(lengths, "lengths")
            y = await run_in_threadpool(self.model.predict, x, lengths=lengths)
        except FastLSTMError as exc:
            return self._refuse("bad_input", 400, str(exc))
        self.metrics.predictions.inc()
        if as_npy:
            out = io.BytesIO()
            np.save(out, y)
            return Response(out.getvalue(), media_type=NPY)
        return JSONResponse({"y": y.tolist()})

    async def end_stream(self, request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        if stream_id in self.connected:
            return self._refuse("in_use", 409, f"stream {stream_id!r} has a live connection")
        if self.pool is None or stream_id not in self.pool:
            return self._refuse("unknown_stream", 404, f"no stream {stream_id!r}")
        try:
            self.pool.close(stream_id)
        except InvalidInputError as exc:  # the pool is closed: the server is shutting down
            return self._refuse("draining", 503, str(exc))
        return Response(status_code=204)

    async def get_state(self, request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        if self.pool is None:
            return self._refuse("unknown_stream", 404, f"no stream {stream_id!r}")
        try:
            snapshot = self.pool.snapshot(stream_id)
        except InvalidInputError:  # no such stream (evicted, ended or never started), or the pool is closed
            return self._refuse("unknown_stream", 404, f"no stream {stream_id!r}")
        return Response(snapshot, media_type="application/octet-stream")

    async def put_state(self, request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        if self.draining:
            return self._refuse("draining", 503, "the server is shutting down")
        if self.pool is None:
            return self._refuse("not_streaming", 400, "this model does not stream (it has a reverse direction)")
        if stream_id in self.connected:
            return self._refuse("in_use", 409, f"stream {stream_id!r} has a live connection")
        body = await self._body(request)
        if body is None:
            return self._refuse("too_large", 413, f"the body is larger than {self.max_message_bytes} bytes")
        try:
            self.pool.restore(stream_id, body)
        except InvalidInputError as exc:
            return self._refuse("bad_state", 400, str(exc))
        return Response(status_code=204)

    # ------------------------------------------------------------------ WebSocket streams
    async def stream(self, websocket: WebSocket) -> None:
        stream_id = websocket.path_params["stream_id"]
        refusal = self._connection_refusal(stream_id)
        if refusal is not None:
            code, reason, message = refusal
            self.metrics.refusals.labels(reason).inc()
            await websocket.accept()  # then close with a code and reason a client can read (a refused handshake has none)
            await websocket.close(code, message)
            return
        self.connected.add(stream_id)
        try:
            await websocket.accept()
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if self.draining:
                    self.metrics.refusals.labels("draining").inc()
                    await websocket.send_text(json.dumps({"error": "the server is shutting down"}))
                    continue
                binary = message.get("bytes") is not None
                try:
                    steps, single = self._steps(message["bytes"]) if binary else self._json_steps(message.get("text"))
                    y = await self._run_steps(stream_id, steps)
                except FastLSTMError as exc:
                    self.metrics.refusals.labels("bad_message").inc()
                    await websocket.send_text(json.dumps({"error": str(exc)}))
                    continue
                if binary:
                    await websocket.send_bytes(y.astype("<f4").tobytes())
                else:
                    await websocket.send_text(json.dumps({"y": (y[0] if single else y).tolist()}))
        except WebSocketDisconnect:
            return
        finally:
            self.connected.discard(stream_id)
            self.pool.release(stream_id)  # its idle time starts now (nothing to do once the pool is closed)

    def _connection_refusal(self, stream_id: str):
        """``(close code, metric reason, message)`` when a connection to ``stream_id`` is refused, else None;
        when it is accepted, its stream (a new one from zero state) is held in the pool until it closes."""
        if self.draining:
            return CLOSE_TRY_LATER, "draining", "the server is shutting down"
        if self.pool is None:
            return CLOSE_NOT_STREAMING, "not_streaming", "this model does not stream (it has a reverse direction)"
        if stream_id in self.connected:
            return CLOSE_IN_USE, "in_use", f"stream {stream_id!r} already has a live connection"
        try:
            self.pool.hold(stream_id)
        except InvalidInputError:  # no room for a new stream (or the pool has closed: shutting down)
            return CLOSE_NO_ROOM, "capacity", f"the server holds its capacity of {self.capacity} streams"
        return None

    def _steps(self, data: bytes) -> tuple[np.ndarray, bool]:
        """A binary message as ``(k, F)`` features (or ``(k,)`` token ids), checked before any step runs."""
        if not data or len(data) % self._step_bytes:
            raise InvalidInputError(
                f"message: expected a whole number k >= 1 of steps of {self._step_bytes} bytes "
                f"({'one int32 token id' if self.model.takes_token_ids else f'{self.model.input_size} float32 values'} "
                f"each, little-endian), got {len(data)} bytes")
        steps = np.frombuffer(data, self._wire_dtype).reshape((-1,) + self._step_shape)
        return self._checked(steps), False

    def _json_steps(self, text) -> tuple[np.ndarray, bool]:
        """A text message ``{"x": step}`` or ``{"x": [step, ...]}`` as ``(k, ...)`` steps, and whether it was one."""
        document = _json(text.encode() if isinstance(text, str) else b"")
        if not isinstance(document, dict) or set(document) != {"x"}:
            raise InvalidInputError('message: expected a JSON object {"x": [...]} (one step or a list of steps)')
        steps = _json_array(document["x"], "x")
        single = steps.ndim == len(self._step_shape)
        if single:
            steps = steps[None]
        if steps.ndim != len(self._step_shape) + 1 or steps.shape[1:] != self._step_shape or len(steps) == 0:
            expected = "a token id or a list of them" if self.model.takes_token_ids else \
                f"{self.model.input_size} numbers or a list of such steps"
            raise InvalidInputError(f"x: expected {expected}, got shape {steps.shape}")
        return self._checked(steps), single

    def _checked(self, steps: np.ndarray) -> np.ndarray:
        if self.model.takes_token_ids:
            if steps.dtype.kind == "f":
                if not np.all(steps == np.round(steps)):
                    raise InvalidInputError("x: token ids must be whole numbers")
                steps = steps.astype(np.int64)
            vocab = self.model.spec.vocab_size
            if steps.dtype.kind not in "iu" or np.any(steps < 0) or np.any(steps >= vocab):
                raise InvalidInputError(f"x: token ids must be integers in 0..{vocab - 1}")
        elif not np.all(np.isfinite(steps)):
            raise InvalidInputError("x: every value must be a finite number")
        return steps

    async def _run_steps(self, stream_id: str, steps: np.ndarray) -> np.ndarray:
        """The outputs ``(k, O)`` of ``steps`` run in order on ``stream_id``'s stream, each through the batcher
        (``StreamPool.submit_async``: a batch's outputs reach the event loop in one call)."""
        started = time.perf_counter()
        futures = [self.pool.submit_async(stream_id, x_t) for x_t in steps]
        self.in_flight += len(futures)
        try:
            if len(futures) == 1:
                outputs = [await futures[0]]
            else:
                outputs = await asyncio.gather(*futures, return_exceptions=True)
        except FastLSTMError as exc:  # the one step of the message
            outputs = [exc]
        finally:
            self.in_flight -= len(futures)
        failed = [o for o in outputs if isinstance(o, BaseException)]
        done = len(outputs) - len(failed)
        if done:
            self.metrics.step_latency.observe(time.perf_counter() - started)  # one per message: its slowest step
        if failed:
            error = failed[0]
            if isinstance(error, FastLSTMError):
                raise type(error)(f"{done} of {len(steps)} step(s) ran; then: {error}") if done else error
            raise error
        return outputs[0][None] if len(outputs) == 1 else np.stack(outputs)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with the first SIGTERM or SIGINT turned into a drain of the queued steps."""

    def __init__(self, config: uvicorn.Config, stream_server: StreamServer, drain_seconds: float = 30.0):
        super().__init__(config)
        self.stream_server = stream_server
        self.drain_seconds = drain_seconds
        self._exit_signal = None
        self._drain_deadline = None

    def handle_exit(self, sig, frame) -> None:
        if self._exit_signal is not None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        _log.info("draining: refusing new work, finishing %d queued step(s)", self.stream_server.in_flight)
        self._exit_signal = (sig, frame)
        self._drain_deadline = time.monotonic() + self.drain_seconds
        self.stream_server.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self._exit_signal is not None and not self.should_exit and (
                self.stream_server.in_flight == 0 or time.monotonic() > self._drain_deadline):
            super().handle_exit(*self._exit_signal)
        return await super().on_tick(counter)


def serve(model, *, source: str = "", host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          max_delay_us: float = 200.0, capacity: int = 10_000, idle_timeout: float = 300.0,
          max_message_bytes: int = 1 << 20, log_level: str = "info") -> None:
    """Serve ``model`` until SIGTERM or Ctrl-C (see the module docstring for the endpoints)."""
    server = StreamServer(model, source=source, max_batch=max_batch, max_delay_us=max_delay_us, capacity=capacity,
                          idle_timeout=idle_timeout, max_message_bytes=max_message_bytes)
    # "auto": uvloop and httptools when installed (the serve extra has them), else asyncio's loop and h11. Of
    # uvicorn's WebSocket implementations, websockets' sans-I/O one measured fastest here.
    config = uvicorn.Config(server.app, host=host, port=port, loop="auto", http="auto", ws="websockets-sansio",
                            ws_max_size=max_message_bytes, log_level=log_level, access_log=False, lifespan="on")
    _DrainingServer(config, server).run()


def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"body: not valid JSON ({type(exc).__name__}: {exc})") from None


def _json_array(value, name: str) -> np.ndarray:
    """A JSON value as an array of numbers: ragged lists, strings, booleans and null are refused."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{name}: could not be read as an array of numbers ({exc})") from None
    if array.dtype.kind not in "iuf":
        raise InvalidInputError(f"{name}: expected numbers, got {'a ragged list' if array.dtype.kind == 'O' else array.dtype}")
    return array
