"""ONNX import of stacks of recurrent nodes of any kinds and sizes, PyTorch exports of nn.GRU / nn.RNN (both
exporters), and the embedding (a Gather of a constant table by integer ids), against ONNX Runtime and torch.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlstm.errors import UnsupportedModelError

sys.path.insert(0, str(Path(__file__).parent))
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from test_onnx_gru_rnn import canonical_y, recurrent_weights  # noqa: E402
from test_onnx_import import (FLOAT, assert_close, const, export_torch, ints, load, lstm_weights,  # noqa: E402
                              make_model, random_inputs, run_ort)


# ----------------------------------------------------------------------------------------- hand-built stacks
def mixed_stack(states: bool, streamable: bool = False):
    """LSTM (4 -> 5, bidirectional) -> GRU (10 -> 6, reset before linear) -> RNN (6 -> 3, reverse, Relu), with
    the glue exporters write between them; every layer's initial state a graph input of its own if ``states``.
    ``streamable``: the LSTM and the RNN run forward (the GRU then reads 5 features)."""
    lstm_directions = 1 if streamable else 2
    lstm, gru, rnn = lstm_weights(lstm_directions, 5, 4, seed=1), \
        recurrent_weights("GRU", 1, 6, 5 * lstm_directions, 2), recurrent_weights("RNN", 1, 3, 6, 3)
    initializers = [const(f"{name}{n}", w[name]) for n, w in (("l", lstm), ("g", gru), ("r", rnn)) for name in "WRB"]
    initializers += [ints("merge", [0, 0, -1]), ints("dir_axis", [1])]
    state_inputs = ["hl", "cl", "hg", "hr"] if states else ["", "", "", ""]
    nodes = [
        helper.make_node("LSTM", ["x", "Wl", "Rl", "Bl", "", state_inputs[0], state_inputs[1]], ["Yl", "Yl_h", "Yl_c"],
                         hidden_size=5, direction="forward" if streamable else "bidirectional"),
        helper.make_node("Transpose", ["Yl"], ["Yl_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["Yl_t", "merge"], ["xg"]),
        helper.make_node("GRU", ["xg", "Wg", "Rg", "Bg", "", state_inputs[2]], ["Yg", "Yg_h"], hidden_size=6),
        helper.make_node("Squeeze", ["Yg", "dir_axis"], ["xr"]),
        helper.make_node("RNN", ["xr", "Wr", "Rr", "Br", "", state_inputs[3]], ["Yr", "Yr_h"], hidden_size=3,
                         direction="forward" if streamable else "reverse", activations=["Relu"]),
    ]
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["T", "B", 4])]
    if states:
        inputs += [helper.make_tensor_value_info(name, FLOAT, [d, "B", h])
                   for name, d, h in (("hl", 2, 5), ("cl", 2, 5), ("hg", 1, 6), ("hr", 1, 3))]
    outputs = [helper.make_tensor_value_info(name, FLOAT, None) for name in ("Yr", "Yl_h", "Yl_c", "Yg_h", "Yr_h")]
    return make_model(nodes, inputs, outputs, initializers)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "sequence_lens"])
def test_a_stack_of_three_kinds_and_sizes_matches_onnxruntime_with_every_state(lengths):
    model = mixed_stack(states=True)
    feeds = {}
    if lengths:  # one sequence_lens graph input for every layer
        for node in model.graph.node:
            if node.op_type in ("LSTM", "GRU", "RNN"):
                node.input[4] = "lens"
        model.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
        feeds["lens"] = np.array([6, 2, 4], np.int32)
    imported = load(model)
    spec = imported.spec
    assert [(layer.kind, layer.input_size, layer.hidden_size, layer.direction) for layer in spec.layers] == [
        ("lstm", 4, 5, "bidirectional"), ("gru", 10, 6, "forward"), ("rnn", 6, 3, "reverse")]
    assert not spec.layers[1].linear_before_reset and imported.state_form == "per_layer"
    rng = np.random.default_rng(4)
    x = random_inputs()
    hl, cl, hg, hr = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 3, 5), (2, 3, 5), (1, 3, 6),
                                                                                  (1, 3, 3)))
    y_ref, hl_ref, cl_ref, hg_ref, hr_ref = run_ort(
        model, {"x": x.transpose(1, 0, 2), "hl": hl, "cl": cl, "hg": hg, "hr": hr, **feeds})
    y, state = imported.predict(x, state=((hl, cl), hg, hr), lengths=feeds.get("lens"), return_state=True)
    assert_close(y, canonical_y(y_ref))
    (h_lstm, c_lstm), h_gru, h_rnn = state
    for actual, expected in ((h_lstm, hl_ref), (c_lstm, cl_ref), (h_gru, hg_ref), (h_rnn, hr_ref)):
        assert_close(actual, expected)


def test_streaming_a_mixed_stack_equals_onnxruntime():
    model = mixed_stack(states=False, streamable=True)
    imported = load(model)
    x = random_inputs(seed=5)
    stream = imported.stream(batch_size=3)
    steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert_close(steps, canonical_y(run_ort(model, {"x": x.transpose(1, 0, 2)})[0]))


def test_per_layer_states_read_from_one_shared_input_are_refused():
    model = mixed_stack(states=True)
    gru = model.graph.node[3]
    gru.input[5] = "hr"  # the GRU and the RNN would start from one graph input
    with pytest.raises(UnsupportedModelError, match="state holds one entry per layer"):
        load(model)


# ----------------------------------------------------------------------------------------- PyTorch exports
def export(module, example, dynamo: bool, dynamic_axes=((0, "b"), (1, "t"))) -> onnx.ModelProto:
    """``torch.onnx.export`` of ``module`` with one input ``x`` whose given axes are dynamic, by either exporter."""
    torch = pytest.importorskip("torch")
    if not dynamo:
        return export_torch(module, (example,), input_names=["x"], dynamic_axes={"x": dict(dynamic_axes)})
    pytest.importorskip("onnxscript")
    buffer = io.BytesIO()
    shapes = ({axis: torch.export.Dim(name) for axis, name in dynamic_axes},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=True, input_names=["x"],
                          dynamic_shapes=shapes, verbose=False)
    return onnx.load_from_string(buffer.getvalue())


def torch_stacks(case: str):
    """Batch-first PyTorch modules whose forward returns the sequence output (through a head for some)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Chain(nn.Module):
        def __init__(self, *layers, head=None, embedding=None):
            super().__init__()
            self.embedding, self.layers, self.head = embedding, nn.ModuleList(layers), head

        def forward(self, x):
            if self.embedding is not None:
                x = self.embedding(x)
            for layer in self.layers:
                x, _ = layer(x)
            return x if self.head is None else self.head(x)

    torch.manual_seed(7)
    return {
        "gru": lambda: Chain(nn.GRU(4, 5, batch_first=True)),
        "gru-bi-2-layers": lambda: Chain(nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True)),
        "rnn-tanh-bi-2-layers": lambda: Chain(nn.RNN(4, 5, num_layers=2, bidirectional=True, batch_first=True)),
        "rnn-relu": lambda: Chain(nn.RNN(4, 5, nonlinearity="relu", batch_first=True)),
        "lstm-gru-head": lambda: Chain(nn.LSTM(4, 5, batch_first=True),
                                       nn.GRU(5, 7, bidirectional=True, batch_first=True), head=nn.Linear(14, 3)),
        "lstm-gru-rnn": lambda: Chain(nn.LSTM(4, 6, num_layers=2, batch_first=True),
                                      nn.GRU(6, 3, batch_first=True), nn.RNN(3, 8, batch_first=True)),
        "embedding-lstm-linear": lambda: Chain(nn.LSTM(4, 5, batch_first=True), head=nn.Linear(5, 3),
                                               embedding=nn.Embedding(11, 4)),
        "embedding-gru-bi": lambda: Chain(nn.GRU(6, 5, bidirectional=True, batch_first=True),
                                          embedding=nn.Embedding(20, 6, padding_idx=0)),
    }[case]()


