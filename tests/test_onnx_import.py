"""ONNX importer: parity with ONNX Runtime for exported and hand-built graphs, and every refusal.

Each model is run by ONNX Runtime and by fastlstm (NumPy backend) on the same input; float32 outputs must
agree within 1e-5. ONNX graphs are time-major where fastlstm is batch first, so inputs and outputs are
transposed for the comparison. Weights are random (scale 0.3) with non-zero biases, so a permuted gate
would show.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm.errors import FastLSTMError, InvalidModelError, ModelFormatError, UnsupportedModelError
from fastlstm.importers import onnx as onnx_importer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TOLERANCE = 1e-5
OPSET = 14
FLOAT = TensorProto.FLOAT


# ----------------------------------------------------------------------------------------- helpers
def assert_close(actual, expected, tolerance=TOLERANCE):
    """Within ``tolerance`` of the reference, scaled by its magnitude above 1: float32 holds about 7 digits, so
    an output of 390 (unbounded gate activations such as LeakyRelu grow the state) differs by its rounding."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    assert np.max(np.abs(actual - expected)) <= tolerance * scale


def random_inputs(batch=3, steps=6, features=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


def run_ort(model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def load(model, **kwargs) -> fastlstm.Model:
    return fastlstm.load(model, backend="numpy", **kwargs)


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def ints(name, values):
    return const(name, np.asarray(values, dtype=np.int64))


def lstm_weights(directions, hidden, input_size, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(0, scale, shape).astype(np.float32)  # noqa: E731
    return dict(W=normal(directions, 4 * hidden, input_size), R=normal(directions, 4 * hidden, hidden),
                B=normal(directions, 8 * hidden), P=normal(directions, 3 * hidden))


def lstm_model(direction="forward", hidden=5, input_size=4, layout=0, attributes=None, bias=True,
               peepholes=False, lengths=False, states=False, outputs=("Y", "Y_h", "Y_c"), seed=0, scale=0.3,
               opset=OPSET):
    """A graph of one LSTM node with every optional input wired as asked; the graph outputs are ``outputs``."""
    directions = 2 if direction == "bidirectional" else 1
    weights = lstm_weights(directions, hidden, input_size, seed, scale)
    x_dims = ["T", "B", input_size] if layout == 0 else ["B", "T", input_size]
    state_dims = [directions, "B", hidden] if layout == 0 else ["B", directions, hidden]
    graph_inputs = [helper.make_tensor_value_info("X", FLOAT, x_dims)]
    node_inputs = ["X", "W", "R", "B" if bias else "", "", "", "", "P" if peepholes else ""]
    initializers = [const("W", weights["W"]), const("R", weights["R"])]
    if bias:
        initializers.append(const("B", weights["B"]))
    if peepholes:
        initializers.append(const("P", weights["P"]))
    if lengths:
        node_inputs[4] = "lens"
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
    if states:
        node_inputs[5:7] = ["h0", "c0"]
        graph_inputs += [helper.make_tensor_value_info(n, FLOAT, state_dims) for n in ("h0", "c0")]
    while node_inputs[-1] == "":
        node_inputs.pop()
    node_outputs = [name if name in outputs else "" for name in ("Y", "Y_h", "Y_c")]
    while node_outputs[-1] == "":
        node_outputs.pop()
    attrs = dict(hidden_size=hidden, direction=direction, **(attributes or {}))
    if layout:
        attrs["layout"] = layout
    node = helper.make_node("LSTM", node_inputs, node_outputs, **attrs)
    graph_outputs = [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs]
    return make_model([node], graph_inputs, graph_outputs, initializers, opset)


def canonical_y(y: np.ndarray) -> np.ndarray:
    """ONNX Y (time, directions, batch, hidden) -> fastlstm's (batch, time, directions * hidden)."""
    steps, directions, batch, hidden = y.shape
    return y.transpose(2, 0, 1, 3).reshape(batch, steps, directions * hidden)


def export_torch(module, args, **kwargs) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buffer, dynamo=False, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


# ----------------------------------------------------------------------------------------- hand-built LSTM nodes

def inputs_with_state(direction, seed, lengths):
    """x, random initial h0/c0 ``(directions, 3, 5)`` and int32 sequence lengths for the graphs above."""
    directions = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(seed)
    h0, c0 = (rng.standard_normal((directions, 3, 5)).astype(np.float32) for _ in range(2))
    return random_inputs(), h0, c0, np.array(lengths, dtype=np.int32)

@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_every_lstm_input_and_output_matches_onnxruntime(direction):
    """B, P, sequence_lens, initial_h/c as graph inputs; Y as the output, Y_h and Y_c as the state."""
    model = lstm_model(direction, peepholes=True, lengths=True, states=True)
    imported = load(model)
    x, h0, c0, lengths = inputs_with_state(direction, seed=1, lengths=[6, 3, 1])
    y_ref, h_ref, c_ref = run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0, "c0": c0})
    y, (h, c) = imported.predict(x, state=(h0, c0), lengths=lengths, return_state=True)
    assert imported.spec.output == "sequence"
    assert imported.spec.layers[0].has_peepholes
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)
    assert_close(c, c_ref)


