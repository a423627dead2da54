"""The dense head inside the compiled kernels: every activation, several layers, the head's input activation,
softmax, every output mode, streams and whole sequences, against the NumPy oracle (``fastlstm.head``).

A compiled stream step runs the recurrent step and the head in one call and writes into the workspace's
output buffer; these tests also hold it to allocating nothing.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

import fastlstm
from fastlstm.activations import ACTIVATION_PARAMS, Activation
from fastlstm.spec import DenseLayer
from random_models import random_spec
from test_backends import COMPILED, assert_close

# Each activation with parameters away from its defaults, where it has any, so a kernel that ignored them
# would fail.
HEAD_ACTIVATIONS = {
    "identity": Activation.of("identity"),
    "sigmoid": Activation.of("sigmoid"),
    "tanh": Activation.of("tanh"),
    "relu": Activation.of("relu"),
    "affine": Activation.of("affine", 0.7, -0.2),
    "leaky_relu": Activation.of("leaky_relu", 0.2),
    "thresholded_relu": Activation.of("thresholded_relu", 0.15),
    "scaled_tanh": Activation.of("scaled_tanh", 1.3, 0.8),
    "hard_sigmoid": Activation.of("hard_sigmoid", 1 / 6, 0.5),
    "elu": Activation.of("elu", 0.6),
    "softsign": Activation.of("softsign"),
    "softplus": Activation.of("softplus"),
    "softmax": Activation.of("softmax"),
}
ELEMENTWISE = [name for name in HEAD_ACTIVATIONS if name != "softmax"]


def test_every_activation_is_covered():
    assert set(HEAD_ACTIVATIONS) == set(ACTIVATION_PARAMS)


def with_head(spec, sizes_and_activations, input_activation="identity", seed=0, bias=True):
    """``spec`` with a head of dense layers (out_features, Activation), each with random weights."""
    rng = np.random.default_rng(seed)
    layers, size = [], spec.recurrent_output_size
    for out, activation in sizes_and_activations:
        layers.append(DenseLayer(rng.normal(0, 0.5, (out, size)), rng.normal(0, 0.5, out) if bias else None,
                                 activation))
        size = out
    act = HEAD_ACTIVATIONS[input_activation]
    return dataclasses.replace(spec, head=tuple(layers), head_input_activation=act).validate()


def check_against_oracle(spec, backend, dtype, x, **options):
    """predict() and (for forward models) a stream of ``backend`` in ``dtype`` against the NumPy oracle in
    float64, with the tolerance widened by the oracle's own float32-vs-float64 drift (as test_backends)."""
    exact = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x, **options)
    own = fastlstm.Model(spec, backend="numpy", dtype=dtype).predict(x, **options)
    model = fastlstm.Model(spec, backend=backend, dtype=dtype)
    got = model.predict(x, **options)
    slack = float(np.max(np.abs(own - exact)))
    assert got.dtype == np.dtype(dtype) and got.shape == exact.shape
    assert_close(got, exact, dtype, slack)
    if spec.is_unidirectional_forward and spec.output == "sequence" and not options:
        stream = model.stream(batch_size=x.shape[0])
        steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
        assert_close(steps, exact, dtype, slack)
    return got


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", list(HEAD_ACTIVATIONS))
def test_each_head_activation_matches_the_oracle(backend, dtype, activation):
    rng = np.random.default_rng(1)
    spec = with_head(random_spec(rng, input_size=5, hidden_size=9), [(6, HEAD_ACTIVATIONS[activation])])
    y = check_against_oracle(spec, backend, dtype, rng.normal(0, 1.5, (3, 8, 5)))
    if activation == "softmax":
        np.testing.assert_allclose(y.sum(axis=-1), 1, rtol=1e-5)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_each_head_input_activation_matches_the_oracle(backend, dtype, activation):
    """``head(act(lstm_out))``, with dense layers after it and with none."""
    rng = np.random.default_rng(2)
    base = random_spec(rng, input_size=4, hidden_size=7, num_layers=2)
    x = rng.normal(0, 1.5, (2, 6, 4))
    check_against_oracle(with_head(base, [(5, HEAD_ACTIVATIONS["tanh"])], activation), backend, dtype, x)
    check_against_oracle(with_head(base, [], activation), backend, dtype, x)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 2, 11])
