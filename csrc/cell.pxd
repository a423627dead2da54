# What the nogil kernels know of a cell (CellDesc, filled by LSTMKernels from the packed arrays) and the
# pointwise part of its step. Inline, cimported by _cykernels.pyx: no module of its own at run time.

from cython cimport floating
from libc.string cimport memcpy

from activations cimport activation, clamp, sigmoid, tanh_

ctypedef void (*PointwiseFloat)(const CellDesc*, const float*, const float*, float*, const float*, float*,
                                Py_ssize_t, Py_ssize_t) noexcept nogil
ctypedef void (*PointwiseDouble)(const CellDesc*, const double*, const double*, double*, const double*, double*,
                                 Py_ssize_t, Py_ssize_t) noexcept nogil

# The kind of a cell (equations in fastlstm.spec), from its gate count and GRU variant.
cdef enum CellKind:
    CELL_LSTM
    CELL_GRU                 # linear before reset: n = g(W_n x + b_n + r * (R_n h' + b_hn))
    CELL_GRU_RESET_FIRST     # reset before linear: n = g(W_n x + b_n + R_n (r * h') + b_hn)
    CELL_RNN

# How a float32 cell's gate weights are stored (fastlstm.quantize): the products at batch 1 and in the hand
# loop read ``narrow_weights`` in this format; float64 cells are always WEIGHTS_FLOAT.
cdef enum WeightFormat:
    WEIGHTS_FLOAT
    WEIGHTS_BFLOAT16
    WEIGHTS_INT8

cdef struct CellDesc:
    CellKind kind
    void* weights        # (G*H, row_stride): [w_ih | 0 | w_hh | 0] per row (with narrow weights: their float32 values)
    WeightFormat weight_format
    const void* narrow_weights  # bfloat16 (uint16) or int8 weights in the layout of ``weights``, else NULL
    const float* scales  # int8: (2, G*H), each row's scale of its input block, then of its recurrent block
    void* bias           # (G*H,)
    void* peephole       # (3, H) in order i, f, o, or NULL
    void* projection     # (P, hidden_stride), or NULL
    void* candidate_bias # GRU: b_hn (H,), else NULL
    const float* packed  # float32 only: ``weights`` again as GEMM panels (see lstm_parallel.h), else NULL
    const float* candidate_packed  # float32 GRU with the reset first: its candidate rows alone as panels, else NULL
    Py_ssize_t input_size, hidden_size, proj_size, rec_size   # I, H, P (0 = none), R = P or H
    Py_ssize_t gate_rows       # G*H: rows of ``weights``, width of a pre-activation vector
    Py_ssize_t state_size      # C: H for an LSTM (its c), 0 for a GRU or RNN
    Py_ssize_t h_start, c_start  # where the cell's (B, R) and (B, C) blocks start in the flat h and c, per batch row
    Py_ssize_t input_stride    # I_pad: where the recurrent block starts in a row
    Py_ssize_t rec_stride      # R_pad
    Py_ssize_t row_stride      # K = I_pad + R_pad
    Py_ssize_t hidden_stride   # H_pad
    int gate_code, cell_code, output_code
    double gate_alpha, gate_beta, cell_alpha, cell_beta, output_alpha, output_beta
    double clip                # +inf when the layer has no clip
    bint input_forget
    bint standard              # sigmoid/tanh/tanh, no clip, no peepholes, no coupled gates
    # The pointwise kernel of this cell in each dtype, chosen once at packing. Called through a pointer,
    # it is compiled once on its own, where gcc vectorises it, rather than inlined into every caller.
    PointwiseFloat pointwise_float
    PointwiseDouble pointwise_double


# Pointwise part of a step: activations and the state update, for one batch row.
#
# Every pointwise kernel has one signature: ``z`` is the cell's recurrent product (G*H,), ``zadd`` what is
# added to it (the bias in a stream step of an LSTM or RNN, else the input projection with the bias),
# ``c`` the LSTM's cell state, ``h_prev`` the state fed back, ``h`` where the new output goes (``h_prev``
# itself when updating in place), over units first .. stop-1.

cdef enum:
    POINTWISE_CHUNK = 64