@pytest.mark.parametrize("activations, alpha, beta, expected", [
    (["HardSigmoid", "ScaledTanh", "LeakyRelu"], [0.3, 0.8, 0.05], [0.4, 1.3],
     [("hard_sigmoid", 0.3, 0.4), ("scaled_tanh", 0.8, 1.3), ("leaky_relu", 0.05, 0.0)]),
    (["Sigmoid", "Affine", "Elu"], [0.7, 0.9], [0.1], [("sigmoid", 0, 0), ("affine", 0.7, 0.1), ("elu", 0.9, 0)]),
    (["HardSigmoid", "Softsign", "Softplus"], [0.25], [0.45],
     [("hard_sigmoid", 0.25, 0.45), ("softsign", 0, 0), ("softplus", 0, 0)]),
    (["Sigmoid", "Relu", "ThresholdedRelu"], [0.1], [],
     [("sigmoid", 0, 0), ("relu", 0, 0), ("thresholded_relu", 0.1, 0)]),
])
def test_activations_with_alpha_and_beta_match_onnxruntime(activations, alpha, beta, expected):
    """alpha/beta values go, in order, to the activations that take them (both directions list theirs)."""
    attributes = dict(activations=activations * 2, activation_alpha=alpha * 2)
    if beta:
        attributes["activation_beta"] = beta * 2
    model = lstm_model("bidirectional", attributes=attributes)
    imported = load(model)
    layer = imported.spec.layers[0]
    found = [(a.name, a.alpha, a.beta) for a in (layer.gate_activation, layer.cell_activation, layer.output_activation)]
    assert [name for name, _, _ in found] == [name for name, _, _ in expected]
    assert np.allclose([p for f in found for p in f[1:]], [p for e in expected for p in e[1:]], rtol=1e-6)
    x = random_inputs()
    y_ref = run_ort(model, {"X": x.transpose(1, 0, 2)})[0]
    assert_close(imported.predict(x), canonical_y(y_ref))


@pytest.mark.parametrize("attributes", [dict(clip=2.0), dict(input_forget=1), dict(clip=0.8, input_forget=1)],
                         ids=["clip", "input_forget", "both"])