def test_several_dense_layers(backend, dtype, batch):
    """Four layers of different widths, one without bias, ending in softmax; a wide middle layer takes the
    BLAS product above 8 rows. Batch 11 streams above the hand loop's rows too."""
    rng = np.random.default_rng(3)
    acts = HEAD_ACTIVATIONS
    spec = random_spec(rng, input_size=6, hidden_size=10, num_layers=2)
    spec = with_head(spec, [(40, acts["relu"]), (3, acts["elu"]), (17, acts["sigmoid"]), (12, acts["softmax"])],
                     input_activation="leaky_relu")
    layers = list(spec.head)
    layers[1] = dataclasses.replace(layers[1], bias=None)
    spec = dataclasses.replace(spec, head=tuple(layers)).validate()
    check_against_oracle(spec, backend, dtype, rng.normal(0, 1.0, (batch, 7, 6)))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("output", ["sequence", "last_step", "final_state"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_every_output_mode(backend, dtype, output, direction):
    """The head on the rows each output mode selects, with and without per-sequence lengths."""
    rng = np.random.default_rng(4)
    spec = random_spec(rng, input_size=5, hidden_size=8, direction=direction, output=output)
    spec = with_head(spec, [(9, HEAD_ACTIVATIONS["tanh"]), (4, HEAD_ACTIVATIONS["softmax"])], "relu")
    x = rng.normal(0, 1.0, (4, 9, 5))
    check_against_oracle(spec, backend, dtype, x)
    check_against_oracle(spec, backend, dtype, x, lengths=np.array([9, 3, 0, 6]))
    unbatched = fastlstm.Model(spec, backend=backend, dtype=dtype).predict(x[1])
    assert_close(unbatched, fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x[1]), dtype)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_is_safe_for_large_logits(backend, dtype):
    """Logits in the thousands overflow a naive exp; the kernels subtract each row's maximum first and match
    NumPy's softmax within 1e-6 relative (through an identity dense layer, so the logits are exact). The
    kernels flush denormals to zero: probabilities below the smallest normal number may read 0."""
    spec = random_spec(np.random.default_rng(5), input_size=3, hidden_size=12)
    identity = DenseLayer(np.eye(12), np.zeros(12), HEAD_ACTIVATIONS["softmax"])
    spec = dataclasses.replace(spec, head=(identity,)).validate()
    rng = np.random.default_rng(6)
    for rows in (1, 3, 40):  # the hand loop and BLAS
        logits = (rng.normal(0, 30, (rows, 12)) + rng.choice([-5000.0, 0.0, 3000.0], (rows, 1))).astype(dtype)
        got = fastlstm.Model(spec, backend=backend, dtype=dtype)._lstm.run_head(logits)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        expected = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == "float32" else 1e-13,
                                   atol=np.finfo(dtype).tiny)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 3])
def test_stream_out_path_matches_the_oracle_stream(backend, dtype, batch):
    """``step(x, out=)`` writes the head's output into ``out`` and returns it; unbatched and batched."""
    rng = np.random.default_rng(7)
    spec = with_head(random_spec(rng, input_size=4, hidden_size=6, num_layers=2),
                     [(5, HEAD_ACTIVATIONS["softsign"]), (8, HEAD_ACTIVATIONS["softmax"])], "tanh")
    x = rng.normal(size=(batch, 10, 4))
    oracle = fastlstm.Model(spec, backend="numpy", dtype=dtype).stream(batch)
    stream = fastlstm.Model(spec, backend=backend, dtype=dtype).stream(batch)
    out = np.empty((8,) if batch == 1 else (batch, 8), dtype)
    for t in range(10):
        x_t = x[0, t] if batch == 1 else x[:, t]
        assert stream.step(x_t, out=out) is out
        expected = oracle.step(x_t)
        assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend", COMPILED)
