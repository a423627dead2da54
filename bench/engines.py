"""The engines the harness compares, each behind the same two small interfaces.

A ``Stepper`` advances ``batch`` sequences by one time step per ``step(x_t)`` call, carrying state the way a
user of that engine would (PyTorch modules get the previous ``(h, c)``; ONNX Runtime gets them as inputs).
A ``SequenceRunner`` runs a whole ``(B, T, I)`` batch per call from zero state.

Every engine is built from the same PyTorch network (weights from a fixed seed): an ``nn.LSTM`` or ``nn.GRU``
and its head (``Config.head``: a Linear layer of 8 outputs by default, or 12 classes with softmax, or
none), so outputs can be checked equal before anything is timed. A GRU carries ``h`` alone where an LSTM
carries ``(h, c)``. ``Config.weights`` is the weight format fastlstm is asked for (``fastlstm.load(...,
weights=...)``); the peers always run float32.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

import fastlstm
from fastlstm.backends import available_backends

STREAM_ENGINES = ("fastlstm-cython", "fastlstm-numba", "fastlstm-numpy", "torch-lstm", "torch-lstmcell",
                  "ort-run", "ort-iobinding")
SEQUENCE_ENGINES = ("fastlstm-cython", "fastlstm-numba", "torch-lstm", "ort-run")


# head name -> (output features, activation after the Linear layer); "none" is the recurrent layers alone.
HEADS = {"linear": (8, None), "softmax": (12, "softmax"), "none": (0, None)}
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class Config:
    """One network: input I, hidden H, L layers of an LSTM or a GRU, its head (``HEADS``), and the weight
    format fastlstm runs it in (``WEIGHT_FORMATS``)."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    cell: str = "lstm"
    head: str = "linear"
    weights: str = "float32"

    def __post_init__(self):
        if self.head not in HEADS or self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown head {self.head!r} or weights {self.weights!r}")

    @property
    def label(self) -> str:
        return (f"{self.cell.upper()} I={self.input_size} H={self.hidden_size} L={self.num_layers} "
                f"head={self.head} weights={self.weights}")

    @property
    def output_size(self) -> int:
        return HEADS[self.head][0] or self.hidden_size

    @property
    def gates(self) -> int:
        return {"lstm": 4, "gru": 3}[self.cell]

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def flops_per_step(self, batch: int = 1) -> int:
        """Multiply-adds x2 of the gate products and the head of one time step, all layers."""
        total, layer_input = 0, self.input_size
        for _ in range(self.num_layers):
            total += 2 * self.gates * self.hidden_size * (layer_input + self.hidden_size)
            layer_input = self.hidden_size
        total += 2 * HEADS[self.head][0] * self.hidden_size
        return total * batch


def set_threads(threads: int) -> None:
    """The same thread count for every engine in this process (PyTorch, BLAS via threadpoolctl, fastlstm)."""
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS that fastlstm's kernels call)
    import torch
    from threadpoolctl import threadpool_limits

    # threadpoolctl only reaches libraries already loaded: load every BLAS an engine will use first.
    for module in ("fastlstm.backends._cykernels", "fastlstm.backends._numba_kernels"):
        try:
            __import__(module)
        except ImportError:
            pass
    torch.set_num_threads(threads)
    threadpool_limits(threads)


def torch_network(config: Config):
    """The PyTorch network every engine of a measurement is built from: ``forward(x, state) -> (y, state)``
    with ``rnn`` (the ``nn.LSTM`` or ``nn.GRU``) and ``head`` (modules only, ``nn.Identity`` for "none", so that
    every importer sees the whole head in the module's structure)."""
    import torch

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            kind = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[config.cell]
            self.rnn = kind(config.input_size, config.hidden_size, num_layers=config.num_layers, batch_first=True)
            outputs, activation = HEADS[config.head]
            layers = [torch.nn.Linear(config.hidden_size, outputs)] if outputs else [torch.nn.Identity()]
            if activation == "softmax":
                layers.append(torch.nn.Softmax(dim=-1))
            self.head = torch.nn.Sequential(*layers)

        def forward(self, x, state=None):
            y, state = self.rnn(x, state)
            return self.head(y), state

    torch.manual_seed(1234)
    return Network().eval()


