"""Compiled recurrent kernels (LSTM, GRU, simple RNN): the stacked streaming step and whole sequences, in
float32 and float64.

Everything here works in ``float`` and ``double`` through Cython's fused ``floating`` type, without the GIL,
on weights packed once by ``LSTMKernels``. The only BLAS is SciPy's (``scipy.linalg.cython_blas``); there is
no BLAS of our own to link.

Weight layout (per direction of each layer), packed once in Python by ``cython_backend.pack_for_extension``
from the planner's cells and handed over as arrays and numbers (this module reads nothing of the spec):

* ``weights`` is ``(G*H, K)`` row-major (G gates: 4 for an LSTM, 3 for a GRU, 1 for a simple RNN), gates in
  the spec's order (i, f, g, o; r, z, n), each row ``[w_ih | 0 | w_hh | 0]``: the input block padded from I
  to ``I_pad`` and the recurrent block from R to ``R_pad``, both multiples of one 64-byte vector (16 floats,
  8 doubles), so ``K = I_pad + R_pad``. The step of a stream multiplies it with the scratch vector
  ``[x | 0 | h | 0]`` in one pass over all gates (a GRU takes the two blocks in two passes: its candidate
  keeps the input and recurrent parts apart); whole sequences use the ``w_ih`` block for one GEMM over all
  time steps and the ``w_hh`` block per step. BLAS reads the blocks in place (leading dimension K). The
  padding puts every row and block on a 64-byte boundary, so the hand-written loops run whole aligned
  vectors and never a scalar tail; the zeros add nothing to a sum.
* ``packed`` (float32 only) is ``weights`` again as panels of 32 gate rows stored k-major (layout in
  lstm_parallel.h), which the float32 products of 2 rows or more stream instead of BLAS: BLAS would pack
  the weights anew on every call of a time loop. A GRU with the reset first has its candidate rows as
  panels of their own too (``candidate_packed``): they multiply r * h', apart from the other rows.
* ``narrow_weights`` (float32 cells with 8- or 16-bit weights, fastlstm.quantize) is ``weights`` again in
  bfloat16 (uint16) or int8, same layout, with ``scales`` (2, G*H) for int8: each row's scale of its input
  block, then of its recurrent block. Every product at batch 1 and in the hand loop (stream steps, the
  time loops of whole sequences, the threaded split by hidden units) reads them, widened to float32 as they
  load (csrc/narrow_weights.h): those products stream the weights from memory on every step, and that is
  what shrinks. ``weights`` and ``packed`` then hold the float32 values they represent, exactly, for the
  products of 2 rows or more and the input projection of whole sequences (GEMM tiles, bound by arithmetic,
  not bytes).
* ``projection`` (LSTMP) is ``w_hr`` ``(P, H_pad)`` with each row zero-padded the same way.
* ``candidate_bias`` (GRU) is ``b_hn`` ``(H,)``.
* the dense head (``cython_backend.pack_head_for_extension``) is one entry per stage: the head's input
  activation (no weight), then each dense layer's ``weight`` ``(out, in)`` as the spec holds it, its ``bias``
  and activation (head.pxd runs them). A stream step runs it on the top layer's new h into the workspace's
  ``output``; ``run_head`` runs it over whole sequences' selected outputs.

A pre-activation vector ``z`` is ``(G*H,)`` in gate order; the pointwise kernels add the bias or the
precomputed input projection to it, apply the activations and update the state.

The state is the flat ``h`` and ``c`` of fastlstm.backends.base: per cell a ``(B, R)`` block of h and a
``(B, H)`` block of c (none for a GRU or RNN), cell after cell; each cell knows where its blocks start.

Threads (at most ``num_threads``, from the pool of lstm_parallel.h): a time loop runs as one job over the
whole sequence (or stack step). At batch 1 each thread owns a block of hidden units, all gates of them,
so its slice of the weights stays in its own cache from step to step, and the threads meet once per step
(once per layer in a stream step; a GRU with the reset before the linear map meets once more, for r * h');
above batch 1 each thread runs its own rows' whole loop and they never meet. BLAS is never called inside
a thread: it may start threads of its own.
"""

from cython cimport floating
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cimport numpy as cnp

from activations cimport D0, D1, D2, D3, N0, N1, N2, N3, N4, N5, N6, TANH_CLAMP_C, activation, fast_tanh, sigmoid
from blas cimport HAND_MATMUL_MAX_ROWS, dot_rows, gemm_nt, matmul_nt
from head cimport HeadStage, run_head
from cell cimport (CELL_GRU, CELL_GRU_RESET_FIRST, CELL_LSTM, CELL_RNN, WEIGHTS_BFLOAT16, WEIGHTS_FLOAT, WEIGHTS_INT8,
                   CellDesc, gru_reset_gates, pointwise,
                   pointwise_gru_general, pointwise_gru_reset_first, pointwise_gru_standard, pointwise_lstm_general,
                   pointwise_lstm_standard, pointwise_rnn_general, pointwise_rnn_standard)

import numpy as np

from fastlstm.backends._cells import ALIGN_BYTES as _PACKER_ALIGN_BYTES
from fastlstm.backends._cells import aligned_zeros
from fastlstm.backends.blas_threads import available_cores, thread_query_address

cnp.import_array()


# ------------------------------------------------------------------------------------------------------
# Constants shared with the Python side, and the floating-point mode of the kernels.

cdef extern from *:
    """
    /* Denormals flushed to zero (FTZ, MXCSR bit 15) and read as zero (DAZ, bit 6) while a kernel runs:
       a decaying state that reaches the denormal range would otherwise slow every operation on it
       by ~100x. The caller's mode is restored on exit. Other architectures keep their default mode. */
    #if defined(__SSE2__) || defined(_M_X64)
    #include <xmmintrin.h>
    static inline unsigned int fastlstm_flush_denormals(void) {
        unsigned int saved = _mm_getcsr();
        _mm_setcsr(saved | 0x8040u);
        return saved;
    }
    static inline void fastlstm_restore_fp_mode(unsigned int saved) { _mm_setcsr(saved); }
    static inline unsigned int fastlstm_fp_mode(void) { return _mm_getcsr(); }
    #define FASTLSTM_FLUSHES_DENORMALS 1
    #else
    static inline unsigned int fastlstm_flush_denormals(void) { return 0; }
    static inline void fastlstm_restore_fp_mode(unsigned int saved) { (void)saved; }
    static inline unsigned int fastlstm_fp_mode(void) { return 0; }
    #define FASTLSTM_FLUSHES_DENORMALS 0
    #endif
    """
    const bint FLUSHES_DENORMALS_C "FASTLSTM_FLUSHES_DENORMALS"
    unsigned int flush_denormals "fastlstm_flush_denormals"() noexcept nogil
    void restore_fp_mode "fastlstm_restore_fp_mode"(unsigned int saved) noexcept nogil
    unsigned int current_fp_mode "fastlstm_fp_mode"() noexcept nogil

cdef extern from "narrow_weights.h" nogil:
    void dot_rows_int8 "fastlstm_dot_rows_int8"(
        const signed char* q, long ldq, long rows, const float* scale_in, const float* scale_rec, long split,
        const float* x, long ldx, long batch, long n, float* y, long ldy)
    void dot_rows_bf16 "fastlstm_dot_rows_bf16"(
        const unsigned short* w, long ldw, long rows, const float* x, long ldx, long batch, long n, float* y,
        long ldy)

cdef extern from "lstm_parallel.h" nogil:
    ctypedef struct Barrier "fastlstm_barrier":
        pass
    void barrier_init "fastlstm_barrier_init"(Barrier* barrier)
    void barrier_wait "fastlstm_barrier_wait"(Barrier* barrier, int team, int* local_sense)
    ctypedef void (*ParallelJob "fastlstm_job")(void* arg, int part, int parts) noexcept nogil
    void run_parallel "fastlstm_run_parallel"(ParallelJob job, void* arg, int parts)
    void packed_gemm "fastlstm_packed_gemm"(
        long rows, long cols, long k, const float* x, long ldx, const float* packed, long packed_k,
        long k_offset, const float* bias, float* y, long ldy)
    const int PANEL_COLUMNS "FASTLSTM_PANEL"
    const int TILE_ROWS "FASTLSTM_TILE_ROWS"

TANH_CLAMP = TANH_CLAMP_C
TANH_NUMERATOR = (N0, N1, N2, N3, N4, N5, N6)
TANH_DENOMINATOR = (D0, D1, D2, D3)
FLUSHES_DENORMALS = bool(FLUSHES_DENORMALS_C)
PANEL_ROWS = PANEL_COLUMNS  # gate rows per panel of the float32 ``packed`` layout (lstm_parallel.h)

# Row padding unit of the packed weights and scratch vectors: one 64-byte vector (a cache line); the
# Python packer pads with fastlstm.backends._cells.ALIGN_BYTES, which must be the same (checked at import).
cdef enum:
    VECTOR_BYTES = 64
