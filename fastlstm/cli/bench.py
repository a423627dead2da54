"""Measure a model on this machine: per-step latency and sequence throughput, per backend and thread count.

Per step: one ``Stream`` of one sequence, each ``step`` timed alone (p50 and p99 in µs; a model with a
reverse direction does not stream). Sequences: ``predict`` on a ``(batch, time)`` batch, repeated for a
fixed time (sequences per second). Beside fastlstm, where they are installed and can run the model exactly:
PyTorch (the model rebuilt from its weights as ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and ``nn.Linear``) and
ONNX Runtime (that rebuild exported to ONNX). Their outputs are checked against fastlstm's before anything
is timed; an engine that cannot run the model, or disagrees, is listed with the reason instead.
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import CommandError

NAME = "bench"
HELP = "per-step latency and sequence throughput on this machine"
BACKENDS = ("cython", "numba", "numpy")
AGREEMENT = {"float32": 1e-4, "float64": 1e-8}


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the model file")
    parser.add_argument("--thread-counts", metavar="N[,N...]",
                        help="thread counts to measure (default: --threads if given, else 1 and the cores available)")
    parser.add_argument("--batch", type=int, default=8, metavar="B", help="sequences per predict call (default 8)")
    parser.add_argument("--time-steps", type=int, default=100, metavar="T", help="steps per sequence (default 100)")
    parser.add_argument("--steps", type=int, default=2000, metavar="N", help="timed stream steps (default 2000)")
    parser.add_argument("--seconds", type=float, default=0.5, metavar="S",
                        help="how long each sequence measurement runs (default 0.5)")
    parser.add_argument("--no-frameworks", action="store_true", help="measure fastlstm only")


def run(args) -> None:
    from .. import Model
    from . import load_model

    if min(args.batch, args.time_steps, args.steps) < 1 or args.seconds <= 0:
        raise CommandError("--batch, --time-steps, --steps and --seconds must be positive")
    first = load_model(args)
    spec = first.spec
    threads = [args.threads] if args.thread_counts is None and args.threads else _thread_counts(args.thread_counts)
    backends = BACKENDS if args.backend == "auto" else (args.backend,)
    rng = np.random.default_rng(0)
    x_steps = _inputs(spec, rng, (args.steps + 50,))
    x_batch = _inputs(spec, rng, (args.batch, args.time_steps))
    reference = first.predict(x_batch)
    print(f"{args.model}: {first!r}")
    print(f"per step: one stream, {args.steps} steps; sequences: batch {args.batch} x {args.time_steps} steps")
    print(f"{'engine':<24}{'threads':>8}{'step p50 µs':>13}{'step p99 µs':>13}{'sequences/s':>13}")
    for backend in backends:
        for count in threads:
            try:
                model = Model(spec, backend=backend, dtype=args.dtype, num_threads=count)
            except Exception as exc:  # a backend not built or not able to run this model
                print(f"{'fastlstm ' + backend:<24}{count:>8}  unavailable: {_one_line(exc)}")
                continue
            step = _stream_latency(model, x_steps) if spec.is_unidirectional_forward else None
            rate = _sequence_rate(lambda: model.predict(x_batch), args.batch, args.seconds)
            _row(f"fastlstm {model.backend}", count, step, rate)
    if args.no_frameworks:
        return
    for name, make in (("PyTorch", _torch_engine), ("ONNX Runtime", _ort_engine)):
        for count in threads:
            try:
                engine = make(spec, args.dtype, count, x_batch, reference)
            except _Skip as reason:
                print(f"{name:<24}{'':>8}  not measured: {reason}")
                break
            step = _stream_latency(engine, x_steps) if spec.is_unidirectional_forward else None
            rate = _sequence_rate(lambda: engine.predict(x_batch), args.batch, args.seconds)
            _row(name, count, step, rate)


def _thread_counts(text: str | None) -> list[int]:
    if text is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return sorted({1, cores})
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise CommandError(f"--thread-counts: expected positive whole numbers separated by commas, got {text!r}")
    return counts


def _inputs(spec, rng, shape: tuple[int, ...]) -> np.ndarray:
    if spec.takes_token_ids:
        return rng.integers(0, spec.vocab_size, size=shape)
    return rng.standard_normal(shape + (spec.input_size,)).astype(np.float32)


def _stream_latency(model, x_steps: np.ndarray) -> tuple[float, float]:
    """p50 and p99 of one stream's step, in µs (the first 50 steps warm up and are not counted)."""
    stream = model.stream()
    times = np.empty(len(x_steps) - 50)
    clock = time.perf_counter_ns
    for n, x_t in enumerate(x_steps):
        start = clock()
        stream.step(x_t)
        if n >= 50:
            times[n - 50] = clock() - start
    return float(np.percentile(times, 50)) / 1e3, float(np.percentile(times, 99)) / 1e3


