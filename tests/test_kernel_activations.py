"""Each compiled backend's activation switch (and its float32 fast tanh/sigmoid) against the reference.

One test per property, run over every compiled backend's scalar evaluator, so the two kernels are held to
the same definitions (``fastlstm.activations``) and the same error bound (``fastlstm.fast_activations``).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastlstm import fast_activations
from fastlstm.activations import ELEMENTWISE, SIGMOID, TANH, Activation, apply_activation


def cython_evaluator():
    cy = pytest.importorskip("fastlstm.backends._cykernels", reason="the Cython extension is not built")
    return lambda x, act: cy.activation_array(x, act.code, act.alpha, act.beta)


def numba_evaluator():
    kernels = pytest.importorskip("fastlstm.backends._numba_kernels")
    return lambda x, act: kernels.apply_activation(x, act.code, act.alpha, act.beta)


@pytest.fixture(params=["cython", "numba"])
def evaluate(request):
    return {"cython": cython_evaluator, "numba": numba_evaluator}[request.param]()


ELEMENTWISE_CASES = [Activation.of(name) for name in sorted(ELEMENTWISE)] + [
    Activation.of("affine", 0.5, -0.25), Activation.of("leaky_relu", 0.3), Activation.of("thresholded_relu", 0.5),
    Activation.of("scaled_tanh", 1.7, 0.6), Activation.of("hard_sigmoid", 1 / 6, 0.5), Activation.of("elu", 0.7),
]


def test_fast_tanh_and_sigmoid_within_documented_bound(evaluate):
    x = np.arange(-20.0, 20.0, 1e-4).astype(np.float32)
    exact = x.astype(np.float64)
    tanh_error = np.abs(evaluate(x, TANH).astype(np.float64) - np.tanh(exact))
    sigmoid_error = np.abs(evaluate(x, SIGMOID).astype(np.float64) - 1 / (1 + np.exp(-exact)))
    assert tanh_error.max() <= fast_activations.TANH_MAX_ABS_ERROR
    assert sigmoid_error.max() <= fast_activations.SIGMOID_MAX_ABS_ERROR


def test_fast_tanh_special_values(evaluate):
    out = evaluate(np.float32([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30]), TANH)
    assert np.isnan(out[0])
    np.testing.assert_array_equal(out[1:], np.float32([1, -1, 0, 1, -1]))
    sig = evaluate(np.float32([np.nan, np.inf, -np.inf]), SIGMOID)
    assert np.isnan(sig[0]) and sig[1] == 1 and sig[2] == 0


@pytest.mark.parametrize("act", ELEMENTWISE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_switch_matches_reference(evaluate, act, dtype):
    x = np.concatenate([np.linspace(-30, 30, 6001), [0.0, -0.0, 1e-3, -1e-3]]).astype(dtype)
    got = evaluate(x, act)
    assert got.dtype == dtype
    # float32 sigmoid/tanh-based functions differ from the exact ones by the approximation's bound.
    atol = 5e-7 * max(1.0, abs(act.alpha)) if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(got, apply_activation(act, x), rtol=1e-6 if dtype == np.float32 else 1e-14, atol=atol)
