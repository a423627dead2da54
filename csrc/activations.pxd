# The kernels' scalar maths: the float32 rational tanh (constants of fastlstm/fast_activations.py), sigmoid,
# clamp, and the activation switch over the codes of fastlstm.activations. All inline, cimported by
# _cykernels.pyx: no module of its own at run time.

from cython cimport floating
from libc.math cimport NAN, exp, expm1, fabs, log1p, tanh

cdef extern from *:
    """
    /* The rational tanh of fastlstm/fast_activations.py, repeated here because C cannot read the Python
       module's constants at compile time; tests/test_cython_kernels.py checks both copies agree.
       tanh(x) ~= x * N(x^2) / D(x^2) for |x| <= CLAMP (x clamped first). */
    #define FASTLSTM_TANH_CLAMP 7.90531110763549805
    #define FASTLSTM_TANH_N0 4.89352455891786e-03
    #define FASTLSTM_TANH_N1 6.37261928875436e-04
    #define FASTLSTM_TANH_N2 1.48572235717979e-05
    #define FASTLSTM_TANH_N3 5.12229709037114e-08
    #define FASTLSTM_TANH_N4 -8.60467152213735e-11
    #define FASTLSTM_TANH_N5 2.00018790482477e-13
    #define FASTLSTM_TANH_N6 -2.76076847742355e-16
    #define FASTLSTM_TANH_D0 4.89352518554385e-03
    #define FASTLSTM_TANH_D1 2.26843463243900e-03
    #define FASTLSTM_TANH_D2 1.18534705686654e-04
    #define FASTLSTM_TANH_D3 1.19825839466702e-06
    """
    const double TANH_CLAMP_C "FASTLSTM_TANH_CLAMP"
    const double N0 "FASTLSTM_TANH_N0"
    const double N1 "FASTLSTM_TANH_N1"
    const double N2 "FASTLSTM_TANH_N2"
    const double N3 "FASTLSTM_TANH_N3"
    const double N4 "FASTLSTM_TANH_N4"
    const double N5 "FASTLSTM_TANH_N5"
    const double N6 "FASTLSTM_TANH_N6"
    const double D0 "FASTLSTM_TANH_D0"
    const double D1 "FASTLSTM_TANH_D1"
    const double D2 "FASTLSTM_TANH_D2"
    const double D3 "FASTLSTM_TANH_D3"

# Activation codes, in the order of fastlstm.activations.ACTIVATION_PARAMS (``Activation.code``, which the
# planner hands over; tests/test_cython_kernels.py checks the two agree through ``activation_array``).
cdef enum ActivationCode:
    ACT_IDENTITY = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_RELU = 3
    ACT_AFFINE = 4
    ACT_LEAKY_RELU = 5
    ACT_THRESHOLDED_RELU = 6
    ACT_SCALED_TANH = 7
    ACT_HARD_SIGMOID = 8
    ACT_ELU = 9
    ACT_SOFTSIGN = 10
    ACT_SOFTPLUS = 11
    ACT_SOFTMAX = 12     # over a whole row, in a dense head only: head.pxd applies it, never ``activation``

# ------------------------------------------------------------------------------------------------------
# Scalar maths. Every clamp is written so that a NaN passes through unchanged.

cdef inline float fast_tanh(float x) noexcept nogil:
    """tanh(x) by the rational approximation of fastlstm.fast_activations (|error| <= 4e-7)."""
    cdef float clamp = <float>TANH_CLAMP_C
    x = clamp if x > clamp else x
    x = -clamp if x < -clamp else x
    cdef float x2 = x * x
    cdef float p = <float>N6
    p = p * x2 + <float>N5
    p = p * x2 + <float>N4
    p = p * x2 + <float>N3
    p = p * x2 + <float>N2
    p = p * x2 + <float>N1
    p = p * x2 + <float>N0
    cdef float q = <float>D3
    q = q * x2 + <float>D2
    q = q * x2 + <float>D1
    q = q * x2 + <float>D0
    return x * p / q


cdef inline floating tanh_(floating x) noexcept nogil:
    """tanh: the rational approximation in float32, the exact function in float64."""
    if floating is float:
        return fast_tanh(x)
    else:
        return tanh(x)


cdef inline floating sigmoid(floating x) noexcept nogil:
    """1 / (1 + exp(-x)): 0.5 * tanh(x / 2) + 0.5 (an identity) in float32, the exact form in float64."""
    cdef float half = 0.5  # a float constant: a bare 0.5 would promote the float32 arithmetic to double
    if floating is float:
        return half * fast_tanh(half * x) + half
    else:
        return 1.0 / (1.0 + exp(-x))  # exp overflowing to inf for x < -709 gives the right limit, 0


cdef inline floating clamp(floating x, floating bound) noexcept nogil:
    """x limited to [-bound, bound] (bound = inf for no clip)."""
    x = bound if x > bound else x
    return -bound if x < -bound else x


cdef inline floating activation(floating x, int code, floating alpha, floating beta) noexcept nogil:
    """The activation ``code`` of fastlstm.activations at x (formulas in ACTIVATION_PARAMS' comment).

    The Numba backend repeats this switch (``_numba_kernels``): C and Numba cannot share code; both are
    held to the NumPy definitions by tests/test_kernel_activations.py.
    """
    cdef floating y
    if code == ACT_SIGMOID:
        return sigmoid(x)
    if code == ACT_TANH:
        return tanh_(x)
    if code == ACT_IDENTITY:
        return x
    if code == ACT_RELU:
        return 0 if x < 0 else x
    if code == ACT_AFFINE:
        return alpha * x + beta
    if code == ACT_LEAKY_RELU:
        return x if x >= 0 else alpha * x
    if code == ACT_THRESHOLDED_RELU:
        return x if x > alpha else 0
    if code == ACT_SCALED_TANH:
        return alpha * tanh_(beta * x)
    if code == ACT_HARD_SIGMOID:
        y = alpha * x + beta
        y = 0 if y < 0 else y
        return 1 if y > 1 else y
    if code == ACT_ELU:
        return x if x >= 0 else alpha * <floating>expm1(x)
    if code == ACT_SOFTSIGN:
        return x / (1 + fabs(x))
    if code == ACT_SOFTPLUS:  # log(1 + e^x) = max(x, 0) + log1p(e^-|x|), never overflowing
        return (x if x > 0 else 0) + <floating>log1p(exp(-fabs(x)))
    return <floating>NAN  # unknown code: rejected at construction, never reached