ALIGN_BYTES = VECTOR_BYTES
if _PACKER_ALIGN_BYTES != VECTOR_BYTES:
    raise ImportError(f"fastlstm.backends._cells.ALIGN_BYTES ({_PACKER_ALIGN_BYTES}) differs from the extension's "
                      f"VECTOR_BYTES ({VECTOR_BYTES}): rebuild the extension")

# BLAS's thread count, asked before every call that could go to BLAS (fastlstm.backends.blas_threads): BLAS
# runs only where it takes one thread, the hand loops everywhere else. One thread, not "no more than the
# model's num_threads": after a call, BLAS's own threads spin for a while, and they then take the cores this
# extension's pool needs for its next job, which it reads as contention and runs on one thread (measured:
# a 2-thread whole sequence at (64, 100, 256, 256) with a Linear head took 77 ms, as on one thread, against
# 42 ms when the head's product stayed off a 2-thread BLAS).
ctypedef int (*ThreadQuery)() noexcept nogil
cdef ThreadQuery blas_thread_query = <ThreadQuery><size_t>thread_query_address()
cdef int blas_cores = available_cores()


cdef inline bint blas_within(int num_threads) noexcept nogil:
    """Whether BLAS would run a call on one thread (and so on at most ``num_threads``, which is >= 1)."""
    if blas_thread_query == NULL:
        return blas_cores <= 1
    return blas_thread_query() <= 1


def blas_allowed(int num_threads):
    """Whether the kernels of a model limited to ``num_threads`` threads call BLAS now."""
    return blas_within(num_threads)


# A stream step reading fewer weights than this keeps the GIL (see LSTMKernels.step).
cdef enum:
    RELEASE_GIL_MIN_WEIGHTS = 1 << 16


# ------------------------------------------------------------------------------------------------------
# When the drivers take the prepacked tiles and threads.

# Float32 products of this many rows or more run on the prepacked tiles (lstm_parallel.h) instead, on one
# thread: a stream step at (I, H) = (32, 64) took 2.4 us at batch 2 against 2.8 with the hand loop, 5.7 us
# at batch 8 against 8.0; at (64, 256), 28 us at batch 3 against 34, and 87 us at batch 12 against 609
# with BLAS GEMM (which packs the weights on every call).
cdef enum:
    PACKED_MIN_BATCH = 2

# Threads. At batch 1 the product is split by blocks of UNIT_GRAIN hidden units (a cache line of h and c
# each) once the recurrent weights of a sequence reach UNIT_SPLIT_MIN_WEIGHTS (256 KiB in float32), or the
# whole stack's weights of a stream step reach STREAM_UNIT_SPLIT_MIN_WEIGHTS. Two threads on a quiet
# machine, float32 stream step: (I, H) = (64, 128), 96K weights, 4.1 us against 4.9 on one; (32, 64), 24K
# weights, 2.7 against 2.1 (posting the job, the meetings and the wait cost ~1 us); (128, 256) x 2 layers,
# 458K weights, 25 us against 35. But when another process holds a core, every meeting may wait for a time
# slice (a step at (64, 128) then took 110 us), so a stream step, which pays that per call, is split only
# where the gain is large. Above batch 1, rows are split once a step's work (weights x rows) reaches
# ROWS_SPLIT_MIN_WEIGHTS.
cdef enum:
    UNIT_GRAIN = 16
    UNIT_SPLIT_MIN_WEIGHTS = 64 * 1024
    STREAM_UNIT_SPLIT_MIN_WEIGHTS = 256 * 1024
    ROWS_SPLIT_MIN_WEIGHTS = 256 * 1024


# ------------------------------------------------------------------------------------------------------
# The stacked streaming step and one direction of one layer over whole sequences, each single-threaded on
# a range of batch rows, or split by hidden units over a team of threads at batch 1.

cdef inline void rows_product(const CellDesc* d, Py_ssize_t batch, const floating* x, Py_ssize_t ldx,
                              Py_ssize_t first_row, Py_ssize_t rows, Py_ssize_t k_offset, Py_ssize_t n,
                              floating* z, Py_ssize_t ldz, bint use_blas) noexcept nogil:
    """z (batch, rows) = x (batch, n) @ weights[first_row : first_row + rows, k_offset : k_offset + n].T.

    Every hand-loop product of the gate weights goes through here, in the cell's weight format: float
    weights by ``matmul_nt`` (BLAS only if ``use_blas``: never inside a thread), 8- and 16-bit
    weights by the widening loops of narrow_weights.h. An int8 row's input and recurrent blocks have scales
    of their own: the product splits its sum where the recurrent block starts.
    """
    cdef Py_ssize_t K = d.row_stride
    cdef Py_ssize_t split = min(max(d.input_stride, k_offset), k_offset + n) - k_offset
    if floating is float:
        if d.weight_format == WEIGHTS_INT8:
            dot_rows_int8(<const signed char*>d.narrow_weights + first_row * K + k_offset, K, rows,
                          d.scales + first_row, d.scales + d.gate_rows + first_row, split, x, ldx, batch, n, z,
                          ldz)
            return
        if d.weight_format == WEIGHTS_BFLOAT16:
            dot_rows_bf16(<const unsigned short*>d.narrow_weights + first_row * K + k_offset, K, rows, x, ldx,
                          batch, n, z, ldz)
            return
    matmul_nt(batch, rows, <const floating*>d.weights + first_row * K + k_offset, K, x, ldx, n, z, ldz, use_blas)


cdef inline void gate_product(const CellDesc* d, Py_ssize_t batch, const floating* x, Py_ssize_t ldx,
                              Py_ssize_t k_offset, Py_ssize_t n, Py_ssize_t rows, floating* z,
                              Py_ssize_t ldz, bint use_blas) noexcept nogil:
    """z (batch, rows) = x (batch, n) @ weights[:rows, k_offset : k_offset + n].T, on one thread.

    Float32 from PACKED_MIN_BATCH rows: the tiles over prepacked panels; otherwise ``matmul_nt``.
    """
    if floating is float:
        if d.packed != NULL and batch >= PACKED_MIN_BATCH:
            packed_gemm(batch, rows, n, x, ldx, d.packed, d.row_stride, k_offset, NULL, z, ldz)
            return
    rows_product(d, batch, x, ldx, 0, rows, k_offset, n, z, ldz, use_blas)


cdef inline void candidate_product(const CellDesc* d, Py_ssize_t batch, const floating* reset_h,
                                   Py_ssize_t ld_reset_h, floating* z, bint use_blas) noexcept nogil:
    """z[:, 2H:3H] (ld G*H) = reset_h (batch, R_pad) @ R_n.T: the candidate rows of a GRU with the reset first,
    on one thread; on their own tiles in float32 (``CellDesc.candidate_packed``) as ``gate_product``."""
    cdef Py_ssize_t H = d.hidden_size, G = d.gate_rows
    if floating is float:
        if d.candidate_packed != NULL and batch >= PACKED_MIN_BATCH:
            packed_gemm(batch, H, d.rec_stride, reset_h, ld_reset_h, d.candidate_packed, d.row_stride,
                        d.input_stride, NULL, z + 2 * H, G)
            return
    rows_product(d, batch, reset_h, ld_reset_h, 2 * H, H, d.input_stride, d.rec_stride, z + 2 * H, G,
                 use_blas)


cdef inline void split_range(Py_ssize_t size, Py_ssize_t grain, int part, int parts, Py_ssize_t* first,
                             Py_ssize_t* stop) noexcept nogil:
    """Part ``part`` of ``parts`` of range(size), in pieces that are whole multiples of ``grain`` but the last."""
    cdef Py_ssize_t piece = (size + parts - 1) // parts
    piece = (piece + grain - 1) // grain * grain
    first[0] = min(part * piece, size)
    stop[0] = min(first[0] + piece, size)


