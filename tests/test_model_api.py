"""The public API's contract: shapes, dtypes, layouts, states, output modes, out=, and its input errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastlstm
from fastlstm import InvalidInputError
from random_models import random_spec

BACKENDS = ["numpy", "numba", "cython"]


def test_shapes_batched_and_unbatched(model):
    x = np.random.default_rng(1).normal(size=(2, 5, 4))
    y, (h, c) = model.predict(x, return_state=True)
    assert y.shape == (2, 5, 3) and h.shape == (2, 2, 6) and c.shape == (2, 2, 6)
    y1, (h1, c1) = model.predict(x[1], return_state=True)
    assert y1.shape == (5, 3) and h1.shape == (2, 6) and c1.shape == (2, 6)
    np.testing.assert_allclose(y1, y[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h1, h[:, 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.uint8, bool])
def test_any_real_dtype_is_accepted(model, dtype):
    x = (np.random.default_rng(2).normal(size=(1, 4, 4)) * 3).astype(dtype)
    expected = model.predict(x.astype(np.float64))
    y = model.predict(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_any_memory_layout_is_accepted(model):
    base = np.random.default_rng(3).normal(size=(4, 6, 8)).astype(np.float32)
    expected = model.predict(np.ascontiguousarray(base[:, ::2, ::2]))
    fortran = np.asfortranarray(base[:, ::2, ::2])
    strided = base[:, ::2, ::2]
    readonly = np.ascontiguousarray(base[:, ::2, ::2])
    readonly.setflags(write=False)
    for x in (fortran, strided, readonly, base[:, ::2, ::2].tolist()):
        np.testing.assert_array_equal(model.predict(x), expected)


def test_initial_state_is_used_and_not_modified(model):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 4))
    h0, c0 = rng.normal(size=(2, 2, 6)), rng.normal(size=(2, 2, 6))
    h0_copy, c0_copy = h0.copy(), c0.copy()
    with_state = model.predict(x, state=(h0, c0))
    assert not np.allclose(with_state, model.predict(x))
    np.testing.assert_array_equal(h0, h0_copy)
    np.testing.assert_array_equal(c0, c0_copy)
    # Continuing from a returned state equals one long run.
    _, state = model.predict(x[:, :2], return_state=True)
    np.testing.assert_allclose(model.predict(x[:, 2:], state=state), model.predict(x)[:, 2:], rtol=1e-5, atol=1e-6)


def test_float64_runs_in_double_precision(spec):
    x = np.random.default_rng(5).normal(size=(1, 50, 4))
    y64 = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x)
    for backend in BACKENDS:
        y = fastlstm.Model(spec, backend=backend, dtype="float64").predict(x)
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, y64, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("output", ["last_step", "final_state"])
def test_last_step_outputs(output):
    rng = np.random.default_rng(6)
    spec = random_spec(rng, input_size=3, hidden_size=4, direction="bidirectional", output=output)
    sequence_spec = random_spec(np.random.default_rng(6), input_size=3, hidden_size=4, direction="bidirectional")
    x = rng.normal(size=(2, 5, 3))
    y_seq, (h, _) = fastlstm.Model(sequence_spec, backend="numpy").predict(x, return_state=True)
    y = fastlstm.Model(spec, backend="numpy").predict(x)
    assert y.shape == (2, 8)
    if output == "last_step":
        np.testing.assert_array_equal(y, y_seq[:, -1])
    else:  # forward's final state and the reverse direction's final state (reached at t = 0)
        np.testing.assert_array_equal(y, np.concatenate([h[0], h[1]], axis=-1))
        np.testing.assert_array_equal(y[:, 4:], y_seq[:, 0, 4:])


def test_lengths_follow_sequence_lens_semantics():
    rng = np.random.default_rng(7)
    spec = random_spec(rng, input_size=3, hidden_size=4, direction="bidirectional")
    model = fastlstm.Model(spec, backend="numpy")
    x = rng.normal(size=(2, 6, 3))
    y, (h, c) = model.predict(x, lengths=[4, 6], return_state=True)
    alone, (h_alone, c_alone) = model.predict(x[0, :4], return_state=True)
    np.testing.assert_allclose(y[0, :4], alone, rtol=1e-6, atol=1e-7)
    assert np.all(y[0, 4:] == 0)
    np.testing.assert_allclose(h[:, 0], h_alone, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y[1], model.predict(x[1]))


def test_mask_value_turns_trailing_padding_into_lengths():
    rng = np.random.default_rng(8)
    spec = random_spec(rng, input_size=3, hidden_size=4, mask_value=0.0, output="final_state")
    model = fastlstm.Model(spec, backend="numpy")
    x = rng.normal(size=(2, 5, 3))
    x[0, 3:] = 0.0
    y = model.predict(x)
    np.testing.assert_allclose(y[0], model.predict(x[0, :3]), rtol=1e-6, atol=1e-7)
    x[1, 1] = 0.0  # a masked step before the end cannot be expressed as a length
    with pytest.raises(InvalidInputError, match="pad the end"):
        model.predict(x)


def test_stream_step_shapes_and_out(model):
    stream = model.stream()
    y = stream.step(np.ones(4))
    assert y.shape == (3,)
    assert stream.step(np.ones((1, 4))).shape == (1, 3)
    out = np.empty(3, np.float32)
    assert stream.step(np.ones(4), out=out) is out
    batched = model.stream(batch_size=3)
    assert batched.step(np.ones((3, 4))).shape == (3, 3)
    assert batched.state[0].shape == (2, 3, 6)


def test_stream_returns_fresh_arrays(model):
    stream = model.stream()
    first = stream.step(np.ones(4))
    kept = first.copy()
    stream.step(np.zeros(4))
    np.testing.assert_array_equal(first, kept)


def test_model_is_shareable_between_threads(spec):
    model = fastlstm.Model(spec)
    rng = np.random.default_rng(9)
    inputs = [rng.normal(size=(20, 4)) for _ in range(4)]
    expected = [model.predict(x) for x in inputs]
    results = [None] * 4

    def worker(n):
        stream = model.stream()
        results[n] = np.stack([stream.step(x_t) for x_t in inputs[n]])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((2, 5, 3)), r"expected 4 features"),
        (np.zeros((5,)), r"expected shape \(batch, time, 4\)"),
        (np.zeros((1, 2, 3, 4)), r"expected shape"),
        (np.zeros((1, 0, 4)), r"at least one"),
        (np.zeros((0, 3, 4)), r"at least one"),
        (np.zeros((1, 2, 4), complex), r"real numbers"),
        (np.array([["a"]]), r"real numbers"),
        ([[1.0, 2.0], [3.0]], r"could not be read"),
    ],
)
def test_predict_input_errors(model, x, message):
    with pytest.raises(InvalidInputError, match=message):
        model.predict(x)


def test_state_and_lengths_errors(model):
    x = np.zeros((2, 3, 4))
    with pytest.raises(InvalidInputError, match=r"state h: expected shape \(2, 2, 6\)"):
        model.predict(x, state=(np.zeros((2, 1, 6)), np.zeros((2, 2, 6))))
    with pytest.raises(InvalidInputError, match="pair"):
        model.predict(x, state=np.zeros((2, 2, 6)))
    with pytest.raises(InvalidInputError, match=r"values in 0\.\.3"):
        model.predict(x, lengths=[-1, 3])
    with pytest.raises(InvalidInputError, match=r"values in 0\.\.3"):
        model.predict(x, lengths=[4, 3])
    with pytest.raises(InvalidInputError, match="one length per sequence"):
        model.predict(x, lengths=[1, 2, 3])


def test_stream_input_errors(model):
    stream = model.stream()
    with pytest.raises(InvalidInputError, match=r"expected shape \(1, 4\) or \(4,\), got \(5,\)"):
        stream.step(np.zeros(5))
    with pytest.raises(InvalidInputError, match="real numbers"):
        stream.step(np.zeros(4, complex))
    with pytest.raises(InvalidInputError, match="out: expected a NumPy array of shape"):
        stream.step(np.zeros(4), out=np.zeros(3, np.float64))
    with pytest.raises(InvalidInputError, match=r"state h: expected shape"):
        stream.state = (np.zeros((1, 1, 6)), np.zeros((2, 1, 6)))
    with pytest.raises(InvalidInputError, match="batch_size"):
        model.stream(batch_size=0)
    batched = model.stream(batch_size=2)
    with pytest.raises(InvalidInputError, match=r"expected shape \(2, 4\), got \(4,\)"):
        batched.step(np.zeros(4))


def test_rejected_state_leaves_stream_untouched(model):
    stream = model.stream()
    stream.step(np.ones(4))
    before = stream.state
    with pytest.raises(InvalidInputError):
        stream.state = (np.zeros((2, 1, 6)), np.zeros((9, 9)))
    np.testing.assert_array_equal(stream.state[0], before[0])


def test_stream_refused_for_bidirectional_and_reverse():
    rng = np.random.default_rng(10)
    for direction in ("bidirectional", "reverse"):
        model = fastlstm.Model(random_spec(rng, direction=direction), backend="numpy")
        with pytest.raises(InvalidInputError, match=f"{direction} layers.*predict"):
            model.stream()


def test_unknown_backend_and_dtype(spec):
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastlstm.Model(spec, backend="gpu")
    with pytest.raises(ValueError, match="dtype"):
        fastlstm.Model(spec, dtype="float16")


def test_errors_are_value_errors():
    for error in (fastlstm.ModelFormatError, fastlstm.InvalidModelError, fastlstm.UnsupportedModelError,
                  fastlstm.InvalidInputError):
        assert issubclass(error, fastlstm.FastLSTMError) and issubclass(error, ValueError)


def test_repr_names_backend(model):
    assert f"backend={model.backend!r}" in repr(model)


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "sigmoid", "softmax", "softsign"])
def test_streamed_head_equals_predicted_head(activation):
    """The stream runs the head in place into its own buffers; it must equal the whole-sequence head."""
    rng = np.random.default_rng(11)
    spec = random_spec(rng, input_size=3, hidden_size=5, head=[(4, "relu"), (6, activation)])
    model = fastlstm.Model(spec, backend="numpy")
    x = rng.normal(size=(8, 3)) * 4
    stream = model.stream()
    streamed = np.stack([stream.step(x_t) for x_t in x])
    np.testing.assert_allclose(streamed, model.predict(x), rtol=1e-6, atol=1e-7)
