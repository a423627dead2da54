"""ONNX import of GRU and RNN nodes: every attribute and input against ONNX Runtime, and each refusal.

Weights are random (scale 0.5) with non-zero biases in both halves of ``B``, so a permuted gate, a folded
candidate bias or a lost activation parameter would show. float32 outputs must agree within 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlstm.errors import InvalidModelError, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).parent))
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from test_onnx_import import FLOAT, assert_close, const, load, make_model, random_inputs, run_ort  # noqa: E402

GATES = {"GRU": 3, "RNN": 1}


def recurrent_weights(op, directions, hidden, input_size, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(0, scale, shape).astype(np.float32)  # noqa: E731
    gates = GATES[op]
    return dict(W=normal(directions, gates * hidden, input_size), R=normal(directions, gates * hidden, hidden),
                B=normal(directions, 2 * gates * hidden))


def recurrent_model(op="GRU", direction="forward", hidden=5, input_size=4, layout=0, attributes=None, bias=True,
                    lengths=False, states=False, outputs=("Y", "Y_h"), seed=0, scale=0.5):
    """A graph of one GRU or RNN node with every optional input wired as asked; the graph outputs are
    ``outputs``."""
    directions = 2 if direction == "bidirectional" else 1
    weights = recurrent_weights(op, directions, hidden, input_size, seed, scale)
    x_dims = ["T", "B", input_size] if layout == 0 else ["B", "T", input_size]
    state_dims = [directions, "B", hidden] if layout == 0 else ["B", directions, hidden]
    graph_inputs = [helper.make_tensor_value_info("X", FLOAT, x_dims)]
    node_inputs = ["X", "W", "R", "B" if bias else "", "", ""]
    initializers = [const("W", weights["W"]), const("R", weights["R"])] + ([const("B", weights["B"])] if bias else [])
    if lengths:
        node_inputs[4] = "lens"
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
    if states:
        node_inputs[5] = "h0"
        graph_inputs.append(helper.make_tensor_value_info("h0", FLOAT, state_dims))
    while node_inputs[-1] == "":
        node_inputs.pop()
    node_outputs = [name if name in outputs else "" for name in ("Y", "Y_h")]
    while node_outputs[-1] == "":
        node_outputs.pop()
    attrs = dict(hidden_size=hidden, direction=direction, **(attributes or {}))
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(op, node_inputs, node_outputs, **attrs)
    return make_model([node], graph_inputs, [helper.make_tensor_value_info(n, FLOAT, None) for n in outputs],
                      initializers)


def canonical_y(y: np.ndarray) -> np.ndarray:
    """ONNX Y (time, directions, batch, hidden) -> fastlstm's (batch, time, directions * hidden)."""
    steps, directions, batch, hidden = y.shape
    return y.transpose(2, 0, 1, 3).reshape(batch, steps, directions * hidden)


def with_state(direction, seed, lengths):
    directions = 2 if direction == "bidirectional" else 1
    h0 = np.random.default_rng(seed).standard_normal((directions, 3, 5)).astype(np.float32)
    return random_inputs(seed=seed), h0, np.array(lengths, dtype=np.int32)


# ----------------------------------------------------------------------------------------- GRU
@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_every_gru_input_and_output_matches_onnxruntime(direction, linear_before_reset):
    """B, sequence_lens and initial_h as graph inputs; Y as the output and Y_h as the state, in both variants."""
    model = recurrent_model("GRU", direction, attributes=dict(linear_before_reset=linear_before_reset),
                            lengths=True, states=True)
    imported = load(model)
    layer = imported.spec.layers[0]
    assert (layer.kind, layer.linear_before_reset, imported.state_form) == ("gru", bool(linear_before_reset), "h")
    x, h0, lengths = with_state(direction, seed=1, lengths=[6, 3, 1])
    y_ref, h_ref = run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0})
    y, h = imported.predict(x, state=h0, lengths=lengths, return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)


