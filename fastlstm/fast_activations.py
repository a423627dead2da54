"""Vectorisable float32 sigmoid and tanh: the rational approximation the compiled kernels use.

Scalar ``expf``/``tanhf`` calls do not vectorise and cost more than the matrix product at small hidden
sizes. A rational function (odd degree-13 numerator over even degree-6 denominator, the form used by
Eigen's float tanh) is only multiplies, adds and one divide, which compilers turn into AVX2/FMA code:

    tanh(x) ~= x * P(x^2) / Q(x^2)   for |x| <= TANH_CLAMP, with x clamped to that range first
    sigmoid(x) = 0.5 * tanh(x / 2) + 0.5       (an identity, not an approximation)

Error bound, measured in float32 arithmetic over [-20, 20] in steps of 1e-5 against float64 tanh and
sigmoid, and asserted by tests/test_fast_activations.py: |error| <= 4e-7 for tanh and <= 2.5e-7 for sigmoid
(a few float32 ulps near +-1). Float64 models use the exact functions.

The coefficients live here once. The Numba kernels read these constants; the Cython kernels repeat them as
C constants because C cannot take values from a Python module at compile time; a test checks both agree.
"""

from __future__ import annotations

import numpy as np

TANH_CLAMP = 7.90531110763549805
# numerator x * (N0 + N1 x^2 + ... + N6 x^12)
TANH_NUMERATOR = (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16,
)
# denominator D0 + D1 x^2 + D2 x^4 + D3 x^6
TANH_DENOMINATOR = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)

TANH_MAX_ABS_ERROR = 4e-7
SIGMOID_MAX_ABS_ERROR = 2.5e-7


def tanh_approx(x: np.ndarray) -> np.ndarray:
    """NumPy evaluation of the approximation in float32, operation for operation as the kernels do it."""
    f32 = np.float32
    x = np.clip(np.asarray(x, dtype=f32), f32(-TANH_CLAMP), f32(TANH_CLAMP))
    x2 = x * x
    p = np.full_like(x, f32(TANH_NUMERATOR[-1]))
    for coefficient in TANH_NUMERATOR[-2::-1]:
        p = p * x2 + f32(coefficient)
    q = np.full_like(x, f32(TANH_DENOMINATOR[-1]))
    for coefficient in TANH_DENOMINATOR[-2::-1]:
        q = q * x2 + f32(coefficient)
    return x * p / q


def sigmoid_approx(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    return f32(0.5) * tanh_approx(f32(0.5) * np.asarray(x, dtype=f32)) + f32(0.5)