def test_clip_and_input_forget_match_onnxruntime(attributes):
    """Weights large enough that the clip bounds the gates, while the cell state stays inside it."""
    model = lstm_model("forward", attributes=attributes, peepholes=True, scale=0.8)
    imported = load(model)
    clip = attributes.get("clip")
    assert imported.spec.layers[0].clip == (None if clip is None else float(np.float32(clip)))
    assert imported.spec.layers[0].input_forget == bool(attributes.get("input_forget"))
    x = random_inputs()
    y_ref, h_ref, c_ref = run_ort(model, {"X": x.transpose(1, 0, 2)})
    y, (h, c) = imported.predict(x, return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(c, c_ref)
    if clip is not None:  # the clip is exercised: without it ONNX Runtime computes something else
        unclipped = lstm_model("forward", attributes={k: a for k, a in attributes.items() if k != "clip"},
                               peepholes=True, scale=0.8)
        assert np.max(np.abs(run_ort(unclipped, {"X": x.transpose(1, 0, 2)})[0] - y_ref)) > 1e-2


def test_clip_below_the_cell_state_matches_onnxruntime():
    model = lstm_model("forward", attributes=dict(clip=0.4), scale=0.8)
    x = random_inputs() * 3
    y_ref = run_ort(model, {"X": x.transpose(1, 0, 2)})[0]
    assert_close(load(model).predict(x), canonical_y(y_ref))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_y_h_alone_is_the_final_state_output(direction):
    model = lstm_model(direction, outputs=("Y_h",), lengths=True)
    imported = load(model)
    assert imported.spec.output == "final_state"
    x = random_inputs()
    lengths = np.array([2, 6, 4], dtype=np.int32)
    h_ref = run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths})[0]  # (directions, batch, hidden)
    expected = np.concatenate(list(h_ref), axis=-1)
    assert_close(imported.predict(x, lengths=lengths), expected)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_layout_1_matches_the_same_weights_run_as_layout_0(direction):
    """ONNX Runtime refuses layout=1; the same weights in a layout-0 graph are its reference."""
    batch_first = lstm_model(direction, layout=1, peepholes=True, lengths=True, states=True)
    time_major = lstm_model(direction, layout=0, peepholes=True, lengths=True, states=True)
    imported = load(batch_first)
    x, h0, c0, lengths = inputs_with_state(direction, seed=2, lengths=[5, 6, 2])
    y_ref, h_ref, c_ref = run_ort(time_major, {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0, "c0": c0})
    y, (h, c) = imported.predict(x, state=(h0, c0), lengths=lengths, return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)
    assert_close(c, c_ref)