def test_masked_rows_output_the_head_of_their_carried_state(backend):
    """With a mask, the step runs the head on every row; a skipped row's output must be the head of the state
    it carries, as the NumPy oracle gives."""
    rng = np.random.default_rng(8)
    spec = random_spec(rng, input_size=3, hidden_size=5, mask_value=0.0)
    spec = with_head(spec, [(4, HEAD_ACTIVATIONS["relu"]), (3, HEAD_ACTIVATIONS["softmax"])], "tanh")
    x = rng.normal(size=(3, 8, 3))
    x[1, [0, 2, 3]] = 0.0
    x[2, 5] = 0.0
    oracle = fastlstm.Model(spec, backend="numpy").stream(3)
    stream = fastlstm.Model(spec, backend=backend).stream(3)
    for t in range(8):
        expected, got = oracle.step(x[:, t]), stream.step(x[:, t])
        assert_close(got, expected, "float32")
    assert not np.allclose(got[1], got[0])  # rows really differ: the test compares something


@pytest.mark.parametrize("backend", list(fastlstm.backends.BACKENDS))
def test_step_writes_the_workspace_output(backend):
    """The backend contract: ``step`` leaves the model's output in ``workspace.output``, the same array on
    every step (a buffer the stream owns), equal to the head run on the top layer's h."""
    rng = np.random.default_rng(9)
    spec = with_head(random_spec(rng, input_size=4, hidden_size=6, num_layers=2), [(7, HEAD_ACTIVATIONS["relu"])])
    prepared = fastlstm.Model(spec, backend=backend)._lstm
    workspace = prepared.new_workspace(2)
    output = workspace.output
    assert output.shape == (2, 7) and output.dtype == np.float32
    h = np.zeros(2 * 12, np.float32)
    c = np.zeros(2 * 12, np.float32)
    for _ in range(3):
        prepared.step(rng.normal(size=(2, 4)).astype(np.float32), h, c, workspace)
        assert workspace.output is output
        top = np.ascontiguousarray(h[2 * 6:].reshape(2, 6))
        np.testing.assert_allclose(output, prepared.run_head(top), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(output, fastlstm.Model(spec, backend="numpy")._lstm.run_head(top),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("with_out", [True, False])
def test_a_stream_step_allocates_nothing_in_the_head(backend, with_out):
    """1000 steps of a model whose head has a 4096-wide layer: a head that allocated its intermediate output
    would take 16 KiB per step. With ``out=`` the step allocates nothing that outlives it; without, only the
    returned copies."""
    rng = np.random.default_rng(10)
    spec = with_head(random_spec(rng, input_size=4, hidden_size=8),
                     [(4096, HEAD_ACTIVATIONS["relu"]), (4, HEAD_ACTIVATIONS["softmax"])])
    stream = fastlstm.Model(spec, backend=backend).stream()
    x = rng.normal(size=4).astype(np.float32)
    out = np.empty(4, np.float32)
    for _ in range(10):  # compiled and warm before measuring
        stream.step(x, out=out)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(1000):
            y = stream.step(x, out=out) if with_out else stream.step(x)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 2048, f"a step allocated {peak - before} bytes at its peak"
    assert current - before < 1024
    assert y.shape == (4,)


def test_a_large_head_counts_towards_releasing_the_gil():
    """A small LSTM under a large head: the step reads mostly the head's weights, and releases the GIL for them."""
    from fastlstm.backends.numba_backend import NumbaLSTM, step_releases_gil

    rng = np.random.default_rng(11)
    small = random_spec(rng, input_size=4, hidden_size=8)
    prepared = NumbaLSTM(with_head(small, [(8192, HEAD_ACTIVATIONS["relu"]), (4, HEAD_ACTIVATIONS["identity"])]),
                         np.float32)
    assert step_releases_gil(prepared._plans, prepared._head_stages, 1)
    assert not step_releases_gil(prepared._plans, (), 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_threaded_cython_step_runs_the_head(batch):
    """A stream step split over two threads (by hidden units at batch 1, by rows above) runs the head after
    the threads have met, on the whole new h."""
    rng = np.random.default_rng(12)
    spec = with_head(random_spec(rng, input_size=128, hidden_size=256, scale=0.05),
                     [(32, HEAD_ACTIVATIONS["tanh"]), (10, HEAD_ACTIVATIONS["softmax"])], "relu")
    model = fastlstm.Model(spec, backend="cython", num_threads=2)
    stream = model.stream(batch)
    assert stream._workspace.threads == 2
    oracle = fastlstm.Model(spec, backend="numpy").stream(batch)
    x = rng.normal(size=(batch, 6, 128))
    for t in range(6):
        assert_close(stream.step(x[:, t]), oracle.step(x[:, t]), "float32")