# ----------------------------------------------------------------------------------------------- streaming
def load_fastlstm(network, backend: str, config: Config, threads: int) -> fastlstm.Model:
    """``network`` in fastlstm; ``weights=`` is passed only for a format other than float32, so that the
    float32 rows run with any fastlstm (the option is newer than the harness)."""
    options = {} if config.weights == "float32" else {"weights": config.weights}
    return fastlstm.load(network, backend=backend, num_threads=threads, **options)


class FastlstmStepper:
    def __init__(self, module, backend: str, config: Config, batch: int, threads: int):
        self.model = load_fastlstm(module, backend, config, threads)
        self.stream = self.model.stream(batch_size=batch)
        self.out = np.empty((batch, self.model.output_size), np.float32)

    def step(self, x_t):
        return self.stream.step(x_t, out=self.out)


class TorchLSTMStepper:
    def __init__(self, module, batch: int, threads: int):
        import torch

        self.torch = torch
        self.module = module
        self.state = None

    def step(self, x_t):
        with self.torch.inference_mode():
            y, self.state = self.module(self.torch.from_numpy(x_t)[:, None], self.state)
        return y[:, 0].numpy()


class TorchLSTMCellStepper:
    """The cheapest PyTorch streaming path: one ``nn.LSTMCell`` (``nn.GRUCell``) per layer, same weights, then
    the network's head."""

    def __init__(self, network, batch: int, threads: int):
        import torch

        self.torch = torch
        self.head = network.head
        module = network.rnn
        self.cells = []
        cell_class = torch.nn.LSTMCell if isinstance(module, torch.nn.LSTM) else torch.nn.GRUCell
        self.carries_c = cell_class is torch.nn.LSTMCell
        for layer in range(module.num_layers):
            cell = cell_class(module.input_size if layer == 0 else module.hidden_size, module.hidden_size)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).data.copy_(getattr(module, f"{name}_l{layer}"))
            self.cells.append(cell.eval())
        self.state = [None] * module.num_layers

    def step(self, x_t):
        with self.torch.inference_mode():
            layer_input = self.torch.from_numpy(x_t)
            for n, cell in enumerate(self.cells):
                self.state[n] = cell(layer_input, self.state[n])
                layer_input = self.state[n][0] if self.carries_c else self.state[n]
            return self.head(layer_input).numpy()


def state_names(config: Config) -> tuple[list[str], list[str]]:
    """The ONNX graph's state inputs and outputs: ``h0, c0 -> h_n, c_n`` for an LSTM, ``h0 -> h_n`` for a GRU."""
    return (["h0", "c0"], ["h_n", "c_n"]) if config.has_cell_state else (["h0"], ["h_n"])


def onnx_bytes(module, config: Config, batch: int, steps: int | None) -> bytes:
    """``torch.onnx.export`` of ``forward(x, *state) -> (y, *state_n)`` (``y`` after the head); ``steps=None``
    makes B and T dynamic."""
    import torch

    class WithState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = module

        def forward(self, x, h0, c0=None):
            if c0 is None:
                y, h = self.network(x, h0)
                return y, h
            y, (h, c) = self.network(x, (h0, c0))
            return y, h, c

    inputs, outputs = state_names(config)
    shape_steps = steps or 5
    args = (torch.zeros(batch, shape_steps, config.input_size),) + tuple(
        torch.zeros(config.num_layers, batch, config.hidden_size) for _ in inputs)
    dynamic = None
    if steps is None:
        dynamic = {"x": {0: "B", 1: "T"}, "y": {0: "B", 1: "T"}, **{name: {1: "B"} for name in inputs}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithState(), args, buffer, dynamo=False, opset_version=17,
                          input_names=["x"] + inputs, output_names=["y"] + outputs, dynamic_axes=dynamic)
    return buffer.getvalue()


def ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class OrtRunStepper:
    def __init__(self, module, config: Config, batch: int, threads: int):
        self.session = ort_session(onnx_bytes(module, config, batch, steps=1), threads)
        self.state_inputs = state_names(config)[0]
        self.state = [np.zeros((config.num_layers, batch, config.hidden_size), np.float32) for _ in self.state_inputs]

    def step(self, x_t):
        y, *self.state = self.session.run(None, {"x": x_t[:, None], **dict(zip(self.state_inputs, self.state))})
        return y[:, 0]


class OrtIOBindingStepper:
    """ONNX Runtime at its fastest per call: bound buffers shared with NumPy, state ping-ponged between two."""

    def __init__(self, module, config: Config, batch: int, threads: int):
        import onnxruntime as ort

        self.session = ort_session(onnx_bytes(module, config, batch, steps=1), threads)
        self.x = np.zeros((batch, 1, config.input_size), np.float32)
        self.y = np.zeros((batch, 1, config.output_size), np.float32)
        inputs, outputs = state_names(config)
        shape = (config.num_layers, batch, config.hidden_size)
        ping, pong = ([np.zeros(shape, np.float32) for _ in inputs] for _ in range(2))
        self.bindings = []
        for state_in, state_out in ((ping, pong), (pong, ping)):
            binding = self.session.io_binding()
            for name, array in [("x", self.x)] + list(zip(inputs, state_in)):
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            for name, array in [("y", self.y)] + list(zip(outputs, state_out)):
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
            self.bindings.append(binding)
        self.turn = 0

    def step(self, x_t):
        np.copyto(self.x[:, 0], x_t)
        self.session.run_with_iobinding(self.bindings[self.turn])
        self.turn ^= 1
        return self.y[:, 0]


def make_stepper(engine: str, module, config: Config, batch: int, threads: int):
    if engine.startswith("fastlstm-"):
        return FastlstmStepper(module, engine.split("-", 1)[1], config, batch, threads)
    if engine == "torch-lstm":
        return TorchLSTMStepper(module, batch, threads)
    if engine == "torch-lstmcell":
        return TorchLSTMCellStepper(module, batch, threads)
    if engine == "ort-run":
        return OrtRunStepper(module, config, batch, threads)
    if engine == "ort-iobinding":
        return OrtIOBindingStepper(module, config, batch, threads)
    raise ValueError(f"unknown engine {engine!r}")


# ----------------------------------------------------------------------------------------------- sequences
class FastlstmSequence:
    def __init__(self, module, backend: str, config: Config, threads: int):
        self.model = load_fastlstm(module, backend, config, threads)

    def run(self, x):
        return self.model.predict(x)


class TorchSequence:
    def __init__(self, module, config: Config):
        import torch

        self.torch = torch
        self.module = module

    def run(self, x):
        with self.torch.inference_mode():
            return self.module(self.torch.from_numpy(x))[0].numpy()


class OrtSequence:
    def __init__(self, module, config: Config, threads: int):
        self.session = ort_session(onnx_bytes(module, config, batch=1, steps=None), threads)
        self.config = config

    def run(self, x):
        zeros = np.zeros((self.config.num_layers, x.shape[0], self.config.hidden_size), np.float32)
        return self.session.run(["y"], {"x": x, **{name: zeros for name in state_names(self.config)[0]}})[0]


def make_sequence_runner(engine: str, module, config: Config, threads: int):
    if engine.startswith("fastlstm-"):
        return FastlstmSequence(module, engine.split("-", 1)[1], config, threads)
    if engine == "torch-lstm":
        return TorchSequence(module, config)
    if engine == "ort-run":
        return OrtSequence(module, config, threads)
    raise ValueError(f"unknown engine {engine!r}")


def engines_available(engines) -> list[str]:
    """Drop fastlstm backends that are not importable here (e.g. an unbuilt extension)."""
    backends = set(available_backends())
    return [e for e in engines if not e.startswith("fastlstm-") or e.split("-", 1)[1] in backends]