def stacked_model(layout: int):
    """Two bidirectional LSTM nodes; between them the first one's Y goes to (time or batch, ..., 2 * hidden)."""
    first, second = lstm_weights(2, 5, 4, seed=6), lstm_weights(2, 5, 10, seed=7)
    initializers = [const(f"{name}{n}", w[name]) for n, w in ((1, first), (2, second)) for name in "WRB"]
    initializers.append(ints("merge", [0, 0, -1]))
    if layout == 0:  # (T, 2, B, H) -> (T, B, 2, H) -> (T, B, 2H), as PyTorch's exporter writes it
        glue = [helper.make_node("Transpose", ["Y1"], ["Y1t"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", ["Y1t", "merge"], ["X2"])]
    else:  # (B, T, 2, H) -> (B, T, 2H)
        glue = [helper.make_node("Reshape", ["Y1", "merge"], ["X2"])]
    attrs = dict(hidden_size=5, direction="bidirectional", **({"layout": 1} if layout else {}))
    nodes = [helper.make_node("LSTM", ["X", "W1", "R1", "B1"], ["Y1"], **attrs), *glue,
             helper.make_node("LSTM", ["X2", "W2", "R2", "B2"], ["Y2"], **attrs)]
    x_dims = ["T", "B", 4] if layout == 0 else ["B", "T", 4]
    return make_model(nodes, [helper.make_tensor_value_info("X", FLOAT, x_dims)],
                      [helper.make_tensor_value_info("Y2", FLOAT, None)], initializers)


def test_stacked_layout_1_graph_matches_its_layout_0_twin():
    imported = load(stacked_model(layout=1))
    assert [layer.input_size for layer in imported.spec.layers] == [4, 10]
    x = random_inputs()
    y_ref = run_ort(stacked_model(layout=0), {"X": x.transpose(1, 0, 2)})[0]
    assert_close(imported.predict(x), canonical_y(y_ref))


def test_missing_alpha_uses_the_onnx_default_and_warns():
    model = lstm_model("forward", attributes=dict(activations=["Sigmoid", "Affine", "Tanh"]), outputs=("Y",))
    with pytest.warns(UserWarning, match="ONNX Runtime uses 0"):
        layer = load(model).spec.layers[0]
    assert (layer.cell_activation.alpha, layer.cell_activation.beta) == (1.0, 0.0)


def test_gates_are_permuted_from_onnx_order():
    """A direct look at the translation: fastlstm's (i, f, g, o) blocks are ONNX's (i, o, f, c) blocks 0, 2, 3, 1."""
    model = lstm_model("forward", peepholes=True)
    layer = load(model).spec.layers[0]
    weights = lstm_weights(1, 5, 4)
    w = weights["W"][0].reshape(4, 5, 4)
    assert np.array_equal(layer.cells[0].w_ih.reshape(4, 5, 4), w[[0, 2, 3, 1]])
    b = weights["B"][0]
    assert np.allclose(layer.cells[0].bias, (b[:20] + b[20:]).reshape(4, 5)[[0, 2, 3, 1]].reshape(-1))
    assert np.array_equal(layer.cells[0].peephole, weights["P"][0].reshape(3, 5)[[0, 2, 1]])


# ----------------------------------------------------------------------------------------- PyTorch exports
def torch_modules():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Tagger(nn.Module):
        def __init__(self, bidirectional, layers, head, last_step, batch_first=True):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
            self.fc = nn.Linear(10 if bidirectional else 5, 3) if head else None
            self.last_step, self.batch_first = last_step, batch_first

        def forward(self, x):
            y, _ = self.lstm(x)
            if self.last_step:
                y = y[:, -1] if self.batch_first else y[-1]
            return y if self.fc is None else torch.relu(self.fc(y))

    class FinalState(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return torch.cat([h[-2], h[-1]], dim=1)

    class SoftmaxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True, num_layers=2, dropout=0.2)
            self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            y, _ = self.lstm(x)
            return torch.softmax(self.fc2(torch.tanh(self.fc1(y[:, -1, :]))), dim=-1)

    return {
        "uni-sequence": Tagger(False, 1, False, False),
        "bi-stacked-head-last-step": Tagger(True, 2, True, True),
        "uni-stacked-time-major-head": Tagger(False, 2, True, False, batch_first=False),
        "bi-stacked-time-major": Tagger(True, 3, False, False, batch_first=False),
        "bi-final-state": FinalState(),
        "softmax-head": SoftmaxHead(),
    }


TORCH_CASES = ["uni-sequence", "bi-stacked-head-last-step", "uni-stacked-time-major-head",
               "bi-stacked-time-major", "bi-final-state", "softmax-head"]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_pytorch_exports_match_onnxruntime(case):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch_modules()[case]
    time_major = "time-major" in case
    example = torch.randn(7, 2, 4) if time_major else torch.randn(2, 7, 4)
    axes = {0: "t", 1: "b"} if time_major else {0: "b", 1: "t"}
    model = export_torch(module, (example,), input_names=["x"], output_names=["y"], dynamic_axes={"x": axes})
    imported = load(model)
    x = random_inputs()
    expected = run_ort(model, {"x": x.transpose(1, 0, 2) if time_major else x})[0]
    if time_major and expected.ndim == 3:
        expected = expected.transpose(1, 0, 2)
    assert_close(imported.predict(x), expected)


def test_pytorch_export_with_states_in_and_out_from_a_file(tmp_path):
    """h0/c0 graph inputs sliced per layer become ``state``; h_n/c_n outputs are ``return_state``."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True)

        def forward(self, x, h, c):
            y, (h, c) = self.lstm(x, (h, c))
            return y, h, c

    torch.manual_seed(1)
    model = export_torch(WithState(), (torch.randn(7, 2, 4), torch.randn(4, 2, 5), torch.randn(4, 2, 5)),
                         input_names=["x", "h0", "c0"], dynamic_axes={"x": {0: "t", 1: "b"}, "h0": {1: "b"},
                                                                      "c0": {1: "b"}})
    path = tmp_path / "stateful.onnx"
    onnx.save_model(model, str(path))
    imported = load(str(path))
    rng = np.random.default_rng(3)
    x = random_inputs()
    h0, c0 = (rng.standard_normal((4, 3, 5)).astype(np.float32) for _ in range(2))
    y_ref, h_ref, c_ref = run_ort(model, {"x": x.transpose(1, 0, 2), "h0": h0, "c0": c0})
    y, (h, c) = imported.predict(x, state=(h0, c0), return_state=True)
    assert imported.spec.source == "ONNX file stateful.onnx"
    assert_close(y, y_ref.transpose(1, 0, 2))
    assert_close(h, h_ref)
    assert_close(c, c_ref)


def test_pytorch_export_without_constant_folding():
    """Weights reach the LSTM through Slice/Concat/Unsqueeze of the raw parameters; the state through Expand."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(4, 5, batch_first=True, bidirectional=True)
    model = export_torch(lstm, (torch.randn(2, 7, 4),), input_names=["x"], do_constant_folding=False)
    x = random_inputs(batch=2, steps=7)
    assert_close(load(model).predict(x), run_ort(model, {"x": x})[0])


def test_streaming_an_imported_model_equals_its_whole_sequence_output():
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    module = torch_modules()["uni-stacked-time-major-head"]
    model = export_torch(module, (torch.randn(7, 2, 4),), input_names=["x"], dynamic_axes={"x": {0: "t", 1: "b"}})
    imported = load(model)
    x = random_inputs()
    stream = imported.stream(batch_size=3)
    steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert_close(steps, imported.predict(x), 1e-6)


# ----------------------------------------------------------------------------------------- tf2onnx (Keras) patterns
def keras_like_model(bidirectional: bool, return_sequences: bool, opset: int):
    """What tf2onnx writes for a Keras LSTM: Transpose to time-major, Squeeze the direction axis, and for a
    Bidirectional layer a Slice per direction (the backward one taken at time 0 for return_sequences=False)."""
    directions = 2 if bidirectional else 1
    weights = lstm_weights(directions, 5, 4, seed=4)
    initializers = [const("W", weights["W"]), const("R", weights["R"]), const("B", weights["B"])]
    nodes = [helper.make_node("Transpose", ["x"], ["x_tm"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["x_tm", "W", "R", "B"], ["Y", "Y_h"], hidden_size=5,
                              direction="bidirectional" if bidirectional else "forward")]

    def squeeze(src, dst, axis):
        if opset >= 13:
            initializers.append(ints(f"{dst}_axes", [axis]))
            return helper.make_node("Squeeze", [src, f"{dst}_axes"], [dst])
        return helper.make_node("Squeeze", [src], [dst], axes=[axis])

    def slice_(src, dst, axis, start, end):
        if opset < 10:
            return helper.make_node("Slice", [src], [dst], starts=[start], ends=[end], axes=[axis])
        initializers.extend([ints(f"{dst}_s", [start]), ints(f"{dst}_e", [end]), ints(f"{dst}_a", [axis])])
        return helper.make_node("Slice", [src, f"{dst}_s", f"{dst}_e", f"{dst}_a"], [dst])

    if not bidirectional:
        if return_sequences:
            nodes += [squeeze("Y", "y_tm", 1), helper.make_node("Transpose", ["y_tm"], ["out"], perm=[1, 0, 2])]
        else:
            nodes += [squeeze("Y_h", "out", 0)]
    else:
        for d, name in enumerate(("fw", "bw")):
            nodes += [slice_("Y", f"{name}_4d", 1, d, d + 1), squeeze(f"{name}_4d", f"{name}_tm", 1)]
            if return_sequences:
                nodes.append(helper.make_node("Transpose", [f"{name}_tm"], [f"{name}_out"], perm=[1, 0, 2]))
            else:
                start, end = (-1, 2**31 - 1) if name == "fw" else (0, 1)
                nodes += [slice_(f"{name}_tm", f"{name}_step", 0, start, end),
                          squeeze(f"{name}_step", f"{name}_out", 0)]
        nodes.append(helper.make_node("Concat", ["fw_out", "bw_out"], ["out"], axis=-1))
    # A Dense(3, softmax) head as tf2onnx writes it: MatMul, Add, Softmax.
    rng = np.random.default_rng(5)
    initializers += [const("kernel", rng.normal(0, 0.3, (5 * directions, 3)).astype(np.float32)),
                     const("bias", rng.normal(0, 0.3, 3).astype(np.float32))]
    nodes += [helper.make_node("MatMul", ["out", "kernel"], ["dense"]),
              helper.make_node("Add", ["dense", "bias"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["B", "T", 4])],
                      [helper.make_tensor_value_info("probs", FLOAT, None)], initializers, opset)


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["lstm", "bidirectional"])
@pytest.mark.parametrize("return_sequences", [True, False], ids=["sequences", "final"])
def test_tf2onnx_keras_patterns_match_onnxruntime(bidirectional, return_sequences, opset):
    model = keras_like_model(bidirectional, return_sequences, opset)
    imported = load(model)
    assert imported.spec.output == ("sequence" if return_sequences else "final_state")
    assert imported.spec.head[-1].activation.name == "softmax"
    x = random_inputs()
    assert_close(imported.predict(x), run_ort(model, {"x": x})[0])


# ----------------------------------------------------------------------------------------- refusals
def test_every_unsupported_operator_is_named_at_once():
    weights = lstm_weights(1, 5, 4)
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=5),
             helper.make_node("Squeeze", ["Y", "one"], ["y"]),
             helper.make_node("Mul", ["y", "scale"], ["scaled"]),
             helper.make_node("Erf", ["scaled"], ["erf"]),
             helper.make_node("FusedMatMul", ["erf", "scale"], ["out"], domain="com.microsoft")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["T", "B", 4])],
                       [helper.make_tensor_value_info("out", FLOAT, None)],
                       [const("W", weights["W"]), const("R", weights["R"]), ints("one", [1]),
                        const("scale", np.float32(2.0))])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedModelError) as info:
        load(model)
    listed = "\n".join(info.value.unsupported)
    assert len(info.value.unsupported) == 3
    for op in ("Mul on data", "operator Erf", "com.microsoft::FusedMatMul"):
        assert op in listed


