"""Tests specific to the compiled kernels of the Cython backend.

The shared backend suite compares every backend with the NumPy reference; these cover what only this
backend has: its C copies of Python constants, its float32 rational tanh/sigmoid, its activation switch,
each kernel path (hand-written loop at batch 1 and small batches, BLAS GEMV above the size threshold,
BLAS GEMM at larger batches, projection tails, several pointwise chunks), the floating-point mode it restores, and its import error.
"""

from __future__ import annotations

import importlib
import sys
import threading

import numpy as np
import pytest

from fastlstm import fast_activations
from fastlstm.activations import ACTIVATION_CODES, ELEMENTWISE, SIGMOID, TANH, Activation, apply_activation
from fastlstm.backends.numpy_backend import NumpyLSTM
from fastlstm.spec import LSTMCellWeights, LSTMLayer, ModelSpec

cy = pytest.importorskip("fastlstm._cykernels", reason="the Cython extension is not built")
from fastlstm.backends.cython_backend import CythonLSTM  # noqa: E402

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}


# ---------------------------------------------------------------------------------------------- constants
def test_c_constants_equal_the_python_ones():
    assert cy.TANH_CLAMP == fast_activations.TANH_CLAMP
    assert cy.TANH_NUMERATOR == fast_activations.TANH_NUMERATOR
    assert cy.TANH_DENOMINATOR == fast_activations.TANH_DENOMINATOR


def test_activation_codes_equal_the_python_ones():
    assert cy.ACTIVATION_CODES == {name: ACTIVATION_CODES[name] for name in ELEMENTWISE}


# ---------------------------------------------------------------------------------------------- activations
def test_fast_tanh_and_sigmoid_within_documented_bound():
    x = np.arange(-20.0, 20.0, 1e-4)
    tanh_error = np.abs(cy.fast_tanh_array(x).astype(np.float64) - np.tanh(x.astype(np.float32).astype(np.float64)))
    sigmoid_error = np.abs(cy.fast_sigmoid_array(x).astype(np.float64)
                           - 1 / (1 + np.exp(-x.astype(np.float32).astype(np.float64))))
    assert tanh_error.max() <= fast_activations.TANH_MAX_ABS_ERROR
    assert sigmoid_error.max() <= fast_activations.SIGMOID_MAX_ABS_ERROR


def test_fast_tanh_matches_the_python_evaluation():
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    # Same coefficients and operations; FMA contraction and reassociation may differ by a few float32 ulps
    # (6e-8 each near 1).
    np.testing.assert_allclose(cy.fast_tanh_array(x), fast_activations.tanh_approx(x), rtol=0, atol=5e-7)
    np.testing.assert_allclose(cy.fast_sigmoid_array(x), fast_activations.sigmoid_approx(x), rtol=0, atol=5e-7)


def test_fast_tanh_special_values():
    out = cy.fast_tanh_array(np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30]))
    assert np.isnan(out[0])
    np.testing.assert_array_equal(out[1:], np.float32([1, -1, 0, 1, -1]))
    sig = cy.fast_sigmoid_array(np.array([np.nan, np.inf, -np.inf]))
    assert np.isnan(sig[0]) and sig[1] == 1 and sig[2] == 0


ELEMENTWISE_CASES = [Activation.of(name) for name in sorted(ELEMENTWISE)] + [
    Activation.of("affine", 0.5, -0.25), Activation.of("leaky_relu", 0.3), Activation.of("thresholded_relu", 0.5),
    Activation.of("scaled_tanh", 1.7, 0.6), Activation.of("hard_sigmoid", 1 / 6, 0.5), Activation.of("elu", 0.7),
]


@pytest.mark.parametrize("act", ELEMENTWISE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_switch_matches_reference(act, dtype):
    x = np.concatenate([np.linspace(-30, 30, 6001), [0.0, -0.0, 1e-3, -1e-3]]).astype(dtype)
    expected = apply_activation(act, x)
    got = cy.activation_array(x, act.code, act.alpha, act.beta)
    assert got.dtype == dtype
    atol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(got, expected, rtol=atol, atol=atol)


# ---------------------------------------------------------------------------------------------- whole kernels
def make_spec(rng, input_size, hidden, *, layers=1, proj=0, direction="forward", peepholes=False, clip=None,
              input_forget=False, activations=(SIGMOID, TANH, TANH)):
    recurrent = proj or hidden
    directions = 2 if direction == "bidirectional" else 1
    result, size = [], input_size
    for _ in range(layers):
        cells = tuple(
            LSTMCellWeights(
                rng.normal(0, 0.3, (4 * hidden, size)), rng.normal(0, 0.3, (4 * hidden, recurrent)),
                rng.normal(0, 0.3, 4 * hidden), rng.normal(0, 0.3, (proj, hidden)) if proj else None,
                rng.normal(0, 0.3, (3, hidden)) if peepholes else None,
            )
            for _ in range(directions)
        )
        result.append(LSTMLayer(size, hidden, cells, direction, proj, *activations, clip=clip,
                                input_forget=input_forget))
        size = directions * recurrent
    return ModelSpec(tuple(result)).validate()


def run_both(spec, dtype, x, lengths=None, seed=0):
    rng = np.random.default_rng(seed)
    h_size, c_size = spec.state_sizes()
    shape = (spec.num_state_rows, x.shape[0])
    h0 = rng.normal(0, 0.5, shape + (h_size,)).astype(dtype)
    c0 = rng.normal(0, 0.5, shape + (c_size,)).astype(dtype)
    results = []
    for backend in (NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype)):
        h, c = h0.copy(), c0.copy()
        y = backend.run_sequence(x.astype(dtype), h, c, lengths)
        results.append((y, h, c))
    return results