cdef inline void cell_step(const CellDesc* d, Py_ssize_t rows, const floating* xh, floating* z, floating* zx,
                           floating* hidden, floating* h, floating* c, bint use_blas) noexcept nogil:
    """One time step of one cell for ``rows`` batch rows, on one thread: h (rows, R) and c (rows, C) in place.

    xh (rows, K) holds each row's padded [x | 0 | h' | 0]. An LSTM or RNN takes all its gates from one
    pass over the packed weights. A GRU keeps its candidate's input and recurrent parts apart (with the
    reset first, the candidate's recurrent rows wait for r * h'): z gets the recurrent parts, zx the input
    parts with the bias. In the hand loop r and z take one pass over [x | h] (z then holds both parts and
    zx their bias alone), the candidate's rows one pass over x and one over h: a row's sum costs a
    reduction across lanes, and this way each row has one or two. The tiles take the input part of all
    rows, then the recurrent part. Scratch: z and zx (rows, G*H); hidden (rows, H_pad), zero-padded: the
    unprojected h of an LSTMP, r * h' of a GRU with the reset first.
    """
    cdef Py_ssize_t H = d.hidden_size, R = d.rec_size, C = d.state_size, G = d.gate_rows, K = d.row_stride
    cdef Py_ssize_t Ip = d.input_stride, Rs = d.rec_stride, Hs = d.hidden_stride, b, j
    cdef const floating* bias = <const floating*>d.bias
    cdef bint tiles = False
    if d.kind == CELL_LSTM or d.kind == CELL_RNN:
        gate_product(d, rows, xh, K, 0, K, G, z, G, use_blas)
        for b in range(rows):
            pointwise(d, z + b * G, bias, c + b * C, h + b * R, hidden + b * Hs if d.proj_size else h + b * R)
        if d.proj_size:
            matmul_nt(rows, d.proj_size, <const floating*>d.projection, Hs, hidden, Hs, Hs, h, R, use_blas)
        return
    if floating is float:
        tiles = d.packed != NULL and rows >= PACKED_MIN_BATCH
    if tiles:
        gate_product(d, rows, xh, K, 0, Ip, G, zx, G, use_blas)
        gate_product(d, rows, xh + Ip, K, Ip, Rs, G if d.kind == CELL_GRU else 2 * H, z, G, use_blas)
        for b in range(rows):
            for j in range(G):
                zx[b * G + j] += bias[j]
    else:
        rows_product(d, rows, xh, K, 0, 2 * H, 0, K, z, G, use_blas)
        rows_product(d, rows, xh, K, 2 * H, H, 0, Ip, zx + 2 * H, G, use_blas)
        if d.kind == CELL_GRU:
            rows_product(d, rows, xh + Ip, K, 2 * H, H, Ip, Rs, z + 2 * H, G, use_blas)
        for b in range(rows):
            memcpy(zx + b * G, bias, 2 * H * sizeof(floating))
            for j in range(2 * H, G):
                zx[b * G + j] += bias[j]
    if d.kind == CELL_GRU_RESET_FIRST:
        for b in range(rows):
            gru_reset_gates(d, z + b * G, zx + b * G, h + b * R, hidden + b * Hs, 0, H)
        candidate_product(d, rows, hidden, Hs, z, use_blas)
    for b in range(rows):
        pointwise(d, z + b * G, zx + b * G, c, h + b * R, h + b * R)


cdef void step_stack(const CellDesc* cells, Py_ssize_t num_layers, Py_ssize_t batch, Py_ssize_t row0,
                     Py_ssize_t rows, const floating* x, floating* h, floating* c, floating* scratch,
                     const Py_ssize_t* offsets, bint use_blas) noexcept nogil:
    """One time step of a forward stack for batch rows row0 .. row0+rows-1: the flat h and c in place
    (layout in fastlstm.backends.base), x (B, I). BLAS only if ``use_blas`` (never inside a thread).

    Per layer: [x | h] is copied into its padded scratch rows, then ``cell_step``. Scratch offsets come from
    ``StepWorkspace``; rows use only their own scratch rows, so threads may run disjoint row ranges at once.
    """
    cdef Py_ssize_t layer, b, R, K, G
    cdef const CellDesc* d
    cdef Py_ssize_t input_stride = cells[0].input_size
    cdef const floating* layer_input = x + row0 * input_stride
    cdef const Py_ssize_t* regions
    cdef floating* xh
    cdef floating* h_layer
    for layer in range(num_layers):
        d = &cells[layer]
        R, K, G = d.rec_size, d.row_stride, d.gate_rows
        regions = offsets + layer * WS_PER_LAYER
        h_layer = h + batch * d.h_start + row0 * R
        xh = scratch + regions[WS_XH] + row0 * K
        for b in range(rows):
            memcpy(xh + b * K, layer_input + b * input_stride, d.input_size * sizeof(floating))
            memcpy(xh + b * K + d.input_stride, h_layer + b * R, R * sizeof(floating))
        cell_step(d, rows, xh, scratch + regions[WS_Z] + row0 * G, scratch + regions[WS_ZX] + row0 * G,
                  scratch + regions[WS_HIDDEN] + row0 * d.hidden_stride, h_layer,
                  c + batch * d.c_start + row0 * d.state_size, use_blas)
        layer_input = h_layer
        input_stride = R


cdef void units_product(const CellDesc* d, const floating* x, Py_ssize_t k_offset, Py_ssize_t n,
                        Py_ssize_t first_gate, Py_ssize_t gates, Py_ssize_t first, Py_ssize_t stop,
                        floating* z) noexcept nogil:
    """z[g*H + u] = weights[g*H + u, k_offset : k_offset + n] . x for gates g of first_gate ..
    first_gate+gates-1 and units u of first .. stop-1: a thread's share of a batch-1 product."""
    cdef Py_ssize_t H = d.hidden_size, K = d.row_stride, gate
    for gate in range(first_gate, first_gate + gates):
        rows_product(d, 1, x, K, gate * H + first, stop - first, k_offset, n, z + gate * H + first, d.gate_rows,
                     False)


