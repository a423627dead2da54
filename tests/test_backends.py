"""Every compiled backend against the NumPy reference, over random models with every option.

The NumPy backend is the oracle (itself checked against PyTorch, Keras and ONNX Runtime in the importer
tests); here each compiled backend must agree with it on whole sequences, variable lengths and streaming.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm.activations import Activation
from fastlstm.backends import BACKENDS, available_backends
from random_models import random_spec

COMPILED = [name for name in BACKENDS if name != "numpy"]
TOLERANCE = {"float32": dict(rtol=1e-4, atol=2e-5), "float64": dict(rtol=1e-9, atol=1e-10)}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_compiled_backends_are_built():
    """A broken build must fail the suite, not silently fall back to a slower backend."""
    assert available_backends() == list(BACKENDS)
    assert fastlstm.load(random_spec(np.random.default_rng(0))).backend == "cython"


@st.composite
def model_cases(draw, forward_only=False):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    direction = "forward" if forward_only else draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    hidden = draw(st.integers(1, 40))
    proj = draw(st.sampled_from([0, 0, max(hidden - 1, 0)])) if hidden > 1 else 0
    activations, scale = None, 0.3
    if draw(st.booleans()):
        # Gates from bounded functions; cell input/output from any continuous one. Unbounded activations
        # get small weights: with large ones the recurrence is chaotic and float32 rounding alone (even
        # NumPy against itself) moves the result past any tolerance.
        bounded = [Activation.of("sigmoid"), Activation.of("tanh"), Activation.of("hard_sigmoid", 1 / 6, 0.5),
                   Activation.of("scaled_tanh", 0.9, 1.1), Activation.of("softsign")]
        unbounded = [Activation.of("relu"), Activation.of("elu", 0.7), Activation.of("leaky_relu", 0.1),
                     Activation.of("affine", 0.5, 0.1), Activation.of("softplus")]
        activations = (draw(st.sampled_from(bounded)), draw(st.sampled_from(bounded + unbounded)),
                       draw(st.sampled_from(bounded + unbounded)))
        if any(a in unbounded for a in activations):
            scale = 0.1
    spec = random_spec(
        rng,
        input_size=draw(st.integers(1, 24)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        direction=direction,
        proj_size=proj,
        peepholes=draw(st.booleans()),
        clip=draw(st.sampled_from([None, None, 0.8, 3.0])),
        input_forget=draw(st.booleans()),
        activations=activations,
        scale=scale,
    )
    batch = draw(st.integers(1, 5))
    steps = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    x = rng.normal(0, 1, (batch, steps, spec.input_size))
    rows, (h_size, c_size) = spec.num_state_rows, spec.state_sizes()
    state = (rng.normal(0, 0.5, (rows, batch, h_size)), rng.normal(0, 0.5, (rows, batch, c_size)))
    return spec, x, state, dtype, rng


def assert_close(actual, expected, dtype, slack=0.0):
    """Equal within the dtype's tolerance, widened by ``slack``: how far NumPy's own result in this dtype
    strays from float64 on the same case. Random recurrences can be ill-conditioned, and then rounding alone
    moves the result; a kernel bug moves it much further than the reference's own rounding does."""
    tolerance = dict(TOLERANCE[dtype])
    tolerance["atol"] += 10 * slack
    np.testing.assert_allclose(actual, expected, **tolerance)


def compare_with_reference(spec, backend, dtype, x, state, **options):
    """Run ``backend`` and the NumPy reference (in ``dtype`` and float64); assert y, h_n, c_n agree."""
    run = lambda name, dt: fastlstm.Model(spec, backend=name, dtype=dt).predict(  # noqa: E731
        x, state, return_state=True, **options)
    exact, own, got = run("numpy", "float64"), run("numpy", dtype), run(backend, dtype)
    flat = lambda result: (result[0], *result[1])  # noqa: E731
    assert got[0].dtype == np.dtype(dtype)
    for g, o, e in zip(flat(got), flat(own), flat(exact)):
        assert_close(g, e, dtype, slack=float(np.max(np.abs(o - e))))