def test_the_gru_variants_differ_so_the_attribute_is_exercised():
    x = random_inputs()
    outputs = [run_ort(recurrent_model("GRU", attributes=dict(linear_before_reset=v)), {"X": x.transpose(1, 0, 2)})[0]
               for v in (0, 1)]
    assert np.max(np.abs(outputs[0] - outputs[1])) > 1e-2


def test_gru_gates_and_candidate_bias_are_translated_from_onnx_order():
    """fastlstm's (r, z, n) blocks are ONNX's (z, r, h) blocks 1, 0, 2; the candidate's Rb stays apart."""
    layer = load(recurrent_model("GRU")).spec.layers[0]
    weights = recurrent_weights("GRU", 1, 5, 4)
    assert np.array_equal(layer.cells[0].w_ih.reshape(3, 5, 4), weights["W"][0].reshape(3, 5, 4)[[1, 0, 2]])
    assert np.array_equal(layer.cells[0].w_hh.reshape(3, 5, 5), weights["R"][0].reshape(3, 5, 5)[[1, 0, 2]])
    wb, rb = weights["B"][0].reshape(2, 3, 5)
    assert np.allclose(layer.cells[0].bias.reshape(3, 5), [wb[1] + rb[1], wb[0] + rb[0], wb[2]])
    assert np.array_equal(layer.cells[0].candidate_bias, rb[2])


@pytest.mark.parametrize("activations, alpha, beta, expected", [
    (["HardSigmoid", "ScaledTanh"], [0.3, 0.8], [0.4, 1.3], [("hard_sigmoid", 0.3, 0.4), ("scaled_tanh", 0.8, 1.3)]),
    (["Sigmoid", "LeakyRelu"], [0.05], [], [("sigmoid", 0, 0), ("leaky_relu", 0.05, 0)]),
    (["Softsign", "Elu"], [0.9], [], [("softsign", 0, 0), ("elu", 0.9, 0)]),
])
@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_activations_with_alpha_and_beta_match_onnxruntime(activations, alpha, beta, expected,
                                                                linear_before_reset):
    attributes = dict(activations=activations * 2, activation_alpha=alpha * 2,
                      linear_before_reset=linear_before_reset)
    if beta:
        attributes["activation_beta"] = beta * 2
    model = recurrent_model("GRU", "bidirectional", attributes=attributes, outputs=("Y",))
    layer = load(model).spec.layers[0]
    found = [(a.name, a.alpha, a.beta) for a in (layer.gate_activation, layer.cell_activation)]
    assert [f[0] for f in found] == [e[0] for e in expected]
    assert np.allclose([p for f in found for p in f[1:]], [p for e in expected for p in e[1:]], rtol=1e-6)
    x = random_inputs()
    assert_close(load(model).predict(x), canonical_y(run_ort(model, {"X": x.transpose(1, 0, 2)})[0]))


@pytest.mark.parametrize("op, extra", [("GRU", dict(linear_before_reset=0)), ("GRU", dict(linear_before_reset=1)),
                                       ("RNN", {})], ids=["gru", "gru-linear-before-reset", "rnn"])
def test_clip_matches_onnxruntime_and_changes_its_output(op, extra):
    model = recurrent_model(op, "bidirectional", attributes=dict(clip=0.7, **extra), scale=1.0)
    imported = load(model)
    assert imported.spec.layers[0].clip == pytest.approx(0.7)
    x = random_inputs() * 2
    y_ref, h_ref = run_ort(model, {"X": x.transpose(1, 0, 2)})
    y, h = imported.predict(x, return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)
    unclipped = recurrent_model(op, "bidirectional", attributes=extra, scale=1.0)
    assert np.max(np.abs(run_ort(unclipped, {"X": x.transpose(1, 0, 2)})[0] - y_ref)) > 1e-2


