"""Jitted kernels of the Numba backend: the streaming step and whole sequences of stacks of LSTM, GRU and
simple RNN cells, float32 and float64.

Every kernel takes the weights as arguments (nothing is compiled per model) and is cached on disk. One
compiled version exists per dtype; the float32 one evaluates sigmoid and tanh with the rational
approximation of ``fastlstm.fast_activations``, the float64 one with the exact functions.

Packed layout, built once per model by ``numba_backend.pack_cells`` from the planner's cells
(``fastlstm.backends._cells``):

* ``weights`` is one flat, 64-byte-aligned array of the run dtype, never written after packing (yet not
  flagged read-only: Numba takes 0.1 us longer to dispatch each read-only argument, a stream step pays it
  on every call). Each cell (one direction of one layer) owns segments of it, each on a 64-byte boundary:

  - ``input`` ``(I, G*H)``: ``w_ih.T`` (G = 4, 3, 1 gates for an LSTM, a GRU, a simple RNN), i.e. row k
    holds what input feature k adds to the G*H gate pre-activations, gates in spec order; BLAS multiplies
    all time steps' inputs by it in one GEMM, and a step's ``x @ input`` is one pass over it whose inner
    loop runs along a contiguous row (vectorised by LLVM, no reductions);
  - ``recurrent`` ``(R, G*H)``: ``w_hh.T``, the same for the fed-back state. A GRU that resets before the
    linear map needs ``r`` before its candidate's product, so its ``w_hh.T`` is split in two segments:
    the r and z columns ``(R, 2H)`` and the candidate's ``(R, H)``;
  - ``bias`` ``(G*H,)``; a GRU's ``recurrent_bias`` ``(3H,)`` ``[0 | 0 | b_hn]``, where its recurrent products
    start; ``peephole`` ``(3, H)`` (i, f, o), when present; ``projection`` ``w_hr.T`` ``(H, P)``, when present;
  - ``params`` ``(7,)``: the clip bound (+inf without clip) and alpha, beta of the gate, cell and output
    activations, cast to the run dtype as the NumPy reference casts them.
  - with 8- or 16-bit gate weights (float32 only, ``fastlstm.quantize``): ``input_narrow``,
    ``recurrent_narrow`` (and a reset-first GRU's ``candidate_narrow``), the same matrices as the format
    stores them, bfloat16 bit patterns (uint16) or int8, their bytes packed into float32 items of the flat
    array and read back through a view; for int8 also ``input_scale`` and ``recurrent_scale`` ``(G*H,)``,
    each gate row's scale (one per column of the transposed matrices). Products at batch 1 (stream steps and
    the time loops of whole sequences) read these, widened to float32 as they load; the float segments then
    hold the values they represent, exactly, for every product of more rows and for the input projection of
    whole sequences (bound by arithmetic more than by bytes).

* the dense head, when the model has one, owns segments of ``weights`` too: per dense layer ``head_weight``
  ``(in, out)`` (``weight.T``), ``head_bias`` ``(out,)`` (zeros for a layer without bias), and per stage
  ``head_params`` ``(2,)``: alpha and beta of its activation.

* ``cells`` is an int64 table with one row per cell, in state order (layer by layer, forward direction
  first); its columns are the ``COL_*`` constants below, among them where the cell's blocks of the flat
  state start (``COL_H_START``, ``COL_C_START``: the kernels take ``h`` and ``c`` in the flat layout of
  ``fastlstm.backends.base``, of any C-contiguous shape, and slice each cell's ``(B, R)`` and ``(B, H)``
  blocks from them).

* ``head`` is an int64 table with one row per stage of the dense head (none without a head): the head's
  input activation (no weight), then each dense layer; its columns are the ``HEAD_*`` constants below.

Every cell step is one product of the input with ``input`` (hoisted over whole sequences, or one pass per
stream step), one pass over ``recurrent`` (two for a GRU that resets first), then one fused pointwise loop
per kind; scratch is sized by the widest cell, and nothing is allocated per step.

This file holds jitted code and the constants it reads only: Numba's on-disk cache is keyed on the file that
defines a cached function, so everything compiled into the kernels must live here; the pure-Python packing
lives in ``numba_backend``. The thresholds' names are shared with the Cython backend (see ``_cells``).

The layering is: drivers that Python calls (``step_stack``, ``run_stack``, ``run_head``,
``step_scratch_size``), then
one layer / one cell (``_layer_step``, ``_run_layer``, ``_run_cell``, and ``_cell_step``, the recurrent
half of a step both share), then small helpers (products, pointwise updates, activations).

The float32 rational-approximation constants are read from ``fastlstm.fast_activations`` when a kernel is
compiled and are frozen into the on-disk cache; the cache is keyed on this file only, so after changing
those constants delete this package's ``__pycache__`` (tests/test_numba_kernels.py would fail otherwise).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ..activations import ACTIVATION_CODES
from ..fast_activations import TANH_CLAMP, TANH_DENOMINATOR, TANH_NUMERATOR

# ------------------------------------------------------------------------------------------------------
# Compiler and threading choices, in one place.

# "contract" lets LLVM fuse multiply-adds (FMA). Nothing here needs reassociation: the products are written
# as elementwise updates along contiguous rows, which vectorise without reordering any sum, and the
# NaN/inf semantics of the clip and the activations are kept. error_model="numpy": a float division needs no
# zero check, which would keep the rational tanh from vectorising.
FASTMATH = {"contract"}
_KERNEL_OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
_HELPER_OPTIONS = dict(fastmath=FASTMATH, error_model="numpy", boundscheck=False)
# sigmoid and tanh without contraction, so that the float32 approximation rounds operation for operation as
# fast_activations.tanh_approx does and the two agree exactly (tests/test_numba_kernels.py checks it).
# Explicitly False: a callee that leaves fastmath unset inherits its caller's.
_ACTIVATION_OPTIONS = dict(fastmath=False, error_model="numpy", boundscheck=False)

# Threads. Every kernel runs on the calling thread only: a stream step is too short to split, and on the
# 2 cores measured, splitting a batched step's small products made it slower. BLAS (SciPy's OpenBLAS,
# through np.dot) runs the GEMMs of batches above HAND_MATMUL_MAX_ROWS and the input projection of whole
# sequences, with the threads OpenBLAS is configured for: so only while that is no more than the model's
# num_threads (asked of the BLAS library before each such product, fastlstm.backends.blas_threads), and
# the hand loops otherwise. num_threads also decides whether a batch-1 product may go to BLAS
# (BLAS_GEMV_MIN_BYTES).
# The kernels release the GIL, except the stream step of a small model (step_stack_holding_gil): releasing
# and re-taking it costs about 40 ns, a few percent of a small step, which no other thread could use.
RELEASE_GIL_MIN_WEIGHTS = 1 << 16  # weights a stream step reads (all layers, all batch rows)

# Which product runs a cell's matrix multiplication (hand-written loop or BLAS), from measurements with one
# OpenBLAS thread (AMD Zen 4, AVX-512, 1 MiB L2 per core):
# * at batch 1 the hand loop is as fast as OpenBLAS gemv (both stream the weights from cache);
# * from 2 to 8 rows the hand loop (two rows per pass over the weights) is 1.1-1.8x faster than OpenBLAS when
#   the weights exceed L2 (1.5 MiB: OpenBLAS takes 150-170 us whatever the batch, the hand loop 20-100 us)
#   and up to 1.4x slower below it; above 8 rows, GEMM's register blocking wins.
HAND_MATMUL_MAX_ROWS = 8
# * at batch 1, a matrix of at least this many bytes goes to BLAS GEMV when the model may use more than one
#   thread: OpenBLAS then splits it over cores, which the hand loop cannot (recorded per cell by
#   numba_backend.pack_cells).
BLAS_GEMV_MIN_BYTES = 2 * 1024 * 1024

# ------------------------------------------------------------------------------------------------------
# The cell table.

NUM_COLUMNS = 31
(
    COL_KIND,                 # KIND_CODES of the cell's kind
    COL_GATES,                # G: 4 (LSTM), 3 (GRU) or 1 (RNN)
    COL_INPUT_SIZE,           # I
    COL_HIDDEN_SIZE,          # H
    COL_PROJ_SIZE,            # P, 0 without projection (then R = H)
    COL_INPUT,                # offset of the (I, G*H) input weights w_ih.T
    COL_RECURRENT,            # offset of the (R, G*H) recurrent weights w_hh.T; for a GRU that resets before
                              # the linear map, of the (R, 2H) r and z columns only
    COL_RECURRENT_N,          # offset of that GRU's (R, H) candidate columns of w_hh.T; -1 for other cells
    COL_BIAS,                 # offset of the (G*H,) bias
    COL_RECURRENT_BIAS,       # GRU: offset of (3H,) [0 | 0 | b_hn], what the recurrent products start from; else -1
    COL_PEEPHOLE,             # offset of the (3, H) peepholes, -1 when none
    COL_PROJECTION,           # offset of the (H, P) transposed projection, -1 when none
    COL_PARAMS,               # offset of (clip, gate alpha, gate beta, cell alpha, cell beta, output alpha, beta)
    COL_ACTIVATIONS,          # gate, cell and output activation codes, 8 bits each (gate lowest)
    COL_INPUT_FORGET,         # 1 for coupled input/forget gates
    COL_LINEAR_BEFORE_RESET,  # GRU: 1 for the linear-before-reset variant (1 for the other kinds)
    COL_STANDARD,             # 1 for the kind's plain activations without clip, peepholes or coupled gates
    COL_REVERSE,              # 1 for a cell that reads the sequence from its end
    COL_DIRECTIONS,           # 1 or 2: directions of the cell's layer
    COL_BLAS_GEMV,            # 1 when its batch-1 products go to BLAS (see BLAS_GEMV_MIN_BYTES)
    COL_H_START,              # items of one batch row of h held by the cells before this one: the cell's
    COL_C_START,              # (B, R) block of the flat h starts at B * COL_H_START; likewise its c block
    COL_WEIGHT_FORMAT,        # WEIGHT_FORMAT_CODES of the gate weights' format
    COL_INPUT_NARROW,         # offsets of the narrow (bfloat16 or int8) input, recurrent and candidate
    COL_RECURRENT_NARROW,     # matrices (shapes as COL_INPUT, COL_RECURRENT, COL_RECURRENT_N); -1 when the
    COL_RECURRENT_N_NARROW,   # weights are float (or the cell has no candidate segment)
    COL_INPUT_SCALE,          # int8: offsets of the (G*H,) scales of the input and recurrent weights' gate rows;
    COL_RECURRENT_SCALE,      # -1 for other formats
    COL_NUM_THREADS,          # the model's num_threads: BLAS runs a product only on as many threads or fewer
    COL_BLAS_THREAD_QUERY,    # address of BLAS's ``int query(void)`` thread count (blas_threads), 0 if unknown
    COL_BLAS_CORES,           # the threads BLAS is taken to use when there is no query: the process's cores
) = range(NUM_COLUMNS)

HEAD_NUM_COLUMNS = 6
(
    HEAD_IN,                  # features into the stage
    HEAD_OUT,                 # features out of it (HEAD_IN for the input activation)
    HEAD_WEIGHT,              # offset of the (in, out) weight.T, -1 for the input activation
    HEAD_BIAS,                # offset of the (out,) bias, -1 for the input activation
    HEAD_ACTIVATION,          # ``Activation.code``; softmax acts on each row as a whole
    HEAD_PARAMS,              # offset of (alpha, beta) of the activation
) = range(HEAD_NUM_COLUMNS)
WEIGHT_FORMAT_CODES = {"float32": 0, "bfloat16": 1, "int8": 2}
_FORMAT_FLOAT, _FORMAT_BFLOAT16, _FORMAT_INT8 = (WEIGHT_FORMAT_CODES[f] for f in ("float32", "bfloat16", "int8"))
# Which of a cell's gate matrices a product reads.
_INPUT, _RECURRENT, _CANDIDATE = 0, 1, 2

KIND_CODES = {"lstm": 0, "gru": 1, "rnn": 2}
_KIND_LSTM, _KIND_GRU, _KIND_RNN = KIND_CODES["lstm"], KIND_CODES["gru"], KIND_CODES["rnn"]

_ACT_IDENTITY = ACTIVATION_CODES["identity"]
_ACT_SIGMOID = ACTIVATION_CODES["sigmoid"]
_ACT_TANH = ACTIVATION_CODES["tanh"]
_ACT_RELU = ACTIVATION_CODES["relu"]
_ACT_AFFINE = ACTIVATION_CODES["affine"]
_ACT_LEAKY_RELU = ACTIVATION_CODES["leaky_relu"]
_ACT_THRESHOLDED_RELU = ACTIVATION_CODES["thresholded_relu"]
_ACT_SCALED_TANH = ACTIVATION_CODES["scaled_tanh"]
_ACT_HARD_SIGMOID = ACTIVATION_CODES["hard_sigmoid"]
_ACT_ELU = ACTIVATION_CODES["elu"]
_ACT_SOFTSIGN = ACTIVATION_CODES["softsign"]
_ACT_SOFTPLUS = ACTIVATION_CODES["softplus"]
_ACT_SOFTMAX = ACTIVATION_CODES["softmax"]


# ------------------------------------------------------------------------------------------------------
# Denormals flushed to zero (FTZ, MXCSR bit 15) and read as zero (DAZ, bit 6) while a kernel computes:
# a decaying state that reaches the denormal range would otherwise slow every operation on it ~100x.
# The caller's mode is restored before the kernel returns, and never changed around code that could
# raise or allocate. Other architectures keep their default mode.

_FLUSH_DENORMALS_BITS = 0x8040
FLUSHES_DENORMALS = platform.machine().lower() in ("x86_64", "amd64")


def _call_mxcsr_intrinsic(builder, name, slot):
    byte_pointer = ir.IntType(8).as_pointer()
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer]), name)
    builder.call(function, [builder.bitcast(slot, byte_pointer)])


@intrinsic
def _fp_mode(typingctx):
    """The calling thread's MXCSR (0 where denormals are not flushed)."""
    def codegen(context, builder, signature, args):
        if not FLUSHES_DENORMALS:
            return ir.Constant(ir.IntType(32), 0)
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _call_mxcsr_intrinsic(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def _set_fp_mode(typingctx, mode):
    """Load ``mode`` into the calling thread's MXCSR (nothing where denormals are not flushed)."""
    def codegen(context, builder, signature, args):
        if FLUSHES_DENORMALS:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _call_mxcsr_intrinsic(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    return types.void(types.uint32), codegen


@njit(**_HELPER_OPTIONS)
def _flush_denormals():
    """Turn on FTZ/DAZ; returns the previous mode for ``_set_fp_mode``."""
    saved = _fp_mode()
    if FLUSHES_DENORMALS:
        _set_fp_mode(saved | np.uint32(_FLUSH_DENORMALS_BITS))
    return saved


@intrinsic
def _call_thread_query(typingctx, address):
    """The int that the C function ``int f(void)`` at ``address`` (int64) returns."""
    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = builder.inttoptr(args[0], function_type.as_pointer())
        return builder.sext(builder.call(function, []), ir.IntType(64))
    return types.int64(types.int64), codegen


@njit(cache=True)
def fp_mode():
    """The calling thread's MXCSR, for tests: kernels must leave it as they found it."""
    return _fp_mode()


# ------------------------------------------------------------------------------------------------------
# Activations. sigmoid and tanh are chosen by argument type at compile time: the rational approximation in
# float32, the exact functions in float64.

_F32 = np.float32
_CLAMP = _F32(TANH_CLAMP)
_N0, _N1, _N2, _N3, _N4, _N5, _N6 = (_F32(v) for v in TANH_NUMERATOR)
_D0, _D1, _D2, _D3 = (_F32(v) for v in TANH_DENOMINATOR)
_HALF32 = _F32(0.5)


@njit(**_ACTIVATION_OPTIONS)
def _rational_tanh(x):
    """tanh(x) ~= x * N(x^2) / D(x^2) on float32 x clamped to +-TANH_CLAMP (bound in fast_activations)."""
    # Two comparisons rather than min/max: a NaN fails both and comes out NaN, as from np.clip.
    if x > _CLAMP:
        x = _CLAMP
    if x < -_CLAMP:
        x = -_CLAMP
    x2 = x * x
    p = ((((((_N6 * x2 + _N5) * x2 + _N4) * x2 + _N3) * x2 + _N2) * x2 + _N1) * x2 + _N0)
    q = (((_D3 * x2 + _D2) * x2 + _D1) * x2 + _D0)
    return x * p / q


def _tanh(x):
    """tanh inside a kernel (compiled by the overload below; not callable from Python)."""
    raise NotImplementedError


def _sigmoid(x):
    """1 / (1 + exp(-x)) inside a kernel (compiled by the overload below; not callable from Python)."""
    raise NotImplementedError


def _activation(x, code, alpha, beta):
    """Activation ``code`` of fastlstm.activations at x, inside a kernel (see the overload below)."""
    raise NotImplementedError


@overload(_tanh, jit_options=_ACTIVATION_OPTIONS)
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _rational_tanh(x)
    return lambda x: np.tanh(x)


@overload(_sigmoid, jit_options=_ACTIVATION_OPTIONS)
def _sigmoid_overload(x):
    if x == types.float32:
        # An identity, not a further approximation: sigmoid(x) = 0.5 * tanh(x / 2) + 0.5.
        return lambda x: _HALF32 * _rational_tanh(_HALF32 * x) + _HALF32
    # exp overflowing to inf for x < -709 gives the right limit, 0.
    return lambda x: 1.0 / (1.0 + np.exp(-x))


@overload(_activation, jit_options=_HELPER_OPTIONS)
def _activation_overload(x, code, alpha, beta):
    # Constants of x's own type: an untyped 0 or 1 would promote float32 arithmetic to float64.
    as_float = as_dtype(x).type
    zero, one, nan = as_float(0), as_float(1), as_float(np.nan)

    def activation(x, code, alpha, beta):
        # The Cython kernels repeat this switch in C (they cannot share code); tests/test_kernel_activations.py
        # holds both to the NumPy definitions.
        if code == _ACT_SIGMOID:
            return _sigmoid(x)
        if code == _ACT_TANH:
            return _tanh(x)
        if code == _ACT_IDENTITY:
            return x
        if code == _ACT_RELU:
            return zero if x < zero else x
        if code == _ACT_AFFINE:
            return alpha * x + beta
        if code == _ACT_LEAKY_RELU:
            return x if x >= zero else alpha * x
        if code == _ACT_THRESHOLDED_RELU:
            return x if x > alpha else zero
        if code == _ACT_SCALED_TANH:
            return alpha * _tanh(beta * x)
        if code == _ACT_HARD_SIGMOID:
            y = alpha * x + beta
            y = zero if y < zero else y
            return one if y > one else y
        if code == _ACT_ELU:
            return x if x >= zero else alpha * np.expm1(x)
        if code == _ACT_SOFTSIGN:
            return x / (one + abs(x))
        if code == _ACT_SOFTPLUS:  # log(1 + e^x) = max(x, 0) + log1p(e^-|x|), never overflowing
            return (x if x > zero else zero) + np.log1p(np.exp(-abs(x)))
        return nan  # unknown code: rejected by the spec's validation, never reached

    return activation


@njit(**_HELPER_OPTIONS)
def _clamp(x, bound):
    """x limited to [-bound, bound] (bound = inf without clip); NaN stays NaN."""
    if x > bound:
        x = bound
    if x < -bound:
        x = -bound
    return x


@njit(cache=True, **_HELPER_OPTIONS)
def apply_activation(values, code, alpha, beta):
    """The kernels' activation ``code`` on a copy of ``values`` (for tests)."""
    out = values.copy()
    a, b = values.dtype.type(alpha), values.dtype.type(beta)
    flat = out.reshape(-1)
    for n in range(flat.size):
        flat[n] = _activation(flat[n], code, a, b)
    return out


# ------------------------------------------------------------------------------------------------------
# Products.

@njit(**_HELPER_OPTIONS)
def _add_vector_matrix_product(v, m, out):
    """out += v @ m for v (K,), m (K, N), out (N,).

    Four rows of m per pass over out: each pass is an elementwise loop along contiguous rows, which LLVM
    vectorises (FMA) without reordering any sum, and out is loaded and stored once per four rows.
    """
    rows, cols = m.shape
    full = rows - rows % 4
    for k in range(0, full, 4):
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
        for n in range(cols):
            out[n] += v0 * m0[n] + v1 * m1[n] + v2 * m2[n] + v3 * m3[n]
    for k in range(full, rows):
        vk = v[k]
        mk = m[k]
        for n in range(cols):
            out[n] += vk * mk[n]


@njit(**_HELPER_OPTIONS)
def _add_two_vector_matrix_products(v0, v1, m, out0, out1):
    """out0 += v0 @ m and out1 += v1 @ m in one pass over m: each loaded row of m serves both products."""
    rows, cols = m.shape
    full = rows - rows % 4
    for k in range(0, full, 4):
        a0, a1, a2, a3 = v0[k], v0[k + 1], v0[k + 2], v0[k + 3]
        b0, b1, b2, b3 = v1[k], v1[k + 1], v1[k + 2], v1[k + 3]
        m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
        for n in range(cols):
            w0, w1, w2, w3 = m0[n], m1[n], m2[n], m3[n]
            out0[n] += a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3
            out1[n] += b0 * w0 + b1 * w1 + b2 * w2 + b3 * w3
    for k in range(full, rows):
        a, b = v0[k], v1[k]
        mk = m[k]
        for n in range(cols):
            out0[n] += a * mk[n]
            out1[n] += b * mk[n]


@intrinsic
def _bfloat16_value(typingctx, bits):
    """The float32 whose upper 16 bits are ``bits`` (uint16) and whose lower 16 are zero."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(**_HELPER_OPTIONS)
def _add_vector_bfloat16_product(v, m, out):
    """out += v @ m for m (K, N) of bfloat16 bit patterns, each widened to float32 as it loads (as
    ``_add_vector_matrix_product``, written apart because a load passed in as a function would not be inlined
    into the vectorised inner loop)."""
    rows, cols = m.shape
    full = rows - rows % 4
    for k in range(0, full, 4):
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
        for n in range(cols):
            out[n] += (v0 * _bfloat16_value(m0[n]) + v1 * _bfloat16_value(m1[n]) + v2 * _bfloat16_value(m2[n])
                       + v3 * _bfloat16_value(m3[n]))
    for k in range(full, rows):
        vk = v[k]
        mk = m[k]
        for n in range(cols):
            out[n] += vk * _bfloat16_value(mk[n])


@njit(**_HELPER_OPTIONS)
def _add_vector_int8_product(v, q, scale, out):
    """out += v @ (q * scale) for q (K, N) int8 and scale (N,): each integer widened to float32 as it loads;
    four rows' sum of a column is scaled once."""
    rows, cols = q.shape
    full = rows - rows % 4
    for k in range(0, full, 4):
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        q0, q1, q2, q3 = q[k], q[k + 1], q[k + 2], q[k + 3]
        for n in range(cols):
            out[n] += scale[n] * (v0 * _F32(q0[n]) + v1 * _F32(q1[n]) + v2 * _F32(q2[n]) + v3 * _F32(q3[n]))
    for k in range(full, rows):
        vk = v[k]
        qk = q[k]
        for n in range(cols):
            out[n] += scale[n] * (vk * _F32(qk[n]))


@njit(**_HELPER_OPTIONS)
def _add_gate_product(v, weights, cell, which, out):
    """out += v @ W for one row v (K,) and out (N,), W the cell's ``which`` matrix (_INPUT, _RECURRENT or
    _CANDIDATE, transposed as packed) read in the cell's weight format, by the hand loop."""
    I, H, _, R, GH = _sizes(cell)
    fmt = cell[COL_WEIGHT_FORMAT]
    if which == _INPUT:
        rows, cols, column, scale_column = I, GH, COL_INPUT_NARROW, COL_INPUT_SCALE
    elif which == _RECURRENT:
        rows, cols = R, (GH if cell[COL_LINEAR_BEFORE_RESET] else 2 * H)
        column, scale_column = COL_RECURRENT_NARROW, COL_RECURRENT_SCALE
    else:
        rows, cols, column, scale_column = R, H, COL_RECURRENT_N_NARROW, COL_RECURRENT_SCALE
    if fmt == _FORMAT_FLOAT:
        if which == _INPUT:
            _add_vector_matrix_product(v, _input_weights(weights, cell), out)
        elif which == _RECURRENT:
            _add_vector_matrix_product(v, _recurrent_weights(weights, cell), out)
        else:
            _add_vector_matrix_product(v, _candidate_weights(weights, cell), out)
        return
    start = cell[column]
    if fmt == _FORMAT_BFLOAT16:
        bits = weights[start:start + (rows * cols + 1) // 2].view(np.uint16)[:rows * cols].reshape(rows, cols)
        _add_vector_bfloat16_product(v, bits, out)
        return
    q = weights[start:start + (rows * cols + 3) // 4].view(np.int8)[:rows * cols].reshape(rows, cols)
    scale_start = cell[scale_column] + (2 * H if which == _CANDIDATE else 0)
    _add_vector_int8_product(v, q, weights[scale_start:scale_start + cols], out)


@njit(**_HELPER_OPTIONS)
def _gate_matmul(a, weights, cell, which, init, out, by_hand):
    """out = init + a @ W for a (B, K), out (B, N), init (N,) or None (zeros), W as in ``_add_gate_product``:
    at batch 1 by the hand loop in the cell's weight format; above, on the float values of the weights (the
    hand loop's pairs of rows, or BLAS): a pair reads each float weight once for two rows, which was faster
    at batch 8 than reading the narrow weights once per row."""
    if by_hand and a.shape[0] == 1 and cell[COL_WEIGHT_FORMAT] != _FORMAT_FLOAT:
        if init is None:
            out[0] = 0
        else:
            out[0] = init
        _add_gate_product(a[0], weights, cell, which, out[0])
        return
    if which == _INPUT:
        m = _input_weights(weights, cell)
    elif which == _RECURRENT:
        m = _recurrent_weights(weights, cell)
    else:
        m = _candidate_weights(weights, cell)
    if init is None:
        _matmul(a, m, out, by_hand)
    else:
        _matmul_onto(a, m, init, out, by_hand)


@njit(**_HELPER_OPTIONS)
def _add_matrix_product(a, m, out):
    """out += a @ m for a (B, K), m (K, N), out (B, N), rows of a taken in pairs (see above)."""
    batch = a.shape[0]
    for b in range(0, batch - 1, 2):
        _add_two_vector_matrix_products(a[b], a[b + 1], m, out[b], out[b + 1])
    if batch % 2:
        _add_vector_matrix_product(a[batch - 1], m, out[batch - 1])


@njit(**_HELPER_OPTIONS)
def _matmul(a, m, out, by_hand):
    """out = a @ m for a (B, K), m (K, N), out (B, N): the hand loop, or BLAS."""
    if by_hand:
        out[:] = 0
        _add_matrix_product(a, m, out)
    else:
        np.dot(a, m, out)


@njit(**_HELPER_OPTIONS)
def _matmul_onto(a, m, init, out, by_hand):
    """out = init + a @ m for a (B, K), m (K, N), init (N,), out (B, N): the hand loop, or BLAS."""
    if by_hand:
        for b in range(out.shape[0]):
            out[b] = init
        _add_matrix_product(a, m, out)
    else:
        np.dot(a, m, out)
        for b in range(out.shape[0]):
            row = out[b]
            for n in range(init.shape[0]):
                row[n] += init[n]


@njit(**_HELPER_OPTIONS)
def _blas_allowed(cell):
    """Whether BLAS runs a product now on no more threads than the model's num_threads."""
    query = cell[COL_BLAS_THREAD_QUERY]
    threads = _call_thread_query(query) if query != 0 else cell[COL_BLAS_CORES]
    return threads <= cell[COL_NUM_THREADS]


@njit(**_HELPER_OPTIONS)
def _uses_hand_loop(cell, batch):
    """Whether the cell's products of ``batch`` rows run in the hand loop (else in BLAS)."""
    if batch <= HAND_MATMUL_MAX_ROWS and not (batch == 1 and cell[COL_BLAS_GEMV]):
        return True
    return not _blas_allowed(cell)


# ------------------------------------------------------------------------------------------------------
# Pointwise part of a step, one batch row: activations and the state update of each kind.

@njit(**_HELPER_OPTIONS)
def _activation_params(weights, cell):
    """(clip bound, gate code, alpha, beta, cell code, alpha, beta, output code, alpha, beta) of the cell."""
    p = weights[cell[COL_PARAMS]:cell[COL_PARAMS] + 7]
    codes = cell[COL_ACTIVATIONS]
    return (p[0], codes & 255, p[1], p[2], (codes >> 8) & 255, p[3], p[4], (codes >> 16) & 255, p[5], p[6])


@njit(**_HELPER_OPTIONS)
def _lstm_standard(z, z_add, c, h_out):
    """The plain LSTM cell: i, f, o = sigmoid, g = tanh of (z + z_add); c = f*c + i*g; h_out = o*tanh(c).

    Branch-free, so LLVM vectorises it in float32 (the rational tanh is multiplies, adds and a divide).
    """
    H = c.shape[0]
    zi, zf, zg, zo = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:4 * H]
    ai, af, ag, ao = z_add[:H], z_add[H:2 * H], z_add[2 * H:3 * H], z_add[3 * H:4 * H]
    for j in range(H):
        i = _sigmoid(zi[j] + ai[j])
        f = _sigmoid(zf[j] + af[j])
        g = _tanh(zg[j] + ag[j])
        o = _sigmoid(zo[j] + ao[j])
        c_new = f * c[j] + i * g
        c[j] = c_new
        h_out[j] = o * _tanh(c_new)


@njit(**_HELPER_OPTIONS)
def _lstm_general(z, z_add, c, h_out, weights, cell):
    """Every LSTM option of the spec: activations with parameters, clip (of the gate pre-activations only),
    peepholes, coupled input/forget gates."""
    H = c.shape[0]
    bound, gate_code, gate_alpha, gate_beta, cell_code, cell_alpha, cell_beta, out_code, out_alpha, out_beta = (
        _activation_params(weights, cell))
    input_forget = cell[COL_INPUT_FORGET] != 0
    has_peepholes = cell[COL_PEEPHOLE] >= 0
    peep = weights[max(cell[COL_PEEPHOLE], 0):max(cell[COL_PEEPHOLE], 0) + 3 * H]
    one = c.dtype.type(1)
    for j in range(H):
        zi = z[j] + z_add[j]
        zf = z[H + j] + z_add[H + j]
        zg = z[2 * H + j] + z_add[2 * H + j]
        zo = z[3 * H + j] + z_add[3 * H + j]
        c_old = c[j]
        if has_peepholes:
            zi += peep[j] * c_old
            zf += peep[H + j] * c_old
        i = _activation(_clamp(zi, bound), gate_code, gate_alpha, gate_beta)
        if input_forget:
            f = one - i
        else:
            f = _activation(_clamp(zf, bound), gate_code, gate_alpha, gate_beta)
        g = _activation(_clamp(zg, bound), cell_code, cell_alpha, cell_beta)
        c_new = f * c_old + i * g
        if has_peepholes:
            zo += peep[2 * H + j] * c_new
        o = _activation(_clamp(zo, bound), gate_code, gate_alpha, gate_beta)
        c[j] = c_new
        h_out[j] = o * _activation(c_new, out_code, out_alpha, out_beta)


@njit(**_HELPER_OPTIONS)
def _lstm_pointwise(z, z_add, c, h_out, weights, cell):
    """LSTM: c and h_out (before the projection) from the pre-activations z + z_add (4H each)."""
    if cell[COL_STANDARD]:
        _lstm_standard(z, z_add, c, h_out)
    else:
        _lstm_general(z, z_add, c, h_out, weights, cell)


@njit(**_HELPER_OPTIONS)
def _rnn_pointwise(z, z_add, h, weights, cell):
    """Simple RNN: h = g(clip(z + z_add))."""
    H = h.shape[0]
    if cell[COL_STANDARD]:
        for j in range(H):
            h[j] = _tanh(z[j] + z_add[j])
    else:
        bound, _, _, _, cell_code, cell_alpha, cell_beta, _, _, _ = _activation_params(weights, cell)
        for j in range(H):
            h[j] = _activation(_clamp(z[j] + z_add[j], bound), cell_code, cell_alpha, cell_beta)


@njit(**_HELPER_OPTIONS)
def _gru_pointwise(zx, zh, h, weights, cell):
    """GRU, linear before reset: zx = W x + b and zh = R h + [0 | 0 | b_hn] (3H each) give
    r, z = f(clip(zx + zh)), n = g(clip(zx_n + r * zh_n)), h = (1 - z) * n + z * h."""
    H = h.shape[0]
    one = h.dtype.type(1)
    xr, xz, xn = zx[:H], zx[H:2 * H], zx[2 * H:3 * H]
    hr, hz, hn = zh[:H], zh[H:2 * H], zh[2 * H:3 * H]
    if cell[COL_STANDARD]:
        for j in range(H):
            r = _sigmoid(xr[j] + hr[j])
            u = _sigmoid(xz[j] + hz[j])
            n = _tanh(xn[j] + r * hn[j])
            h[j] = (one - u) * n + u * h[j]
    else:
        bound, gate_code, gate_alpha, gate_beta, cell_code, cell_alpha, cell_beta, _, _, _ = (
            _activation_params(weights, cell))
        for j in range(H):
            r = _activation(_clamp(xr[j] + hr[j], bound), gate_code, gate_alpha, gate_beta)
            u = _activation(_clamp(xz[j] + hz[j], bound), gate_code, gate_alpha, gate_beta)
            n = _activation(_clamp(xn[j] + r * hn[j], bound), cell_code, cell_alpha, cell_beta)
            h[j] = (one - u) * n + u * h[j]


@njit(**_HELPER_OPTIONS)
def _gru_reset(zx, zh_rz, h, reset_h, weights, cell):
    """GRU, reset before linear, first half: r = f(clip(zx_r + zh_r)) and reset_h = r * h (zh_rz = R_rz h)."""
    H = h.shape[0]
    if cell[COL_STANDARD]:
        for j in range(H):
            reset_h[j] = _sigmoid(zx[j] + zh_rz[j]) * h[j]
    else:
        bound, gate_code, gate_alpha, gate_beta, _, _, _, _, _, _ = _activation_params(weights, cell)
        for j in range(H):
            reset_h[j] = _activation(_clamp(zx[j] + zh_rz[j], bound), gate_code, gate_alpha, gate_beta) * h[j]


@njit(**_HELPER_OPTIONS)
def _gru_update(zx, zh_rz, zh_n, h, weights, cell):
    """GRU, reset before linear, second half: zh_n = R_n (r * h) + b_hn gives n = g(clip(zx_n + zh_n)),
    z = f(clip(zx_z + zh_z)), h = (1 - z) * n + z * h."""
    H = h.shape[0]
    one = h.dtype.type(1)
    xz, xn, hz = zx[H:2 * H], zx[2 * H:3 * H], zh_rz[H:2 * H]
    if cell[COL_STANDARD]:
        for j in range(H):
            u = _sigmoid(xz[j] + hz[j])
            n = _tanh(xn[j] + zh_n[j])
            h[j] = (one - u) * n + u * h[j]
    else:
        bound, gate_code, gate_alpha, gate_beta, cell_code, cell_alpha, cell_beta, _, _, _ = (
            _activation_params(weights, cell))
        for j in range(H):
            u = _activation(_clamp(xz[j] + hz[j], bound), gate_code, gate_alpha, gate_beta)
            n = _activation(_clamp(xn[j] + zh_n[j], bound), cell_code, cell_alpha, cell_beta)
            h[j] = (one - u) * n + u * h[j]


# ------------------------------------------------------------------------------------------------------
# Views of a cell's packed weights and of its state.

@njit(**_HELPER_OPTIONS)
def _sizes(cell):
    """(I, H, P, R, G*H) of the cell."""
    I, H, P = cell[COL_INPUT_SIZE], cell[COL_HIDDEN_SIZE], cell[COL_PROJ_SIZE]
    return I, H, P, P if P else H, cell[COL_GATES] * H


@njit(**_HELPER_OPTIONS)
def _matrix(weights, start, rows, cols):
    return weights[start:start + rows * cols].reshape(rows, cols)


@njit(**_HELPER_OPTIONS)
def _input_weights(weights, cell):
    """The cell's (I, G*H) w_ih.T."""
    I, _, _, _, GH = _sizes(cell)
    return _matrix(weights, cell[COL_INPUT], I, GH)


@njit(**_HELPER_OPTIONS)
def _recurrent_weights(weights, cell):
    """The cell's (R, G*H) w_hh.T; for a GRU resetting before the linear map, its (R, 2H) r and z columns."""
    _, H, _, R, GH = _sizes(cell)
    return _matrix(weights, cell[COL_RECURRENT], R, GH if cell[COL_LINEAR_BEFORE_RESET] else 2 * H)


@njit(**_HELPER_OPTIONS)
def _candidate_weights(weights, cell):
    """A GRU resetting before the linear map: its (R, H) candidate columns of w_hh.T."""
    _, H, _, R, _ = _sizes(cell)
    return _matrix(weights, max(cell[COL_RECURRENT_N], 0), R, H)


@njit(**_HELPER_OPTIONS)
def _projection(weights, cell):
    """The cell's (H, P) transposed projection; (H, 0) without one."""
    _, H, P, _, _ = _sizes(cell)
    return _matrix(weights, max(cell[COL_PROJECTION], 0), H, P)


@njit(**_HELPER_OPTIONS)
def _bias(weights, cell):
    start = cell[COL_BIAS]
    return weights[start:start + cell[COL_GATES] * cell[COL_HIDDEN_SIZE]]


@njit(**_HELPER_OPTIONS)
def _recurrent_bias(weights, cell):
    """A GRU's (3H,) [0 | 0 | b_hn]."""
    start = max(cell[COL_RECURRENT_BIAS], 0)
    return weights[start:start + 3 * cell[COL_HIDDEN_SIZE]]


@njit(**_HELPER_OPTIONS)
def _state_items(cells):
    """Items of one batch row of the flat h and of the flat c (the state layout of ``fastlstm.backends.base``)."""
    last = cells[cells.shape[0] - 1]
    _, H, _, R, _ = _sizes(last)
    return last[COL_H_START] + R, last[COL_C_START] + (H if last[COL_KIND] == _KIND_LSTM else 0)


@njit(**_HELPER_OPTIONS)
def _cell_state(h, c, cell, batch):
    """The cell's (B, R) block of the flat h and its (B, H) block of the flat c ((B, 0) without a cell state)."""
    _, H, _, R, _ = _sizes(cell)
    C = H if cell[COL_KIND] == _KIND_LSTM else 0
    hs, cs = batch * cell[COL_H_START], batch * cell[COL_C_START]
    return h[hs:hs + batch * R].reshape(batch, R), c[cs:cs + batch * C].reshape(batch, C)


# ------------------------------------------------------------------------------------------------------
# Scratch, sized by the widest cell, and the rows a step runs.

@njit(**_HELPER_OPTIONS)
def _aligned(n):
    return (n + 15) // 16 * 16  # 16 items: 64 bytes of float32, a multiple of 64 bytes of float64


@njit(**_HELPER_OPTIONS)
def _scratch_layout(cells, batch):
    """Offsets of the scratch regions a step of any cell uses at this batch size, and the items they need:
    x part (B, G*H) at 0, z (B, G*H), auxiliary (B, max(G*H, P)), hidden (B, H), each as wide as the widest
    cell needs."""
    gates = auxiliary = hidden = 0
    for n in range(cells.shape[0]):
        _, H, P, _, GH = _sizes(cells[n])
        gates = max(gates, GH)
        auxiliary = max(auxiliary, GH, P)
        hidden = max(hidden, H)
    z_start = _aligned(batch * gates)
    auxiliary_start = z_start + _aligned(batch * gates)
    hidden_start = auxiliary_start + _aligned(batch * auxiliary)
    return z_start, auxiliary_start, hidden_start, hidden_start + _aligned(batch * hidden)


@njit(**_HELPER_OPTIONS)
def _head_sizes(cells, head):
    """(features into the head, features out of it, widest intermediate stage): the model's output size is
    the second (the top cell's R, or all its layer's directions' for whole sequences, without a head)."""
    last = cells[cells.shape[0] - 1]
    size = last[COL_DIRECTIONS] * _sizes(last)[3]
    widest = 0
    for n in range(head.shape[0] - 1):
        widest = max(widest, head[n, HEAD_OUT])
    return size, head[head.shape[0] - 1, HEAD_OUT] if head.shape[0] else size, widest


@njit(cache=True, **_HELPER_OPTIONS)
def step_scratch_size(cells, head, batch):
    """Items of scratch ``step_stack`` needs at this batch size: the cells' regions, then the head's two."""
    return _scratch_layout(cells, batch)[3] + 2 * _aligned(batch * _head_sizes(cells, head)[2])


def _row_runs(lengths, b, s):
    """Whether batch row b runs step s: every row in a stream step (lengths None), else s < lengths[b]."""


def _time_index(lengths, b, s, reverse):
    """The time index of row b's step s: s in a stream step (lengths None), else counted from the row's end
    for a reverse cell."""


@overload(_row_runs, jit_options=_HELPER_OPTIONS)
def _row_runs_overload(lengths, b, s):
    if isinstance(lengths, types.NoneType):
        return lambda lengths, b, s: True
    return lambda lengths, b, s: s < lengths[b]


@overload(_time_index, jit_options=_HELPER_OPTIONS)
def _time_index_overload(lengths, b, s, reverse):
    if isinstance(lengths, types.NoneType):
        return lambda lengths, b, s, reverse: s
    return lambda lengths, b, s, reverse: lengths[b] - 1 - s if reverse else s


# ------------------------------------------------------------------------------------------------------
# One step of one cell over a batch, shared by the stream step and whole sequences.

@njit(**_HELPER_OPTIONS)
def _cell_step(x_part, h, c, lengths, s, weights, cell, scratch, layout, by_hand):
    """Step s of one cell for the batch rows that run it: h (B, R) and c (B, H or 0) in place.

    ``x_part`` (B, T, G*H) holds W x + b of every row and time step (the input projection, bias included);
    this adds the recurrent products, each one pass over its weights, and the kind's pointwise update.
    """
    batch = h.shape[0]
    _, H, P, R, GH = _sizes(cell)
    kind = cell[COL_KIND]
    reverse = cell[COL_REVERSE] != 0
    z_start, auxiliary_start, hidden_start, _ = layout
    if kind == _KIND_LSTM:
        z = scratch[z_start:z_start + batch * GH].reshape(batch, GH)
        hidden = scratch[hidden_start:hidden_start + batch * H].reshape(batch, H)
        _gate_matmul(h, weights, cell, _RECURRENT, None, z, by_hand)
        for b in range(batch):
            if _row_runs(lengths, b, s):
                _lstm_pointwise(z[b], x_part[b, _time_index(lengths, b, s, reverse)], c[b],
                                hidden[b] if P else h[b], weights, cell)
        if P:
            projected = scratch[auxiliary_start:auxiliary_start + batch * P].reshape(batch, P)
            _matmul(hidden, _projection(weights, cell), projected, by_hand)
            for b in range(batch):
                if _row_runs(lengths, b, s):
                    h[b] = projected[b]
    elif kind == _KIND_RNN:
        z = scratch[z_start:z_start + batch * H].reshape(batch, H)
        _gate_matmul(h, weights, cell, _RECURRENT, None, z, by_hand)
        for b in range(batch):
            if _row_runs(lengths, b, s):
                _rnn_pointwise(z[b], x_part[b, _time_index(lengths, b, s, reverse)], h[b], weights, cell)
    elif cell[COL_LINEAR_BEFORE_RESET]:
        zh = scratch[z_start:z_start + batch * GH].reshape(batch, GH)
        _gate_matmul(h, weights, cell, _RECURRENT, _recurrent_bias(weights, cell), zh, by_hand)
        for b in range(batch):
            if _row_runs(lengths, b, s):
                _gru_pointwise(x_part[b, _time_index(lengths, b, s, reverse)], zh[b], h[b], weights, cell)
    else:
        zh_rz = scratch[z_start:z_start + batch * 2 * H].reshape(batch, 2 * H)
        reset_h = scratch[hidden_start:hidden_start + batch * H].reshape(batch, H)
        zh_n = scratch[auxiliary_start:auxiliary_start + batch * H].reshape(batch, H)
        _gate_matmul(h, weights, cell, _RECURRENT, None, zh_rz, by_hand)
        for b in range(batch):
            if _row_runs(lengths, b, s):
                _gru_reset(x_part[b, _time_index(lengths, b, s, reverse)], zh_rz[b], h[b], reset_h[b], weights, cell)
        _gate_matmul(reset_h, weights, cell, _CANDIDATE, _recurrent_bias(weights, cell)[2 * H:], zh_n, by_hand)
        for b in range(batch):
            if _row_runs(lengths, b, s):
                _gru_update(x_part[b, _time_index(lengths, b, s, reverse)], zh_rz[b], zh_n[b], h[b], weights, cell)


# ------------------------------------------------------------------------------------------------------
# The streaming step.

@njit(**_HELPER_OPTIONS)
def _layer_step(inputs, h, c, weights, cell, scratch, layout):
    """One forward cell one step: inputs (B, I), h (B, R) and c (B, H or 0) in place.

    The input part W x + b goes to the scratch's x part, then ``_cell_step`` adds the recurrent part.
    """
    batch = inputs.shape[0]
    GH = cell[COL_GATES] * cell[COL_HIDDEN_SIZE]
    by_hand = _uses_hand_loop(cell, batch)
    x_part = scratch[:batch * GH].reshape(batch, GH)
    _gate_matmul(inputs, weights, cell, _INPUT, _bias(weights, cell), x_part, by_hand)
    _cell_step(x_part.reshape(batch, 1, GH), h, c, None, 0, weights, cell, scratch, layout, by_hand)


@njit(**_HELPER_OPTIONS)
def _layer_step_one_row(inputs, h, c, weights, cell, scratch, layout):
    """``_layer_step`` at batch 1 with the hand loop: inputs (I,), h (R,), c (H,) or (0,).

    The same computation on 1-D views only: on the streaming hot path the 2-D plumbing of the general
    version (reshapes, row loops, the BLAS branch) costs about 0.15 us of a 1.2 us step. An LSTM's or RNN's
    gates sum both products into one z before the pointwise part adds the bias.
    """
    _, H, P, _, GH = _sizes(cell)
    kind = cell[COL_KIND]
    z_start, auxiliary_start, hidden_start, _ = layout
    if kind == _KIND_GRU:
        zx = scratch[:GH]
        zx[:] = _bias(weights, cell)
        _add_gate_product(inputs, weights, cell, _INPUT, zx)
        recurrent_bias = _recurrent_bias(weights, cell)
        zh = scratch[z_start:z_start + GH]
        if cell[COL_LINEAR_BEFORE_RESET]:
            zh[:] = recurrent_bias
            _add_gate_product(h, weights, cell, _RECURRENT, zh)
            _gru_pointwise(zx, zh, h, weights, cell)
        else:
            zh_rz = zh[:2 * H]
            zh_rz[:] = 0
            _add_gate_product(h, weights, cell, _RECURRENT, zh_rz)
            reset_h = scratch[hidden_start:hidden_start + H]
            _gru_reset(zx, zh_rz, h, reset_h, weights, cell)
            zh_n = scratch[auxiliary_start:auxiliary_start + H]
            zh_n[:] = recurrent_bias[2 * H:]
            _add_gate_product(reset_h, weights, cell, _CANDIDATE, zh_n)
            _gru_update(zx, zh_rz, zh_n, h, weights, cell)
        return
    z = scratch[:GH]
    z[:] = 0
    _add_gate_product(inputs, weights, cell, _INPUT, z)
    _add_gate_product(h, weights, cell, _RECURRENT, z)
    if kind == _KIND_RNN:
        _rnn_pointwise(z, _bias(weights, cell), h, weights, cell)
        return
    hidden = scratch[hidden_start:hidden_start + H]
    _lstm_pointwise(z, _bias(weights, cell), c, hidden if P else h, weights, cell)
    if P:
        h[:] = 0
        _add_vector_matrix_product(hidden, _projection(weights, cell), h)


@njit(**_KERNEL_OPTIONS)
def step_stack(x, h, c, y, scratch, weights, cells, head):
    """One time step of a forward stack: x (B, I); h and c (flat state, any C-contiguous shape) in place;
    then the head on the top cell's new h into y (B, O) (the top cell's h itself without a head).

    ``scratch`` holds at least ``step_scratch_size(cells, head, B)`` items. Raises ValueError (before
    touching anything) when the shapes do not fit the model.
    """
    num_cells = cells.shape[0]
    batch = x.shape[0]
    h, c = h.reshape(h.size), c.reshape(c.size)
    h_items, c_items = _state_items(cells)
    layout = _scratch_layout(cells, batch)
    _, output_size, head_width = _head_sizes(cells, head)
    head_half = _aligned(batch * head_width)
    fits = (x.shape[1] == cells[0, COL_INPUT_SIZE] and h.size == batch * h_items and c.size == batch * c_items
            and scratch.size >= layout[3] + 2 * head_half and y.size == batch * output_size)
    for n in range(num_cells):
        fits = fits and cells[n, COL_DIRECTIONS] == 1 and cells[n, COL_REVERSE] == 0
    if not fits:
        raise ValueError("step(): x, h, c or the workspace do not fit this model, or it is not forward-only")
    one_row = batch == 1
    for n in range(num_cells):
        one_row = one_row and _uses_hand_loop(cells[n], batch)
    saved_mode = _flush_denormals()
    if one_row:
        inputs = x[0]
        for n in range(num_cells):
            cell_h, cell_c = _cell_state(h, c, cells[n], 1)
            _layer_step_one_row(inputs, cell_h[0], cell_c[0], weights, cells[n], scratch, layout)
            inputs = cell_h[0]
    else:
        cell_h, cell_c = _cell_state(h, c, cells[0], batch)
        _layer_step(x, cell_h, cell_c, weights, cells[0], scratch, layout)
        for n in range(1, num_cells):
            inputs = cell_h
            cell_h, cell_c = _cell_state(h, c, cells[n], batch)
            _layer_step(inputs, cell_h, cell_c, weights, cells[n], scratch, layout)
    top_h = _cell_state(h, c, cells[num_cells - 1], batch)[0]
    _run_head(top_h, y.reshape(batch, output_size), weights, cells[0], head, scratch[layout[3]:], head_half)
    _set_fp_mode(saved_mode)


@njit(**dict(_KERNEL_OPTIONS, nogil=False))
def step_stack_holding_gil(x, h, c, y, scratch, weights, cells, head):
    """``step_stack`` without releasing the GIL, for steps too short to be worth it."""
    step_stack(x, h, c, y, scratch, weights, cells, head)


# ------------------------------------------------------------------------------------------------------
# Whole sequences.

@njit(**_HELPER_OPTIONS)
def _run_cell(inputs, h, c, lengths, weights, cell, y, column, x_proj, scratch, layout):
    """One direction of one layer over inputs (B, T, I); h (B, R) and c (B, H or 0) in place.

    Writes this direction's outputs into y[b, t, column:column + R] for the steps each row runs (row b runs
    steps 0 .. lengths[b]-1, backwards when the cell is reverse). ``x_proj`` holds at least B*T*G*H items.
    """
    batch, steps = inputs.shape[0], inputs.shape[1]
    I, _, _, R, GH = _sizes(cell)
    reverse = cell[COL_REVERSE] != 0
    bias = _bias(weights, cell)

    # The input projection of every step in one product (a GEMM where BLAS may run), the bias folded in.
    x_part = x_proj[:batch * steps * GH].reshape(batch * steps, GH)
    _matmul_onto(inputs.reshape(batch * steps, I), _input_weights(weights, cell), bias, x_part,
                 _uses_hand_loop(cell, batch * steps))
    x_part_steps = x_part.reshape(batch, steps, GH)

    by_hand = _uses_hand_loop(cell, batch)
    for s in range(lengths.max()):
        _cell_step(x_part_steps, h, c, lengths, s, weights, cell, scratch, layout, by_hand)
        for b in range(batch):
            if s < lengths[b]:
                t = lengths[b] - 1 - s if reverse else s
                y[b, t, column:column + R] = h[b]


@njit(**_HELPER_OPTIONS)
def _run_layer(inputs, h, c, lengths, weights, cells, first_cell, x_proj, scratch, layout):
    """Every direction of the layer whose first cell is ``first_cell``; returns its output (B, T, D * R)."""
    batch, steps = inputs.shape[0], inputs.shape[1]
    cell = cells[first_cell]
    R = _sizes(cell)[3]
    directions = cell[COL_DIRECTIONS]
    # Outputs past a row's length stay zero.
    if lengths.min() < steps:
        y = np.zeros((batch, steps, directions * R), dtype=inputs.dtype)
    else:
        y = np.empty((batch, steps, directions * R), dtype=inputs.dtype)
    for d in range(directions):
        n = first_cell + d
        cell_h, cell_c = _cell_state(h, c, cells[n], batch)
        saved_mode = _flush_denormals()
        _run_cell(inputs, cell_h, cell_c, lengths, weights, cells[n], y, d * R, x_proj, scratch, layout)
        _set_fp_mode(saved_mode)
    return y


@njit(**_KERNEL_OPTIONS)
def run_stack(x, h, c, lengths, weights, cells):
    """Every layer over x (B, T, I); h and c (flat state, any C-contiguous shape) hold the initial state and
    get the final one; ``lengths`` (B,) int64 in 1..T. Returns the last layer's output (B, T, D * R), a new
    array."""
    batch, steps = x.shape[0], x.shape[1]
    num_cells = cells.shape[0]
    h, c = h.reshape(h.size), c.reshape(c.size)
    h_items, c_items = _state_items(cells)
    fits = (x.shape[2] == cells[0, COL_INPUT_SIZE] and h.size == batch * h_items and c.size == batch * c_items
            and lengths.shape[0] == batch and batch > 0 and steps > 0)
    if not fits:
        raise ValueError("run_sequence(): x, h or c do not fit this model")
    if lengths.min() < 1 or lengths.max() > steps:
        raise ValueError("run_sequence(): lengths must lie in 1..T")
    layout = _scratch_layout(cells, batch)
    scratch = np.zeros(layout[3], dtype=x.dtype)
    widest = 0
    for n in range(num_cells):
        widest = max(widest, _sizes(cells[n])[4])
    x_proj = np.empty(batch * steps * widest, dtype=x.dtype)
    y = _run_layer(x, h, c, lengths, weights, cells, 0, x_proj, scratch, layout)
    n = cells[0, COL_DIRECTIONS]
    while n < num_cells:
        y = _run_layer(y, h, c, lengths, weights, cells, n, x_proj, scratch, layout)
        n += cells[n, COL_DIRECTIONS]
    return y


# ------------------------------------------------------------------------------------------------------
# The dense head.

@njit(**_HELPER_OPTIONS)
def _softmax_rows(y):
    """Each row of y (N, O) replaced by its softmax: exp(y - max(y)) / sum, so exp never overflows."""
    for r in range(y.shape[0]):
        row = y[r]
        top = row[0]
        for j in range(1, row.shape[0]):
            if row[j] > top:
                top = row[j]
        total = row.dtype.type(0)
        for j in range(row.shape[0]):
            e = np.exp(row[j] - top)
            row[j] = e
            total += e
        for j in range(row.shape[0]):
            row[j] = row[j] / total


@njit(**_HELPER_OPTIONS)
def _activate(y, code, alpha, beta):
    """y = activation ``code`` of y (1-D), elementwise. The common head activations get loops of their own,
    which LLVM vectorises; the switch of ``_activation`` inside one loop would keep it scalar."""
    if code == _ACT_IDENTITY:
        return
    zero = y.dtype.type(0)
    if code == _ACT_RELU:
        for j in range(y.shape[0]):
            y[j] = zero if y[j] < zero else y[j]
    elif code == _ACT_TANH:
        for j in range(y.shape[0]):
            y[j] = _tanh(y[j])
    elif code == _ACT_SIGMOID:
        for j in range(y.shape[0]):
            y[j] = _sigmoid(y[j])
    else:
        for j in range(y.shape[0]):
            y[j] = _activation(y[j], code, alpha, beta)


@njit(**_HELPER_OPTIONS)
def _run_head(x, y, weights, cell, head, scratch, half):
    """y (N, O) = the head's stages, in order, over x (N, F); without stages y = x.

    Intermediate stages alternate between scratch[:half] and scratch[half:2 * half] (each at least N times
    the widest intermediate stage); the last stage writes y. Products of up to HAND_MATMUL_MAX_ROWS rows run
    in the hand loop, larger ones in BLAS where ``cell`` (the model's first) lets it run.
    """
    rows = x.shape[0]
    num_stages = head.shape[0]
    if num_stages == 0:
        y[:] = x
        return
    by_hand = rows <= HAND_MATMUL_MAX_ROWS or not _blas_allowed(cell)
    source = x
    for n in range(num_stages):
        stage = head[n]
        size_in, size_out = stage[HEAD_IN], stage[HEAD_OUT]
        if n == num_stages - 1:
            target = y
        else:
            start = (n % 2) * half
            target = scratch[start:start + rows * size_out].reshape(rows, size_out)
        if stage[HEAD_WEIGHT] < 0:
            target[:] = source
        else:
            bias = weights[stage[HEAD_BIAS]:stage[HEAD_BIAS] + size_out]
            _matmul_onto(source, _matrix(weights, stage[HEAD_WEIGHT], size_in, size_out), bias, target, by_hand)
        code = stage[HEAD_ACTIVATION]
        if code == _ACT_SOFTMAX:
            _softmax_rows(target)
        else:
            _activate(target.reshape(rows * size_out), code, weights[stage[HEAD_PARAMS]],
                      weights[stage[HEAD_PARAMS] + 1])
        source = target


@njit(**_KERNEL_OPTIONS)
def run_head(x, weights, cells, head):
    """The head over x (N, F), F what the recurrent stack outputs: a new (N, O) array."""
    rows = x.shape[0]
    size_in, size_out, widest = _head_sizes(cells, head)
    if x.shape[1] != size_in:
        raise ValueError("run_head(): x does not fit this model's head")
    y = np.empty((rows, size_out), dtype=x.dtype)
    half = _aligned(rows * widest)
    scratch = np.empty(2 * half, dtype=x.dtype)
    saved_mode = _flush_denormals()
    _run_head(x, y, weights, cells[0], head, scratch, half)
    _set_fp_mode(saved_mode)
    return y
