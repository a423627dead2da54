"""One walk of a ``ModelSpec`` into what compiled kernels need per cell, shared by both compiled backends.

A *cell* is one direction of one layer (of any kind: LSTM, GRU, simple RNN). ``plan_cells`` turns each into
a ``CellPlan``: its sizes, the integer codes and parameters of its activations, its clip bound, its flags and
its weights in the spec's layout, and its gate weights as the run's weight format stores them
(``fastlstm.quantize``: float, bfloat16 or int8 with per-row scales) beside the float values they represent.
``plan_head`` does the same for the dense head: one ``HeadStagePlan`` per stage (the head's input
activation, then each dense layer with its activation). Each compiled backend then packs the plans into its
own memory layout (``numba_backend.pack_cells``, ``cython_backend.pack_for_extension`` and
``pack_head_for_extension``) and its kernels read nothing of the spec: a new cell or head option is
decided here once, and the compiled extension receives arrays and numbers only.

Thresholds both compiled backends apply, under one vocabulary. Their values were measured per backend and
are defined beside the kernels that read them (``_numba_kernels.py``; ``csrc/blas.pxd`` and
``_cykernels.pyx``): Numba freezes what its cached kernels read from the defining file only, and the
extension's are compile-time constants.

* ``RELEASE_GIL_MIN_WEIGHTS``: a stream step reading fewer weights (all layers, all batch rows) keeps the GIL;
  releasing and re-taking it costs about 40 ns, a few percent of a small step no other thread could use.
* ``HAND_MATMUL_MAX_ROWS``: products of up to this many batch rows run in the hand-written loop, larger ones
  in BLAS GEMM.
* ``BLAS_GEMV_MIN_BYTES``: a batch-1 product of a matrix this large goes to BLAS GEMV when the model may use
  more than one thread (OpenBLAS splits it over cores, the hand loop cannot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..activations import ACTIVATION_CODES
from ..quantize import StoredWeights, cell_gate_weights
from ..spec import ModelSpec

# Every packed segment and scratch region starts on a 64-byte boundary (one AVX-512 vector, a cache line).
ALIGN_BYTES = 64


@dataclass(frozen=True, eq=False)
class CellPlan:
    """One cell as the kernels see it; weights keep the spec's layouts (see ``fastlstm.spec``)."""

    kind: str                 # "lstm", "gru" or "rnn" (equations in fastlstm.spec)
    num_gates: int            # G: 4, 3 or 1; the weights stack G blocks of H rows
    layer: int
    direction: int            # 0 forward (or the only direction), 1 the reverse half of a bidirectional layer
    num_directions: int       # of the cell's layer
    reverse: bool             # reads the sequence from its end
    input_size: int           # I
    hidden_size: int          # H
    proj_size: int            # P, 0 without projection
    activation_codes: tuple[int, int, int]           # gate, cell, output (``Activation.code``); see the spec for
                                                     # which a kind uses (the others hold their defaults)
    activation_params: tuple[float, float, float, float, float, float]  # alpha, beta of each, same order
    clip: float               # +inf without clip
    input_forget: bool        # LSTM: coupled input and forget gates
    linear_before_reset: bool  # GRU: the variant (True for every other kind)
    standard: bool            # the kind's plain activations without clip, peepholes or coupled gates: the fast path
    w_ih: np.ndarray          # (G*H, I): the values the weight format stores, as floats (dequantized)
    w_hh: np.ndarray          # (G*H, R): likewise
    bias: np.ndarray          # (G*H,)
    w_hr: np.ndarray | None   # LSTM: (P, H)
    peephole: np.ndarray | None  # LSTM: (3, H), gates i, f, o
    candidate_bias: np.ndarray | None  # GRU: (H,), b_hn
    w_ih_stored: StoredWeights  # w_ih as the weight format stores it (fastlstm.quantize)
    w_hh_stored: StoredWeights

    @property
    def weight_format(self) -> str:
        """``"float32"`` (the run dtype's own weights), ``"bfloat16"`` or ``"int8"``."""
        return self.w_ih_stored.format

    @property
    def recurrent_size(self) -> int:
        """R: the size of the hidden state fed back (the projection size when there is one)."""
        return self.proj_size or self.hidden_size

    @property
    def state_size(self) -> int:
        """Size of the cell's ``c`` (H for an LSTM, 0 otherwise): its block in the flat ``c`` is ``(B, state_size)``."""
        return self.hidden_size if self.kind == "lstm" else 0

    @property
    def weights_per_step(self) -> int:
        """Weights one batch row of a step reads: the gate products and the projection."""
        G = self.num_gates
        return (self.input_size + self.recurrent_size) * G * self.hidden_size + self.hidden_size * self.proj_size


