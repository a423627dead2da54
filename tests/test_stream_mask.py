"""A stream of a model with a Keras ``Masking`` layer skips masked steps as Keras does."""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastlstm

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_masked_steps_in_a_stream_carry_state_and_repeat_the_output(backend):
    L = keras.layers
    model = keras.Sequential([keras.Input((None, 3)), L.Masking(0.0), L.LSTM(4, return_sequences=True),
                              L.Dense(2, activation="tanh")])
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    x = rng.normal(size=(2, 7, 3)).astype(np.float32)
    x[0, [0, 3, 4]] = 0.0  # masked steps at the start and in the middle of row 0
    x[1, [2, 6]] = 0.0
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    stream = fastlstm.load(model, backend=backend).stream(batch_size=2)
    streamed = np.stack([stream.step(x[:, t]) for t in range(7)], axis=1)
    assert np.max(np.abs(streamed - expected)) <= 1e-5
    # A masked step changes nothing: the state after it is the state before it.
    before = stream.state
    stream.step(np.zeros((2, 3)))
    np.testing.assert_array_equal(stream.state[0], before[0])
    np.testing.assert_array_equal(stream.state[1], before[1])
