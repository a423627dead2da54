"""What the ONNX importer says when it refuses: the cause first, and enough to find each node."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import UnsupportedModelError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from test_onnx_import import FLOAT, const, lstm_model, make_model  # noqa: E402


def refusal(model) -> list[str]:
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(model, backend="numpy")
    return info.value.unsupported


def test_an_unrolled_lstm_says_first_that_the_graph_has_no_lstm_node():
    """An LSTMCell stepped in Python exports as per-step Gemm/Sigmoid/Tanh/Mul nodes, no LSTM node."""
    torch = pytest.importorskip("torch")

    class Unrolled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.LSTMCell(4, 5)

        def forward(self, x):
            h = c = torch.zeros(x.shape[1], 5)
            for step in range(x.shape[0]):
                h, c = self.cell(x[step], (h, c))
            return h

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Unrolled().eval(), (torch.randn(6, 2, 4),), buffer, dynamo=False)
    unsupported = refusal(onnx.load_from_string(buffer.getvalue()))
    assert unsupported[0].startswith("the graph has no LSTM, GRU or RNN node")
    assert "Load the source model" in unsupported[0]


def test_a_loop_and_many_unsupported_nodes_are_summarised_by_operator():
    body = helper.make_graph(
        [helper.make_node("Identity", ["state_in"], ["state_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", FLOAT, None)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", FLOAT, None)])
    nodes = [helper.make_node("Loop", ["steps", "", "x"], ["e0"], body=body, name="recurrence")]
    nodes += [helper.make_node("Erf", [f"e{n}"], [f"e{n + 1}"], name=f"erf{n}") for n in range(40)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
                       [helper.make_tensor_value_info("e40", FLOAT, None)],
                       [const("steps", np.int64(6))])
    unsupported = refusal(model)
    assert unsupported[0].startswith("the graph has no LSTM, GRU or RNN node")
    assert "operator Loop is not supported (1 node: node 'recurrence')" in unsupported
    assert "operator Erf is not supported (40 nodes: node 'erf0', node 'erf1', node 'erf2', ...)" in unsupported
    assert len(unsupported) == 3


def test_an_unsupported_node_names_every_input_computed_at_run_time():
    model = lstm_model("forward", outputs=("Y",))
    model.graph.input.append(helper.make_tensor_value_info("z", FLOAT, ["T", 1, "B", 5]))
    model.graph.initializer.append(const("floor", np.float32(0.0)))
    model.graph.node.append(helper.make_node("Max", ["Y", "z", "floor"], ["out"], name="clamp"))
    model.graph.output[0].name = "out"
    [message] = refusal(model)
    assert message.startswith("node 'clamp' (Max): operator Max is not supported; it reads ")
    assert "'Y' from node #0 (LSTM)" in message
    assert "graph input 'z'" in message
    assert "floor" not in message  # constants are not data


def test_state_outputs_are_logged_as_the_rows_of_the_returned_state(caplog):
    """A graph returning only the last layer's h_n: the log says which rows of ``return_state``'s h it is."""
    torch = pytest.importorskip("torch")
    from test_onnx_import import export_torch

    class LastLayerState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True)

        def forward(self, x):
            y, (h, c) = self.lstm(x)
            return y, h[-2:], c

    model = export_torch(LastLayerState(), (torch.randn(6, 2, 4),), input_names=["x"],
                         output_names=["y", "h_last", "c"])
    with caplog.at_level("INFO", logger="fastlstm.importers.onnx"):
        fastlstm.load(model, backend="numpy")
    assert "'h_last' = h[2:4] as (directions(2), batch(2), hidden(5))" in caplog.text
    assert "'c' = c[0:4]" in caplog.text


def test_a_residual_add_names_both_of_its_inputs():
    model = lstm_model("forward", outputs=("Y",))
    model.graph.input.append(helper.make_tensor_value_info("skip", FLOAT, ["T", 1, "B", 5]))
    model.graph.node.append(helper.make_node("Add", ["Y", "skip"], ["out"], name="residual"))
    model.graph.output[0].name = "out"
    [message] = refusal(model)
    assert message.startswith("node 'residual' (Add): adds two tensors computed from the input")
    assert message.endswith("it reads 'Y' from node #0 (LSTM), graph input 'skip'")
