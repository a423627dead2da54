"""The run-time API under hostile or absurd calls: a refused call changes nothing, sizes are checked before
anything is allocated, zero-length sequences, every argument error inside fastlstm's hierarchy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fastlstm
from fastlstm import InvalidInputError, InvalidModelError
from fastlstm.activations import Activation
from random_models import random_spec

BACKENDS = ["numpy", "numba", "cython"]
# np.matrix, one of the refused `out=` arrays, warns of its own deprecation when made.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


# ----------------------------------------------------------------------------------------- refused calls
def _bad_outs():
    read_only = np.zeros(3, np.float32)
    read_only.setflags(write=False)
    return {
        "wrong dtype": np.zeros(3, np.float64),
        "wrong shape": np.zeros(4, np.float32),
        "batched shape for unbatched x": np.zeros((1, 3), np.float32),
        "a list": [0.0, 0.0, 0.0],
        "read-only": read_only,
        "a matrix": np.asmatrix(np.zeros((1, 3), np.float32)),
    }


@pytest.mark.parametrize("case", list(_bad_outs()))
def test_refused_step_leaves_the_stream_untouched(model, case):
    stream = model.stream()
    stream.step(np.ones(4))
    h_before, c_before = stream.state
    with pytest.raises(InvalidInputError, match="out"):
        stream.step(np.full(4, 2.0), out=_bad_outs()[case])
    h_after, c_after = stream.state
    np.testing.assert_array_equal(h_after, h_before)
    np.testing.assert_array_equal(c_after, c_before)
    # The next good step continues from the same state as a stream that never saw the refused call.
    twin = model.stream()
    twin.step(np.ones(4))
    np.testing.assert_array_equal(stream.step(np.full(4, 3.0)), twin.step(np.full(4, 3.0)))


@pytest.mark.parametrize("bad_x", [np.zeros(5), np.zeros((2, 4)), np.zeros(4, complex), "abc", [[1, 2], [3]]])
def test_refused_input_leaves_the_stream_untouched(model, bad_x):
    stream = model.stream()
    stream.step(np.ones(4))
    before = stream.state
    with pytest.raises(InvalidInputError):
        stream.step(bad_x)
    np.testing.assert_array_equal(stream.state[0], before[0])
    np.testing.assert_array_equal(stream.state[1], before[1])


def test_refused_predict_leaves_the_callers_state_untouched(model):
    h0, c0 = np.ones((2, 2, 6), np.float32), np.ones((2, 2, 6), np.float32)
    with pytest.raises(InvalidInputError):
        model.predict(np.zeros((2, 3, 4)), state=(h0, c0), lengths=[1, 9])
    assert np.all(h0 == 1) and np.all(c0 == 1)


# ----------------------------------------------------------------------------------------- sizes before allocation
def test_predict_on_a_huge_stride_0_view_is_refused_before_allocating(model):
    x = np.broadcast_to(np.zeros(4, np.float32), (1, 10**9, 4))  # no memory of its own
    with pytest.raises(InvalidInputError, match=r"predict\(\) on x of shape \(1, 1000000000, 4\) would allocate about"):
        model.predict(x)


def test_a_huge_stream_is_refused_before_allocating(model):
    with pytest.raises(InvalidInputError, match=r"stream\(batch_size=10000000000\) would allocate about .* TiB"):
        model.stream(batch_size=10**10)


def test_the_allocation_limit_can_be_raised_and_lowered(model):
    x = np.zeros((2, 50, 4))
    previous = fastlstm.set_allocation_limit(10_000)
    try:
        assert fastlstm.allocation_limit() == 10_000
        with pytest.raises(InvalidInputError, match="set_allocation_limit"):
            model.predict(x)
        with pytest.raises(InvalidInputError, match="set_allocation_limit"):
            model.stream(batch_size=1000)
        fastlstm.set_allocation_limit(1 << 30)
        assert model.predict(x).shape == (2, 50, 3)
    finally:
        fastlstm.set_allocation_limit(previous)
    with pytest.raises(InvalidInputError, match="positive whole number"):
        fastlstm.set_allocation_limit(0)


# ----------------------------------------------------------------------------------------- zero lengths
@pytest.mark.parametrize("output", ["sequence", "last_step", "final_state"])
def test_zero_length_rows_output_zeros_and_keep_their_initial_state(output):
    rng = np.random.default_rng(1)
    spec = random_spec(rng, input_size=3, hidden_size=5, num_layers=2, direction="bidirectional", output=output)
    x = rng.normal(size=(3, 6, 3))
    h0, c0 = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    lengths = np.array([4, 0, 6])
    reference = fastlstm.Model(spec, backend="numpy")
    for backend in BACKENDS:
        model = fastlstm.Model(spec, backend=backend)
        y, (h, c) = model.predict(x, state=(h0, c0), lengths=lengths, return_state=True)
        np.testing.assert_array_equal(h[:, 1], h0[:, 1].astype(np.float32))
        np.testing.assert_array_equal(c[:, 1], c0[:, 1].astype(np.float32))
        if output == "final_state":  # each direction's final state, which is the initial one
            np.testing.assert_array_equal(y[1], np.concatenate(h0[2:, 1]).astype(np.float32))
        else:
            assert not np.any(y[1])
        # The other rows are what they are when run without the empty row.
        others = reference.predict(x[[0, 2]], state=(h0[:, [0, 2]], c0[:, [0, 2]]), lengths=lengths[[0, 2]],
                                   return_state=True)
        np.testing.assert_allclose(y[[0, 2]], others[0], atol=2e-6)
        np.testing.assert_allclose(h[:, [0, 2]], others[1][0], atol=2e-6)


def test_a_batch_of_only_empty_rows(model):
    y, (h, c) = model.predict(np.ones((2, 3, 4)), lengths=[0, 0], return_state=True)
    assert y.shape == (2, 3, 3) and not np.any(h) and not np.any(c)
    # Zero outputs go through the head, as any output would: the head of a zero vector is its bias.
    np.testing.assert_allclose(y, np.tanh(model.spec.head[0].bias).astype(np.float32)[None, None].repeat(3, 1).repeat(2, 0),
                               atol=1e-6)


def test_zero_lengths_against_onnxruntime():
    """Outputs and the other rows equal ONNX Runtime's. The final state of an empty row is where the two
    differ on purpose: ONNX Runtime returns zeros, fastlstm the initial state (nothing was read, so nothing
    changed; TensorFlow and Keras do the same). With a zero initial state the two agree."""
    onnx_tests = pytest.importorskip("test_onnx_import")
    model = onnx_tests.lstm_model("bidirectional", lengths=True, states=True)
    x, h0, c0, lengths = onnx_tests.inputs_with_state("bidirectional", 3, [0, 6, 2])
    y_ort, h_ort, c_ort = onnx_tests.run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0, "c0": c0})
    y, (h, c) = fastlstm.load(model).predict(x, state=(h0, c0), lengths=lengths, return_state=True)
    onnx_tests.assert_close(y, onnx_tests.canonical_y(y_ort))
    onnx_tests.assert_close(h[:, 1:], h_ort[:, 1:])
    onnx_tests.assert_close(c[:, 1:], c_ort[:, 1:])
    np.testing.assert_array_equal(h[:, 0], h0[:, 0])
    assert not np.any(h_ort[:, 0]) and not np.any(c_ort[:, 0])
    h0[:, 0] = c0[:, 0] = 0
    _, h_ort, c_ort = onnx_tests.run_ort(model, {"X": x.transpose(1, 0, 2), "lens": lengths, "h0": h0, "c0": c0})
    _, (h, c) = fastlstm.load(model).predict(x, state=(h0, c0), lengths=lengths, return_state=True)
    onnx_tests.assert_close(h, h_ort)
    onnx_tests.assert_close(c, c_ort)


def test_a_fully_masked_sequence_is_a_zero_length_one():
    rng = np.random.default_rng(2)
    spec = random_spec(rng, input_size=3, hidden_size=5, mask_value=0.0, output="final_state")
    x = rng.normal(size=(2, 4, 3))
    x[1] = 0.0
    y = fastlstm.Model(spec, backend="numpy").predict(x)
    assert not np.any(y[1]) and np.any(y[0])


# ----------------------------------------------------------------------------------------- values and arguments
@pytest.mark.parametrize("where", ["gate", "head", "head_input"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_activation_parameters_are_refused(where, value):
    spec = random_spec(np.random.default_rng(3), input_size=3, hidden_size=5, head=[(2, "identity")])
    bad = Activation("leaky_relu", value, 0.0)
    if where == "gate":
        spec = dataclasses.replace(spec, layers=(dataclasses.replace(spec.layers[0], gate_activation=bad),))
    elif where == "head":
        spec = dataclasses.replace(spec, head=(dataclasses.replace(spec.head[0], activation=bad),))
    else:
        spec = dataclasses.replace(spec, head_input_activation=bad)
    with pytest.raises(InvalidModelError, match="leaky_relu parameters must be finite"):
        spec.validate()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dtype": "foo"}, InvalidInputError, "dtype: expected one of"),
    ({"dtype": "float16"}, InvalidInputError, "dtype: expected one of"),
    ({"backend": "gpu"}, InvalidInputError, "unknown backend 'gpu'"),
    ({"num_threads": 0}, InvalidInputError, "num_threads"),
    ({"num_threads": True}, InvalidInputError, "num_threads"),
    ({"backend": 3}, TypeError, "backend: expected a name"),
])
def test_argument_errors(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        fastlstm.Model(spec, **kwargs)


def test_what_cannot_be_loaded_at_all_is_a_type_error(spec):
    """A call of the wrong type (not a path, not a model object) is a TypeError, as Python's own are."""
    with pytest.raises(TypeError, match="cannot load a builtins.int"):
        fastlstm.load(123)
    with pytest.raises(TypeError, match="do not apply"):
        fastlstm.load(spec, head=["fc"])


# ----------------------------------------------------------------------------------------- head input activation
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_input_activation_in_predict_and_stream(backend):
    rng = np.random.default_rng(4)
    plain = random_spec(rng, input_size=3, hidden_size=5, head=[(2, "sigmoid")])
    spec = dataclasses.replace(plain, head_input_activation=Activation.of("relu")).validate()
    x = rng.normal(size=(2, 7, 3))
    hidden = fastlstm.Model(dataclasses.replace(plain, head=()), backend="numpy", dtype="float64").predict(x)
    dense = plain.head[0]
    expected = 1 / (1 + np.exp(-(np.maximum(hidden, 0) @ dense.weight.T + dense.bias)))
    model = fastlstm.Model(spec, backend=backend)
    np.testing.assert_allclose(model.predict(x), expected, atol=2e-6)
    stream = model.stream(batch_size=2)
    streamed = np.stack([stream.step(x[:, t]) for t in range(7)], axis=1)
    np.testing.assert_allclose(streamed, expected, atol=2e-6)
