"""Malformed ONNX models: parameters that would only produce NaN or inf, sizes that would exhaust memory,
and field-level corruption. Every one must end in a ``FastLSTMError`` naming the problem, never a Python
error and never a model that loads and computes garbage.
"""

from __future__ import annotations

import math
import random
import tracemalloc

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import FastLSTMError, InvalidModelError, ModelFormatError, UnsupportedModelError
from fastlstm.importers import _onnx_graph
from fastlstm.importers import onnx as onnx_importer

onnx = pytest.importorskip("onnx")
from onnx import AttributeProto, helper  # noqa: E402

from test_onnx_import import const, ints, keras_like_model, lstm_model, slice_time, time_step_model  # noqa: E402
from test_onnx_heads import merged_rows_graph  # noqa: E402
from test_onnx_gru_rnn import recurrent_model  # noqa: E402
from test_onnx_stacks import embedding_model, mixed_stack  # noqa: E402


def load(model):
    return fastlstm.load(model, backend="numpy")


def with_head(op, **attributes):
    """A forward LSTM whose Y_h (batch, 5) goes through activation ``op``."""
    model = lstm_model("forward", outputs=("Y_h",))
    model.graph.initializer.append(ints("axes0", [0]))
    model.graph.node.extend([helper.make_node("Squeeze", ["Y_h", "axes0"], ["h"]),
                             helper.make_node(op, ["h"], ["out"], **attributes)])
    model.graph.output[0].name = "out"
    return model


# ----------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("activations, alpha, beta, message", [
    (["Sigmoid", "Tanh", "LeakyRelu"], [math.nan], None, "activation LeakyRelu has alpha=nan"),
    (["HardSigmoid", "Tanh", "Tanh"], [0.2], [math.inf], "activation HardSigmoid has beta=inf"),
    (["Sigmoid", "Affine", "Tanh"], [-math.inf], [0.0], "activation Affine has alpha=-inf"),
    (["Sigmoid", "ScaledTanh", "Tanh"], [math.nan], [math.nan], "alpha=nan, beta=nan"),
    (["Sigmoid", "Tanh", "Elu"], [math.inf], None, "activation Elu has alpha=inf"),
    (["Sigmoid", "Tanh", "ThresholdedRelu"], [math.nan], None, "activation ThresholdedRelu has alpha=nan"),
])
def test_lstm_activation_parameters_must_be_finite(activations, alpha, beta, message):
    attributes = dict(activations=activations, activation_alpha=alpha)
    if beta is not None:
        attributes["activation_beta"] = beta
    with pytest.raises(InvalidModelError, match=message):
        load(lstm_model("forward", attributes=attributes))


def test_finite_activation_parameters_of_any_sign_load():
    """The ONNX functions are defined for every real alpha and beta: negative or zero ones are valid."""
    model = lstm_model("forward", attributes=dict(activations=["HardSigmoid", "Affine", "LeakyRelu"],
                                                  activation_alpha=[0.0, -0.5, -2.0], activation_beta=[0.5, 0.0]))
    layer = load(model).spec.layers[0]
    assert (layer.cell_activation.alpha, layer.output_activation.alpha) == (-0.5, -2.0)


@pytest.mark.parametrize("op, attributes, message", [
    ("LeakyRelu", dict(alpha=math.nan), "LeakyRelu has alpha=nan"),
    ("Elu", dict(alpha=math.inf), "Elu has alpha=inf"),
    ("HardSigmoid", dict(alpha=0.2, beta=-math.inf), "HardSigmoid has beta=-inf"),
    ("ThresholdedRelu", dict(alpha=math.nan), "ThresholdedRelu has alpha=nan"),
])
def test_head_activation_parameters_must_be_finite(op, attributes, message):
    with pytest.raises(InvalidModelError, match=message):
        load(with_head(op, **attributes))