cdef void cell_step_units(const CellDesc* d, const floating* xh, floating* z, floating* zx, floating* hidden,
                          floating* h, floating* c, Py_ssize_t first, Py_ssize_t stop, int team,
                          Barrier* barrier, int* sense) noexcept nogil:
    """``cell_step`` at batch 1 (no projection) for this thread's units first .. stop-1, all gates of them.

    A GRU splits its products as ``cell_step``'s hand loop does; with the reset first it meets the team once
    more: its candidate's product reads every unit of r * h'.
    """
    cdef Py_ssize_t H = d.hidden_size, G = d.gate_rows, K = d.row_stride, Ip = d.input_stride
    cdef Py_ssize_t Rs = d.rec_stride, g, u
    cdef const floating* bias = <const floating*>d.bias
    if d.kind == CELL_LSTM or d.kind == CELL_RNN:
        units_product(d, xh, 0, K, 0, G // H, first, stop, z)
        pointwise(d, z, bias, c, h, h, first, stop)
        return
    units_product(d, xh, 0, K, 0, 2, first, stop, z)
    units_product(d, xh, 0, Ip, 2, 1, first, stop, zx)
    for g in range(3):
        for u in range(g * H + first, g * H + stop):
            zx[u] = bias[u] if g < 2 else zx[u] + bias[u]
    if d.kind == CELL_GRU:
        units_product(d, xh + Ip, Ip, Rs, 2, 1, first, stop, z)
    else:
        gru_reset_gates(d, z, zx, h, hidden, first, stop)
        barrier_wait(barrier, team, sense)
        units_product(d, hidden, Ip, Rs, 2, 1, first, stop, z)
    pointwise(d, z, zx, c, h, h, first, stop)


cdef void step_stack_units(const CellDesc* cells, Py_ssize_t num_layers, const floating* x, floating* h,
                           floating* c, floating* scratch, const Py_ssize_t* offsets,
                           int part, int team, Barrier* barrier, int* sense) noexcept nogil:
    """``step_stack`` at batch 1, thread ``part`` of ``team``: this thread's block of hidden units, all gates,
    in every layer (no projection).

    Per layer the thread copies its own units of the layer input and of h into the scratch [x | h], waits
    for the others (then [x | h] is whole, and nobody reads this layer's h any more), multiplies its gate
    rows and updates its units of c and h (``cell_step_units``). Where a layer has the H of the one before,
    the units a thread feeds on are the ones it has just computed; where H changes, the threads meet once
    more first, so that the previous layer's output is whole before each copies its share of it.
    """
    cdef Py_ssize_t layer, H, first, stop, input_first, input_stop
    cdef const CellDesc* d
    cdef const CellDesc* previous
    cdef const Py_ssize_t* regions
    cdef floating* xh
    cdef floating* h_layer
    for layer in range(num_layers):
        d = &cells[layer]
        H = d.hidden_size
        split_range(H, UNIT_GRAIN, part, team, &first, &stop)
        regions = offsets + layer * WS_PER_LAYER
        h_layer = h + d.h_start
        xh = scratch + regions[WS_XH]
        if layer == 0:
            if part == 0:
                memcpy(xh, x, d.input_size * sizeof(floating))
        else:
            previous = &cells[layer - 1]
            input_first, input_stop = first, stop
            if previous.hidden_size != H:
                barrier_wait(barrier, team, sense)
                split_range(previous.hidden_size, UNIT_GRAIN, part, team, &input_first, &input_stop)
            memcpy(xh + input_first, h + previous.h_start + input_first,
                   (input_stop - input_first) * sizeof(floating))
        memcpy(xh + d.input_stride + first, h_layer + first, (stop - first) * sizeof(floating))
        barrier_wait(barrier, team, sense)
        cell_step_units(d, xh, scratch + regions[WS_Z], scratch + regions[WS_ZX], scratch + regions[WS_HIDDEN],
                        h_layer, c + d.c_start,
                        first, stop, team, barrier, sense)


cdef struct StepJob:
    # step_stack's arguments, for the parts of one threaded step (see step_part)
    const CellDesc* cells
    Py_ssize_t num_layers, batch
    const void* x
    void* h
    void* c
    void* scratch
    const Py_ssize_t* offsets
    Barrier barrier


cdef void step_part(StepJob* job, const floating* x, int part, int parts) noexcept nogil:
    """Part ``part`` of ``parts`` of a stream step: by hidden units at batch 1 (``step_stack_units``), by
    rows above (``step_stack`` on this part's rows)."""
    cdef int sense = 0
    cdef Py_ssize_t first, stop
    cdef unsigned int saved_mode = flush_denormals()
    if job.batch == 1:
        step_stack_units(job.cells, job.num_layers, x, <floating*>job.h, <floating*>job.c,
                         <floating*>job.scratch, job.offsets, part, parts, &job.barrier, &sense)
    else:
        split_range(job.batch, TILE_ROWS, part, parts, &first, &stop)
        if stop > first:
            step_stack(job.cells, job.num_layers, job.batch, first, stop - first, x, <floating*>job.h,
                       <floating*>job.c, <floating*>job.scratch, job.offsets, False)
    restore_fp_mode(saved_mode)


cdef void step_job_float(void* job, int part, int parts) noexcept nogil:
    step_part(<StepJob*>job, <const float*>(<StepJob*>job).x, part, parts)


cdef void step_job_double(void* job, int part, int parts) noexcept nogil:
    step_part(<StepJob*>job, <const double*>(<StepJob*>job).x, part, parts)


cdef void input_projection(const CellDesc* d, Py_ssize_t rows, const floating* x, floating* x_proj,
                           bint use_blas) noexcept nogil:
    """x_proj (rows, G*H) = bias + x (rows, I) @ w_ih.T: the input part of every step, before the time loop.

    Float32 on the packed tiles, on the calling thread alone; float64 by BLAS if ``use_blas`` (BLAS may take
    threads of its own: never inside a parallel region), else by the hand loop.
    """
    cdef Py_ssize_t G = d.gate_rows, n, j
    cdef const floating* bias = <const floating*>d.bias
    if floating is float:
        if d.packed != NULL:
            packed_gemm(rows, G, d.input_size, x, d.input_size, d.packed, d.row_stride, 0, <const float*>d.bias,
                        x_proj, G)
            return
    if not use_blas:
        dot_rows(<const floating*>d.weights, d.row_stride, G, x, d.input_size, rows, d.input_size, x_proj, G)
        for n in range(rows):
            for j in range(G):
                x_proj[n * G + j] += bias[j]
        return
    for n in range(rows):
        memcpy(x_proj + n * G, d.bias, G * sizeof(floating))
    gemm_nt(rows, G, d.input_size, x, d.input_size, <const floating*>d.weights, d.row_stride, 1, x_proj, G)


cdef void recurrence(const CellDesc* d, Py_ssize_t batch, Py_ssize_t steps, floating* h, floating* c,
                     floating* y, Py_ssize_t y_stride, bint reverse, const int64_t* lengths,
                     const floating* x_proj, floating* z, floating* hidden, floating* h_pad,
                     bint use_blas) noexcept nogil:
    """The time loop of ``run_cell`` for ``batch`` rows, on one thread (arguments as there; BLAS only if
    ``use_blas``).

    Every pointer may start at some row of the caller's arrays: the rows touch nothing of other rows, so
    threads may run disjoint row ranges at once.
    """
    cdef Py_ssize_t H = d.hidden_size, R = d.rec_size, P = d.proj_size, C = d.state_size
    cdef Py_ssize_t G = d.gate_rows, Hs = d.hidden_stride, Rs = d.rec_stride
    cdef Py_ssize_t b, s, t, n, active_steps = steps
    cdef Py_ssize_t ld_state = Rs if batch == 1 else R
    cdef bint reset_first = d.kind == CELL_GRU_RESET_FIRST
    cdef floating* state
    cdef floating* out

    if lengths != NULL:
        active_steps = 0
        for b in range(batch):
            active_steps = lengths[b] if lengths[b] > active_steps else active_steps
    # At batch 1 the state lives in a zero-padded copy for the hand loop; above, the product reads h in place.
    state = h_pad if batch == 1 else h
    if batch == 1:
        memcpy(h_pad, h, R * sizeof(floating))

    for s in range(active_steps):
        gate_product(d, batch, state, ld_state, d.input_stride, ld_state, 2 * H if reset_first else G, z, G,
                     use_blas)
        if reset_first:
            for b in range(batch):
                n = steps if lengths == NULL else lengths[b]
                if s < n:
                    t = n - 1 - s if reverse else s
                    gru_reset_gates(d, z + b * G, x_proj + (b * steps + t) * G, state + b * R, hidden + b * Hs,
                                    0, H)
            candidate_product(d, batch, hidden, Hs, z, use_blas)
        for b in range(batch):
            n = steps if lengths == NULL else lengths[b]
            if s >= n:
                continue
            t = n - 1 - s if reverse else s
            if P:
                out = hidden + b * Hs
            else:
                out = state + b * R
            pointwise(d, z + b * G, x_proj + (b * steps + t) * G, c + b * C, state + b * R, out)
        if P:
            # All rows at once (Hs columns: the padding is zero), then only the rows still running take
            # their new state.
            matmul_nt(batch, P, <const floating*>d.projection, Hs, hidden, Hs, Hs, h_pad, Rs, use_blas)
            if batch > 1:
                for b in range(batch):
                    n = steps if lengths == NULL else lengths[b]
                    if s < n:
                        memcpy(h + b * R, h_pad + b * Rs, R * sizeof(floating))
        for b in range(batch):
            n = steps if lengths == NULL else lengths[b]
            if s < n:
                t = n - 1 - s if reverse else s
                memcpy(y + (b * steps + t) * y_stride, state + b * R, R * sizeof(floating))
    if batch == 1:
        memcpy(h, h_pad, R * sizeof(floating))


cdef void recurrence_units(const CellDesc* d, Py_ssize_t length, floating* h, floating* c, floating* y,
                           Py_ssize_t y_stride, bint reverse, const floating* x_proj, floating* z,
                           floating* hidden, floating* h_pads, int part, int team, Barrier* barrier,
                           int* sense) noexcept nogil:
    """The time loop of ``run_cell`` at batch 1 (no projection), thread ``part`` of ``team``: this thread's
    block of hidden units, all gates, over ``length`` steps.

    h_pads holds two zero-padded copies of h (2, R_pad): step s reads copy s % 2 whole and writes this
    thread's units of the other, so one meeting per step suffices: after it, every unit of the new h is
    written and nobody reads the old copy any more. A GRU with the reset first meets once more per step,
    after writing its units of r * h' into ``hidden``, which its candidate's product reads whole.
    """
    cdef Py_ssize_t H = d.hidden_size, G = d.gate_rows, Rs = d.rec_stride
    cdef Py_ssize_t s, t, first, stop
    cdef bint reset_first = d.kind == CELL_GRU_RESET_FIRST
    cdef floating* h_old
    cdef floating* h_new
    split_range(H, UNIT_GRAIN, part, team, &first, &stop)
    memcpy(h_pads + first, h + first, (stop - first) * sizeof(floating))
    barrier_wait(barrier, team, sense)
    for s in range(length):
        h_old = h_pads + (s % 2) * Rs
        h_new = h_pads + ((s + 1) % 2) * Rs
        t = length - 1 - s if reverse else s
        units_product(d, h_old, d.input_stride, Rs, 0, 2 if reset_first else G // H, first, stop, z)
        if reset_first:
            gru_reset_gates(d, z, x_proj + t * G, h_old, hidden, first, stop)
            barrier_wait(barrier, team, sense)
            units_product(d, hidden, d.input_stride, Rs, 2, 1, first, stop, z)
        pointwise(d, z, x_proj + t * G, c, h_old, h_new, first, stop)
        memcpy(y + t * y_stride + first, h_new + first, (stop - first) * sizeof(floating))
        barrier_wait(barrier, team, sense)
    memcpy(h + first, h_pads + (length % 2) * Rs + first, (stop - first) * sizeof(floating))


cdef int sequence_team(const CellDesc* d, Py_ssize_t batch, int num_threads) noexcept nogil:
    """How many threads ``run_cell``'s time loop takes (see the thresholds' comment)."""
    if num_threads < 2 or d.proj_size:
        return 1
    if batch == 1:
        if d.gate_rows * d.rec_stride < UNIT_SPLIT_MIN_WEIGHTS:
            return 1
        return num_threads
    # Threads over rows, each row range's own time loop: only where no BLAS call would run inside a thread.
    if d.packed == NULL and (batch + num_threads - 1) // num_threads > HAND_MATMUL_MAX_ROWS:
        return 1
    return <int>min(<Py_ssize_t>num_threads, batch)


cdef struct SequenceJob:
    # run_cell's arguments, for the parts of its threaded time loop (see sequence_part)
    const CellDesc* cell
    Py_ssize_t batch, steps, y_stride
    const void* x
    void* h
    void* c
    void* y
    void* x_proj
    void* z
    void* hidden
    void* h_pad
    bint reverse
    const int64_t* lengths
    Barrier barrier


cdef void sequence_part(SequenceJob* job, const floating* x, int part, int parts) noexcept nogil:
    """Part ``part`` of ``parts`` of ``run_cell``'s time loop: by hidden units at batch 1, by rows above.

    In float32 each part also projects the input of its own rows (at batch 1: of its own time steps, before
    the first meeting); float64 had it projected before, by BLAS, outside the threads.
    """
    cdef const CellDesc* d = job.cell
    cdef Py_ssize_t G = d.gate_rows, I = d.input_size, steps = job.steps, first, stop
    cdef floating* x_proj = <floating*>job.x_proj
    cdef int sense = 0
    cdef unsigned int saved_mode = flush_denormals()
    if job.batch == 1:
        if floating is float:
            split_range(steps, 1, part, parts, &first, &stop)
            input_projection(d, stop - first, x + first * I, x_proj + first * G, False)
        recurrence_units(d, steps if job.lengths == NULL else job.lengths[0], <floating*>job.h,
                         <floating*>job.c, <floating*>job.y, job.y_stride, job.reverse, x_proj,
                         <floating*>job.z, <floating*>job.hidden, <floating*>job.h_pad, part, parts,
                         &job.barrier, &sense)
    else:
        split_range(job.batch, TILE_ROWS, part, parts, &first, &stop)
        if stop > first:
            if floating is float:
                input_projection(d, (stop - first) * steps, x + first * steps * I, x_proj + first * steps * G,
                                 False)
            recurrence(d, stop - first, steps, <floating*>job.h + first * d.rec_size,
                       <floating*>job.c + first * d.state_size,
                       <floating*>job.y + first * steps * job.y_stride, job.y_stride, job.reverse,
                       NULL if job.lengths == NULL else job.lengths + first, x_proj + first * steps * G,
                       <floating*>job.z + first * G, <floating*>job.hidden + first * d.hidden_stride,
                       <floating*>job.h_pad + first * d.rec_stride, False)
    restore_fp_mode(saved_mode)


cdef void sequence_job_float(void* job, int part, int parts) noexcept nogil:
    sequence_part(<SequenceJob*>job, <const float*>(<SequenceJob*>job).x, part, parts)


cdef void sequence_job_double(void* job, int part, int parts) noexcept nogil:
    sequence_part(<SequenceJob*>job, <const double*>(<SequenceJob*>job).x, part, parts)


cdef void run_cell(const CellDesc* d, Py_ssize_t batch, Py_ssize_t steps, const floating* x, floating* h,
                   floating* c, floating* y, Py_ssize_t y_stride, bint reverse, const int64_t* lengths,
                   floating* x_proj, floating* z, floating* hidden, floating* h_pad,
                   int num_threads) noexcept nogil:
    """One direction of one layer over x (B, T, I); h (B, R) and c (B, C) in place; writes y[b, t, :R].

    y points at this direction's first column and advances y_stride per time step. Row b runs its own
    steps 0 .. lengths[b]-1 (all T without lengths), backwards when reverse; other outputs are left alone.
    Scratch: x_proj (B*T, G*H), z (B, G*H), hidden (B, H_pad), h_pad (max(B, 2), R_pad), the last two zero
    on entry. The time loop runs on up to ``num_threads`` threads (``sequence_team``, ``sequence_part``);
    BLAS (on the calling thread) only where it keeps to ``num_threads`` too.
    """
    cdef int team = sequence_team(d, batch, num_threads)
    cdef bint use_blas = blas_within(num_threads)
    cdef SequenceJob job
    if team == 1 or floating is double:
        input_projection(d, batch * steps, x, x_proj, use_blas)
    if team == 1:
        recurrence(d, batch, steps, h, c, y, y_stride, reverse, lengths, x_proj, z, hidden, h_pad, use_blas)
        return
    job.cell, job.batch, job.steps, job.y_stride = d, batch, steps, y_stride
    job.x, job.h, job.c, job.y, job.x_proj = x, h, c, y, x_proj
    job.z, job.hidden, job.h_pad, job.reverse, job.lengths = z, hidden, h_pad, reverse, lengths
    barrier_init(&job.barrier)
    run_parallel(sequence_job_float if floating is float else sequence_job_double, &job, team)


# ------------------------------------------------------------------------------------------------------
# Python-facing objects.

cdef Py_ssize_t padded(Py_ssize_t n, Py_ssize_t itemsize):
    """n rounded up to a whole number of 64-byte vectors of items (as _cells.padded, for C sizes)."""
    cdef Py_ssize_t lanes = VECTOR_BYTES // itemsize
    return (n + lanes - 1) // lanes * lanes


# Where each region of a stream's scratch starts (StepWorkspace.offsets[layer * WS_PER_LAYER + WS_*]): per
# layer its [x | h] rows, its zero-padded hidden rows (the unprojected h of an LSTMP, r * h' of a GRU with
# the reset first), its gate pre-activations and a GRU's input part. Nothing is shared between layers:
# threads that split the rows run through the layers without meeting.
cdef enum:
    WS_XH = 0
    WS_HIDDEN = 1
    WS_Z = 2
    WS_ZX = 3
    WS_PER_LAYER = 4


cdef class StepWorkspace:
    """Scratch of one stream: padded [x | h] rows and hidden rows per layer, gate pre-activations, the
    head's intermediate outputs, and ``output``, where each step leaves its output.

    One aligned buffer holds the scratch; ``step`` writes only there, into ``output`` and into the caller's
    h and c.
    """
    cdef readonly Py_ssize_t batch_size
    cdef readonly cnp.ndarray output  # (B, O): the step's output, the head's when the model has one
    cdef void* output_data
    cdef cnp.ndarray buffer
    cdef void* scratch
    cdef Py_ssize_t* offsets          # region starts, indexed by the WS_* constants
    cdef Py_ssize_t head_offset       # where the head's two halves of scratch start (head_items each)
    cdef Py_ssize_t head_items
    cdef object owner                 # the LSTMKernels whose layout the offsets follow
    cdef readonly int threads         # threads per step (LSTMKernels._stream_threads)

    def __cinit__(self):
        self.offsets = NULL

    def __dealloc__(self):
        free(self.offsets)


cdef class LSTMKernels:
    """A ModelSpec's recurrent stack (LSTM, GRU and RNN layers of any sizes) packed for the compiled kernels
    in one dtype; immutable once built.

    ``num_threads`` is the most threads one call may take (1: the calling thread alone).
    """

    cdef readonly object dtype
    cdef readonly bint is_double
    cdef int type_num
    cdef Py_ssize_t num_layers, num_cells, itemsize
    cdef CellDesc* cells
    cdef list arrays            # owners of the packed arrays the CellDesc pointers point into
    cdef tuple directions       # per layer: 1 or 2
    cdef tuple reverse_layer    # per layer: True for direction "reverse"
    cdef tuple first_cells      # per layer: the index of its first cell
    cdef Py_ssize_t input_size, h_items, c_items   # I; items of the flat h and c per batch row
    cdef Py_ssize_t max_gate_rows                  # the widest G*H of all cells
    cdef bint streamable
    cdef Py_ssize_t weights_per_step   # packed weights one batch row of a stream step reads
    cdef readonly int num_threads      # the most threads one call may use
    cdef bint steps_threadable         # no projection: stream steps may run threaded
    cdef HeadStage* head_stages        # the dense head, stage by stage (none: the output is the recurrent one)
    cdef Py_ssize_t num_head_stages
    cdef readonly Py_ssize_t head_input_size, output_size   # features into and out of the head
    cdef Py_ssize_t head_width         # the widest intermediate stage's output (0 with fewer than 2 stages)
    cdef Py_ssize_t head_weights       # weights the head reads per batch row

    def __cinit__(self):
        self.cells = NULL
        self.head_stages = NULL

    def __dealloc__(self):
        free(self.cells)
        free(self.head_stages)

    def __init__(self, dtype, int num_threads, list cells, list head=None):
        """``cells``: one dict per cell in state order, as ``cython_backend.pack_for_extension`` makes them
        (sizes, strides, activation codes and parameters, flags, and the packed arrays of the layout above).
        ``head``: one dict per stage of the dense head, as ``cython_backend.pack_head_for_extension`` makes
        them; None or empty for a model without a head."""
        cdef CellDesc* d
        if num_threads < 1:
            raise ValueError(f"num_threads: expected a positive integer, got {num_threads}")
        if not cells:
            raise ValueError("LSTMKernels: expected at least one cell")
        self.num_threads = num_threads
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.is_double = self.dtype == np.float64
        self.type_num = self.dtype.num
        self.itemsize = self.dtype.itemsize
        self.num_cells = len(cells)
        self.num_layers = cells[len(cells) - 1]["layer"] + 1
        self.cells = <CellDesc*>malloc(self.num_cells * sizeof(CellDesc))
        if self.cells == NULL:
            raise MemoryError()
        memset(self.cells, 0, self.num_cells * sizeof(CellDesc))
        self.arrays = []
        directions, reverse_layer = [0] * self.num_layers, [False] * self.num_layers
        first_cells = [0] * self.num_layers
        self.weights_per_step = 0
        self.h_items = self.c_items = self.max_gate_rows = 0
        for n, cell in enumerate(cells):
            d = &self.cells[n]
            self._describe_cell(d, cell)
            d.h_start, d.c_start = self.h_items, self.c_items
            self.h_items += d.rec_size
            self.c_items += d.state_size
            self.max_gate_rows = max(self.max_gate_rows, d.gate_rows)
            if cell["direction"] == 0:
                first_cells[cell["layer"]] = n
            directions[cell["layer"]] += 1
            reverse_layer[cell["layer"]] = reverse_layer[cell["layer"]] or (cell["reverse"] and cell["num_directions"] == 1)
            if cell["direction"] == cell["num_directions"] - 1:  # a stream step reads one cell per layer
                self.weights_per_step += d.row_stride * d.gate_rows
        self.directions = tuple(directions)
        self.reverse_layer = tuple(reverse_layer)
        self.first_cells = tuple(first_cells)
        self.input_size = self.cells[0].input_size
        self.streamable = all(not cell["reverse"] for cell in cells)
        self.steps_threadable = all(cell["proj_size"] == 0 for cell in cells)
        self._describe_head(head or [], self.directions[self.num_layers - 1] * self.cells[self.num_cells - 1].rec_size)

    cdef _describe_head(self, list stages, Py_ssize_t input_size):
        """Point ``self.head_stages`` at the head's arrays (kept alive in ``self.arrays``) and check that each
        stage takes what the one before gives, the first what the recurrent stack outputs (``input_size``)."""
        cdef HeadStage* stage
        cdef cnp.ndarray array
        self.num_head_stages = len(stages)
        self.head_input_size = self.output_size = input_size
        self.head_width = self.head_weights = 0
        if not stages:
            return
        self.head_stages = <HeadStage*>malloc(self.num_head_stages * sizeof(HeadStage))
        if self.head_stages == NULL:
            raise MemoryError()
        memset(self.head_stages, 0, self.num_head_stages * sizeof(HeadStage))
        for n, entry in enumerate(stages):
            stage = &self.head_stages[n]
            stage.in_features, stage.out_features = entry["in_features"], entry["out_features"]
            if stage.in_features != self.output_size or stage.out_features < 1:
                raise ValueError(f"LSTMKernels: head stage {n} maps {stage.in_features} features to "
                                 f"{stage.out_features}, after a stage of {self.output_size}")
            for name, shape in (("weight", (stage.out_features, stage.in_features)), ("bias", (stage.out_features,))):
                array = entry[name]
                if array is None:
                    continue
                if array.dtype != self.dtype or not array.flags.c_contiguous or np.shape(array) != shape:
                    raise ValueError(f"LSTMKernels: head stage {n}'s {name} must be a C-contiguous {self.dtype} "
                                     f"array of shape {shape}")
                array.flags.writeable = False
                self.arrays.append(array)
            if entry["weight"] is None and (entry["bias"] is not None or stage.out_features != stage.in_features):
                raise ValueError(f"LSTMKernels: head stage {n} has no weight: it is an activation alone")
            stage.weight = NULL if entry["weight"] is None else cnp.PyArray_DATA(entry["weight"])
            if stage.weight != NULL:
                self.head_weights += stage.in_features * stage.out_features
            stage.bias = NULL if entry["bias"] is None else cnp.PyArray_DATA(entry["bias"])
            stage.code, stage.alpha, stage.beta = entry["activation_code"], entry["alpha"], entry["beta"]
            if n < self.num_head_stages - 1:
                self.head_width = max(self.head_width, stage.out_features)
            self.output_size = stage.out_features

    cdef _describe_cell(self, CellDesc* d, dict cell):
        """Point ``d`` at a packed cell's arrays (kept alive in ``self.arrays``) and copy its numbers."""
        cdef cnp.ndarray array
        for name in ("weights", "packed", "candidate_packed", "bias", "peephole", "projection", "candidate_bias"):
            array = cell[name]
            if array is None:
                continue
            if array.dtype != self.dtype or not array.flags.c_contiguous:
                raise ValueError(f"LSTMKernels: packed array {name!r} must be C-contiguous {self.dtype}")
            array.flags.writeable = False
            self.arrays.append(array)
        if (cell["packed"] is None) != self.is_double:
            raise ValueError("LSTMKernels: float32 cells need the packed panels, float64 cells have none")
        if (cell["candidate_packed"] is None) != (self.is_double or cell["num_gates"] != 3
                                                  or cell["linear_before_reset"]):
            raise ValueError("LSTMKernels: float32 GRU cells with the reset first need their candidate panels, "
                             "other cells have none")
        num_gates = cell["num_gates"]
        if num_gates == 4:
            d.kind = CELL_LSTM
        elif num_gates == 3:
            d.kind = CELL_GRU if cell["linear_before_reset"] else CELL_GRU_RESET_FIRST
            if cell["candidate_bias"] is None:
                raise ValueError("LSTMKernels: a GRU cell needs its candidate_bias")
        elif num_gates == 1:
            d.kind = CELL_RNN
        else:
            raise ValueError(f"LSTMKernels: num_gates must be 4 (LSTM), 3 (GRU) or 1 (RNN), got {num_gates}")
        d.weights = cnp.PyArray_DATA(cell["weights"])
        self._describe_weight_format(d, cell)
        d.bias = cnp.PyArray_DATA(cell["bias"])
        d.packed = NULL if cell["packed"] is None else <const float*>cnp.PyArray_DATA(cell["packed"])
        d.candidate_packed = (NULL if cell["candidate_packed"] is None
                              else <const float*>cnp.PyArray_DATA(cell["candidate_packed"]))
        d.peephole = NULL if cell["peephole"] is None else cnp.PyArray_DATA(cell["peephole"])
        d.projection = NULL if cell["projection"] is None else cnp.PyArray_DATA(cell["projection"])
        d.candidate_bias = NULL if cell["candidate_bias"] is None else cnp.PyArray_DATA(cell["candidate_bias"])
        d.input_size, d.hidden_size, d.proj_size = cell["input_size"], cell["hidden_size"], cell["proj_size"]
        d.rec_size = d.proj_size or d.hidden_size
        d.gate_rows = num_gates * d.hidden_size
        d.state_size = d.hidden_size if d.kind == CELL_LSTM else 0
        d.input_stride, d.rec_stride = cell["input_stride"], cell["rec_stride"]
        d.row_stride, d.hidden_stride = d.input_stride + d.rec_stride, cell["hidden_stride"]
        d.gate_code, d.cell_code, d.output_code = cell["activation_codes"]
        (d.gate_alpha, d.gate_beta, d.cell_alpha, d.cell_beta,
         d.output_alpha, d.output_beta) = cell["activation_params"]
        d.clip = cell["clip"]
        d.input_forget = cell["input_forget"]
        d.standard = cell["standard"]
        if d.kind == CELL_LSTM and d.standard:
            d.pointwise_float, d.pointwise_double = pointwise_lstm_standard[float], pointwise_lstm_standard[double]
        elif d.kind == CELL_LSTM:
            d.pointwise_float, d.pointwise_double = pointwise_lstm_general[float], pointwise_lstm_general[double]
        elif d.kind == CELL_GRU and d.standard:
            d.pointwise_float, d.pointwise_double = pointwise_gru_standard[float], pointwise_gru_standard[double]
        elif d.kind == CELL_GRU:
            d.pointwise_float, d.pointwise_double = pointwise_gru_general[float], pointwise_gru_general[double]
        elif d.kind == CELL_GRU_RESET_FIRST:
            d.pointwise_float = pointwise_gru_reset_first[float]
            d.pointwise_double = pointwise_gru_reset_first[double]
        elif d.standard:
            d.pointwise_float, d.pointwise_double = pointwise_rnn_standard[float], pointwise_rnn_standard[double]
        else:
            d.pointwise_float, d.pointwise_double = pointwise_rnn_general[float], pointwise_rnn_general[double]

    cdef _describe_weight_format(self, CellDesc* d, dict cell):
        """Point ``d`` at a cell's 8- or 16-bit gate weights and int8 scales, after checking their layout."""
        formats = {"float32": WEIGHTS_FLOAT, "bfloat16": WEIGHTS_BFLOAT16, "int8": WEIGHTS_INT8}
        storage = {"bfloat16": np.uint16, "int8": np.int8}
        name = cell["weight_format"]
        if name not in formats:
            raise ValueError(f"LSTMKernels: weight_format must be one of {tuple(formats)}, got {name!r}")
        d.weight_format = formats[name]
        d.narrow_weights = d.scales = NULL
        if name == "float32":
            if cell["narrow_weights"] is not None or cell["scales"] is not None:
                raise ValueError("LSTMKernels: float32 weights come without narrow_weights or scales")
            return
        if self.is_double:
            raise ValueError(f"LSTMKernels: {name} weights run in float32 only")
        narrow, scales = cell["narrow_weights"], cell["scales"]
        weights = cell["weights"]
        if (not isinstance(narrow, np.ndarray) or narrow.dtype != storage[name] or narrow.shape != weights.shape
                or not narrow.flags.c_contiguous):
            raise ValueError(f"LSTMKernels: narrow_weights must be C-contiguous {np.dtype(storage[name])} of shape "
                             f"{weights.shape}")
        if (scales is None) != (name != "int8"):
            raise ValueError("LSTMKernels: int8 weights need their scales, bfloat16 weights have none")
        if scales is not None and (not isinstance(scales, np.ndarray) or scales.dtype != np.float32
                                   or scales.shape != (2, weights.shape[0]) or not scales.flags.c_contiguous):
            raise ValueError(f"LSTMKernels: scales must be C-contiguous float32 of shape (2, {weights.shape[0]})")
        for array in (narrow, scales):
            if array is not None:
                array.flags.writeable = False
                self.arrays.append(array)
        d.narrow_weights = cnp.PyArray_DATA(narrow)
        if scales is not None:
            d.scales = <const float*>cnp.PyArray_DATA(scales)

    cdef inline bint _state_fits(self, cnp.ndarray h, cnp.ndarray c, Py_ssize_t batch) noexcept:
        """Whether h and c are C-contiguous, writeable arrays of this dtype holding the flat state of ``batch`` rows."""
        return (cnp.PyArray_TYPE(h) == self.type_num and cnp.PyArray_TYPE(c) == self.type_num
                and cnp.PyArray_IS_C_CONTIGUOUS(h) and cnp.PyArray_IS_C_CONTIGUOUS(c)
                and cnp.PyArray_ISWRITEABLE(h) and cnp.PyArray_ISWRITEABLE(c)
                and cnp.PyArray_SIZE(h) == batch * self.h_items and cnp.PyArray_SIZE(c) == batch * self.c_items)

    def _state_error(self, str where, h, c, Py_ssize_t batch):
        return ValueError(
            f"{where}: h and c must be C-contiguous, writeable {self.dtype} arrays of {batch * self.h_items} and "
            f"{batch * self.c_items} items (the flat state of {batch} rows); got {np.shape(h)} {h.dtype}, "
            f"{np.shape(c)} {c.dtype}")

    # -------------------------------------------------------------------------------- streaming
    def new_workspace(self, Py_ssize_t batch_size):
        """Scratch for ``step`` at this batch size (see StepWorkspace)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        cdef StepWorkspace ws = StepWorkspace()
        cdef Py_ssize_t layer, offset = 0, lanes = VECTOR_BYTES // self.itemsize
        cdef const CellDesc* d
        ws.batch_size = batch_size
        ws.owner = self
        ws.threads = self._stream_threads(batch_size)
        ws.offsets = <Py_ssize_t*>malloc(WS_PER_LAYER * self.num_layers * sizeof(Py_ssize_t))
        if ws.offsets == NULL:
            raise MemoryError()
        # Every region starts on a whole vector: offsets are multiples of the lane count.
        for layer in range(self.num_layers):
            d = &self.cells[self.first_cells[layer]]
            ws.offsets[layer * WS_PER_LAYER + WS_XH] = offset
            offset += batch_size * d.row_stride
            ws.offsets[layer * WS_PER_LAYER + WS_HIDDEN] = offset
            offset += batch_size * d.hidden_stride
            ws.offsets[layer * WS_PER_LAYER + WS_Z] = offset
            offset += padded(batch_size * d.gate_rows, self.itemsize)
            ws.offsets[layer * WS_PER_LAYER + WS_ZX] = offset
            if d.kind != CELL_LSTM and d.kind != CELL_RNN:
                offset += padded(batch_size * d.gate_rows, self.itemsize)
        ws.head_offset = offset
        ws.head_items = padded(batch_size * self.head_width, self.itemsize)
        offset += 2 * ws.head_items
        ws.buffer = aligned_zeros(offset + lanes, self.dtype)
        ws.scratch = cnp.PyArray_DATA(ws.buffer)
        ws.output = np.zeros((batch_size, self.output_size), dtype=self.dtype)
        ws.output_data = cnp.PyArray_DATA(ws.output)
        return ws

    def step(self, cnp.ndarray x not None, cnp.ndarray h not None, cnp.ndarray c not None,
             StepWorkspace workspace not None):
        """Advance a forward stack one time step in place, then run the head on the top layer's new h into
        ``workspace.output`` (B, O) (without a head, the top layer's h is copied there).

        ``x`` is ``(B, I)`` (or ``(I,)`` at batch 1); ``h`` and ``c`` hold the flat state (layout in
        fastlstm.backends.base; any shape of that memory, 1-D as fastlstm.model passes it); all C-contiguous
        of this dtype; B is the workspace's batch size. The checks are C macros on the array headers, so a
        call costs little beyond them. The GIL is released when a step reads 64K weights or more (the cells'
        and the head's, all batch rows): releasing and re-taking it costs about 45 ns, a few percent of a
        smaller step, which no other thread could use.
        """
        cdef Py_ssize_t batch = workspace.batch_size
        if not self.streamable:
            raise ValueError("step(): only models whose layers are all forward can be stepped")
        if workspace.owner is not self:
            raise ValueError("step(): the workspace was made by another model's new_workspace()")
        if not (cnp.PyArray_TYPE(x) == self.type_num and cnp.PyArray_IS_C_CONTIGUOUS(x)):
            raise ValueError(f"step(): x must be a C-contiguous {self.dtype} array")
        if not ((cnp.PyArray_NDIM(x) == 2 and cnp.PyArray_DIM(x, 0) == batch
                 and cnp.PyArray_DIM(x, 1) == self.input_size)
                or (cnp.PyArray_NDIM(x) == 1 and batch == 1 and cnp.PyArray_DIM(x, 0) == self.input_size)):
            raise ValueError(f"step(): expected x ({batch}, {self.input_size}), got {np.shape(x)}")
        if not self._state_fits(h, c, batch):
            raise self._state_error("step()", h, c, batch)
        cdef void* xp = cnp.PyArray_DATA(x)
        cdef void* hp = cnp.PyArray_DATA(h)
        cdef void* cp = cnp.PyArray_DATA(c)
        if (self.weights_per_step + self.head_weights) * batch >= RELEASE_GIL_MIN_WEIGHTS:
            with nogil:
                self._step(batch, xp, hp, cp, workspace)
        else:
            self._step(batch, xp, hp, cp, workspace)

    cdef void _step(self, Py_ssize_t batch, void* x, void* h, void* c, StepWorkspace ws) noexcept nogil:
        cdef unsigned int saved_mode = flush_denormals()
        cdef StepJob job
        cdef const CellDesc* top = &self.cells[self.num_cells - 1]
        cdef bint use_blas = blas_within(self.num_threads)
        if ws.threads > 1:
            job.cells, job.num_layers, job.batch, job.offsets = self.cells, self.num_layers, batch, ws.offsets
            job.x, job.h, job.c, job.scratch = x, h, c, ws.scratch
            barrier_init(&job.barrier)
            run_parallel(step_job_double if self.is_double else step_job_float, &job, ws.threads)
        elif self.is_double:
            step_stack[double](self.cells, self.num_layers, batch, 0, batch, <double*>x, <double*>h,
                               <double*>c, <double*>ws.scratch, ws.offsets, use_blas)
        else:
            step_stack[float](self.cells, self.num_layers, batch, 0, batch, <float*>x, <float*>h, <float*>c,
                              <float*>ws.scratch, ws.offsets, use_blas)
        # The head, on the calling thread (its products may go to BLAS), from the top layer's (B, R) block of h.
        if self.is_double:
            run_head[double](self.head_stages, self.num_head_stages, batch, <double*>h + batch * top.h_start,
                             top.rec_size, <double*>ws.output_data,
                             <double*>ws.scratch + ws.head_offset, ws.head_items, use_blas)
        else:
            run_head[float](self.head_stages, self.num_head_stages, batch, <float*>h + batch * top.h_start,
                            top.rec_size, <float*>ws.output_data,
                            <float*>ws.scratch + ws.head_offset, ws.head_items, use_blas)
        restore_fp_mode(saved_mode)

    cdef int _stream_threads(self, Py_ssize_t batch):
        """How many threads a stream step at this batch size takes (see the thresholds' comment)."""
        if self.num_threads < 2:
            return 1
        if batch == 1:
            return self.num_threads if self.steps_threadable and self.weights_per_step >= STREAM_UNIT_SPLIT_MIN_WEIGHTS else 1
        # By rows: no projection (its product may be BLAS, which must not run inside our threads).
        if not self.steps_threadable or self.weights_per_step * batch < ROWS_SPLIT_MIN_WEIGHTS:
            return 1
        if self.is_double and (batch + self.num_threads - 1) // self.num_threads > HAND_MATMUL_MAX_ROWS:
            return 1
        return <int>min(<Py_ssize_t>self.num_threads, batch)

    # -------------------------------------------------------------------------------- whole sequences
    def sequence_threads(self, Py_ssize_t batch):
        """The most threads ``run_sequence`` takes for a cell's time loop at this batch size."""
        return max(sequence_team(&self.cells[n], batch, self.num_threads) for n in range(self.num_cells))

    def run_sequence(self, cnp.ndarray x not None, cnp.ndarray h not None, cnp.ndarray c not None,
                     lengths=None):
        """Every layer over x (B, T, I); h and c (the flat state, as in ``step``) hold the initial state and
        get the final one. Returns the last layer's output (B, T, D * R). Semantics of ``lengths`` as in
        ``PreparedLSTM.run_sequence``."""
        if not (cnp.PyArray_TYPE(x) == self.type_num and cnp.PyArray_IS_C_CONTIGUOUS(x)):
            raise ValueError(f"run_sequence(): x must be a C-contiguous {self.dtype} array")
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"run_sequence(): expected x (B, T, {self.input_size}), got {np.shape(x)}")
        cdef Py_ssize_t batch = x.shape[0], steps = x.shape[1]
        if not self._state_fits(h, c, batch):
            raise self._state_error("run_sequence()", h, c, batch)
        cdef cnp.ndarray lengths_array = None
        cdef const int64_t* lengths_ptr = NULL
        if lengths is not None:
            lengths_array = np.ascontiguousarray(lengths, dtype=np.int64)
            if lengths_array.ndim != 1 or lengths_array.shape[0] != batch:
                raise ValueError(f"lengths: expected shape ({batch},), got {np.shape(lengths_array)}")
            if batch and not (lengths_array.min() >= 1 and lengths_array.max() <= steps):
                raise ValueError(f"lengths: expected values in [1, {steps}]")
            lengths_ptr = <const int64_t*>cnp.PyArray_DATA(lengths_array)

        cdef Py_ssize_t lanes = VECTOR_BYTES // self.itemsize
        cdef Py_ssize_t layer, direction, cell_index = 0, num_dirs
        cdef cnp.ndarray layer_input = x, layer_output
        cdef cnp.ndarray x_proj = np.empty((batch * steps, self.max_gate_rows), dtype=self.dtype)
        cdef cnp.ndarray z = np.empty((batch, self.max_gate_rows), dtype=self.dtype)
        cdef cnp.ndarray hidden, h_pad
        cdef const CellDesc* d
        cdef bint reverse
        cdef unsigned int saved_mode
        cdef char* h_base = <char*>cnp.PyArray_DATA(h)
        cdef char* c_base = <char*>cnp.PyArray_DATA(c)
        cdef char* out_base
        cdef Py_ssize_t out_width
        for layer in range(self.num_layers):
            num_dirs = self.directions[layer]
            out_width = num_dirs * self.cells[cell_index].rec_size
            make = np.zeros if lengths is not None else np.empty  # outputs past a row's length are zero
            layer_output = make((batch, steps, out_width), dtype=self.dtype)
            out_base = <char*>cnp.PyArray_DATA(layer_output)
            for direction in range(num_dirs):
                d = &self.cells[cell_index]
                reverse = self.reverse_layer[layer] or direction == 1
                hidden = aligned_zeros(batch * d.hidden_stride + lanes, self.dtype)
                h_pad = aligned_zeros(max(batch, 2) * d.rec_stride + lanes, self.dtype)
                with nogil:
                    saved_mode = flush_denormals()
                    if self.is_double:
                        run_cell[double](
                            d, batch, steps, <const double*>cnp.PyArray_DATA(layer_input),
                            <double*>(h_base + batch * d.h_start * self.itemsize),
                            <double*>(c_base + batch * d.c_start * self.itemsize),
                            <double*>out_base + direction * d.rec_size, out_width, reverse, lengths_ptr,
                            <double*>cnp.PyArray_DATA(x_proj), <double*>cnp.PyArray_DATA(z),
                            <double*>cnp.PyArray_DATA(hidden), <double*>cnp.PyArray_DATA(h_pad),
                            self.num_threads)
                    else:
                        run_cell[float](
                            d, batch, steps, <const float*>cnp.PyArray_DATA(layer_input),
                            <float*>(h_base + batch * d.h_start * self.itemsize),
                            <float*>(c_base + batch * d.c_start * self.itemsize),
                            <float*>out_base + direction * d.rec_size, out_width, reverse, lengths_ptr,
                            <float*>cnp.PyArray_DATA(x_proj), <float*>cnp.PyArray_DATA(z),
                            <float*>cnp.PyArray_DATA(hidden), <float*>cnp.PyArray_DATA(h_pad),
                            self.num_threads)
                    restore_fp_mode(saved_mode)
                cell_index += 1
            layer_input = layer_output
        return layer_input

    def run_head(self, cnp.ndarray x not None):
        """The head over x (N, F): a new (N, O) array (a copy of x without a head). F is what the recurrent
        stack outputs; x is C-contiguous of this dtype."""
        if not (cnp.PyArray_TYPE(x) == self.type_num and cnp.PyArray_IS_C_CONTIGUOUS(x)):
            raise ValueError(f"run_head(): x must be a C-contiguous {self.dtype} array")
        if x.ndim != 2 or x.shape[1] != self.head_input_size:
            raise ValueError(f"run_head(): expected x (N, {self.head_input_size}), got {np.shape(x)}")
        cdef Py_ssize_t rows = x.shape[0]
        cdef cnp.ndarray y = np.empty((rows, self.output_size), dtype=self.dtype)
        cdef Py_ssize_t half = padded(rows * self.head_width, self.itemsize)
        cdef cnp.ndarray scratch = aligned_zeros(2 * half + 1, self.dtype)
        cdef unsigned int saved_mode
        cdef bint use_blas = blas_within(self.num_threads)
        if rows == 0:
            return y
        with nogil:
            saved_mode = flush_denormals()
            if self.is_double:
                run_head[double](self.head_stages, self.num_head_stages, rows, <const double*>cnp.PyArray_DATA(x),
                                 self.head_input_size, <double*>cnp.PyArray_DATA(y),
                                 <double*>cnp.PyArray_DATA(scratch), half, use_blas)
            else:
                run_head[float](self.head_stages, self.num_head_stages, rows, <const float*>cnp.PyArray_DATA(x),
                                self.head_input_size, <float*>cnp.PyArray_DATA(y),
                                <float*>cnp.PyArray_DATA(scratch), half, use_blas)
            restore_fp_mode(saved_mode)
        return y


# ------------------------------------------------------------------------------------------------------
# Kernel entry points for tests.

def fast_tanh_array(x):
    """The C float32 tanh applied to each element of ``x`` (cast to float32); for testing the bound."""
    cdef cnp.ndarray[float, ndim=1, mode="c"] values = np.ascontiguousarray(x, dtype=np.float32).ravel().copy()
    cdef float* p = &values[0] if values.shape[0] else NULL
    cdef Py_ssize_t n
    for n in range(values.shape[0]):
        p[n] = fast_tanh(p[n])
    return values.reshape(np.shape(x))


def fast_sigmoid_array(x):
    """The C float32 sigmoid applied to each element of ``x`` (cast to float32); for testing the bound."""
    cdef cnp.ndarray[float, ndim=1, mode="c"] values = np.ascontiguousarray(x, dtype=np.float32).ravel().copy()
    cdef float* p = &values[0] if values.shape[0] else NULL
    cdef Py_ssize_t n
    for n in range(values.shape[0]):
        p[n] = sigmoid[float](p[n])
    return values.reshape(np.shape(x))


def activation_array(x, int code, double alpha=0.0, double beta=0.0):
    """The kernels' activation ``code`` applied to each element of a float32 or float64 array."""
    values = np.array(x, order="C", copy=True)
    if values.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected float32 or float64, got {values.dtype}")
    cdef Py_ssize_t n, size = values.size
    cdef float* pf
    cdef double* pd
    if values.dtype == np.float32:
        pf = <float*>cnp.PyArray_DATA(values)
        for n in range(size):
            pf[n] = activation[float](pf[n], code, <float>alpha, <float>beta)
    else:
        pd = <double*>cnp.PyArray_DATA(values)
        for n in range(size):
            pd[n] = activation[double](pd[n], code, alpha, beta)
    return values


def fp_mode():
    """The calling thread's floating-point control word (MXCSR on x86-64, 0 elsewhere): kernels restore it."""
    return current_fp_mode()

