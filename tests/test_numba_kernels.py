"""Tests specific to the jitted kernels of the Numba backend.

The shared backend suite compares every backend with the NumPy reference on small batches; these cover what
only this backend has: its float32 rational tanh/sigmoid compiled from the Python constants, its activation
switch, each product path (hand loop at batch 1 and small batches, BLAS GEMV for large matrices, BLAS GEMM
above the hand loop's batch limit, projections on each) for every cell kind (LSTM, both GRU variants, simple
RNN) and for stacks mixing kinds and sizes on the flat state, the shape checks that guard its unchecked
memory accesses, the floating-point mode it sets and restores, and its on-disk cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm import fast_activations
from fastlstm.activations import SIGMOID, TANH, Activation, apply_activation
from fastlstm.backends.base import flat_state_sizes
from fastlstm.backends.numpy_backend import NumpyLSTM
from fastlstm.spec import CELL_KINDS, LSTMCellWeights, LSTMLayer, ModelSpec
from random_models import random_spec, random_stack

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
    assert step_releases_gil(prepared._plans, prepared._head_stages, 1)
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


# ---------------------------------------------------------------------------------------------- GRU, RNN, mixed stacks
# (kind, linear_before_reset, layer options): each kind with its plain activations (the vectorised fast path)
# and with parametrised activations and clip (the general activation switch).
KIND_CASES = {
    "gru": ("gru", True, {}),
    "gru-reset-first": ("gru", False, {}),
    "gru-general": ("gru", True, dict(gate_activation=Activation.of("hard_sigmoid", 0.3, 0.45),
                                      cell_activation=Activation.of("softsign"), clip=1.5)),
    "gru-reset-first-general": ("gru", False, dict(gate_activation=Activation.of("affine", 0.4, 0.5),
                                                   cell_activation=Activation.of("scaled_tanh", 0.9, 1.2),
                                                   clip=0.8)),
    "rnn-tanh": ("rnn", True, {}),
    "rnn-relu": ("rnn", True, dict(cell_activation=Activation.of("relu"))),
    "rnn-leaky-relu": ("rnn", True, dict(cell_activation=Activation.of("leaky_relu", 0.2))),
    "rnn-scaled-tanh-clip": ("rnn", True, dict(cell_activation=Activation.of("scaled_tanh", 0.8, 1.3), clip=0.9)),
}


def kind_stack(rng, case, direction="forward", hidden_sizes=(13, 9), input_size=6):
    """Two layers of one KIND_CASES case, of different sizes, with the case's options on both."""
    kind, linear_before_reset, options = KIND_CASES[case]
    spec = random_stack(rng, [kind] * len(hidden_sizes), list(hidden_sizes), input_size=input_size,
                        directions=[direction] * len(hidden_sizes), linear_before_reset=linear_before_reset)
    return ModelSpec(tuple(replace(layer, **options) for layer in spec.layers)).validate()


def mixed_stack(rng, directions=("forward",) * 4, linear_before_reset=True):
    """An LSTM with projection and peepholes, a GRU, a simple RNN and an LSTM, each of its own size."""
    lstm = random_spec(rng, input_size=5, hidden_size=8, proj_size=6, peepholes=True,
                       direction=directions[0]).layers[0]
    rest = random_stack(rng, ["gru", "rnn", "lstm"], [11, 4, 7], input_size=lstm.num_directions * 6,
                        directions=list(directions[1:]), linear_before_reset=linear_before_reset)
    return ModelSpec((lstm,) + rest.layers).validate()


def flat_inputs(rng, spec, batch, steps, dtype):
    """x (B, T, I) and a random initial state in the flat layout Model passes (1-D h and c)."""
    h_items, c_items = flat_state_sizes(spec, batch)
    return (rng.normal(0, 1, (batch, steps, spec.input_size)).astype(dtype),
            rng.normal(0, 0.5, h_items).astype(dtype), rng.normal(0, 0.5, c_items).astype(dtype))