@pytest.mark.parametrize("attributes, message", [
    (dict(alpha=math.inf), "alpha=inf, expected a finite number"),
    (dict(beta=math.nan), "beta=nan, expected a finite number"),
    (dict(transB=2), "transB=2, expected 0 or 1"),
])
def test_gemm_attributes_are_checked(attributes, message):
    model = lstm_model("forward", outputs=("Y_h",))
    model.graph.initializer.extend([ints("axes0", [0]), const("w", np.ones((3, 5), np.float32)),
                                    const("b", np.ones(3, np.float32))])
    model.graph.node.extend([helper.make_node("Squeeze", ["Y_h", "axes0"], ["h"]),
                             helper.make_node("Gemm", ["h", "w", "b"], ["out"], **{"transB": 1, **attributes})])
    model.graph.output[0].name = "out"
    with pytest.raises(InvalidModelError, match=message):
        load(model)


def test_flags_other_than_0_or_1_are_invalid():
    with pytest.raises(InvalidModelError, match="input_forget=2, expected 0 or 1"):
        load(lstm_model("forward", attributes=dict(input_forget=2)))


# ----------------------------------------------------------------------------------------- sizes
def test_a_huge_declared_sequence_length_costs_no_memory():
    build, constants = slice_time(1, 2**40)
    model = time_step_model(build, steps=2**40)
    model.graph.initializer.extend(constants)
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedModelError, match=r"keeps time steps \[1:1099511627776:1\]"):
            load(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_attribute_lists_longer_than_any_use_are_refused_before_conversion():
    model = lstm_model("forward", attributes=dict(activation_alpha=[0.5] * 100_000))
    with pytest.raises(InvalidModelError, match="holds 100000 values"):
        load(model)


def test_index_and_shape_lists_longer_than_any_rank_are_refused():
    model = merged_rows_graph()
    model.graph.initializer.append(ints("many", list(range(100))))
    for node in model.graph.node:
        if node.output[0] == "time":
            node.input[1] = "many"
    with pytest.raises(InvalidModelError, match="Gather indices holds 100 entries"):
        load(model)


@pytest.mark.parametrize("op, a, b, message", [
    ("Div", [6], [0], "Div of integer constants by zero"),
    ("Mul", [2**62], [4], "Mul of integer constants overflows int64"),
])
def test_integer_constant_arithmetic_is_exact_or_refused(op, a, b, message):
    model = merged_rows_graph()
    model.graph.initializer.extend([ints("a", a), ints("b", b)])
    model.graph.node.insert(0, helper.make_node(op, ["a", "b"], ["folded"]))
    for node in model.graph.node:
        if node.output[0] == "merge":
            node.input[1] = "folded"
    with pytest.raises(InvalidModelError, match=message):
        load(model)


def test_python_errors_from_a_malformed_graph_become_format_errors(monkeypatch):
    """The last line of defence: an error the reader did not foresee is still a ModelFormatError."""
    def overflow(self):
        raise OverflowError("Python int too large to convert to C ssize_t")

    monkeypatch.setattr(_onnx_graph.GraphReader, "read", overflow)
    with pytest.raises(ModelFormatError, match=r"unreadable model \(OverflowError"):
        load(lstm_model("forward"))


# ----------------------------------------------------------------------------------------- field mutations
SEEDS = {
    "bidirectional": lstm_model("bidirectional", peepholes=True, lengths=True, states=True),
    "activations": lstm_model("bidirectional", attributes=dict(
        activations=["HardSigmoid", "ScaledTanh", "LeakyRelu"] * 2, activation_alpha=[0.3, 0.8, 0.05] * 2,
        activation_beta=[0.4, 1.3] * 2, clip=2.0)),
    "tf2onnx": keras_like_model(True, False, 13),
    "merged-rows": merged_rows_graph(),
    "gru": recurrent_model("GRU", "bidirectional", lengths=True, states=True, attributes=dict(
        activations=["HardSigmoid", "LeakyRelu"] * 2, activation_alpha=[0.3, 0.05] * 2, activation_beta=[0.4] * 2,
        clip=2.0, linear_before_reset=1)),
    "mixed-stack": mixed_stack(states=True),
    "embedding": embedding_model(),
}
EXTREMES = [0, -1, 1, 2, 7, 2**31, 2**40, 2**62, 2**63 - 1, -2**63]


def mutate(model, rng: random.Random):
    """One random field of ``model`` set to an extreme value (dims, attributes, constants, names, ops)."""
    mutated = onnx.ModelProto()
    mutated.CopyFrom(model)
    graph = mutated.graph
    node = rng.choice(graph.node)
    value = rng.choice(EXTREMES)
    choice = rng.randrange(6)
    if choice == 0 and len(graph.initializer):
        tensor = rng.choice(graph.initializer)
        if tensor.dims:
            tensor.dims[rng.randrange(len(tensor.dims))] = value
        elif tensor.data_type == onnx.TensorProto.INT64 and tensor.raw_data:
            tensor.raw_data = np.int64(value).tobytes() * (len(tensor.raw_data) // 8)
    elif choice == 1:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.INT:
                attribute.i = value
            elif attribute.type == AttributeProto.INTS and len(attribute.ints):
                attribute.ints[rng.randrange(len(attribute.ints))] = value
            elif attribute.type == AttributeProto.FLOAT:
                attribute.f = rng.choice([math.nan, math.inf, 1e38, 0.0])
    elif choice == 2:
        dims = rng.choice(list(graph.input)).type.tensor_type.shape.dim
        if len(dims):
            dims[rng.randrange(len(dims))].dim_value = value
    elif choice == 3 and len(node.input):
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "undefined", *graph.node[-1].output])
    elif choice == 4:
        node.op_type = rng.choice(["LSTM", "GRU", "RNN", "Reshape", "Gather", "Slice", "Concat", "Mul", "Div",
                                   "Squeeze", "Gemm", "Transpose", "Split", "Shape", "Flatten", "Softmax"])
    elif len(node.output):
        del node.output[rng.randrange(len(node.output)):]
    return mutated