def test_unknown_attributes_are_listed_with_their_nodes():
    model = lstm_model(attributes=dict(output_sequence=1), outputs=("Y",))
    node = model.graph.node[0]
    model.graph.node.append(helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 1, 2, 3], fancy=2))
    model.graph.output[0].name = "Yt"
    with pytest.raises(UnsupportedModelError) as info:
        load(model)
    assert any("'output_sequence'" in u for u in info.value.unsupported)
    assert any("'fancy'" in u for u in info.value.unsupported)
    assert node.op_type == "LSTM"


@pytest.mark.parametrize("change, message", [
    (lambda m: m.graph.node[0].attribute.extend([helper.make_attribute(
        "activations", ["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"])]), "different activations"),
    (lambda m: m.graph.node[0].attribute.extend([helper.make_attribute(
        "activations", ["Sigmoid", "Gelu", "Tanh"] * 2)]), "Gelu"),
], ids=["per-direction", "unknown-name"])
def test_activations_fastlstm_cannot_run_are_refused(change, message):
    model = lstm_model("bidirectional", outputs=("Y",))
    change(model)
    with pytest.raises(UnsupportedModelError, match=message):
        load(model)


def test_constant_initial_state_and_sequence_lens_are_refused():
    model = lstm_model("forward", outputs=("Y",))
    model.graph.initializer.extend([const("h0", np.full((1, 3, 5), 0.5, np.float32)),
                                    const("lens", np.array([6, 6, 6], np.int32))])
    node = model.graph.node[0]
    node.input.extend(["lens", "h0"])
    with pytest.raises(UnsupportedModelError) as info:
        load(model)
    assert len(info.value.unsupported) == 2
    assert "sequence_lens is a constant" in info.value.unsupported[0]
    assert "initial_h is a non-zero constant" in info.value.unsupported[1]
    del node.input[4:]
    node.input.extend(["", "h0"])
    with pytest.raises(UnsupportedModelError, match="initial_h is a non-zero constant"):
        load(model)
    model.graph.initializer[-2].CopyFrom(const("h0", np.zeros((1, 3, 5), np.float32)))
    assert load(model).spec.output == "sequence"  # a zero constant state is the default state