def check_sequences(spec, dtype, x, h0, c0, lengths=None, num_threads=1):
    expected = reference_run(spec, dtype, x, h0, c0, lengths)
    h, c = h0.copy(), c0.copy()
    got = (NumbaLSTM(spec, dtype, num_threads).run_sequence(x, h, c, lengths), h, c)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, **TOLERANCE[dtype])


def check_stream(spec, dtype, x, h0, c0, num_threads=1):
    """Step by step from (h0, c0): every step's top layer and the final state equal the reference's run."""
    batch = x.shape[0]
    y_ref, h_ref, c_ref = reference_run(spec, dtype, x, h0, c0)
    prepared = NumbaLSTM(spec, dtype, num_threads)
    workspace = prepared.new_workspace(batch)
    h, c = h0.copy(), c0.copy()
    top = h.reshape(-1)[h.size - batch * spec.layers[-1].output_size:].reshape(batch, -1)  # a view of h
    for t in range(x.shape[1]):
        assert prepared.step(np.ascontiguousarray(x[:, t]), h, c, workspace) is None
        np.testing.assert_allclose(top, y_ref[:, t], **TOLERANCE[dtype])
    np.testing.assert_allclose(h, h_ref, **TOLERANCE[dtype])
    np.testing.assert_allclose(c, c_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, kernels.HAND_MATMUL_MAX_ROWS + 5])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("case", list(KIND_CASES))
def test_gru_and_rnn_sequences(dtype, batch, direction, case):
    """Hand loop and BLAS GEMM, every direction, all rows full and ragged lengths, against the reference."""
    rng = np.random.default_rng(batch)
    spec = kind_stack(rng, case, direction)
    x, h0, c0 = flat_inputs(rng, spec, batch, 7, dtype)
    check_sequences(spec, dtype, x, h0, c0)
    check_sequences(spec, dtype, x, h0, c0, rng.integers(1, 8, size=batch))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 2, kernels.HAND_MATMUL_MAX_ROWS + 1])
@pytest.mark.parametrize("case", list(KIND_CASES))
def test_gru_and_rnn_stream_steps(dtype, batch, case):
    """The one-row path (batch 1), the batched hand loop and BLAS GEMM of the stream step."""
    rng = np.random.default_rng(20 + batch)
    spec = kind_stack(rng, case)
    check_stream(spec, dtype, *flat_inputs(rng, spec, batch, 6, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, kernels.HAND_MATMUL_MAX_ROWS + 2])