def assert_close(results, dtype):
    (y_ref, h_ref, c_ref), (y, h, c) = results
    assert y.dtype == dtype and y.flags.c_contiguous and y.shape == y_ref.shape
    for got, expected in ((y, y_ref), (h, h_ref), (c, c_ref)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[dtype])


SEQUENCE_CASES = {
    # name: (spec options, batch)
    "hand gemv, one pointwise chunk": (dict(input_size=5, hidden=13), 1),
    "several pointwise chunks": (dict(input_size=9, hidden=70), 1),
    "hand loop batch": (dict(input_size=9, hidden=21), 4),
    "gemm batch": (dict(input_size=9, hidden=21), 11),
    "projection tail rows": (dict(input_size=6, hidden=11, proj=7), 1),
    "projection hand loop batch": (dict(input_size=6, hidden=11, proj=7), 3),
    "projection gemm batch": (dict(input_size=6, hidden=11, proj=7), 9),
    "reverse stacked": (dict(input_size=4, hidden=9, layers=2, direction="reverse"), 2),
    "bidirectional stacked projection": (dict(input_size=4, hidden=9, proj=5, layers=2, direction="bidirectional"), 3),
    "all options": (dict(input_size=6, hidden=10, peepholes=True, clip=0.7, input_forget=True,
                         activations=(Activation.of("hard_sigmoid"), Activation.of("softsign"),
                                      Activation.of("elu"))), 2),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SEQUENCE_CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_run_sequence_matches_reference(case, dtype, with_lengths):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    options, batch = SEQUENCE_CASES[case]
    spec = make_spec(rng, **options)
    steps = 7
    x = rng.normal(0, 1, (batch, steps, spec.input_size))
    lengths = rng.integers(1, steps + 1, batch) if with_lengths else None
    assert_close(run_both(spec, dtype, x, lengths), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_gemv_path_above_threshold(dtype):
    # 4H x (I + H) weights of 2 MiB or more go through BLAS gemv at batch 1 instead of the hand loop.
    rng = np.random.default_rng(3)
    hidden = 256 if dtype == np.float32 else 128
    spec = make_spec(rng, hidden, hidden, layers=2)
    x = rng.normal(0, 1, (1, 3, hidden))
    assert_close(run_both(spec, dtype, x), dtype)
    reference, backend = NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype)
    states = [np.zeros((2, 1, hidden), dtype) for _ in range(4)]
    workspace = backend.new_workspace(1)
    for t in range(3):
        step_x = np.ascontiguousarray(x[:, t], dtype=dtype)
        expected = reference.step(step_x, states[0], states[1], None)
        got = backend.step(step_x, states[2], states[3], workspace)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, 10])  # hand GEMV, hand batched loop, BLAS GEMM
@pytest.mark.parametrize("proj", [0, 5])
def test_step_matches_reference_and_returns_a_view_of_h(dtype, batch, proj):
    rng = np.random.default_rng(batch * 10 + proj)
    spec = make_spec(rng, 7, 12, layers=2, proj=proj, peepholes=bool(proj))
    reference, backend = NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype)
    h_size, c_size = spec.state_sizes()
    h_ref, c_ref = np.zeros((2, batch, h_size), dtype), np.zeros((2, batch, c_size), dtype)
    h, c = h_ref.copy(), c_ref.copy()
    workspace = backend.new_workspace(batch)
    outputs = []
    for _ in range(5):
        x = rng.normal(0, 1, (batch, 7)).astype(dtype)
        expected = reference.step(x, h_ref, c_ref, None)
        got = backend.step(x, h, c, workspace)
        outputs.append(got)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=TOLERANCE[dtype])
    assert np.shares_memory(outputs[-1], h) and outputs[-1].shape == (batch, h_size)
    assert all(out is outputs[0] for out in outputs)  # the same view each call: nothing allocated