@pytest.mark.parametrize("seed_model", sorted(SEEDS))
def test_field_mutations_load_or_raise_fastlstm_errors(seed_model):
    rng = random.Random(seed_model)
    for _ in range(150):
        data = mutate(SEEDS[seed_model], rng).SerializeToString()
        try:
            onnx_importer.spec_from_bytes(data)
        except FastLSTMError as exc:
            assert "unreadable model (" not in str(exc), str(exc)  # an error the reader should have named


# ----------------------------------------------------------------------------------------- nothing ignored
def test_a_graph_output_no_operator_produces_is_invalid():
    """An Identity node listing a second output the graph returns: that output would otherwise vanish."""
    model = lstm_model("forward", outputs=("Y",))
    model.graph.node.append(helper.make_node("Identity", ["Y"], ["out", "ghost"]))
    model.graph.output[0].name = "out"
    model.graph.output.append(helper.make_tensor_value_info("ghost", onnx.TensorProto.FLOAT, None))
    with pytest.raises(InvalidModelError, match="output\\(s\\) 'ghost' used by the graph, but a Identity node has 1"):
        load(model)


def test_values_in_a_field_the_tensor_type_does_not_use_are_invalid():
    model = lstm_model("forward", outputs=("Y",))
    model.graph.initializer[0].int64_data.extend([1, 2, 3])
    with pytest.raises(InvalidModelError, match="float32 tensor with values in int64_data"):
        load(model)


def test_a_model_local_function_redefining_a_standard_operator_is_refused():
    model = lstm_model("forward", outputs=("Y",))
    model.functions.append(helper.make_function("", "LSTM", ["X"], ["Y"], [helper.make_node("Identity", ["X"], ["Y"])],
                                                [helper.make_opsetid("", 14)]))
    with pytest.raises(UnsupportedModelError, match="model-local function\\(s\\) 'LSTM' in the standard ONNX domain"):
        load(model)


def test_rounding_the_data_to_float16_is_refused():
    """fastlstm cannot round as the graph does, so the model is refused rather than computed differently."""
    model = lstm_model("forward", outputs=("Y",))
    model.graph.node.append(helper.make_node("Cast", ["Y"], ["out"], to=onnx.TensorProto.FLOAT16))
    model.graph.output[0].name = "out"
    with pytest.raises(UnsupportedModelError, match="rounds the data to float16"):
        load(model)