@pytest.mark.parametrize("backend", COMPILED)
@SETTINGS
@given(case=model_cases())
def test_predict_matches_numpy_reference(backend, case):
    spec, x, state, dtype, _ = case
    compare_with_reference(spec, backend, dtype, x, state)


@pytest.mark.parametrize("backend", COMPILED)
@SETTINGS
@given(case=model_cases())
def test_variable_lengths_match_numpy_reference(backend, case):
    spec, x, state, dtype, rng = case
    lengths = rng.integers(1, x.shape[1] + 1, size=x.shape[0])
    compare_with_reference(spec, backend, dtype, x, state, lengths=lengths)


@pytest.mark.parametrize("backend", list(BACKENDS))
@SETTINGS
@given(case=model_cases(forward_only=True))
def test_streaming_equals_predict(backend, case):
    spec, x, state, dtype, _ = case
    model = fastlstm.Model(spec, backend=backend, dtype=dtype)
    expected, (h_n, c_n) = model.predict(x, state, return_state=True)
    exact = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x, state)
    slack = float(np.max(np.abs(expected - exact)))
    stream = model.stream(batch_size=x.shape[0])
    stream.state = state
    steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    # The same maths in a different order of operations: equal to rounding only.
    assert_close(steps, expected, dtype, slack)
    h, c = stream.state
    assert_close(h, h_n, dtype, slack)
    assert_close(c, c_n, dtype, slack)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_stream_state_round_trip_resumes_exactly(backend):
    rng = np.random.default_rng(3)
    spec = random_spec(rng, input_size=6, hidden_size=9, num_layers=2, head=[(4, "softmax")])
    model = fastlstm.Model(spec, backend=backend)
    x = rng.normal(size=(10, 6)).astype(np.float32)
    stream = model.stream()
    for t in range(5):
        stream.step(x[t])
    saved = stream.state
    first = [stream.step(x[t]) for t in range(5, 10)]
    stream.reset()
    assert np.all(stream.state[0] == 0) and np.all(stream.state[1] == 0)
    stream.state = saved
    second = [stream.step(x[t]) for t in range(5, 10)]
    np.testing.assert_array_equal(np.array(first), np.array(second))
    # The snapshot is a copy: stepping did not change it.
    assert not np.array_equal(saved[0], stream.state[0])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_streams_are_independent(backend):
    rng = np.random.default_rng(4)
    model = fastlstm.Model(random_spec(rng, input_size=3, hidden_size=5), backend=backend)
    x = rng.normal(size=(6, 3))
    a, b = model.stream(), model.stream()
    for t in range(6):
        ya = a.step(x[t])
        b.step(-x[t])
    np.testing.assert_allclose(ya, model.predict(x)[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_discontinuous_activation_matches_reference(backend, dtype):
    """thresholded_relu jumps at alpha, so it is kept out of the random draws; a fixed case covers it."""
    rng = np.random.default_rng(12)
    acts = (Activation.of("sigmoid"), Activation.of("thresholded_relu", 0.1), Activation.of("thresholded_relu", 0.02))
    spec = random_spec(rng, input_size=4, hidden_size=6, num_layers=2, activations=acts, scale=0.5)
    x = rng.normal(size=(2, 6, 4))
    expected = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x)
    assert np.count_nonzero(expected) > expected.size // 4  # the threshold is really crossed both ways
    assert_close(fastlstm.Model(spec, backend=backend, dtype=dtype).predict(x), expected, dtype)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_long_sequence_with_head_matches_reference(backend, dtype):
    """A long, wide, stacked case with a head: errors must not accumulate over 300 steps."""
    rng = np.random.default_rng(5)
    spec = random_spec(rng, input_size=33, hidden_size=70, num_layers=2, head=[(16, "relu"), (3, "sigmoid")])
    x = rng.normal(size=(2, 300, 33))
    expected = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x)
    y = fastlstm.Model(spec, backend=backend, dtype=dtype).predict(x)
    assert_close(y, expected, dtype)
