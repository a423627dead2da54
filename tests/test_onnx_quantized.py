"""ONNX Runtime's dynamically quantized models: ``com.microsoft::DynamicQuantizeLSTM`` and the quantized
``MatMul`` of a Linear head (``DynamicQuantizeLinear`` + ``MatMulInteger``, or the fused ``DynamicQuantizeMatMul``
ONNX Runtime's optimizer writes), in files made by ``onnxruntime.quantization.quantize_dynamic`` from
PyTorch-exported models.

fastlstm computes with the dequantized weights ``scale * (q - zero_point)`` in float32, so it must equal ONNX
Runtime running the float model that holds those weights within 1e-5. ONNX Runtime running the quantized file
also rounds the data to 8 bits at every step: with weights of standard deviation 0.5 the measured difference is
0.2-1.0 % of the largest output, while swapping two gates of R alone gives 7-12 %; the tests assert 2 %.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import FastLSTMError, InvalidModelError, UnsupportedModelError
from fastlstm.model import Model
from fastlstm.spec import int8_values

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")
from onnx import numpy_helper  # noqa: E402

from test_onnx_import import assert_close, random_inputs  # noqa: E402

# ONNX Runtime quantizes the data to 8 bits at run time; fastlstm does not (module docstring): the bound on the
# difference, relative to the largest output.
QUANTIZED_DATA_BOUND = 0.02
nn = torch.nn


class LSTMWithHead(nn.Module):
    """An LSTM and a Linear head on every step (exported as ``MatMul``), or on the last step with a softmax
    (exported as ``Gemm``, which the quantizer rewrites into ``MatMul`` too)."""

    def __init__(self, layers: int, bidirectional: bool, last_step: bool = False):
        super().__init__()
        self.last_step = last_step
        self.lstm = nn.LSTM(4, 8, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.fc = nn.Linear(16 if bidirectional else 8, 3)
        with torch.no_grad():  # larger than PyTorch's initialisation, so that a misplaced weight shows
            for parameter in self.parameters():
                parameter.normal_(0, 0.5)

    def forward(self, x):
        y, _ = self.lstm(x)
        return torch.softmax(self.fc(y[:, -1]), dim=-1) if self.last_step else self.fc(y)


def ort_session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(path, x):
    return ort_session(path).run(None, {"x": x})[0]


def assert_near_quantized_run(actual, expected):
    """Within ``QUANTIZED_DATA_BOUND`` of ONNX Runtime's quantized run, relative to its largest output."""
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= QUANTIZED_DATA_BOUND * np.max(np.abs(expected))


def export_float(directory, layers: int, bidirectional: bool, last_step: bool):
    torch.manual_seed(layers * 10 + bidirectional)
    module = LSTMWithHead(layers, bidirectional, last_step).eval()
    path = directory / f"float-{layers}-{bidirectional}-{last_step}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 5, 4),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 1: "time"}})
    return path


