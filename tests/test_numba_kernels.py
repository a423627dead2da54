"""Tests specific to the jitted kernels of the Numba backend.

The shared backend suite compares every backend with the NumPy reference on small batches; these cover what
only this backend has: its float32 rational tanh/sigmoid compiled from the Python constants, its activation
switch, each product path (hand loop at batch 1 and small batches, BLAS GEMV for large matrices, BLAS GEMM
above the hand loop's batch limit, projections on each), the shape checks that guard its unchecked memory
accesses, the floating-point mode it sets and restores, and its on-disk cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from fastlstm import fast_activations
from fastlstm.activations import ELEMENTWISE, SIGMOID, TANH, Activation, apply_activation
from fastlstm.backends.numpy_backend import NumpyLSTM
from fastlstm.spec import LSTMCellWeights, LSTMLayer, ModelSpec
from random_models import random_spec

pytest.importorskip("numba")
from fastlstm.backends import _numba_kernels as kernels  # noqa: E402
from fastlstm.backends.numba_backend import NumbaLSTM, step_releases_gil  # noqa: E402

TOLERANCE = {np.float32: dict(rtol=1e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-10)}


def kernel_activation(x, act):
    return kernels.apply_activation(x, act.code, act.alpha, act.beta)


# ---------------------------------------------------------------------------------------------- activations
def test_fast_tanh_is_the_python_approximation():
    """Same constants, same float32 operations in the same order: equal to the last bit.

    (A stale on-disk cache compiled from other constants, or a float64 promotion, would differ here.)
    """
    x = np.linspace(-10, 10, 200001, dtype=np.float32)
    np.testing.assert_array_equal(kernel_activation(x, TANH), fast_activations.tanh_approx(x))
    np.testing.assert_array_equal(kernel_activation(x, SIGMOID), fast_activations.sigmoid_approx(x))


def test_float64_uses_the_exact_functions():
    x = np.linspace(-30, 30, 6001)
    np.testing.assert_allclose(kernel_activation(x, TANH), np.tanh(x), rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(kernel_activation(x, SIGMOID), 1 / (1 + np.exp(-x)), rtol=1e-15, atol=1e-300)


# ---------------------------------------------------------------------------------------------- product paths
def reference_run(spec, dtype, x, h0, c0, lengths=None):
    h, c = h0.copy(), c0.copy()
    y = NumpyLSTM(spec, dtype).run_sequence(x, h, c, lengths)
    return y, h, c


def random_inputs(rng, spec, batch, steps, dtype):
    x = rng.normal(0, 1, (batch, steps, spec.input_size)).astype(dtype)
    h_size, c_size = spec.state_sizes()
    rows = spec.num_state_rows
    h0 = rng.normal(0, 0.5, (rows, batch, h_size)).astype(dtype)
    c0 = rng.normal(0, 0.5, (rows, batch, c_size)).astype(dtype)
    return x, h0, c0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, kernels.HAND_MATMUL_MAX_ROWS, kernels.HAND_MATMUL_MAX_ROWS + 5])
@pytest.mark.parametrize("options", [
    dict(), dict(proj_size=9, peepholes=True, clip=2.0), dict(direction="bidirectional", proj_size=5),
    dict(direction="reverse", input_forget=True),
], ids=["standard", "projection-peepholes-clip", "bidirectional-projection", "reverse-coupled"])
def test_sequences_on_hand_and_blas_paths(dtype, batch, options):
    """Batches on both sides of HAND_MATMUL_MAX_ROWS, padded with ragged lengths, against the reference."""
    rng = np.random.default_rng(batch)
    spec = random_spec(rng, input_size=11, hidden_size=17, num_layers=2, **options)
    x, h0, c0 = random_inputs(rng, spec, batch, 9, dtype)
    for lengths in (None, rng.integers(1, 10, size=batch)):
        expected = reference_run(spec, dtype, x, h0, c0, lengths)
        h, c = h0.copy(), c0.copy()
        y = NumbaLSTM(spec, dtype).run_sequence(x, h, c, lengths)
        for got, want in zip((y, h, c), expected):
            np.testing.assert_allclose(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 2, kernels.HAND_MATMUL_MAX_ROWS + 1])
@pytest.mark.parametrize("proj_size", [0, 7])
def test_streaming_step_on_hand_and_blas_paths(dtype, batch, proj_size):
    rng = np.random.default_rng(10 + batch)
    spec = random_spec(rng, input_size=6, hidden_size=13, num_layers=3, proj_size=proj_size, peepholes=batch == 2)
    x, h0, c0 = random_inputs(rng, spec, batch, 7, dtype)
    y_ref, h_ref, c_ref = reference_run(spec, dtype, x, h0, c0)
    prepared = NumbaLSTM(spec, dtype)
    workspace = prepared.new_workspace(batch)
    h, c = h0.copy(), c0.copy()
    for t in range(x.shape[1]):
        prepared.step(np.ascontiguousarray(x[:, t]), h, c, workspace)
        np.testing.assert_allclose(h[-1], y_ref[:, t], **TOLERANCE[dtype])
    np.testing.assert_allclose(h, h_ref, **TOLERANCE[dtype])
    np.testing.assert_allclose(c, c_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_gemv_path_for_large_matrices(monkeypatch, dtype):
    """Cells whose weights reach BLAS_GEMV_MIN_BYTES go to BLAS at batch 1 when more than one thread is allowed."""
    monkeypatch.setattr(kernels, "BLAS_GEMV_MIN_BYTES", 0)
    rng = np.random.default_rng(5)
    spec = random_spec(rng, input_size=5, hidden_size=12, num_layers=2, proj_size=6)
    assert NumbaLSTM(spec, dtype, num_threads=2)._cells[:, kernels.COL_BLAS_GEMV].all()
    assert not NumbaLSTM(spec, dtype, num_threads=1)._cells[:, kernels.COL_BLAS_GEMV].any()
    prepared = NumbaLSTM(spec, dtype, num_threads=2)
    assert not kernels._uses_hand_loop(prepared._cells[0], 1) and kernels._uses_hand_loop(prepared._cells[0], 2)
    x, h0, c0 = random_inputs(rng, spec, 1, 6, dtype)
    y_ref, h_ref, c_ref = reference_run(spec, dtype, x, h0, c0)
    h, c = h0.copy(), c0.copy()
    np.testing.assert_allclose(prepared.run_sequence(x, h, c), y_ref, **TOLERANCE[dtype])
    workspace = prepared.new_workspace(1)
    h, c = h0.copy(), c0.copy()
    for t in range(x.shape[1]):
        prepared.step(np.ascontiguousarray(x[:, t]), h, c, workspace)
    np.testing.assert_allclose(h[-1], y_ref[:, -1], **TOLERANCE[dtype])
    np.testing.assert_allclose(c, c_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("hidden_size", [1, 3, 16, 33])
def test_hidden_sizes_off_the_vector_width(hidden_size):
    """Vector loops with scalar tails, and input sizes that are not a multiple of the 4-row product block."""
    rng = np.random.default_rng(hidden_size)
    spec = random_spec(rng, input_size=hidden_size + 2, hidden_size=hidden_size, num_layers=2)
    x, h0, c0 = random_inputs(rng, spec, 1, 5, np.float32)
    expected = reference_run(spec, np.float32, x, h0, c0)
    h, c = h0.copy(), c0.copy()
    got = (NumbaLSTM(spec, np.float32).run_sequence(x, h, c), h, c)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, **TOLERANCE[np.float32])


def test_streams_of_one_model_on_concurrent_threads():
    """Large enough for the step to release the GIL: streams on threads share only the immutable model."""
    rng = np.random.default_rng(8)
    spec = random_spec(rng, input_size=64, hidden_size=128, scale=0.1)
    prepared = NumbaLSTM(spec, np.float32)
    assert step_releases_gil(prepared._plans, 1)
    inputs = [rng.normal(size=(1, 40, 64)).astype(np.float32) for _ in range(4)]
    zeros = np.zeros((1, 1, 128), np.float32)
    expected = [reference_run(spec, np.float32, x, zeros, zeros)[0] for x in inputs]
    results = [None] * len(inputs)

    def run(n):
        workspace, h, c = prepared.new_workspace(1), zeros.copy(), zeros.copy()
        outputs = []
        for t in range(inputs[n].shape[1]):
            prepared.step(inputs[n][:, t].copy(), h, c, workspace)
            outputs.append(h[-1].copy())
        results[n] = np.stack(outputs, axis=1)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, **TOLERANCE[np.float32])


# ---------------------------------------------------------------------------------------------- guards
def test_step_rejects_shapes_that_do_not_fit():
    rng = np.random.default_rng(1)
    spec = random_spec(rng, input_size=4, hidden_size=6, num_layers=2)
    prepared = NumbaLSTM(spec, np.float32)
    workspace = prepared.new_workspace(1)
    x = np.zeros((1, 4), np.float32)
    h, c = np.zeros((2, 1, 6), np.float32), np.zeros((2, 1, 6), np.float32)
    for bad_x, bad_h, bad_c in [
        (np.zeros((1, 5), np.float32), h, c),          # input size
        (np.zeros((2, 4), np.float32), h[:, :1], c),   # batch above the workspace's
        (x, np.zeros((1, 1, 6), np.float32), c),        # layers
        (x, h, np.zeros((2, 1, 7), np.float32)),        # hidden size
    ]:
        before = (bad_h.copy(), bad_c.copy())
        with pytest.raises(ValueError):
            prepared.step(bad_x, bad_h, bad_c, workspace)
        np.testing.assert_array_equal(bad_h, before[0])
        np.testing.assert_array_equal(bad_c, before[1])
    with pytest.raises(ValueError):
        prepared.step(np.zeros((2, 4), np.float32), np.zeros((2, 2, 6), np.float32),
                      np.zeros((2, 2, 6), np.float32), workspace)  # a batch-1 workspace is too small for 2


def test_bidirectional_models_do_not_stream():
    spec = random_spec(np.random.default_rng(2), direction="bidirectional")
    with pytest.raises(ValueError):
        NumbaLSTM(spec, np.float32).new_workspace(1)


# ---------------------------------------------------------------------------------------------- floating-point mode
def single_unit_spec(forget_bias):
    """H=1, all weights zero: i = sigmoid(-30) ~ 0, g = 0, f = sigmoid(forget_bias), so c_new = f * c_old."""
    zeros = np.zeros((4, 1))
    cell = LSTMCellWeights(w_ih=zeros, w_hh=zeros, bias=np.array([-30.0, forget_bias, 0.0, 0.0]))
    return ModelSpec((LSTMLayer(input_size=1, hidden_size=1, cells=(cell,)),)).validate()


@pytest.mark.skipif(not kernels.FLUSHES_DENORMALS, reason="denormals are flushed on x86-64 only")
def test_denormals_flushed_inside_kernels_and_mode_restored():
    prepared = NumbaLSTM(single_unit_spec(forget_bias=30.0), np.float32)
    denormal = np.float32(1e-39)
    assert denormal != 0 and abs(denormal) < np.finfo(np.float32).tiny
    mode = kernels.fp_mode()
    h, c = np.zeros((1, 1, 1), np.float32), np.full((1, 1, 1), denormal)
    prepared.step(np.zeros((1, 1), np.float32), h, c, prepared.new_workspace(1))
    assert c[0, 0, 0] == 0  # read as zero (DAZ): f * c_old with f ~ 1 would otherwise stay ~1e-39
    h, c = np.zeros((1, 1, 1), np.float32), np.full((1, 1, 1), denormal)
    prepared.run_sequence(np.zeros((1, 3, 1), np.float32), h, c)
    assert c[0, 0, 0] == 0
    assert kernels.fp_mode() == mode
    assert denormal * np.float32(1.0) != 0  # and NumPy outside the kernels still sees denormals


def test_fp_mode_restored_after_a_rejected_call():
    prepared = NumbaLSTM(single_unit_spec(forget_bias=0.0), np.float32)
    mode = kernels.fp_mode()
    with pytest.raises(ValueError):
        prepared.step(np.zeros((1, 2), np.float32), np.zeros((1, 1, 1), np.float32),
                      np.zeros((1, 1, 1), np.float32), prepared.new_workspace(1))
    assert kernels.fp_mode() == mode


# ---------------------------------------------------------------------------------------------- cache
CACHE_PROBE = """
import numpy as np
from fastlstm.backends import _numba_kernels as kernels
from fastlstm.backends.numba_backend import NumbaLSTM
from random_models import random_spec
prepared = NumbaLSTM(random_spec(np.random.default_rng(0)), np.float32)
h, c = np.zeros((1, 1, 7), np.float32), np.zeros((1, 1, 7), np.float32)
prepared.step(np.zeros((1, 5), np.float32), h, c, prepared.new_workspace(1))
prepared.run_sequence(np.zeros((1, 2, 5), np.float32), h, c)
print(sum(len(f.stats.cache_misses) for f in (kernels.step_stack, kernels.run_stack)))
"""


def test_kernels_load_from_the_disk_cache():
    """A second process finds the compiled kernels in the cache instead of compiling them again."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), tests_dir]))
    runs = [subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    assert runs[1].stdout.strip() == "0", runs[1].stderr