@pytest.mark.parametrize("op", ["GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_layout_1_matches_the_same_weights_run_as_layout_0(op, direction):
    """ONNX Runtime refuses layout=1; the same weights in a layout-0 graph are its reference."""
    batch_first = recurrent_model(op, direction, layout=1, lengths=True, states=True)
    imported = load(batch_first)
    x, h0, lengths = with_state(direction, seed=2, lengths=[5, 6, 2])
    y_ref, h_ref = run_ort(recurrent_model(op, direction, lengths=True, states=True),
                           {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0})
    y, h = imported.predict(x, state=h0, lengths=lengths, return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)


@pytest.mark.parametrize("op", ["GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_y_h_alone_is_the_final_state_output(op, direction):
    model = recurrent_model(op, direction, outputs=("Y_h",), lengths=True, bias=False)
    imported = load(model)
    assert imported.spec.output == "final_state"
    x = random_inputs()
    lengths = np.array([2, 6, 4], dtype=np.int32)
    h_ref = run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths})[0]
    assert_close(imported.predict(x, lengths=lengths), np.concatenate(list(h_ref), axis=-1))


# ----------------------------------------------------------------------------------------- RNN
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_every_rnn_input_and_output_matches_onnxruntime(direction):
    model = recurrent_model("RNN", direction, lengths=True, states=True)
    imported = load(model)
    layer = imported.spec.layers[0]
    assert (layer.kind, layer.cell_activation.name, imported.state_form) == ("rnn", "tanh", "h")
    x, h0, lengths = with_state(direction, seed=3, lengths=[4, 6, 1])
    y_ref, h_ref = run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0})
    y, h = imported.predict(x, state=h0, lengths=lengths, return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)


@pytest.mark.parametrize("activation, alpha, beta, expected", [
    ("Relu", [], [], ("relu", 0, 0)), ("LeakyRelu", [0.2], [], ("leaky_relu", 0.2, 0)),
    ("HardSigmoid", [0.3], [0.6], ("hard_sigmoid", 0.3, 0.6)), ("ScaledTanh", [0.7], [1.4], ("scaled_tanh", 0.7, 1.4)),
    ("Softplus", [], [], ("softplus", 0, 0)), ("Sigmoid", [], [], ("sigmoid", 0, 0)),
])
def test_rnn_activations_match_onnxruntime(activation, alpha, beta, expected):
    attributes = dict(activations=[activation] * 2)
    if alpha:
        attributes["activation_alpha"] = alpha * 2
    if beta:
        attributes["activation_beta"] = beta * 2
    model = recurrent_model("RNN", "bidirectional", attributes=attributes, outputs=("Y",))
    act = load(model).spec.layers[0].cell_activation
    assert act.name == expected[0] and np.allclose([act.alpha, act.beta], expected[1:], rtol=1e-6)
    x = random_inputs()
    assert_close(load(model).predict(x), canonical_y(run_ort(model, {"X": x.transpose(1, 0, 2)})[0]))


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("op, activations, message", [
    ("GRU", ["Sigmoid", "Tanh", "Sigmoid", "Relu"], "directions use different activations"),
    ("RNN", ["Tanh", "Relu"], "directions use different activations"),
    ("GRU", ["Sigmoid", "Gelu"] * 2, "Gelu"),
])
def test_activations_fastlstm_cannot_run_are_refused(op, activations, message):
    model = recurrent_model(op, "bidirectional", attributes=dict(activations=activations), outputs=("Y",))
    with pytest.raises(UnsupportedModelError, match=message):
        load(model)


@pytest.mark.parametrize("op, attribute, value", [("GRU", "input_forget", 1), ("RNN", "linear_before_reset", 1)])
def test_attributes_of_other_operators_are_refused(op, attribute, value):
    model = recurrent_model(op, outputs=("Y",), attributes={attribute: value})
    with pytest.raises(UnsupportedModelError, match=f"attribute\\(s\\) '{attribute}' not supported"):
        load(model)