def test_last_step_with_sequence_lens_is_refused():
    model = lstm_model("forward", lengths=True, outputs=("Y",))
    model.graph.initializer.append(ints("last", -1))
    model.graph.node.append(helper.make_node("Gather", ["Y", "last"], ["y_last"], axis=0))
    model.graph.output[0].name = "y_last"
    with pytest.raises(UnsupportedModelError, match="last time step with sequence_lens"):
        load(model)


@pytest.mark.parametrize("target, message", [([0, -1], "merges the batch, features axes"),
                                             ([-1, 5], "time and batch stay merged"),
                                             ([0, 0, 5, 1], "fixes the batch axis to 5")])
def test_reshapes_that_mix_axes_are_refused(target, message):
    model = lstm_model("forward", outputs=("Y",))
    model.graph.initializer.append(ints("shape", target))
    model.graph.node.append(helper.make_node("Reshape", ["Y", "shape"], ["r"]))
    model.graph.output[0].name = "r"
    with pytest.raises(UnsupportedModelError, match=message):
        load(model)


def test_interleaving_the_directions_is_refused():
    """(time, batch, hidden, directions) reshaped to 2*hidden interleaves the directions' features."""
    model = lstm_model("bidirectional", outputs=("Y",))
    model.graph.initializer.append(ints("merge", [0, 0, -1]))
    model.graph.node.extend([helper.make_node("Transpose", ["Y"], ["t"], perm=[0, 2, 3, 1]),
                             helper.make_node("Reshape", ["t", "merge"], ["out"])])
    model.graph.output[0].name = "out"
    with pytest.raises(UnsupportedModelError, match="merges the hidden, directions axes"):
        load(model)


