"""The float32 rational tanh/sigmoid approximation stays within its documented error bound."""

from __future__ import annotations

import numpy as np

from fastlstm import fast_activations as fa


def test_tanh_and_sigmoid_within_bound_on_dense_grid():
    x = np.linspace(-20, 20, 2_000_001, dtype=np.float32)
    exact = np.tanh(x.astype(np.float64))
    assert np.max(np.abs(fa.tanh_approx(x) - exact)) <= fa.TANH_MAX_ABS_ERROR
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.max(np.abs(fa.sigmoid_approx(x) - sigmoid)) <= fa.SIGMOID_MAX_ABS_ERROR


def test_limits_and_special_values():
    big = np.array([-1e30, -50, 50, 1e30, np.inf, -np.inf], dtype=np.float32)
    np.testing.assert_allclose(fa.tanh_approx(big), np.sign(big), atol=fa.TANH_MAX_ABS_ERROR)
    assert fa.tanh_approx(np.float32(0.0)) == 0.0
    assert np.isnan(fa.tanh_approx(np.float32(np.nan)))
    # Odd symmetry holds exactly: the numerator is odd and the denominator even.
    x = np.linspace(0, 9, 1001, dtype=np.float32)
    np.testing.assert_array_equal(fa.tanh_approx(-x), -fa.tanh_approx(x))
