"""Dense heads applied to every step through a reshape: time and batch merged into rows, a dense layer, and
the rows split back (PyTorch's ``fc(y.view(T * B, H)).view(T, B, -1)``, the usual OCR/CTC head).

Real PyTorch modules are exported by both of PyTorch's exporters (the TorchScript one, and the dynamo one
PyTorch 2.13 uses by default, when its ``onnxscript`` dependency is installed), with fixed and with dynamic
sizes, so every way they compute the reshape targets (constants, or ``Shape``/``Gather``/``Slice``/``Mul``/
``Concat``/``Unsqueeze`` arithmetic) is met. fastlstm's output must equal PyTorch's within 1e-5.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import UnsupportedModelError

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
from onnx import helper  # noqa: E402

from test_onnx_import import (FLOAT, assert_close, const, ints, load, lstm_model, lstm_weights,  # noqa: E402
                              make_model, random_inputs, run_ort)

nn = torch.nn


class MergedRowsHead(nn.Module):
    """An LSTM whose output rows (time and batch merged) go through a dense head, then back to 3-D."""

    def __init__(self, style: str, batch_first: bool, bidirectional: bool = True):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
        width = 10 if bidirectional else 5
        self.fc = nn.Linear(width, 6)
        self.out = nn.Linear(6, 3)
        self.style = style

    def forward(self, x):
        y, _ = self.lstm(x)
        first, second, hidden = y.shape
        if self.style == "view":  # the CRNN head: view(T*b, h) -> Linear -> view(T, b, -1)
            rows = self.fc(y.view(first * second, hidden))
            return rows.view(first, second, -1)
        if self.style == "reshape-minus-one":
            rows = self.out(torch.relu(self.fc(y.reshape(-1, hidden))))
            return torch.softmax(rows.reshape(first, second, -1), dim=-1)
        if self.style == "flatten":
            return self.fc(y.flatten(0, 1)).unflatten(0, (first, second))
        raise ValueError(self.style)


def export(module, example, exporter: str, dynamic: bool, batch_first: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = ({0: "b", 1: "t"} if batch_first else {0: "t", 1: "b"}) if dynamic else None
            torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": axes} if axes else None)
        else:
            pytest.importorskip("onnxscript")  # what PyTorch's default (dynamo) exporter needs
            shapes = ({0 if batch_first else 1: torch.export.Dim("batch")},) if dynamic else None
            program = torch.onnx.export(module, (example,), dynamic_shapes=shapes, verbose=False)
            return onnx.load_from_string(program.model_proto.SerializeToString())
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("batch, dynamic", [(2, False), (1, False), (2, True)],
                         ids=["fixed-sizes", "fixed-batch-of-1", "dynamic-sizes"])
@pytest.mark.parametrize("style, batch_first", [("view", False), ("reshape-minus-one", True), ("flatten", False)])
def test_per_step_dense_head_behind_reshapes_matches_torch(exporter, batch, dynamic, style, batch_first):
    torch.manual_seed(0)
    module = MergedRowsHead(style, batch_first).eval()
    steps = 6
    example = torch.randn(batch, steps, 4) if batch_first else torch.randn(steps, batch, 4)
    model = export(module, example, exporter, dynamic, batch_first)
    imported = fastlstm.load(model, backend="numpy")
    assert imported.spec.output == "sequence"
    assert len(imported.spec.head) >= 1
    # Fixed-size graphs are checked at their sizes; dynamic ones at another batch size too.
    for run_batch in ([batch] if not dynamic else [batch, 3]):
        x = random_inputs(batch=run_batch, steps=steps, seed=run_batch)
        torch_input = torch.from_numpy(x if batch_first else x.transpose(1, 0, 2))
        with torch.no_grad():
            expected = module(torch_input).numpy()
        if not batch_first:
            expected = expected.transpose(1, 0, 2)
        assert_close(imported.predict(x), expected)


def test_a_reshape_keeping_a_batch_of_1_is_not_a_merge():
    """[T, 1, H] on a (T, 1, H) flow keeps the batch axis: the output needs no split."""
    model = lstm_model("forward", outputs=("Y",))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    model.graph.initializer.append(ints("shape", [6, 1, 5]))
    model.graph.node.append(helper.make_node("Reshape", ["Y", "shape"], ["out"]))
    model.graph.output[0].name = "out"
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 6
    imported = fastlstm.load(model, backend="numpy")
    x = random_inputs(batch=1, steps=6)
    assert_close(imported.predict(x), run_ort(model, {"X": x.transpose(1, 0, 2)})[0].transpose(1, 0, 2))


# ----------------------------------------------------------------------------------------- hand-built graphs
def merged_rows_graph(split_back=True, bias_shape=(3,), merge_target=None, rows="gather"):
    """LSTM Y (T, 1, B, 5) -> Squeeze -> Shape arithmetic -> Reshape (T*B, 5) -> Gemm -> Reshape (T, B, 3).

    ``rows`` is how the merged size T*B is computed: "gather" (Gather scalars, Mul, Unsqueeze: the
    TorchScript exporter), "slice" (1-D Slices of the shape, Mul: the dynamo exporter) or "divide"
    ((T*B*H) / H).
    """
    model = lstm_model("forward", outputs=("Y",))
    rng = np.random.default_rng(5)
    if rows == "gather":
        merged = [helper.make_node("Mul", ["time", "batch"], ["rows"]),
                  helper.make_node("Unsqueeze", ["rows", "axis0"], ["rows1"])]
    elif rows == "slice":
        merged = [helper.make_node("Slice", ["shape", "axis0", "axis1"], ["time_1d"]),
                  helper.make_node("Slice", ["shape", "axis1", "two_1d"], ["batch_1d"]),
                  helper.make_node("Mul", ["time_1d", "batch_1d"], ["rows1"])]
    else:
        merged = [helper.make_node("Gather", ["shape", "two"], ["features"], axis=0),
                  helper.make_node("Mul", ["time", "batch"], ["rows"]),
                  helper.make_node("Mul", ["rows", "features"], ["elements"]),
                  helper.make_node("Div", ["elements", "features"], ["rows_again"]),
                  helper.make_node("Unsqueeze", ["rows_again", "axis0"], ["rows1"])]
    nodes = [
        helper.make_node("Squeeze", ["Y", "axis1"], ["y3"]),
        helper.make_node("Shape", ["y3"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["time"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["batch"], axis=0),
        *merged,
        helper.make_node("Concat", ["rows1", "hidden"], ["merge"], axis=0),
        helper.make_node("Reshape", ["y3", merge_target or "merge"], ["merged"]),
        helper.make_node("Gemm", ["merged", "fc_w", "fc_b"], ["dense"], transB=1),
    ]
    initializers = [ints("axis1", [1]), ints("axis0", [0]), ints("zero", 0), ints("one", 1), ints("hidden", [5]),
                    ints("two", 2), ints("two_1d", [2]),
                    const("fc_w", rng.normal(0, 0.5, (3, 5)).astype(np.float32)),
                    const("fc_b", rng.normal(0, 0.5, bias_shape).astype(np.float32))]
    output = "dense"
    if split_back:
        nodes += [helper.make_node("Unsqueeze", ["time", "axis0"], ["time1"]),
                  helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch1"]),
                  helper.make_node("Concat", ["time1", "batch1", "minus_one"], ["split"], axis=0),
                  helper.make_node("Reshape", ["dense", "split"], ["out"])]
        initializers.append(ints("minus_one", [-1]))
        output = "out"
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    model.graph.output[0].name = output
    return model


@pytest.mark.parametrize("rows", ["gather", "slice", "divide"])
def test_hand_built_shape_arithmetic_head_matches_onnxruntime(rows):
    model = merged_rows_graph(rows=rows)
    imported = fastlstm.load(model, backend="numpy")
    x = random_inputs()
    expected = run_ort(model, {"X": x.transpose(1, 0, 2)})[0]
    assert_close(imported.predict(x), expected.transpose(1, 0, 2))


def test_rows_never_split_back_are_refused():
    with pytest.raises(UnsupportedModelError, match="time and batch stay merged"):
        fastlstm.load(merged_rows_graph(split_back=False), backend="numpy")


def test_a_bias_per_row_is_not_a_per_step_dense_layer():
    with pytest.raises(UnsupportedModelError, match=r"Gemm C of shape \(18, 3\) does not broadcast"):
        fastlstm.load(merged_rows_graph(bias_shape=(18, 3)), backend="numpy")


def test_merging_batch_with_features_is_refused():
    """(T, B, H) -> (T, B*H): a dense layer on that would mix the sequences of a batch."""
    model = merged_rows_graph()
    nodes = list(model.graph.node)
    position = [n.output[0] for n in nodes].index("merge")
    nodes[position:position + 1] = [
        helper.make_node("Gather", ["shape", "two"], ["features"], axis=0),
        helper.make_node("Mul", ["batch", "features"], ["batch_features"]),
        helper.make_node("Unsqueeze", ["time", "axis0"], ["time_entry"]),
        helper.make_node("Unsqueeze", ["batch_features", "axis0"], ["batch_features1"]),
        helper.make_node("Concat", ["time_entry", "batch_features1"], ["merge"], axis=0)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with pytest.raises(UnsupportedModelError, match="merges the batch, features axes"):
        fastlstm.load(model, backend="numpy")


def test_splitting_rows_in_the_wrong_order_is_refused():
    model = merged_rows_graph()
    for node in model.graph.node:
        if node.output[0] == "split":
            node.input[:] = ["batch1", "time1", "minus_one"]
    with pytest.raises(UnsupportedModelError, match="moves the batch axis"):
        fastlstm.load(model, backend="numpy")


def test_mul_on_data_is_refused_by_name():
    model = lstm_model("forward", outputs=("Y",))
    model.graph.initializer.append(const("scale", np.float32(2.0)))
    model.graph.node.append(helper.make_node("Mul", ["Y", "scale"], ["out"]))
    model.graph.output[0].name = "out"
    with pytest.raises(UnsupportedModelError, match="Mul on data computed from the input"):
        fastlstm.load(model, backend="numpy")


@pytest.mark.parametrize("glue", ["squeeze", "transpose-reshape"])
def test_a_one_wide_output_keeps_its_feature_axis_through_reshapes(glue):
    """hidden_size=1: a reshape sees the feature axis as one more size-1 axis; the head still reads it."""
    weights = lstm_weights(1, 1, 3)
    if glue == "squeeze":
        nodes = [helper.make_node("Squeeze", ["Y", "direction_axis"], ["y"])]
    else:
        nodes = [helper.make_node("Transpose", ["Y"], ["Y_t"], perm=[0, 2, 1, 3]),
                 helper.make_node("Reshape", ["Y_t", "merge"], ["y"])]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=1), *nodes,
             helper.make_node("Relu", ["y"], ["r"]), helper.make_node("MatMul", ["r", "kernel"], ["out"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["T", "B", 3])],
                       [helper.make_tensor_value_info("out", FLOAT, None)],
                       [const(name, weights[name]) for name in "WRB"]
                       + [ints("direction_axis", [1]), ints("merge", [0, 0, -1]),
                          const("kernel", np.array([[1.5, -2.0]], np.float32))])
    x = random_inputs(batch=2, steps=4, features=3)
    assert_close(load(model).predict(x), run_ort(model, {"x": x.transpose(1, 0, 2)})[0].transpose(1, 0, 2))