def time_step_model(select, steps=None):
    """One forward LSTM whose Y has its time axis cut by ``select`` (a node builder) before a Squeeze."""
    model = lstm_model("forward", outputs=("Y",))
    if steps is not None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = steps
    model.graph.initializer.append(ints("axes01", [0, 1]))
    model.graph.node.extend([select("Y", "picked"), helper.make_node("Squeeze", ["picked", "axes01"], ["out"])])
    model.graph.output[0].name = "out"
    return model


def slice_time(start, end):
    def build(src, dst):
        return helper.make_node("Slice", [src, f"{dst}_s", f"{dst}_e", f"{dst}_a"], [dst])
    return build, [ints("picked_s", [start]), ints("picked_e", [end]), ints("picked_a", [0])]


@pytest.mark.parametrize("start, end, steps", [(-2, -1, None), (1, 3, None), (4, 5, 6), (0, 2, 6)])
def test_time_slices_other_than_every_first_or_last_step_are_refused(start, end, steps):
    build, constants = slice_time(start, end)
    model = time_step_model(build, steps)
    model.graph.initializer.extend(constants)
    with pytest.raises(UnsupportedModelError, match="keeps time steps"):
        load(model)


def test_gathering_a_middle_time_step_is_refused():
    model = lstm_model("forward", outputs=("Y",))
    model.graph.initializer.append(ints("index", -2))
    model.graph.node.append(helper.make_node("Gather", ["Y", "index"], ["out"], axis=0))
    model.graph.output[0].name = "out"
    with pytest.raises(UnsupportedModelError, match="takes time step -2"):
        load(model)