def _sequence_rate(call, batch: int, seconds: float) -> float:
    """Sequences per second of ``call`` (one warm-up call, then as many as fit in ``seconds``)."""
    call()
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch / elapsed


def _row(engine: str, threads: int, step, rate: float) -> None:
    p50, p99 = ("-", "-") if step is None else (f"{step[0]:.1f}", f"{step[1]:.1f}")
    print(f"{engine:<24}{threads:>8}{p50:>13}{p99:>13}{rate:>13.0f}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Skip(Exception):
    """Why a framework is not measured for this model."""


# ------------------------------------------------------------------------------- the model in PyTorch
_TORCH_ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "softmax")


def _torch_module(spec, dtype: str):
    """The model rebuilt from its weights as PyTorch modules, with ``forward(x, *states) -> (y, *states)``
    (one state tensor per ``h`` and ``c`` of each recurrent module); ``_Skip`` when PyTorch has no module
    for something it computes."""
    try:
        import torch
    except ImportError:
        raise _Skip("PyTorch is not installed") from None
    from torch import nn

    if spec.mask_value is not None:
        raise _Skip("the model masks steps, which PyTorch's modules do not")
    activations = [spec.head_input_activation] + [dense.activation for dense in spec.head]
    if any(a.name not in _TORCH_ACTIVATIONS for a in activations):
        raise _Skip("its head uses an activation this rebuild does not cover")
    torch_dtype = getattr(torch, dtype)
    recurrent = []
    for layer in spec.layers:
        relu_rnn = layer.kind == "rnn" and layer.cell_activation.name == "relu" and layer.clip is None
        if not (layer.is_standard or relu_rnn) or layer.direction == "reverse" or (
                layer.kind == "gru" and not layer.linear_before_reset) or any(
                cell.w_ih_scale is not None for cell in layer.cells):
            raise _Skip(f"PyTorch has no module for the layer {layer.kind} {layer.direction} with these options")
        common = dict(batch_first=True, bidirectional=layer.direction == "bidirectional", dtype=torch_dtype)
        if layer.kind == "lstm":
            module = nn.LSTM(layer.input_size, layer.hidden_size, proj_size=layer.proj_size, **common)
        elif layer.kind == "gru":
            module = nn.GRU(layer.input_size, layer.hidden_size, **common)
        else:
            module = nn.RNN(layer.input_size, layer.hidden_size, nonlinearity="relu" if relu_rnn else "tanh", **common)
        for cell, suffix in zip(layer.cells, ("", "_reverse")):
            recurrent_bias = np.zeros_like(cell.bias)
            if layer.kind == "gru":
                recurrent_bias[2 * layer.hidden_size:] = cell.candidate_bias
            weights = {"weight_ih": cell.w_ih, "weight_hh": cell.w_hh, "bias_ih": cell.bias, "bias_hh": recurrent_bias}
            if cell.w_hr is not None:
                weights["weight_hr"] = cell.w_hr
            for name, value in weights.items():
                getattr(module, f"{name}_l0{suffix}").data = torch.tensor(np.asarray(value), dtype=torch_dtype)
        recurrent.append(module)
    head = []
    for dense in spec.head:
        linear = nn.Linear(dense.in_features, dense.out_features, bias=dense.bias is not None, dtype=torch_dtype)
        linear.weight.data = torch.tensor(np.asarray(dense.weight), dtype=torch_dtype)
        if dense.bias is not None:
            linear.bias.data = torch.tensor(np.asarray(dense.bias), dtype=torch_dtype)
        head.append(linear)

    def activate(y, activation):
        name = activation.name
        return y if name == "identity" else torch.softmax(y, dim=-1) if name == "softmax" else getattr(torch, name)(y)

    class Rebuilt(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = None
            if spec.embedding is not None:
                self.embedding = nn.Embedding.from_pretrained(torch.tensor(np.asarray(spec.embedding), dtype=torch_dtype))
            self.recurrent = nn.ModuleList(recurrent)
            self.head = nn.ModuleList(head)

        def forward(self, x, *states):
            y = self.embedding(x) if self.embedding is not None else x
            finals, n = [], 0
            for module in self.recurrent:
                if isinstance(module, nn.LSTM):
                    y, (h, c) = module(y, (states[n], states[n + 1]))
                    finals += [h, c]
                    n += 2
                else:
                    y, h = module(y, states[n])
                    finals.append(h)
                    n += 1
            if spec.output == "last_step":
                y = y[:, -1]
            elif spec.output == "final_state":
                h = finals[-2] if isinstance(self.recurrent[-1], nn.LSTM) else finals[-1]
                y = torch.cat(list(h), dim=-1)
            y = activate(y, spec.head_input_activation)
            for linear, dense in zip(self.head, spec.head):
                y = activate(linear(y), dense.activation)
            return (y, *finals)

    return Rebuilt().eval(), torch_dtype


def _zero_states(spec, batch: int, torch_dtype):
    import torch

    states = []
    for layer in spec.layers:
        states.append(torch.zeros(layer.num_directions, batch, layer.output_size, dtype=torch_dtype))
        if layer.kind == "lstm":
            states.append(torch.zeros(layer.num_directions, batch, layer.hidden_size, dtype=torch_dtype))
    return states


def _check(name: str, y: np.ndarray, reference: np.ndarray, dtype: str) -> None:
    difference = float(np.max(np.abs(y - reference)))
    if not difference <= AGREEMENT[dtype]:
        raise _Skip(f"its output differs from fastlstm's by {difference:.2g} (more than {AGREEMENT[dtype]})")


class _TorchEngine:
    """``predict`` and ``stream().step`` of the PyTorch rebuild, like a fastlstm model's."""

    def __init__(self, spec, dtype: str, threads: int):
        import torch

        self.torch = torch
        self.spec = spec
        self.module, self.torch_dtype = _torch_module(spec, dtype)
        torch.set_num_threads(threads)
        self.dtype = dtype

    def _tensor(self, x):
        return self.torch.as_tensor(x) if self.spec.takes_token_ids else self.torch.as_tensor(x, dtype=self.torch_dtype)

    def predict(self, x):
        with self.torch.inference_mode():
            return self.module(self._tensor(x), *_zero_states(self.spec, len(x), self.torch_dtype))[0].numpy()

    def stream(self):
        engine, states = self, _zero_states(self.spec, 1, self.torch_dtype)

        class Stream:
            def step(self, x_t):
                nonlocal states
                with engine.torch.inference_mode():
                    y, *states = engine.module(engine._tensor(x_t)[None, None], *states)
                return y

        return Stream()


def _torch_engine(spec, dtype, threads, x_batch, reference):
    engine = _TorchEngine(spec, dtype, threads)
    _check("PyTorch", engine.predict(x_batch), reference, dtype)
    return engine


class _OrtEngine:
    """``predict`` and ``stream().step`` through ONNX Runtime, on the PyTorch rebuild exported to ONNX."""

    def __init__(self, spec, dtype: str, threads: int):
        try:
            import onnxruntime as ort
            import torch
        except ImportError as exc:
            raise _Skip(f"{exc.name} is not installed") from None
        import io
        import warnings

        module, torch_dtype = _torch_module(spec, dtype)
        states = _zero_states(spec, 2, torch_dtype)
        self.state_names = [f"state{n}" for n in range(len(states))]
        x = torch.zeros((2, 3), dtype=torch.int64) if spec.takes_token_ids else torch.zeros((2, 3, spec.input_size), dtype=torch_dtype)
        buffer = io.BytesIO()
        dynamic = {"x": {0: "batch", 1: "time"}, **{name: {1: "batch"} for name in self.state_names}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (x, *states), buffer, dynamo=False, opset_version=17,
                                  input_names=["x"] + self.state_names,
                                  output_names=["y"] + [f"{n}_out" for n in self.state_names], dynamic_axes=dynamic)
        except Exception as exc:  # the exporter's own limits
            raise _Skip(f"torch.onnx.export failed: {_one_line(exc)}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self.spec, self.torch_dtype, self.np_dtype = spec, torch_dtype, np.dtype(dtype)

    def _feed(self, x, states):
        x = np.asarray(x, np.int64) if self.spec.takes_token_ids else np.asarray(x, self.np_dtype)
        return {"x": x, **dict(zip(self.state_names, states))}

    def _zeros(self, batch):
        return [s.numpy() for s in _zero_states(self.spec, batch, self.torch_dtype)]

    def predict(self, x):
        return self.session.run(None, self._feed(x, self._zeros(len(x))))[0]

    def stream(self):
        engine, states = self, self._zeros(1)

        class Stream:
            def step(self, x_t):
                nonlocal states
                y, *states = engine.session.run(None, engine._feed(np.asarray(x_t)[None, None], states))
                return y

        return Stream()


def _ort_engine(spec, dtype, threads, x_batch, reference):
    engine = _OrtEngine(spec, dtype, threads)
    _check("ONNX Runtime", engine.predict(x_batch), reference, dtype)
    return engine
