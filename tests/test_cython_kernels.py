"""Tests specific to the compiled kernels of the Cython backend.

The shared backend suite compares every backend with the NumPy reference; these cover what only this
backend has: its C copies of Python constants, its float32 rational tanh/sigmoid, its activation switch,
each kernel path (hand-written loop at batch 1 and small batches, BLAS GEMV above the size threshold,
BLAS GEMM at larger batches, the float32 tiles over prepacked weights, projection tails, several pointwise
chunks) for every cell kind (LSTM, GRU in both variants, simple RNN) and for stacks of mixed kinds and
sizes on the flat state, the threaded paths (hidden units split over threads at batch 1, rows split above;
each against the reference and against one thread), the floating-point mode it restores, and its import
error.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm import fast_activations
from fastlstm.activations import SIGMOID, TANH, Activation, apply_activation
from fastlstm.backends.base import flat_state_sizes
from fastlstm.backends.numpy_backend import NumpyLSTM
from fastlstm.spec import LSTMCellWeights, LSTMLayer, ModelSpec, RecurrentLayer
from random_models import random_cell, random_stack

cy = pytest.importorskip("fastlstm.backends._cykernels", reason="the Cython extension is not built")
from fastlstm.backends.cython_backend import CythonLSTM  # noqa: E402

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}


# ---------------------------------------------------------------------------------------------- constants
def test_c_constants_equal_the_python_ones():
    assert cy.TANH_CLAMP == fast_activations.TANH_CLAMP
    assert cy.TANH_NUMERATOR == fast_activations.TANH_NUMERATOR
    assert cy.TANH_DENOMINATOR == fast_activations.TANH_DENOMINATOR


# ---------------------------------------------------------------------------------------------- activations
def test_fast_tanh_matches_the_python_evaluation():
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    # Same coefficients and operations; FMA contraction and reassociation may differ by a few float32 ulps
    # (6e-8 each near 1).
    np.testing.assert_allclose(cy.fast_tanh_array(x), fast_activations.tanh_approx(x), rtol=0, atol=5e-7)
    np.testing.assert_allclose(cy.fast_sigmoid_array(x), fast_activations.sigmoid_approx(x), rtol=0, atol=5e-7)


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


def run_both(spec, dtype, x, lengths=None, seed=0, num_threads=1):
    """The reference's and this backend's ``(y, h, c)`` from one random initial state, in the flat 1-D
    layout fastlstm.model passes."""
    rng = np.random.default_rng(seed)
    h_items, c_items = flat_state_sizes(spec, x.shape[0])
    h0 = rng.normal(0, 0.5, h_items).astype(dtype)
    c0 = rng.normal(0, 0.5, c_items).astype(dtype)
    results = []
    for backend in (NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype, num_threads)):
        h, c = h0.copy(), c0.copy()
        y = backend.run_sequence(x.astype(dtype), h, c, lengths)
        results.append((y, h, c))
    return results


def assert_threads_agree(spec, dtype, x, lengths) -> None:
    """Two threads equal the reference, and one thread within a tenth of the tolerance (the same sums)."""
    threaded = run_both(spec, dtype, x, lengths, num_threads=2)
    assert_close(threaded, dtype)
    single = run_both(spec, dtype, x, lengths, num_threads=1)
    for got, expected in zip(threaded[1], single[1]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[dtype] / 10)


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


# Cases on both sides of the threading thresholds of _cykernels.pyx (UNIT_SPLIT_MIN_WEIGHTS: 64K recurrent
# weights at batch 1; float64 splits rows only while each thread has at most 8, which BLAS never gets).
THREADED_SEQUENCE_CASES = {
    # name: (spec options, batch, threads taken in float32, in float64)
    "hidden units split at batch 1": (dict(input_size=16, hidden=128), 1, 2, 2),
    "unit split, H not a multiple of the unit block, bidirectional":
        (dict(input_size=5, hidden=133, direction="bidirectional"), 1, 2, 2),
    "unit split, two layers reversed": (dict(input_size=7, hidden=130, layers=2, direction="reverse"), 1, 2, 2),
    "below the unit split threshold": (dict(input_size=5, hidden=100), 1, 1, 1),
    "rows split, 1 row each": (dict(input_size=9, hidden=21), 2, 2, 2),
    "rows split, uneven": (dict(input_size=9, hidden=21), 3, 2, 2),
    "rows split, one tile and a tail": (dict(input_size=9, hidden=21), 9, 2, 2),
    "rows split, partial panel of gate columns": (dict(input_size=9, hidden=13), 17, 2, 1),
    "rows split, all options": (dict(input_size=6, hidden=10, peepholes=True, clip=0.7, input_forget=True,
                                     activations=(Activation.of("hard_sigmoid"), Activation.of("softsign"),
                                                  Activation.of("elu"))), 20, 2, 1),
    "projection stays on one thread": (dict(input_size=6, hidden=11, proj=7), 9, 1, 1),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", THREADED_SEQUENCE_CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_threaded_run_sequence_matches_reference_and_one_thread(case, dtype, with_lengths):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    options, batch, threads_float32, threads_float64 = THREADED_SEQUENCE_CASES[case]
    spec = make_spec(rng, **options)
    expected_threads = threads_float32 if dtype == np.float32 else threads_float64
    assert CythonLSTM(spec, dtype, 2)._kernels.sequence_threads(batch) == expected_threads
    assert CythonLSTM(spec, dtype, 1)._kernels.sequence_threads(batch) == 1
    steps = 6
    # Small inputs keep the 128-unit recurrences far from chaos, so that rounding differences stay small.
    x = rng.normal(0, 0.3, (batch, steps, spec.input_size))
    lengths = rng.integers(1, steps + 1, batch) if with_lengths else None
    assert_threads_agree(spec, dtype, x, lengths)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("input_size", "hidden", "layers", "batch", "threads"), [
    (64, 192, 2, 1, 2),   # hidden units split over threads in every layer (256K+ weights per step)
    (16, 128, 2, 1, 1),   # below the threshold
    (7, 21, 2, 70, 2),    # rows split: 70 rows x 4K weights per step (float64: too many rows per thread)
    (7, 21, 2, 9, 1),     # below the threshold: the tiles at 9 rows on one thread
])
def test_threaded_step_matches_reference(dtype, input_size, hidden, layers, batch, threads):
    rng = np.random.default_rng(input_size * hidden + batch)
    spec = make_spec(rng, input_size, hidden, layers=layers)
    reference, backend = NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype, num_threads=2)
    states = [np.zeros((layers, batch, hidden), dtype) for _ in range(4)]
    workspace = backend.new_workspace(batch)
    assert workspace.threads == (1 if dtype == np.float64 and batch > 16 else threads)
    assert CythonLSTM(spec, dtype, num_threads=1).new_workspace(batch).threads == 1
    for _ in range(4):
        x = rng.normal(0, 0.3, (batch, input_size)).astype(dtype)
        reference.step(x, states[0], states[1], reference.new_workspace(len(x)))
        backend.step(x, states[2], states[3], workspace)
        np.testing.assert_allclose(states[2], states[0], rtol=0, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(states[3], states[1], rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_threads_work_in_a_forked_child():
    # The child of a fork has none of the parent's pool threads: it must start its own, not wait for them.
    spec = make_spec(np.random.default_rng(6), 16, 128)
    backend = CythonLSTM(spec, np.float32, num_threads=2)
    x = np.random.default_rng(7).normal(0, 0.3, (1, 5, 16)).astype(np.float32)

    def run():
        return backend.run_sequence(x, np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))

    expected = run()  # starts the parent's pool
    pid = os.fork()
    if pid == 0:
        os._exit(0 if np.array_equal(run(), expected) else 1)
    deadline = time.monotonic() + 30
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(status[1]) == 0


def test_num_threads_must_be_positive():
    with pytest.raises(ValueError, match="num_threads"):
        CythonLSTM(make_spec(np.random.default_rng(0), 3, 4), np.float32, 0)


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
        reference.step(step_x, states[0], states[1], reference.new_workspace(len(step_x)))
        backend.step(step_x, states[2], states[3], workspace)
        np.testing.assert_allclose(states[2], states[0], rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, 10])  # hand GEMV, hand batched loop, BLAS GEMM
@pytest.mark.parametrize("proj", [0, 5])
def test_step_matches_reference(dtype, batch, proj):
    rng = np.random.default_rng(batch * 10 + proj)
    spec = make_spec(rng, 7, 12, layers=2, proj=proj, peepholes=bool(proj))
    reference, backend = NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype)
    h_size, c_size = spec.state_sizes()
    h_ref, c_ref = np.zeros((2, batch, h_size), dtype), np.zeros((2, batch, c_size), dtype)
    h, c = h_ref.copy(), c_ref.copy()
    workspace = backend.new_workspace(batch)
    for _ in range(5):
        x = rng.normal(0, 1, (batch, 7)).astype(dtype)
        reference.step(x, h_ref, c_ref, reference.new_workspace(len(x)))
        backend.step(x, h, c, workspace)
        np.testing.assert_allclose(h, h_ref, rtol=0, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=TOLERANCE[dtype])


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
    backend.step(x, states[0], states[1], backend.new_workspace(1))
    backend.step(x[None], states[2], states[3], backend.new_workspace(1))
    np.testing.assert_array_equal(states[0], states[2])
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
    backend.step(x[:, 1].copy(), h, c, backend.new_workspace(1))
    assert np.isnan(h).all() and np.isnan(c).all()


@pytest.mark.parametrize("num_threads", [1, 2])
def test_streams_on_one_model_in_threads_match_sequential(num_threads):
    # Large enough to release the GIL and, with two threads, to split hidden units: the calls that find the
    # thread pool taken by another run on their own thread, with the same results.
    rng = np.random.default_rng(5)
    backend = CythonLSTM(make_spec(rng, 8, 300), np.float32, num_threads)
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

    monkeypatch.setitem(sys.modules, "fastlstm.backends._cykernels", None)  # makes `import` of it fail
    monkeypatch.delattr(fastlstm.backends, "_cykernels", raising=False)
    monkeypatch.delitem(sys.modules, "fastlstm.backends.cython_backend")
    with pytest.raises(ImportError, match=r"not built.*pip install -e \."):
        importlib.import_module("fastlstm.backends.cython_backend")


# ---------------------------------------------------------------------------------------------- GRU, RNN, mixed stacks
def make_layer(rng, kind, input_size, hidden, *, direction="forward", proj=0, peepholes=False,
               linear_before_reset=True, gate=SIGMOID, cell=TANH, clip=None, scale=0.3):
    """One layer of any kind with random weights; ``gate`` and ``cell`` are the activations the kind uses
    (a GRU both, an RNN ``cell`` only, an LSTM both with tanh on c)."""
    cells = tuple(random_cell(rng, input_size, hidden, proj, peepholes, scale, kind)
                  for _ in range(2 if direction == "bidirectional" else 1))
    return RecurrentLayer(input_size, hidden, cells, direction, proj, SIGMOID if kind == "rnn" else gate, cell,
                          clip=clip, kind=kind, linear_before_reset=linear_before_reset if kind == "gru" else True)


def make_stack(rng, input_size, *layers):
    """A validated spec of ``layers``, each ``(kind, hidden, options)``, the input sizes chained."""
    result, size = [], input_size
    for kind, hidden, options in layers:
        layer = make_layer(rng, kind, size, hidden, **options)
        result.append(layer)
        size = layer.num_directions * layer.output_size
    return ModelSpec(tuple(result)).validate()


RESET_FIRST = dict(linear_before_reset=False)
GENERAL_GRU = dict(gate=Activation.of("hard_sigmoid"), cell=Activation.of("softsign"), clip=0.9)
KIND_CASES = {
    # name: (layers, batch)
    "gru, hand gemv": ([("gru", 13, {})], 1),
    "gru reset first, hand gemv": ([("gru", 13, RESET_FIRST)], 1),
    "gru, hand loop batch": ([("gru", 13, {})], 3),
    "gru reset first, hand loop batch": ([("gru", 13, RESET_FIRST)], 3),
    "gru reset first, whole panels": ([("gru", 16, RESET_FIRST)], 3),
    "gru, gemm batch": ([("gru", 21, {})], 12),
    "gru reset first, gemm batch": ([("gru", 21, RESET_FIRST)], 12),
    "gru, several pointwise chunks": ([("gru", 70, {})], 2),
    "gru, activations with parameters and clip": ([("gru", 11, GENERAL_GRU)], 3),
    "gru reset first, activations and clip": ([("gru", 11, dict(GENERAL_GRU, **RESET_FIRST))], 3),
    "gru bidirectional then reverse": ([("gru", 9, dict(direction="bidirectional")),
                                        ("gru", 9, dict(direction="reverse", **RESET_FIRST))], 3),
    "rnn tanh": ([("rnn", 13, {})], 1),
    "rnn tanh, several pointwise chunks, gemm batch": ([("rnn", 70, dict(scale=0.1))], 11),
    "rnn relu": ([("rnn", 12, dict(cell=Activation.of("relu")))], 3),
    "rnn leaky relu with alpha": ([("rnn", 12, dict(cell=Activation.of("leaky_relu", alpha=0.2)))], 1),
    "rnn scaled tanh with clip": ([("rnn", 12, dict(cell=Activation.of("scaled_tanh", alpha=1.3, beta=0.7),
                                                   clip=0.5))], 10),
    "rnn bidirectional": ([("rnn", 8, dict(direction="bidirectional"))], 3),
    "mixed kinds and sizes": ([("lstm", 11, dict(proj=6, peepholes=True)), ("gru", 17, dict(direction="bidirectional")),
                               ("rnn", 5, {}), ("gru", 9, RESET_FIRST), ("lstm", 20, {})], 3),
    "mixed kinds and sizes, batch 1": ([("rnn", 30, dict(direction="reverse")), ("lstm", 7, {}),
                                        ("gru", 12, RESET_FIRST)], 1),
    "mixed kinds and sizes, gemm batch": ([("gru", 6, {}), ("lstm", 24, dict(direction="bidirectional")),
                                           ("rnn", 10, {})], 13),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", KIND_CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_every_kind_run_sequence_matches_reference(case, dtype, with_lengths):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    layers, batch = KIND_CASES[case]
    spec = make_stack(rng, 6, *layers)
    steps = 7
    x = rng.normal(0, 1, (batch, steps, 6))
    lengths = rng.integers(1, steps + 1, batch) if with_lengths else None
    assert_close(run_both(spec, dtype, x, lengths), dtype)


STEP_CASES = {name: case for name, case in KIND_CASES.items()
              if all(options.get("direction", "forward") == "forward" for _, _, options in case[0])}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", STEP_CASES)
def test_every_kind_step_matches_reference_on_the_flat_state(case, dtype):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    layers, batch = STEP_CASES[case]
    spec = make_stack(rng, 6, *layers)
    reference, backend = NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype)
    h_items, c_items = flat_state_sizes(spec, batch)
    h_ref, c_ref = rng.normal(0, 0.5, h_items).astype(dtype), rng.normal(0, 0.5, c_items).astype(dtype)
    h, c = h_ref.copy(), c_ref.copy()
    workspace = backend.new_workspace(batch)
    for _ in range(5):
        x = rng.normal(0, 1, (batch, 6)).astype(dtype)
        reference.step(x, h_ref, c_ref, reference.new_workspace(len(x)))
        assert backend.step(x, h, c, workspace) is None
        np.testing.assert_allclose(h, h_ref, rtol=0, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=TOLERANCE[dtype])


def test_stacked_state_arrays_are_the_flat_state():
    # PyTorch's (rows, B, size) arrays of an equal-sized stack are the flat state's memory: same results.
    rng = np.random.default_rng(11)
    spec = make_spec(rng, 5, 8, layers=2)
    backend = CythonLSTM(spec, np.float64)
    x = rng.normal(0, 1, (3, 4, 5))
    h0, c0 = rng.normal(0, 0.5, (2, 3, 8)), rng.normal(0, 0.5, (2, 3, 8))
    h3, c3, h1, c1 = h0.copy(), c0.copy(), h0.ravel().copy(), c0.ravel().copy()
    np.testing.assert_array_equal(backend.run_sequence(x, h3, c3), backend.run_sequence(x, h1, c1))
    np.testing.assert_array_equal(h3.ravel(), h1)
    np.testing.assert_array_equal(c3.ravel(), c1)


def test_state_of_the_wrong_size_is_rejected():
    rng = np.random.default_rng(12)
    spec = make_stack(rng, 3, ("gru", 4, {}), ("lstm", 6, {}))
    backend = CythonLSTM(spec, np.float32)
    workspace = backend.new_workspace(2)
    x, h, c = np.zeros((2, 3), np.float32), np.zeros(2 * 10, np.float32), np.zeros(2 * 6, np.float32)
    backend.step(x, h, c, workspace)
    with pytest.raises(ValueError, match="20 and 12 items"):
        backend.step(x, h[:-1], c, workspace)
    with pytest.raises(ValueError, match="20 and 12 items"):
        backend.run_sequence(np.zeros((2, 4, 3), np.float32), h, np.zeros(2 * 10, np.float32))
    with pytest.raises(ValueError, match="writeable"):
        h.flags.writeable = False
        backend.step(x, h, c, workspace)


# Unit splits at batch 1 from 64K recurrent weights per cell (3H x H_pad: H = 160 for a GRU, 1 x H_pad: H = 260
# for an RNN); rows split above (float64 while each thread has at most 8 rows).
THREADED_KIND_CASES = {
    # name: (layers, batch, threads taken in float32, in float64)
    "gru unit split": ([("gru", 160, dict(scale=0.1))], 1, 2, 2),
    "gru reset first unit split, bidirectional": ([("gru", 165, dict(scale=0.1, direction="bidirectional",
                                                                      **RESET_FIRST))], 1, 2, 2),
    "rnn unit split, reversed": ([("rnn", 260, dict(scale=0.05, direction="reverse"))], 1, 2, 2),
    "gru below the unit split threshold": ([("gru", 140, dict(scale=0.1))], 1, 1, 1),
    "gru reset first rows split": ([("gru", 21, RESET_FIRST)], 3, 2, 2),
    "mixed rows split": ([("gru", 13, {}), ("rnn", 9, {}), ("lstm", 7, {})], 20, 2, 1),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", THREADED_KIND_CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_threaded_kinds_run_sequence_match_reference_and_one_thread(case, dtype, with_lengths):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    layers, batch, threads_float32, threads_float64 = THREADED_KIND_CASES[case]
    spec = make_stack(rng, 8, *layers)
    assert CythonLSTM(spec, dtype, 2)._kernels.sequence_threads(batch) == (
        threads_float32 if dtype == np.float32 else threads_float64)
    steps = 6
    x = rng.normal(0, 0.3, (batch, steps, 8))
    lengths = rng.integers(1, steps + 1, batch) if with_lengths else None
    assert_threads_agree(spec, dtype, x, lengths)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("layers", "batch", "threads"), [
    ([("gru", 192, {}), ("gru", 192, {})], 1, 2),                               # 368K weights per step
    ([("gru", 192, RESET_FIRST), ("rnn", 192, {}), ("lstm", 192, {})], 1, 2),  # one more meeting for r * h'
    ([("gru", 192, {}), ("gru", 96, {}), ("lstm", 200, {})], 1, 2),           # sizes differ: a meeting each
    ([("gru", 192, {}), ("lstm", 200, dict(proj=100))], 1, 1),                 # a projection: one thread
    ([("gru", 21, RESET_FIRST), ("rnn", 13, {}), ("lstm", 30, {})], 70, 2),    # rows split
])
def test_threaded_kinds_step_matches_reference(dtype, layers, batch, threads):
    rng = np.random.default_rng(batch + len(layers))
    spec = make_stack(rng, 64, *((kind, hidden, dict(options, scale=0.08)) for kind, hidden, options in layers))
    reference, backend = NumpyLSTM(spec, dtype), CythonLSTM(spec, dtype, num_threads=2)
    workspace = backend.new_workspace(batch)
    assert workspace.threads == (1 if dtype == np.float64 and batch > 16 else threads)
    h_items, c_items = flat_state_sizes(spec, batch)
    states = [np.zeros(h_items, dtype), np.zeros(c_items, dtype), np.zeros(h_items, dtype), np.zeros(c_items, dtype)]
    for _ in range(4):
        x = rng.normal(0, 0.3, (batch, 64)).astype(dtype)
        reference.step(x, states[0], states[1], reference.new_workspace(len(x)))
        backend.step(x, states[2], states[3], workspace)
        np.testing.assert_allclose(states[2], states[0], rtol=0, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(states[3], states[1], rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 3])
def test_streams_of_mixed_stacks_equal_predict(dtype, batch):
    rng = np.random.default_rng(13)
    spec = make_stack(rng, 4, ("gru", 10, RESET_FIRST), ("lstm", 6, dict(proj=3)), ("rnn", 8, {}), ("gru", 5, {}))
    model = fastlstm.Model(spec, backend="cython", dtype=dtype)
    assert model.backend == "cython"
    x = rng.normal(0, 1, (batch, 9, 4))
    expected = model.predict(x)
    stream = model.stream(batch_size=batch)
    streamed = np.stack([stream.step(x[:, t]) for t in range(9)], axis=1)
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=TOLERANCE[np.dtype(dtype).type])


@st.composite
def mixed_stacks(draw):
    """A random stack of 1 to 3 layers of any kinds, sizes and directions, with its input and lengths."""
    count = draw(st.integers(1, 3))
    kinds = draw(st.lists(st.sampled_from(["lstm", "gru", "rnn"]), min_size=count, max_size=count))
    sizes = draw(st.lists(st.integers(1, 40), min_size=count, max_size=count))
    directions = draw(st.lists(st.sampled_from(["forward", "reverse", "bidirectional"]), min_size=count,
                               max_size=count))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    spec = random_stack(rng, kinds, sizes, input_size=draw(st.integers(1, 20)), directions=directions,
                        linear_before_reset=draw(st.booleans()), scale=0.2)
    batch, steps = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    x = rng.normal(0, 1, (batch, steps, spec.input_size))
    lengths = rng.integers(1, steps + 1, batch) if draw(st.booleans()) else None
    return spec, x, lengths, draw(st.sampled_from([np.float32, np.float64])), draw(st.sampled_from([1, 2]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layer", [("gru", 20, {}), ("gru", 20, RESET_FIRST), ("rnn", 20, {})])
def test_nan_input_propagates_in_every_kind(dtype, layer):
    spec = make_stack(np.random.default_rng(14), 3, layer)
    backend = CythonLSTM(spec, dtype)
    x = np.zeros((1, 4, 3), dtype)
    x[0, 1, 0] = np.nan
    y = backend.run_sequence(x, np.zeros(20, dtype), np.zeros(0, dtype))
    assert not np.isnan(y[0, 0]).any() and np.isnan(y[0, 1:]).all()
    h = np.zeros(20, dtype)
    backend.step(x[:, 1].copy(), h, np.zeros(0, dtype), backend.new_workspace(1))
    assert np.isnan(h).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mixed_stacks())
def test_random_mixed_stacks_match_reference(case):
    """Whole sequences against the reference; forward stacks also step by step against its sequence."""
    spec, x, lengths, dtype, num_threads = case
    results = run_both(spec, dtype, x, lengths, num_threads=num_threads)
    assert_close(results, dtype)
    if all(layer.direction == "forward" for layer in spec.layers) and lengths is None:
        batch, steps, _ = x.shape
        h_items, c_items = flat_state_sizes(spec, batch)
        y_ref = NumpyLSTM(spec, dtype).run_sequence(x.astype(dtype), np.zeros(h_items, dtype), np.zeros(c_items, dtype))
        backend = CythonLSTM(spec, dtype, num_threads)
        h, c = np.zeros(h_items, dtype), np.zeros(c_items, dtype)
        workspace = backend.new_workspace(batch)
        for t in range(steps):
            backend.step(np.ascontiguousarray(x[:, t], dtype=dtype), h, c, workspace)
            top = h[h_items - batch * spec.layers[-1].output_size:].reshape(batch, -1)  # the last layer's block
            np.testing.assert_allclose(top, y_ref[:, t], rtol=0, atol=TOLERANCE[dtype])