@pytest.mark.parametrize("start, end", [(5, 6), (-1, 2**62)])
def test_a_slice_at_the_last_step_of_a_static_sequence_is_the_last_step(start, end):
    build, constants = slice_time(start, end)
    model = time_step_model(build, steps=6)
    model.graph.initializer.extend(constants)
    imported = load(model)
    assert imported.spec.output == "last_step"
    x = random_inputs(steps=6)
    assert_close(imported.predict(x), run_ort(model, {"X": x.transpose(1, 0, 2)})[0])


def test_transpose_permutation_is_checked():
    """A Transpose that swaps batch and hidden is not a layout change fastlstm can return batch first."""
    model = lstm_model("forward", outputs=("Y_h",))
    model.graph.node.append(helper.make_node("Transpose", ["Y_h"], ["t"], perm=[0, 2, 1]))
    model.graph.initializer.append(const("w", np.ones((3, 2), np.float32)))
    model.graph.node.append(helper.make_node("MatMul", ["t", "w"], ["out"]))
    model.graph.output[0].name = "out"
    with pytest.raises(UnsupportedModelError, match="not the recurrent layers' feature axis"):
        load(model)


@pytest.mark.parametrize("dims", [[2**40, 4], [1000, 1000, 1000]])
def test_absurd_declared_sizes_are_refused_without_allocating(dims):
    model = lstm_model("forward", outputs=("Y",))
    model.graph.initializer[0].ClearField("dims")
    model.graph.initializer[0].dims.extend(dims)
    model.graph.node[0].attribute.append(helper.make_attribute("clip", 1.0))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelError, match="declared shape"):
            load(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_hidden_size_disagreeing_with_weights_is_invalid():
    model = lstm_model("forward", outputs=("Y",))
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "hidden_size":
            attribute.i = 10**12
    with pytest.raises(InvalidModelError, match="hidden_size=1000000000000"):
        load(model)


def test_options_and_missing_onnx_package(monkeypatch):
    model = lstm_model("forward", outputs=("Y",))
    with pytest.raises(TypeError, match="do not apply to ONNX"):
        load(model, head=[])
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"fastlstm\[onnx\]"):
        onnx_importer.spec_from_bytes(model.SerializeToString())


# ----------------------------------------------------------------------------------------- corrupt files
VALID_BYTES = lstm_model("bidirectional", peepholes=True, outputs=("Y",)).SerializeToString()


def test_truncated_files_are_format_errors(tmp_path):
    path = tmp_path / "cut.onnx"
    for cut in range(0, len(VALID_BYTES), max(1, len(VALID_BYTES) // 60)):
        path.write_bytes(VALID_BYTES[:cut])
        with pytest.raises(ModelFormatError):
            onnx_importer.spec_from_file(path)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_bit_flipped_files_load_or_raise_fastlstm_errors(data):
    position = data.draw(st.integers(0, len(VALID_BYTES) * 8 - 1))
    corrupted = bytearray(VALID_BYTES)
    corrupted[position // 8] ^= 1 << (position % 8)
    try:
        onnx_importer.spec_from_bytes(bytes(corrupted))
    except FastLSTMError:
        pass


@settings(max_examples=40, deadline=None)
@given(blob=st.binary(max_size=2000))
def test_random_bytes_are_format_errors(blob):
    with pytest.raises(ModelFormatError):
        onnx_importer.spec_from_bytes(blob)