def plan_cells(spec: ModelSpec, weights: str = "float32") -> tuple[CellPlan, ...]:
    """Every cell of ``spec``, in state order: layer by layer, the forward direction first, its gate weights
    stored as ``weights`` (a format of ``fastlstm.quantize``)."""
    plans = []
    for n, layer in enumerate(spec.layers):
        acts = (layer.gate_activation, layer.cell_activation, layer.output_activation)
        for direction, cell in enumerate(layer.cells):
            if weights == "float32":  # the spec's own arrays: the packers cast them to the run dtype (float64 too)
                w_ih, w_hh = StoredWeights("float32", cell.w_ih), StoredWeights("float32", cell.w_hh)
            else:
                w_ih, w_hh = cell_gate_weights(cell, weights, f"layers[{n}].cells[{direction}]")
            plans.append(CellPlan(
                kind=layer.kind,
                num_gates=layer.num_gates,
                layer=n,
                direction=direction,
                num_directions=layer.num_directions,
                reverse=layer.direction == "reverse" or direction == 1,
                input_size=int(layer.input_size),
                hidden_size=int(layer.hidden_size),
                proj_size=int(layer.proj_size),
                activation_codes=tuple(act.code for act in acts),
                activation_params=tuple(float(v) for act in acts for v in (act.alpha, act.beta)),
                clip=np.inf if layer.clip is None else float(layer.clip),
                input_forget=bool(layer.input_forget),
                linear_before_reset=bool(layer.linear_before_reset),
                standard=bool(layer.is_standard),
                w_ih=w_ih.dequantized(), w_hh=w_hh.dequantized(), bias=cell.bias, w_hr=cell.w_hr,
                peephole=cell.peephole, candidate_bias=cell.candidate_bias, w_ih_stored=w_ih, w_hh_stored=w_hh,
            ))
    return tuple(plans)


#: The activation code the head kernels apply to a whole row (softmax over the features) rather than elementwise.
SOFTMAX_CODE = ACTIVATION_CODES["softmax"]


@dataclass(frozen=True, eq=False)
class HeadStagePlan:
    """One stage of the dense head as the kernels see it: ``y = activation(x @ weight.T + bias)``, or, for the
    head's input activation, ``y = activation(x)`` (no weight)."""

    in_features: int
    out_features: int
    weight: np.ndarray | None  # (out, in) as in the spec; None for the input activation (then out == in)
    bias: np.ndarray | None    # (out,), None when the layer has none (or for the input activation)
    activation_code: int       # ``Activation.code``; SOFTMAX_CODE acts on each row as a whole
    alpha: float
    beta: float

    @property
    def weights(self) -> int:
        """Weights the stage reads per batch row."""
        return 0 if self.weight is None else self.in_features * self.out_features


def plan_head(spec: ModelSpec) -> tuple[HeadStagePlan, ...]:
    """The head of ``spec`` as stages, in order: its input activation (only when it is not the identity), then
    every dense layer. No stages: the recurrent output is the model's output."""
    stages = []
    size = spec.recurrent_output_size
    act = spec.head_input_activation
    if act.name != "identity":
        stages.append(HeadStagePlan(size, size, None, None, act.code, float(act.alpha), float(act.beta)))
    for dense in spec.head:
        act = dense.activation
        stages.append(HeadStagePlan(dense.in_features, dense.out_features, dense.weight, dense.bias, act.code,
                                    float(act.alpha), float(act.beta)))
    return tuple(stages)


def aligned_zeros(size: int, dtype) -> np.ndarray:
    """A zeroed 1-D array of ``size`` items whose data starts on an ``ALIGN_BYTES`` boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(size + ALIGN_BYTES // dtype.itemsize, dtype=dtype)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return raw[skip:skip + size]


def padded(n: int, dtype) -> int:
    """``n`` items rounded up to a whole number of ``ALIGN_BYTES`` vectors."""
    lanes = ALIGN_BYTES // np.dtype(dtype).itemsize
    return (n + lanes - 1) // lanes * lanes