# Cases the dynamo exporter writes as recurrent nodes (it unrolls nn.RNN step by step).
DYNAMO_CASES = ["gru", "gru-bi-2-layers", "lstm-gru-head", "embedding-lstm-linear", "embedding-gru-bi"]
LEGACY_CASES = DYNAMO_CASES + ["rnn-tanh-bi-2-layers", "rnn-relu", "lstm-gru-rnn"]


@pytest.mark.parametrize("dynamo, case", [(False, c) for c in LEGACY_CASES] + [(True, c) for c in DYNAMO_CASES])
def test_pytorch_exports_match_torch(case, dynamo):
    torch = pytest.importorskip("torch")
    module = torch_stacks(case).eval()
    token_ids = case.startswith("embedding")
    rng = np.random.default_rng(8)
    vocab = module.embedding.num_embeddings if token_ids else 0
    example = torch.randint(0, vocab, (2, 7)) if token_ids else torch.randn(2, 7, 4)
    x = rng.integers(0, vocab, (3, 9)) if token_ids else random_inputs(steps=9)
    imported = load(export(module, example, dynamo))
    assert imported.spec.takes_token_ids == token_ids
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert_close(imported.predict(x), expected)


def test_streaming_an_exported_embedding_model_equals_torch():
    torch = pytest.importorskip("torch")
    module = torch_stacks("embedding-lstm-linear").eval()
    imported = load(export(module, torch.randint(0, 11, (2, 7)), dynamo=False))
    ids = np.random.default_rng(9).integers(0, 11, (3, 8))
    stream = imported.stream(batch_size=3)
    steps = np.stack([stream.step(ids[:, t]) for t in range(ids.shape[1])], axis=1)
    with torch.no_grad():
        assert_close(steps, module(torch.from_numpy(ids)).numpy())


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_pytorch_gru_export_with_state_in_and_out(dynamo):
    """nn.GRU(x, h0) with h0 sliced per layer is ``predict(x, state=h0)``; h_n comes with ``return_state``."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, x, h):
            return self.gru(x, h)

    torch.manual_seed(10)
    module = WithState().eval()
    example = (torch.randn(2, 7, 4), torch.randn(4, 2, 5))
    if dynamo:
        pytest.importorskip("onnxscript")
        buffer, batch = io.BytesIO(), torch.export.Dim("b")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, buffer, dynamo=True, input_names=["x", "h0"], verbose=False,
                              dynamic_shapes=({0: batch, 1: torch.export.Dim("t")}, {1: batch}))
        model = onnx.load_from_string(buffer.getvalue())
    else:
        model = export_torch(module, example, input_names=["x", "h0"],
                             dynamic_axes={"x": {0: "b", 1: "t"}, "h0": {1: "b"}})
    imported = load(model)
    assert imported.state_form == "h"
    x = random_inputs()
    h0 = np.random.default_rng(11).standard_normal((4, 3, 5)).astype(np.float32)
    with torch.no_grad():
        y_ref, h_ref = (t.numpy() for t in module(torch.from_numpy(x), torch.from_numpy(h0)))
    y, h = imported.predict(x, state=h0, return_state=True)
    assert_close(y, y_ref)
    assert_close(h, h_ref)


def test_the_dynamo_export_of_nn_rnn_is_refused_as_unrolled():
    torch = pytest.importorskip("torch")
    module = torch_stacks("lstm-gru-rnn")
    with pytest.raises(UnsupportedModelError, match="unrolled over the steps.*export it with dynamo=False"):
        load(export(module, torch.randn(2, 7, 4), dynamo=True))
    with pytest.raises(UnsupportedModelError, match="the graph has no LSTM, GRU or RNN node"):
        load(export(torch_stacks("rnn-relu"), torch.randn(2, 7, 4), dynamo=True))


# ----------------------------------------------------------------------------------------- embedding
def embedding_model(ids_type=TensorProto.INT64, axis=0, ids_dims=("B", "T"), table_shape=(9, 4)):
    """Gather(table, ids) -> Transpose to time major -> LSTM (4 -> 5) -> Y, as torch.onnx.export writes an
    nn.Embedding in front of a batch-first nn.LSTM."""
    weights = lstm_weights(1, 5, 4, seed=12)
    table = np.random.default_rng(13).standard_normal(table_shape).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=axis),
             helper.make_node("Transpose", ["embedded"], ["x"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=5)]
    return make_model(nodes, [helper.make_tensor_value_info("ids", ids_type, list(ids_dims))],
                      [helper.make_tensor_value_info("Y", FLOAT, None)],
                      [const("table", table)] + [const(name, weights[name]) for name in "WRB"])


@pytest.mark.parametrize("ids_type, dtype", [(TensorProto.INT64, np.int64), (TensorProto.INT32, np.int32)])
def test_int64_and_int32_token_ids_match_onnxruntime(ids_type, dtype):
    model = embedding_model(ids_type)
    imported = load(model)
    assert imported.spec.vocab_size == 9 and imported.spec.input_size == 4
    ids = np.random.default_rng(14).integers(0, 9, (3, 6)).astype(dtype)
    assert_close(imported.predict(ids), canonical_y(run_ort(model, {"ids": ids})[0]))


@pytest.mark.parametrize("change, message", [
    (dict(axis=1, table_shape=(4, 9)), "gathers along axis 1 of a constant of shape \\(4, 9\\)"),
    (dict(ids_type=TensorProto.FLOAT), "not declared an int64 or int32 tensor"),
    (dict(ids_dims=("N",)), "token ids as \\(batch, time\\) or \\(time, batch\\)"),
])
def test_gathers_that_are_not_an_embedding_are_refused(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        load(embedding_model(**change))


def test_an_embedding_read_with_its_features_moved_is_refused():
    model = embedding_model()
    model.graph.node[1].attribute[0].ints[:] = [2, 1, 0]  # (E, T, B): the features where time should be
    model.graph.node[2].input[0] = "x"
    with pytest.raises(UnsupportedModelError, match="reads the model input rearranged"):
        load(model)


def test_time_major_token_ids_are_taken_batch_first_and_logged(caplog):
    model = embedding_model(ids_dims=("T", "B"))
    del model.graph.node[1]  # no Transpose: the LSTM reads Gather's (time, batch, E) directly
    model.graph.node[1].input[0] = "embedded"
    with caplog.at_level("INFO", logger="fastlstm.importers.onnx"):
        imported = load(model)
    assert "graph input 'ids' is (time, batch); fastlstm takes token ids as (batch, time)" in caplog.text
    ids = np.random.default_rng(15).integers(0, 9, (3, 6))
    assert_close(imported.predict(ids), canonical_y(run_ort(model, {"ids": ids.T.copy()})[0]))


def test_a_second_embedding_is_refused():
    model = embedding_model()
    model.graph.node.insert(1, helper.make_node("Gather", ["table", "ids"], ["again"], axis=0))
    model.graph.node.insert(2, helper.make_node("Concat", ["embedded", "again"], ["both"], axis=-1))
    model.graph.node[3].input[0] = "both"
    with pytest.raises(UnsupportedModelError, match="a second embedding lookup"):
        load(model)


def test_per_layer_state_inputs_are_logged(caplog):
    with caplog.at_level("INFO", logger="fastlstm.importers.onnx"):
        load(mixed_stack(states=True))
    assert ("graph inputs h[0]='hl', c[0]='cl', h[1]='hg', h[2]='hr' are predict(x, state=(one entry per layer"
            in caplog.text)


def test_int32_ids_cast_to_int64_before_the_embedding_match_onnxruntime():
    model = embedding_model(TensorProto.INT32)
    model.graph.node.insert(0, helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64))
    model.graph.node[1].input[1] = "ids64"
    imported = load(model)
    ids = np.random.default_rng(16).integers(0, 9, (2, 5)).astype(np.int32)
    assert_close(imported.predict(ids), canonical_y(run_ort(model, {"ids": ids})[0]))
    model.graph.node[0].attribute[0].i = TensorProto.FLOAT  # ids cast to floats are not data fastlstm reads
    with pytest.raises(UnsupportedModelError, match="Cast: graph input .ids. is not a floating-point tensor"):
        load(model)


def test_a_sequence_length_the_dynamo_exporter_fixed_is_refused_saying_so():
    """After a time-major one-direction nn.GRU the dynamo exporter reshapes Y to the example's length."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(17)
    model = export(torch.nn.GRU(4, 5), torch.randn(7, 2, 4), dynamo=True, dynamic_axes=((0, "t"), (1, "b")))
    with pytest.raises(UnsupportedModelError, match="fixes the time axis to 7.*export it batch first or with "
                                                    "dynamo=False"):
        load(model)


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(st.tuples(st.sampled_from(["LSTM", "GRU", "RNN"]), st.integers(1, 5),
                                 st.sampled_from(["forward", "reverse", "bidirectional"]), st.integers(0, 1)),
                       min_size=1, max_size=3),
       lengths=st.booleans(), seed=st.integers(0, 2**16))