def test_step_rejects_wrong_arrays():
    rng = np.random.default_rng(0)
    backend = CythonLSTM(make_spec(rng, 3, 4), np.float32)
    workspace = backend.new_workspace(1)
    x, h, c = np.zeros((1, 3), np.float32), np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32)
    backend.step(x, h, c, workspace)
    with pytest.raises(ValueError, match="float32"):
        backend.step(x.astype(np.float64), h, c, workspace)
    with pytest.raises(ValueError, match="expected x"):
        backend.step(np.zeros((1, 4), np.float32), h, c, workspace)
    with pytest.raises(ValueError, match="C-contiguous"):
        backend.step(np.zeros((1, 6), np.float32)[:, ::2], h, c, workspace)
    with pytest.raises(ValueError, match="expected x"):
        backend.step(np.zeros((2, 3), np.float32), h, c, workspace)  # workspace is for batch 1


def test_step_accepts_one_dimensional_x_at_batch_1_and_rejects_foreign_workspace():
    rng = np.random.default_rng(2)
    spec = make_spec(rng, 3, 4)
    backend, other = CythonLSTM(spec, np.float32), CythonLSTM(spec, np.float32)
    x = rng.normal(0, 1, 3).astype(np.float32)
    states = [np.zeros((1, 1, 4), np.float32) for _ in range(4)]
    flat = backend.step(x, states[0], states[1], backend.new_workspace(1))
    batched = backend.step(x[None], states[2], states[3], backend.new_workspace(1))
    np.testing.assert_array_equal(flat, batched)
    with pytest.raises(ValueError, match="another model"):
        backend.step(x, states[0], states[1], other.new_workspace(1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_input_propagates(dtype):
    rng = np.random.default_rng(4)
    backend = CythonLSTM(make_spec(rng, 3, 20), dtype)
    x = np.zeros((1, 4, 3), dtype)
    x[0, 1, 0] = np.nan
    h, c = np.zeros((1, 1, 20), dtype), np.zeros((1, 1, 20), dtype)
    y = backend.run_sequence(x, h, c)
    assert not np.isnan(y[0, 0]).any() and np.isnan(y[0, 1:]).all() and np.isnan(c).all()
    h, c = np.zeros((1, 1, 20), dtype), np.zeros((1, 1, 20), dtype)
    out = backend.step(x[:, 1].copy(), h, c, backend.new_workspace(1))
    assert np.isnan(out).all() and np.isnan(c).all()


def test_streams_on_one_model_in_threads_match_sequential():
    rng = np.random.default_rng(5)
    backend = CythonLSTM(make_spec(rng, 8, 300), np.float32)  # large enough to release the GIL
    inputs = rng.normal(0, 1, (4, 50, 1, 8)).astype(np.float32)

    def run(sequence):
        h, c = np.zeros((1, 1, 300), np.float32), np.zeros((1, 1, 300), np.float32)
        workspace = backend.new_workspace(1)
        for x in sequence:
            backend.step(x, h, c, workspace)
        return h

    expected = [run(sequence) for sequence in inputs]
    results = [None] * len(inputs)

    def worker(n):
        results[n] = run(inputs[n])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_floating_point_mode_is_restored():
    rng = np.random.default_rng(1)
    spec = make_spec(rng, 4, 6)
    backend = CythonLSTM(spec, np.float32)
    before = cy.fp_mode()
    backend.run_sequence(np.ones((1, 3, 4), np.float32), np.zeros((1, 1, 6), np.float32),
                         np.zeros((1, 1, 6), np.float32))
    backend.step(np.ones((1, 4), np.float32), np.zeros((1, 1, 6), np.float32), np.zeros((1, 1, 6), np.float32),
                 backend.new_workspace(1))
    assert cy.fp_mode() == before


@pytest.mark.skipif(not cy.FLUSHES_DENORMALS, reason="denormals are flushed on x86-64 only")
def test_denormal_state_is_flushed():
    # With i = 0 (bias -inf-like) and f = 1, c passes through unchanged: c = f*c. A denormal c reads as zero.
    spec = ModelSpec((LSTMLayer(1, 1, (LSTMCellWeights(
        np.zeros((4, 1)), np.zeros((4, 1)), np.array([-1e4, 1e4, 0.0, 0.0])),)),))
    backend = CythonLSTM(spec, np.float32)
    c = np.full((1, 1, 1), 1e-40, np.float32)
    assert c[0, 0, 0] != 0  # a float32 denormal
    backend.step(np.zeros((1, 1), np.float32), np.zeros((1, 1, 1), np.float32), c, backend.new_workspace(1))
    assert c[0, 0, 0] == 0


def test_missing_extension_raises_import_error_saying_how_to_build(monkeypatch):
    import fastlstm

    monkeypatch.setitem(sys.modules, "fastlstm._cykernels", None)  # makes `import` of it fail
    monkeypatch.delattr(fastlstm, "_cykernels", raising=False)
    monkeypatch.delitem(sys.modules, "fastlstm.backends.cython_backend")
    with pytest.raises(ImportError, match=r"not built.*pip install -e \."):
        importlib.import_module("fastlstm.backends.cython_backend")