@pytest.mark.parametrize("change, message", [
    (lambda node: node.attribute.extend([helper.make_attribute("linear_before_reset", 2)]), "linear_before_reset=2"),
    (lambda node: node.attribute.extend([helper.make_attribute("activations", ["Sigmoid"])]),
     "activations lists 1 functions, expected 2"),
    (lambda node: node.output.extend(["Y_h", "Y_c"]), "a GRU node has at most 2 outputs"),
])
def test_malformed_gru_nodes_are_invalid(change, message):
    model = recurrent_model("GRU", outputs=("Y",))
    change(model.graph.node[0])
    with pytest.raises(InvalidModelError, match=message):
        load(model)


def test_gru_weights_of_the_wrong_shape_are_invalid():
    model = recurrent_model("GRU", outputs=("Y",))
    model.graph.initializer[0].CopyFrom(const("W", np.zeros((1, 16, 4), np.float32)))
    with pytest.raises(InvalidModelError, match=r"W has shape \(1, 16, 4\), expected \(1, 3\*hidden_size"):
        load(model)
    model = recurrent_model("GRU", outputs=("Y",))
    model.graph.initializer[2].CopyFrom(const("B", np.zeros((1, 15), np.float32)))
    with pytest.raises(InvalidModelError, match=r"B has shape \(1, 15\), expected \(1, 30\)"):
        load(model)


_ACTIVATION_CHOICES = ["Sigmoid", "Tanh", "Relu", "HardSigmoid", "Softsign", "LeakyRelu"]


@settings(max_examples=30, deadline=None)
@given(op=st.sampled_from(["GRU", "RNN"]), direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
       linear_before_reset=st.integers(0, 1), hidden=st.integers(1, 6), input_size=st.integers(1, 5),
       activations=st.lists(st.sampled_from(_ACTIVATION_CHOICES), min_size=2, max_size=2),
       clip=st.one_of(st.none(), st.floats(0.3, 3.0)), bias=st.booleans(), lengths=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_gru_and_rnn_nodes_match_onnxruntime(op, direction, linear_before_reset, hidden, input_size,
                                                    activations, clip, bias, lengths, seed):
    directions = 2 if direction == "bidirectional" else 1
    attributes = dict(activations=(activations if op == "GRU" else activations[:1]) * directions)
    if op == "GRU":
        attributes["linear_before_reset"] = linear_before_reset
    if clip is not None:
        attributes["clip"] = clip
    model = recurrent_model(op, direction, hidden=hidden, input_size=input_size, attributes=attributes, bias=bias,
                            lengths=lengths, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, input_size)).astype(np.float32)
    feeds = {"X": x.transpose(1, 0, 2)}
    if lengths:
        feeds["lens"] = rng.integers(0, 6, 3).astype(np.int32)
    y_ref, h_ref = run_ort(model, feeds)
    y, h = load(model).predict(x, lengths=feeds.get("lens"), return_state=True)
    assert_close(y, canonical_y(y_ref))
    assert_close(h, h_ref)


@pytest.mark.parametrize("op, attributes", [("GRU", dict(linear_before_reset=0)), ("GRU", dict(linear_before_reset=1)),
                                            ("RNN", dict(activations=["Relu"], clip=1.5))],
                         ids=["gru", "gru-linear-before-reset", "rnn-relu-clip"])
def test_streaming_matches_onnxruntime_step_by_step(op, attributes):
    model = recurrent_model(op, attributes=attributes, states=True)
    imported = load(model)
    x, h0, _ = with_state("forward", seed=6, lengths=[6, 6, 6])
    y_ref, h_ref = run_ort(model, {"X": x.transpose(1, 0, 2), "h0": h0})
    stream = imported.stream(batch_size=3)
    stream.state = h0
    steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert_close(steps, canonical_y(y_ref))
    assert_close(stream.state, h_ref)