def test_random_chains_of_recurrent_nodes_match_onnxruntime(layers, lengths, seed):
    """Any kinds, sizes and directions in a chain, each Y merged to (time, batch, directions * hidden) as
    PyTorch's exporter does; the last one's merged Y is the output."""
    initializers, nodes, source, features = [ints("merge", [0, 0, -1])], [], "x", 3
    for n, (op, hidden, direction, linear_before_reset) in enumerate(layers):
        directions = 2 if direction == "bidirectional" else 1
        if op == "LSTM":
            weights = lstm_weights(directions, hidden, features, seed=seed + n)
            del weights["P"]
        else:
            weights = recurrent_weights(op, directions, hidden, features, seed=seed + n)
        initializers += [const(f"{name}{n}", weights[name]) for name in "WRB"]
        extra = dict(linear_before_reset=linear_before_reset) if op == "GRU" else {}
        nodes += [helper.make_node(op, [source, f"W{n}", f"R{n}", f"B{n}", "lens" if lengths else ""], [f"Y{n}"],
                                   hidden_size=hidden, direction=direction, **extra),
                  helper.make_node("Transpose", [f"Y{n}"], [f"Yt{n}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"Yt{n}", "merge"], [f"X{n + 1}"])]
        source, features = f"X{n + 1}", directions * hidden
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["T", "B", 3])]
    if lengths:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
    model = make_model(nodes, inputs, [helper.make_tensor_value_info(source, FLOAT, None)], initializers)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    feeds = {"x": x.transpose(1, 0, 2)}
    if lengths:
        feeds["lens"] = rng.integers(1, 6, 2).astype(np.int32)
    imported = load(model)
    assert [layer.kind for layer in imported.spec.layers] == [op.lower() for op, *_ in layers]
    expected = run_ort(model, feeds)[0].transpose(1, 0, 2)
    assert_close(imported.predict(x, lengths=feeds.get("lens")), expected)