def quantize(float_path, path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_dynamic(str(float_path), str(path), **options)
    return path


INT8 = dict(weight_type=quantization.QuantType.QInt8)
# name -> (layers, bidirectional, last step and softmax, quantize_dynamic options, fused by ONNX Runtime's optimizer)
CASES = {
    "one-layer": (1, False, False, INT8, False),
    "two-layers-bidirectional": (2, True, False, INT8, False),
    "per-channel": (2, True, False, dict(INT8, per_channel=True), False),
    "uint8-head": (1, True, False, dict(weight_type=quantization.QuantType.QUInt8), False),
    "fused-matmul": (2, False, False, INT8, True),
    "last-step-softmax": (1, True, True, INT8, False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (float model, quantized model), made once for the module."""
    directory = tmp_path_factory.mktemp("quantized")
    made = {}
    for name, (layers, bidirectional, last_step, options, fused) in CASES.items():
        float_path = export_float(directory, layers, bidirectional, last_step)
        path = quantize(float_path, directory / f"{name}.onnx", **options)
        if fused:  # ONNX Runtime's optimizer turns the MatMulInteger chain into DynamicQuantizeMatMul
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(directory / f"{name}-fused.onnx")
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            path = directory / f"{name}-fused.onnx"
        made[name] = (float_path, path)
    return made


def initializers(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dequantized_float_model(float_path, quantized_path, out_path):
    """The float model with its LSTM and MatMul weights replaced by the quantized file's, dequantized here in
    plain NumPy: ``scale * (q - zero_point)``, the contrib LSTM's ``(directions, size, 4*hidden)`` transposed."""
    model = onnx.load(str(float_path))
    quantized = onnx.load(str(quantized_path))
    values = initializers(quantized)
    lstm_nodes = [n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    matmul_nodes = [n for n in quantized.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    replacements = {}
    float_lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    float_matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(float_lstms) == len(lstm_nodes) and len(float_matmuls) == len(matmul_nodes) == 1
    for float_node, node in zip(float_lstms, lstm_nodes):
        for position, (q, scale, zero) in ((1, node.input[1:2] + node.input[8:10]),
                                           (2, node.input[2:3] + node.input[10:12])):
            q, scale, zero = values[q].astype(np.float64), values[scale], values[zero].astype(np.float64)
            directions, rows = q.shape[0], q.shape[2]
            scale = np.broadcast_to(scale.reshape(directions, -1), (directions, rows))[:, None, :]
            zero = zero.reshape(directions, -1)[:, :1, None]
            weight = (scale.astype(np.float32) * (q - zero).astype(np.float32)).transpose(0, 2, 1)
            replacements[float_node.input[position]] = np.ascontiguousarray(weight)
    node = matmul_nodes[0]
    if node.op_type == "MatMulInteger":
        q, zero = values[node.input[1]], values[node.input[3]]
        # the Mul of the data's scale by the weight's, the one Mul with a constant operand
        scale = next(values[name] for n in quantized.graph.node if n.op_type == "Mul"
                     for name in n.input if name in values)
    else:
        q, scale, zero = (values[name] for name in node.input[1:4])
    weight = scale.astype(np.float32) * (q.astype(np.float64) - zero.astype(np.float64)).astype(np.float32)
    if float_matmuls[0].op_type == "Gemm":  # torch exports Linear as Gemm(x, W, b, transB=1): W is (out, in)
        assert [a.i for a in float_matmuls[0].attribute if a.name == "transB"] == [1]
        weight = np.ascontiguousarray(weight.T)
    replacements[float_matmuls[0].input[1]] = weight
    for tensor in model.graph.initializer:
        if tensor.name in replacements:
            tensor.CopyFrom(numpy_helper.from_array(replacements.pop(tensor.name), tensor.name))
    assert not replacements
    onnx.save(model, str(out_path))
    return out_path


@pytest.mark.parametrize("name", CASES)
def test_quantized_files_match_onnxruntime(name, files, tmp_path):
    float_path, path = files[name]
    x = random_inputs(batch=3, steps=7, seed=1)
    model = fastlstm.load(path, backend="numpy")
    y = model.predict(x)
    reference = run_ort(dequantized_float_model(float_path, path, tmp_path / "dequantized.onnx"), x)
    assert_close(y, reference)
    assert_near_quantized_run(y, run_ort(path, x))
    # the file is really quantized: its weights differ from the float model's
    assert np.max(np.abs(run_ort(float_path, x) - reference)) > 1e-5


@pytest.mark.parametrize("name", CASES)
def test_the_spec_holds_the_files_integers_and_per_row_scales(name, files):
    _, path = files[name]
    spec = fastlstm.load(path, backend="numpy").spec
    values = initializers(onnx.load(str(path)))
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert len(nodes) == len(spec.layers)
    hidden = spec.layers[0].hidden_size
    onnx_rows_of_gate = {"i": 0, "o": 1, "f": 2, "g": 3}  # ONNX stacks i, o, f, c
    for node, layer in zip(nodes, spec.layers):
        for d, cell in enumerate(layer.cells):
            for name_q, name_scale, weights, scale in ((node.input[1], node.input[8], cell.w_ih, cell.w_ih_scale),
                                                       (node.input[2], node.input[10], cell.w_hh, cell.w_hh_scale)):
                assert scale is not None and scale.dtype == np.float32
                q = values[name_q][d].T  # (4*hidden, size), ONNX gate order
                file_scale = np.broadcast_to(values[name_scale].reshape(len(layer.cells), -1)[d], (4 * hidden,))
                for n, gate in enumerate("ifgo"):
                    ours = slice(n * hidden, (n + 1) * hidden)
                    theirs = slice(onnx_rows_of_gate[gate] * hidden, (onnx_rows_of_gate[gate] + 1) * hidden)
                    np.testing.assert_array_equal(int8_values(weights, scale)[ours], q[theirs])
                    np.testing.assert_array_equal(scale[ours], file_scale[theirs])


def test_the_quantized_data_bound_catches_a_gate_swap(files):
    """The bound against ONNX Runtime's quantized run is tight enough to see two gates of R swapped."""
    _, path = files["two-layers-bidirectional"]
    model = fastlstm.load(path, backend="numpy")
    hidden = model.spec.layers[0].hidden_size

    def swapped(array):  # f and o
        return np.ascontiguousarray(array.reshape(4, hidden, *array.shape[1:])[[0, 3, 2, 1]].reshape(array.shape))

    layers = tuple(replace(layer, cells=tuple(replace(c, w_hh=swapped(c.w_hh), w_hh_scale=swapped(c.w_hh_scale))
                                              for c in layer.cells)) for layer in model.spec.layers)
    x = random_inputs(batch=3, steps=7, seed=1)
    with pytest.raises(AssertionError):
        assert_near_quantized_run(Model(replace(model.spec, layers=layers), backend="numpy").predict(x),
                                  run_ort(path, x))


def test_per_tensor_scales_repeat_on_every_row_and_per_channel_ones_differ(files):
    per_tensor = fastlstm.load(files["two-layers-bidirectional"][1], backend="numpy").spec
    per_channel = fastlstm.load(files["per-channel"][1], backend="numpy").spec
    for layer in per_tensor.layers:
        for cell in layer.cells:
            assert len(set(cell.w_ih_scale.tolist())) == 1 and len(set(cell.w_hh_scale.tolist())) == 1
    assert all(len(set(cell.w_ih_scale.tolist())) > 1 for layer in per_channel.layers for cell in layer.cells)


def test_streaming_a_quantized_model_equals_its_whole_sequence_output(files):
    model = fastlstm.load(files["one-layer"][1], backend="numpy")
    x = random_inputs(batch=2, steps=5, seed=3)
    stream = model.stream(batch_size=2)
    steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert_close(steps, model.predict(x), 1e-6)


# ----------------------------------------------------------------------------------------- zero points
def edited(path, out_path, edit):
    """A copy of the quantized file with ``edit(initializers, lstm_node)`` applied to its first LSTM."""
    model = onnx.load(str(path))
    values = initializers(model)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    edit(values, node)
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in values.items())
    onnx.save(model, str(out_path))
    return out_path


def test_uint8_weights_with_zero_point_128_are_the_same_int8_values(files, tmp_path):
    _, path = files["one-layer"]

    def to_uint8(values, node):
        for q, zero in ((node.input[1], node.input[9]), (node.input[2], node.input[11])):
            values[q] = (values[q].astype(np.int16) + 128).astype(np.uint8)
            values[zero] = np.full(values[zero].shape, 128, np.uint8)

    unsigned = edited(path, tmp_path / "uint8.onnx", to_uint8)
    x = random_inputs(batch=2, steps=6, seed=2)
    ours = fastlstm.load(unsigned, backend="numpy")
    for cell, original in zip(ours.spec.layers[0].cells, fastlstm.load(path, backend="numpy").spec.layers[0].cells):
        np.testing.assert_array_equal(cell.w_ih, original.w_ih)
        np.testing.assert_array_equal(cell.w_hh_scale, original.w_hh_scale)
    assert_near_quantized_run(ours.predict(x), run_ort(unsigned, x))


def test_a_zero_point_is_accepted_when_the_shifted_integers_stay_8_bit(files, tmp_path):
    _, path = files["one-layer"]

    def shift(values, node):  # symmetric int8 weights lie in -127..127: q + 1 - 1 keeps them in 8 bits
        values[node.input[1]] = (values[node.input[1]].astype(np.int16) + 1).clip(-128, 127).astype(np.int8)
        values[node.input[9]] = np.ones_like(values[node.input[9]])

    shifted = edited(path, tmp_path / "shifted.onnx", shift)
    x = random_inputs(batch=2, steps=6, seed=4)
    model = fastlstm.load(shifted, backend="numpy")
    assert_near_quantized_run(model.predict(x), run_ort(shifted, x))


def test_asymmetric_weights_outside_8_bits_are_refused_naming_the_zero_point(files, tmp_path):
    float_path, _ = files["one-layer"]
    _, path = files["one-layer"]

    def far(values, node):
        values[node.input[9]] = np.full_like(values[node.input[9]], 20)

    with pytest.raises(UnsupportedModelError, match=r"DynamicQuantizeLSTM: W is int8 \(direction 0: zero point "
                                                    r"20, .*WeightSymmetric"):
        fastlstm.load(edited(path, tmp_path / "far.onnx", far), backend="numpy")
    asymmetric = quantize(float_path, tmp_path / "asymmetric.onnx", per_channel=True,
                          weight_type=quantization.QuantType.QInt8, extra_options={"WeightSymmetric": False})
    with pytest.raises(UnsupportedModelError, match="zero_point differs between the rows of a direction"):
        fastlstm.load(asymmetric, backend="numpy")


# ----------------------------------------------------------------------------------------- malformed files
def set_value(input_index, value):
    def edit(values, node):
        name = node.input[input_index]
        values[name] = np.full_like(values[name], value)
    return edit


def reshape_value(input_index, shape):
    def edit(values, node):
        name = node.input[input_index]
        values[name] = np.resize(values[name], shape)
    return edit


def drop_input(input_index):
    def edit(values, node):
        node.input[input_index] = ""
    return edit


def retype_value(input_index, dtype):
    def edit(values, node):
        name = node.input[input_index]
        values[name] = values[name].astype(dtype)
    return edit


@pytest.mark.parametrize("edit, error, message", [
    (set_value(8, 0.0), InvalidModelError, r"W_scale holds 0\.0; a scale must be a finite number > 0"),
    (set_value(10, np.nan), InvalidModelError, r"R_scale holds nan"),
    (set_value(8, -0.5), InvalidModelError, r"W_scale holds -0\.5"),
    (reshape_value(8, (3,)), InvalidModelError, r"W_scale has shape \(3,\), expected \(1,\)"),
    (reshape_value(1, (1, 4, 30)), InvalidModelError, r"W has shape \(1, 4, 30\)"),
    (reshape_value(2, (1, 32, 8)), InvalidModelError, r"R has shape \(1, 32, 8\), expected \(1, hidden_size, 4"),
    (drop_input(11), InvalidModelError, r"R_zero_point is missing"),
    (drop_input(8), InvalidModelError, r"W_scale is missing"),
    (retype_value(9, np.uint8), InvalidModelError, r"W_zero_point is uint8 but W is int8"),
    (retype_value(1, np.int32), InvalidModelError, r"W must hold int8 or uint8 values, got int32"),
    (retype_value(8, np.float64), InvalidModelError, r"W_scale must hold float32 values"),
], ids=["scale-0", "scale-nan", "scale-negative", "scale-shape", "w-shape", "r-transposed", "no-zero-point",
        "no-scale", "zero-point-type", "w-type", "scale-type"])
def test_malformed_quantized_lstms_are_refused(files, tmp_path, edit, error, message):
    _, path = files["one-layer"]
    with pytest.raises(error, match=message) as caught:
        fastlstm.load(edited(path, tmp_path / "bad.onnx", edit), backend="numpy")
    assert isinstance(caught.value, FastLSTMError)


def test_malformed_quantized_head_weights_are_refused(files, tmp_path):
    _, path = files["one-layer"]
    model = onnx.load(str(path))
    scale = next(t for t in model.graph.initializer if t.name.startswith("onnx::MatMul") and "scale" in t.name)
    scale.CopyFrom(numpy_helper.from_array(np.array(np.inf, np.float32), scale.name))
    with pytest.raises(InvalidModelError, match="weight scale holds inf"):
        fastlstm.load(model, backend="numpy")


# ----------------------------------------------------------------------------------------- embeddings
class EmbeddingLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 4)
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.normal_(0, 0.5)

    def forward(self, ids):
        y, _ = self.lstm(self.embedding(ids))
        return self.fc(y[:, -1])


def test_an_embedding_quantized_to_8_bits_is_dequantized(tmp_path):
    """quantize_dynamic stores the table as uint8 (Gather, then DequantizeLinear, one of them after a Transpose)."""
    torch.manual_seed(5)
    float_path = tmp_path / "embedding.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(EmbeddingLSTM().eval(), (torch.zeros(2, 5, dtype=torch.long),), str(float_path),
                          dynamo=False, input_names=["ids"], dynamic_axes={"ids": {0: "batch", 1: "time"}})
    path = quantize(float_path, tmp_path / "embedding-q.onnx", **INT8)
    quantized = onnx.load(str(path))
    assert {"DequantizeLinear", "DynamicQuantizeLSTM"} <= {n.op_type for n in quantized.graph.node}
    model = fastlstm.load(path, backend="numpy")
    assert model.takes_token_ids
    # the float model with every weight dequantized here: the table as DequantizeLinear computes it
    values = initializers(quantized)
    gather = next(n for n in quantized.graph.node if n.op_type == "Gather" and n.input[1] == "ids")
    dequantize = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear")
    table = ((values[gather.input[0]].astype(np.int32) - values[dequantize.input[2]].astype(np.int32))
             .astype(np.float32) * values[dequantize.input[1]])
    twin = onnx.load(str(float_path))
    float_gather = next(n for n in twin.graph.node if n.op_type == "Gather")
    for tensor in twin.graph.initializer:
        if tensor.name == float_gather.input[0]:
            tensor.CopyFrom(numpy_helper.from_array(table, tensor.name))
    onnx.save(twin, str(tmp_path / "embedding-twin.onnx"))
    # the LSTM and the head of the twin: as in the other tests
    reference_path = dequantized_float_model(tmp_path / "embedding-twin.onnx", path, tmp_path / "reference.onnx")
    ids = np.random.default_rng(9).integers(0, 20, (3, 6))
    np.testing.assert_array_equal(model.spec.embedding, table)
    session = ort_session(reference_path)
    assert_close(model.predict(ids), session.run(None, {"ids": ids})[0])
    assert_near_quantized_run(model.predict(ids), ort_session(path).run(None, {"ids": ids})[0])
