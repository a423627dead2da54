# The dense head in compiled code: what the kernels know of each stage (HeadStage, filled by LSTMKernels from
# the arrays of cython_backend.pack_head_for_extension) and the loop that runs the stages over rows of
# features. Inline, cimported by _cykernels.pyx: no module of its own at run time.

from cython cimport floating
from libc.math cimport exp, expf
from libc.string cimport memcpy

from activations cimport ACT_IDENTITY, ACT_RELU, ACT_SIGMOID, ACT_SOFTMAX, ACT_TANH, activation, sigmoid, tanh_
from blas cimport matmul_nt

cdef struct HeadStage:
    const void* weight     # (out_features, in_features) row-major, or NULL: the head's input activation alone
    const void* bias       # (out_features,), or NULL
    Py_ssize_t in_features, out_features
    int code               # activation code (ACT_SOFTMAX: over each row)
    double alpha, beta


cdef inline void softmax_rows(floating* y, Py_ssize_t rows, Py_ssize_t n) noexcept nogil:
    """Each row of y (rows, n) replaced by its softmax: exp(y - max(y)) / sum, so exp never overflows."""
    cdef Py_ssize_t r, j
    cdef floating top, total, e
    cdef floating* row
    for r in range(rows):
        row = y + r * n
        top = row[0]
        for j in range(1, n):
            top = row[j] if row[j] > top else top
        total = 0
        for j in range(n):
            if floating is float:
                e = expf(row[j] - top)
            else:
                e = exp(row[j] - top)
            row[j] = e
            total += e
        for j in range(n):
            row[j] = row[j] / total


cdef inline void activate(floating* y, Py_ssize_t n, int code, floating alpha, floating beta) noexcept nogil:
    """y[:n] = activation ``code`` of y, elementwise. The common head activations get loops of their own,
    which gcc vectorises; the switch of ``activation`` inside one loop would keep it scalar."""
    cdef Py_ssize_t j
    if code == ACT_IDENTITY:
        return
    if code == ACT_RELU:
        for j in range(n):
            y[j] = 0 if y[j] < 0 else y[j]
    elif code == ACT_TANH:
        for j in range(n):
            y[j] = tanh_(y[j])
    elif code == ACT_SIGMOID:
        for j in range(n):
            y[j] = sigmoid(y[j])
    else:
        for j in range(n):
            y[j] = activation(y[j], code, alpha, beta)


cdef inline void run_head(const HeadStage* stages, Py_ssize_t num_stages, Py_ssize_t rows, const floating* x,
                          Py_ssize_t in_features, floating* y, floating* scratch,
                          Py_ssize_t scratch_items, bint use_blas) noexcept nogil:
    """y (rows, O) = the head's stages, in order, over x (rows, in_features); both C-contiguous.

    Intermediate stages alternate between the two halves of ``scratch`` (2 * scratch_items items, each half
    at least rows times the widest intermediate stage); the last stage writes y. Without stages, y = x.
    Products of up to HAND_MATMUL_MAX_ROWS rows run in the hand loop, larger ones in BLAS (``matmul_nt``) if
    ``use_blas``, so never call it with more rows and ``use_blas`` inside the threads of lstm_parallel.h.
    """
    cdef Py_ssize_t n, r, j, out
    cdef const HeadStage* stage
    cdef const floating* source = x
    cdef const floating* bias
    cdef floating* target
    if num_stages == 0:
        memcpy(y, x, rows * in_features * sizeof(floating))
        return
    for n in range(num_stages):
        stage = &stages[n]
        out = stage.out_features
        target = y if n == num_stages - 1 else scratch + (n % 2) * scratch_items
        if stage.weight == NULL:
            memcpy(target, source, rows * out * sizeof(floating))
        else:
            matmul_nt(rows, out, <const floating*>stage.weight, stage.in_features, source, stage.in_features,
                      stage.in_features, target, out, use_blas)
            if stage.bias != NULL:
                bias = <const floating*>stage.bias
                for r in range(rows):
                    for j in range(out):
                        target[r * out + j] += bias[j]
        if stage.code == ACT_SOFTMAX:
            softmax_rows(target, rows, out)
        else:
            activate(target, rows * out, stage.code, <floating>stage.alpha, <floating>stage.beta)
        source = target