@pytest.mark.parametrize("linear_before_reset", [True, False])
def test_mixed_stacks_of_kinds_and_sizes(dtype, batch, linear_before_reset):
    """LSTM (projection, peepholes), GRU, RNN and LSTM layers of different sizes in one stack on the flat state:
    sequences with every direction and ragged lengths, and the stream step of the forward stack."""
    rng = np.random.default_rng(30 + batch)
    spec = mixed_stack(rng, ("bidirectional", "reverse", "bidirectional", "forward"), linear_before_reset)
    x, h0, c0 = flat_inputs(rng, spec, batch, 6, dtype)
    check_sequences(spec, dtype, x, h0, c0)
    check_sequences(spec, dtype, x, h0, c0, rng.integers(1, 7, size=batch))
    spec = mixed_stack(rng, linear_before_reset=linear_before_reset)
    check_stream(spec, dtype, *flat_inputs(rng, spec, batch, 6, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["gru", "gru-reset-first", "rnn-tanh"])
def test_blas_gemv_path_for_gru_and_rnn(monkeypatch, dtype, case):
    monkeypatch.setattr(kernels, "BLAS_GEMV_MIN_BYTES", 0)
    rng = np.random.default_rng(40)
    spec = kind_stack(rng, case)
    prepared = NumbaLSTM(spec, dtype, num_threads=2)
    assert not kernels._uses_hand_loop(prepared._cells[0], 1)
    x, h0, c0 = flat_inputs(rng, spec, 1, 5, dtype)
    check_sequences(spec, dtype, x, h0, c0, num_threads=2)
    check_stream(spec, dtype, x, h0, c0, num_threads=2)


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_state_in_pytorch_shape(kind):
    """An equal-sized GRU or RNN stack's state as PyTorch's (layers, B, H) array: the same memory as the flat
    layout, taken as it is (and an empty c)."""
    rng = np.random.default_rng(45)
    spec = random_stack(rng, [kind, kind], [7, 7], input_size=4)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    h0 = rng.normal(0, 0.5, (2, 3, 7)).astype(np.float32)
    c0 = np.zeros((2, 3, 0), np.float32)
    check_sequences(spec, np.float32, x, h0, c0)
    check_stream(spec, np.float32, x, h0, c0)


HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def random_mixed_stacks(draw):
    num_layers = draw(st.integers(1, 3))
    kinds = draw(st.lists(st.sampled_from(CELL_KINDS), min_size=num_layers, max_size=num_layers))
    sizes = draw(st.lists(st.integers(1, 12), min_size=num_layers, max_size=num_layers))
    directions = draw(st.lists(st.sampled_from(["forward", "reverse", "bidirectional"]),
                               min_size=num_layers, max_size=num_layers))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return random_stack(rng, kinds, sizes, input_size=draw(st.integers(1, 6)), directions=directions,
                        linear_before_reset=draw(st.booleans())), rng


@HYPOTHESIS
@given(random_mixed_stacks(), st.integers(1, kernels.HAND_MATMUL_MAX_ROWS + 3), st.integers(1, 5),
       st.sampled_from([np.float32, np.float64]))
def test_random_mixed_stacks_against_the_reference(stack, batch, steps, dtype):
    spec, rng = stack
    assert NumbaLSTM.unsupported(spec) is None
    x, h0, c0 = flat_inputs(rng, spec, batch, steps, dtype)
    check_sequences(spec, dtype, x, h0, c0, rng.integers(1, steps + 1, size=batch))
    if spec.is_unidirectional_forward:
        check_stream(spec, dtype, x, h0, c0)


def test_mixed_stack_streams_equal_predict():
    """Through Model: a stream of a mixed stack with a head, step by step, equals predict on the sequence."""
    rng = np.random.default_rng(50)
    spec = random_stack(rng, ["rnn", "gru", "lstm"], [9, 6, 4], input_size=3, head=[(2, "tanh")],
                        linear_before_reset=False)
    model = fastlstm.Model(spec, backend="numba")
    assert model.backend == "numba"
    x = rng.normal(size=(3, 8, 3)).astype(np.float32)
    expected, final = model.predict(x, return_state=True)
    stream = model.stream(batch_size=3)
    out = np.empty((3, 2), np.float32)
    streamed = np.stack([stream.step(x[:, t], out=out).copy() for t in range(8)], axis=1)
    np.testing.assert_allclose(streamed, expected, **TOLERANCE[np.float32])
    for got, want in zip(stream.state, final):
        np.testing.assert_allclose(np.stack(got) if isinstance(got, tuple) else got,
                                   np.stack(want) if isinstance(want, tuple) else want, **TOLERANCE[np.float32])


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


def test_flat_state_of_the_wrong_size_is_rejected():
    rng = np.random.default_rng(3)
    spec = mixed_stack(rng)
    prepared = NumbaLSTM(spec, np.float32)
    workspace = prepared.new_workspace(2)
    x, h, c = flat_inputs(rng, spec, 2, 3, np.float32)
    for bad_h, bad_c in [(h[:-1], c), (h, c[1:]), (np.zeros(h.size + 1, np.float32), c)]:
        before = (bad_h.copy(), bad_c.copy())
        with pytest.raises(ValueError):
            prepared.step(np.ascontiguousarray(x[:, 0]), bad_h, bad_c, workspace)
        with pytest.raises(ValueError):
            prepared.run_sequence(x, bad_h, bad_c)
        np.testing.assert_array_equal(bad_h, before[0])
        np.testing.assert_array_equal(bad_c, before[1])


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