cdef inline void pointwise_lstm_standard(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                         const floating* h_prev, floating* h, Py_ssize_t first,
                                         Py_ssize_t stop) noexcept nogil:
    """The plain LSTM cell: i, f, o = sigmoid, g = tanh of (z + zadd); c = f*c + i*g; h = o*tanh(c).

    Branch-free, so gcc vectorises it in float32 (the rational tanh is multiplies, adds and one divide).
    The units go in chunks whose new c and h are first written to local arrays: a loop that only loads
    from the caller's pointers needs no aliasing checks, which gcc would otherwise give up on.
    """
    cdef Py_ssize_t H = d.hidden_size, chunk, start, count, j, u
    cdef floating c_chunk[POINTWISE_CHUNK]
    cdef floating h_chunk[POINTWISE_CHUNK]
    cdef floating i, f, g, o, c_new
    for chunk in range((stop - first + POINTWISE_CHUNK - 1) // POINTWISE_CHUNK):
        start = first + chunk * POINTWISE_CHUNK
        count = min(<Py_ssize_t>POINTWISE_CHUNK, stop - start)
        for j in range(count):
            u = start + j
            i = sigmoid(z[u] + zadd[u])
            f = sigmoid(z[H + u] + zadd[H + u])
            g = tanh_(z[2 * H + u] + zadd[2 * H + u])
            o = sigmoid(z[3 * H + u] + zadd[3 * H + u])
            c_new = f * c[u] + i * g
            c_chunk[j] = c_new
            h_chunk[j] = o * tanh_(c_new)
        memcpy(c + start, c_chunk, count * sizeof(floating))
        memcpy(h + start, h_chunk, count * sizeof(floating))


cdef inline void pointwise_lstm_general(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                        const floating* h_prev, floating* h, Py_ssize_t first,
                                        Py_ssize_t stop) noexcept nogil:
    """Every LSTM option of the spec: activations with parameters, clip, peepholes, coupled input/forget gates."""
    cdef Py_ssize_t H = d.hidden_size, j
    cdef const floating* peep = <const floating*>d.peephole
    cdef floating bound = <floating>d.clip
    cdef floating ga = <floating>d.gate_alpha, gb = <floating>d.gate_beta
    cdef floating ca = <floating>d.cell_alpha, cb = <floating>d.cell_beta
    cdef floating oa = <floating>d.output_alpha, ob = <floating>d.output_beta
    cdef int gate = d.gate_code, cell = d.cell_code, out = d.output_code
    cdef floating zi, zf, zg, zo, c_old, c_new, i, f, g, o
    for j in range(first, stop):
        zi = z[j] + zadd[j]
        zf = z[H + j] + zadd[H + j]
        zg = z[2 * H + j] + zadd[2 * H + j]
        zo = z[3 * H + j] + zadd[3 * H + j]
        c_old = c[j]
        if peep != NULL:
            zi = zi + peep[j] * c_old
            zf = zf + peep[H + j] * c_old
        i = activation(clamp(zi, bound), gate, ga, gb)
        if d.input_forget:
            f = 1 - i
        else:
            f = activation(clamp(zf, bound), gate, ga, gb)
        g = activation(clamp(zg, bound), cell, ca, cb)
        c_new = f * c_old + i * g
        if peep != NULL:
            zo = zo + peep[2 * H + j] * c_new
        o = activation(clamp(zo, bound), gate, ga, gb)
        c[j] = c_new
        h[j] = o * activation(c_new, out, oa, ob)


cdef inline void pointwise_gru_standard(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                        const floating* h_prev, floating* h, Py_ssize_t first,
                                        Py_ssize_t stop) noexcept nogil:
    """The plain GRU cell, linear before reset: z = R h' (r, u, n rows), zadd = W x + b;
    r, u = sigmoid(z + zadd); n = tanh(zadd_n + r * (z_n + b_hn)); h = (1 - u) * n + u * h'.

    Branch-free and chunked as ``pointwise_lstm_standard`` (h may be h_prev: each unit reads its own first).
    """
    cdef Py_ssize_t H = d.hidden_size, chunk, start, count, j, u
    cdef const floating* b_hn = <const floating*>d.candidate_bias
    cdef floating h_chunk[POINTWISE_CHUNK]
    cdef floating r, update, n
    for chunk in range((stop - first + POINTWISE_CHUNK - 1) // POINTWISE_CHUNK):
        start = first + chunk * POINTWISE_CHUNK
        count = min(<Py_ssize_t>POINTWISE_CHUNK, stop - start)
        for j in range(count):
            u = start + j
            r = sigmoid(z[u] + zadd[u])
            update = sigmoid(z[H + u] + zadd[H + u])
            n = tanh_(zadd[2 * H + u] + r * (z[2 * H + u] + b_hn[u]))
            h_chunk[j] = n + update * (h_prev[u] - n)
        memcpy(h + start, h_chunk, count * sizeof(floating))


cdef inline void pointwise_gru_general(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                       const floating* h_prev, floating* h, Py_ssize_t first,
                                       Py_ssize_t stop) noexcept nogil:
    """The GRU cell, linear before reset, with any gate and candidate activations and clip."""
    cdef Py_ssize_t H = d.hidden_size, j
    cdef const floating* b_hn = <const floating*>d.candidate_bias
    cdef floating bound = <floating>d.clip
    cdef floating ga = <floating>d.gate_alpha, gb = <floating>d.gate_beta
    cdef floating ca = <floating>d.cell_alpha, cb = <floating>d.cell_beta
    cdef int gate = d.gate_code, cell = d.cell_code
    cdef floating r, update, n
    for j in range(first, stop):
        r = activation(clamp(z[j] + zadd[j], bound), gate, ga, gb)
        update = activation(clamp(z[H + j] + zadd[H + j], bound), gate, ga, gb)
        n = activation(clamp(zadd[2 * H + j] + r * (z[2 * H + j] + b_hn[j]), bound), cell, ca, cb)
        h[j] = n + update * (h_prev[j] - n)


cdef inline void gru_reset_gates(const CellDesc* d, floating* z, const floating* zadd, const floating* h_prev,
                                 floating* reset_h, Py_ssize_t first, Py_ssize_t stop) noexcept nogil:
    """First half of a GRU step with the reset before the linear map: from z = R h' (r, u rows) and
    zadd = W x + b, reset_h = r * h' (the operand of R_n) and u, kept in z's u rows for the second half."""
    cdef Py_ssize_t H = d.hidden_size, j
    cdef floating bound = <floating>d.clip
    cdef floating ga = <floating>d.gate_alpha, gb = <floating>d.gate_beta
    cdef int gate = d.gate_code
    if d.standard:
        for j in range(first, stop):
            reset_h[j] = sigmoid(z[j] + zadd[j]) * h_prev[j]
            z[H + j] = sigmoid(z[H + j] + zadd[H + j])
    else:
        for j in range(first, stop):
            reset_h[j] = activation(clamp(z[j] + zadd[j], bound), gate, ga, gb) * h_prev[j]
            z[H + j] = activation(clamp(z[H + j] + zadd[H + j], bound), gate, ga, gb)


cdef inline void pointwise_gru_reset_first(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                           const floating* h_prev, floating* h, Py_ssize_t first,
                                           Py_ssize_t stop) noexcept nogil:
    """Second half of a GRU step with the reset before the linear map (after ``gru_reset_gates``): z holds
    u in its u rows and R_n (r * h') in its n rows; n = g(zadd_n + z_n + b_hn); h = (1 - u) * n + u * h'."""
    cdef Py_ssize_t H = d.hidden_size, j
    cdef const floating* b_hn = <const floating*>d.candidate_bias
    cdef floating bound = <floating>d.clip
    cdef floating ca = <floating>d.cell_alpha, cb = <floating>d.cell_beta
    cdef int cell = d.cell_code
    cdef floating n
    if d.standard:
        for j in range(first, stop):
            n = tanh_(zadd[2 * H + j] + z[2 * H + j] + b_hn[j])
            h[j] = n + z[H + j] * (h_prev[j] - n)
    else:
        for j in range(first, stop):
            n = activation(clamp(zadd[2 * H + j] + z[2 * H + j] + b_hn[j], bound), cell, ca, cb)
            h[j] = n + z[H + j] * (h_prev[j] - n)


cdef inline void pointwise_rnn_standard(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                        const floating* h_prev, floating* h, Py_ssize_t first,
                                        Py_ssize_t stop) noexcept nogil:
    """The plain simple RNN: h = tanh(z + zadd), chunked as ``pointwise_lstm_standard``."""
    cdef Py_ssize_t chunk, start, count, j
    cdef floating h_chunk[POINTWISE_CHUNK]
    for chunk in range((stop - first + POINTWISE_CHUNK - 1) // POINTWISE_CHUNK):
        start = first + chunk * POINTWISE_CHUNK
        count = min(<Py_ssize_t>POINTWISE_CHUNK, stop - start)
        for j in range(count):
            h_chunk[j] = tanh_(z[start + j] + zadd[start + j])
        memcpy(h + start, h_chunk, count * sizeof(floating))


cdef inline void pointwise_rnn_general(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                                       const floating* h_prev, floating* h, Py_ssize_t first,
                                       Py_ssize_t stop) noexcept nogil:
    """The simple RNN with any activation and clip: h = g(clip(z + zadd))."""
    cdef floating bound = <floating>d.clip
    cdef floating ca = <floating>d.cell_alpha, cb = <floating>d.cell_beta
    cdef int cell = d.cell_code
    cdef Py_ssize_t j
    for j in range(first, stop):
        h[j] = activation(clamp(z[j] + zadd[j], bound), cell, ca, cb)


cdef inline void pointwise(const CellDesc* d, const floating* z, const floating* zadd, floating* c,
                           const floating* h_prev, floating* h, Py_ssize_t first=0,
                           Py_ssize_t stop=-1) noexcept nogil:
    """The cell's pointwise kernel (see CellDesc.pointwise_float) over units first .. stop-1 (all by default)."""
    if stop < 0:
        stop = d.hidden_size
    if floating is float:
        d.pointwise_float(d, z, zadd, c, h_prev, h, first, stop)
    else:
        d.pointwise_double(d, z, zadd, c, h_prev, h, first, stop)
