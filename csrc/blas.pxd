# A thin typed layer over SciPy's BLAS (row-major handled here) and the hand-written GEMV, for float and
# double. All inline, cimported by _cykernels.pyx: no module of its own at run time.

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

cdef inline void gemm_nt(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
                         const floating* b, Py_ssize_t ldb, floating beta, floating* c,
                         Py_ssize_t ldc) noexcept nogil:
    """Row-major C (m, n) = A (m, k) @ B (n, k).T + beta * C."""
    # Column-major BLAS sees the row-major C as C.T (n, m) = B @ A.T: B's buffer is B.T column-major
    # (hence 'T'), A's buffer is A.T column-major (hence 'N').
    cdef char trans_b = b'T'
    cdef char trans_a = b'N'
    cdef int m_ = <int>n, n_ = <int>m, k_ = <int>k, lda_ = <int>ldb, ldb_ = <int>lda, ldc_ = <int>ldc
    cdef floating one = 1
    if floating is float:
        sgemm(&trans_b, &trans_a, &m_, &n_, &k_, &one, <float*>b, &lda_, <float*>a, &ldb_, &beta, c, &ldc_)
    else:
        dgemm(&trans_b, &trans_a, &m_, &n_, &k_, &one, <double*>b, &lda_, <double*>a, &ldb_, &beta, c, &ldc_)


cdef inline void gemv_n(Py_ssize_t m, Py_ssize_t k, const floating* a, Py_ssize_t lda, const floating* x,
                        floating beta, floating* y) noexcept nogil:
    """Row-major y (m,) = A (m, k) @ x + beta * y."""
    # A's buffer is A.T column-major (k, m): y = (A.T).T @ x.
    cdef char trans = b'T'
    cdef int m_ = <int>k, n_ = <int>m, lda_ = <int>lda, inc = 1
    cdef floating one = 1
    if floating is float:
        sgemv(&trans, &m_, &n_, &one, <float*>a, &lda_, <float*>x, &inc, &beta, y, &inc)
    else:
        dgemv(&trans, &m_, &n_, &one, <double*>a, &lda_, <double*>x, &inc, &beta, y, &inc)


cdef inline void dot_rows(const floating* a, Py_ssize_t lda, Py_ssize_t rows, const floating* x,
                          Py_ssize_t ldx, Py_ssize_t batch, Py_ssize_t n, floating* y,
                          Py_ssize_t ldy) noexcept nogil:
    """y[b, r] = a[r, :n] . x[b, :n] for r < rows, b < batch.

    Four rows at a time share each load of x: four independent sums that gcc turns into four vector FMA
    chains (the build allows it to reassociate the sums, see setup.py), added across lanes once per row.
    Each group of four rows is taken by every batch row in turn, so its weights come from memory once and
    from L1 for the other batch rows.
    """
    cdef floating s0, s1, s2, s3, xv
    cdef const floating* r0
    cdef const floating* r1
    cdef const floating* r2
    cdef const floating* r3
    cdef const floating* xb
    cdef Py_ssize_t r = 0, b, k
    while r + 4 <= rows:
        r0 = a + r * lda
        r1 = r0 + lda
        r2 = r1 + lda
        r3 = r2 + lda
        for b in range(batch):
            xb = x + b * ldx
            s0 = s1 = s2 = s3 = 0
            for k in range(n):
                xv = xb[k]
                s0 += r0[k] * xv
                s1 += r1[k] * xv
                s2 += r2[k] * xv
                s3 += r3[k] * xv
            y[b * ldy + r] = s0
            y[b * ldy + r + 1] = s1
            y[b * ldy + r + 2] = s2
            y[b * ldy + r + 3] = s3
        r += 4
    while r < rows:  # a projection size that is not a multiple of 4
        r0 = a + r * lda
        for b in range(batch):
            xb = x + b * ldx
            s0 = 0
            for k in range(n):
                s0 += r0[k] * xb[k]
            y[b * ldy + r] = s0
        r += 1


# When the hand-written loop beats BLAS in matmul_nt (float64 products and projections; float32 gate products
# take the tiles from PACKED_MIN_BATCH rows), where BLAS may run at all (``use_blas``: BLAS runs on as many
# threads as it is configured for, so a call that must keep to fewer threads takes the hand loop whatever
# the size). Medians over whole sequences, one or two OpenBLAS threads:
# * at batch 1 it is as fast as OpenBLAS gemv or faster (by 0-12%) on one thread at every size measured;
#   from about 2 MiB of weights OpenBLAS splits its gemv over threads and wins with two cores (1.8x at
#   2 MiB), so larger matrices go to BLAS;
# * at batches 2 to 8 OpenBLAS sgemm re-packs the whole weight matrix on every call, which the hand loop
#   does not: up to 2.5x faster (H >= 128 from batch 4, H >= 256 from batch 2), at worst 5-25% slower
#   (batch 2 to 4 at H <= 128); from batch 16 on, GEMM's register blocking wins (1.3-1.5x at batch 64).
cdef enum:
    BLAS_GEMV_MIN_BYTES = 2 * 1024 * 1024
    HAND_MATMUL_MAX_ROWS = 8

cdef inline void matmul_nt(Py_ssize_t batch, Py_ssize_t rows, const floating* a, Py_ssize_t lda,
                           const floating* x, Py_ssize_t ldx, Py_ssize_t n, floating* y,
                           Py_ssize_t ldy, bint use_blas) noexcept nogil:
    """Row-major y (batch, rows) = x (batch, n) @ A (rows, n).T: hand loop or BLAS, whichever is faster;
    the hand loop alone unless ``use_blas``."""
    if batch == 1:
        if not use_blas or rows * n * <Py_ssize_t>sizeof(floating) < BLAS_GEMV_MIN_BYTES:
            dot_rows(a, lda, rows, x, ldx, 1, n, y, ldy)  # a constant batch: gcc drops the batch loop
        else:
            gemv_n(rows, n, a, lda, x, 0, y)
    elif batch <= HAND_MATMUL_MAX_ROWS or not use_blas:
        dot_rows(a, lda, rows, x, ldx, batch, n, y, ldy)
    else:
        gemm_nt(batch, rows, n, x, ldx, a, lda, 0, y, ldy)
