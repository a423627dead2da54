"""What ONNX ``GRU`` and ``RNN`` nodes mean in fastlstm's terms: their weights and options as a layer.

ONNX stacks a GRU's gates as (z, r, h); fastlstm as (r, z, n). ``B`` is ``[Wb, Rb]``: the bias of each gate is
the sum of its two halves, except the candidate's recurrent half ``Rb_h``, which ONNX adds inside the reset
product when ``linear_before_reset=1`` and inside the recurrent product otherwise; the spec keeps it apart as
``candidate_bias`` in both variants, so either runs exactly. A simple RNN has one block: ``Wb + Rb``.
The graph walk (``_onnx_graph``) binds the node's inputs and outputs as it does an LSTM's.
"""

from __future__ import annotations

import math

import numpy as np

from ..activations import Activation
from ..spec import CellWeights, RecurrentLayer
from ._onnx_lstm import canonical_gates
from ._onnx_values import Malformed

# ONNX stacks the GRU gates (z, r, h); the canonical order is (r, z, n) with n = h.
_CANONICAL_FROM_ONNX_GRU_GATES = [1, 0, 2]

# The attributes of the GRU and RNN operators: (kind, default).
GRU_ATTRIBUTES = {
    "activation_alpha": ("floats", None), "activation_beta": ("floats", None), "activations": ("strings", None),
    "clip": ("float", None), "direction": ("string", "forward"), "hidden_size": ("int", None),
    "layout": ("int", 0), "linear_before_reset": ("int", 0),
}
RNN_ATTRIBUTES = {name: spec for name, spec in GRU_ATTRIBUTES.items() if name != "linear_before_reset"}


def _checked_shapes(W: np.ndarray, R: np.ndarray, B: np.ndarray | None, gates: int, directions: int,
                    hidden_size: int | None, clip: float | None) -> tuple[int, int]:
    """(hidden, input_size) of a node's W, with R, B, hidden_size and clip checked against them."""
    if W.ndim != 3 or W.shape[0] != directions or W.shape[1] % gates or W.shape[1] == 0 or W.shape[2] == 0:
        raise Malformed(f"W has shape {W.shape}, expected ({directions}, {gates}*hidden_size, input_size)"
                        if gates > 1 else f"W has shape {W.shape}, expected ({directions}, hidden_size, input_size)")
    hidden, input_size = W.shape[1] // gates, W.shape[2]
    problems = []
    if hidden_size is not None and hidden_size != hidden:
        problems.append(f"hidden_size={hidden_size} but W has shape {W.shape}")
    if R.ndim != 3 or R.shape != (directions, gates * hidden, hidden):
        problems.append(f"R has shape {R.shape}, expected {(directions, gates * hidden, hidden)}")
    if B is not None and B.shape != (directions, 2 * gates * hidden):
        problems.append(f"B has shape {B.shape}, expected {(directions, 2 * gates * hidden)}")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        problems.append(f"clip={clip}, expected a finite number > 0")
    if problems:
        raise Malformed("; ".join(problems))
    return hidden, input_size


def gru_layer(W: np.ndarray, R: np.ndarray, B: np.ndarray | None, *, direction: str, hidden_size: int | None,
              activations: tuple[Activation, ...], clip: float | None, linear_before_reset: bool) -> RecurrentLayer:
    """The canonical layer of a GRU node's constant inputs (shapes checked first, all problems at once)."""
    directions = 2 if direction == "bidirectional" else 1
    hidden, input_size = _checked_shapes(W, R, B, 3, directions, hidden_size, clip)
    dtype = np.result_type(W.dtype, R.dtype)
    cells = []
    for d in range(directions):
        both = np.zeros(6 * hidden, dtype=dtype) if B is None else B[d]
        input_bias, recurrent_bias = both[:3 * hidden], both[3 * hidden:]
        bias = np.concatenate([input_bias[:2 * hidden] + recurrent_bias[:2 * hidden], input_bias[2 * hidden:]])
        cells.append(CellWeights(
            w_ih=_canonical_gru_gates(W[d], hidden), w_hh=_canonical_gru_gates(R[d], hidden),
            bias=_canonical_gru_gates(bias, hidden), candidate_bias=np.array(recurrent_bias[2 * hidden:])))
    return RecurrentLayer(
        input_size=input_size, hidden_size=hidden, cells=tuple(cells), direction=direction, kind="gru",
        gate_activation=activations[0], cell_activation=activations[1], clip=clip,
        linear_before_reset=linear_before_reset)


def rnn_layer(W: np.ndarray, R: np.ndarray, B: np.ndarray | None, *, direction: str, hidden_size: int | None,
              activations: tuple[Activation, ...], clip: float | None) -> RecurrentLayer:
    """The canonical layer of an RNN node's constant inputs (shapes checked first, all problems at once)."""
    directions = 2 if direction == "bidirectional" else 1
    hidden, input_size = _checked_shapes(W, R, B, 1, directions, hidden_size, clip)
    dtype = np.result_type(W.dtype, R.dtype)
    cells = tuple(CellWeights(
        w_ih=np.ascontiguousarray(W[d]), w_hh=np.ascontiguousarray(R[d]),
        bias=np.zeros(hidden, dtype=dtype) if B is None else B[d, :hidden] + B[d, hidden:])
        for d in range(directions))
    return RecurrentLayer(input_size=input_size, hidden_size=hidden, cells=cells, direction=direction, kind="rnn",
                          cell_activation=activations[0], clip=clip)


def _canonical_gru_gates(array: np.ndarray, hidden: int) -> np.ndarray:
    return canonical_gates(array, hidden, _CANONICAL_FROM_ONNX_GRU_GATES)
