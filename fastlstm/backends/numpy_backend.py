"""The NumPy backend: the readable reference every other backend is tested against.

It follows the equations of ``fastlstm.spec`` line by line, for every kind and option (LSTM activations,
clip, peepholes, coupled gates, projection; both GRU variants; the simple RNN; directions; stacks of any
sizes), with no concern for speed beyond hoisting the input projection of all time steps into one matrix
product. With 8- or 16-bit gate weights (``fastlstm.quantize``) it runs the float32 values they represent:
the reference the compiled backends' 8- and 16-bit kernels are tested against. The dense head is
``fastlstm.head.PreparedHead``.
"""

from __future__ import annotations

import numpy as np

from ..activations import apply_activation
from ..head import PreparedHead
from ..quantize import dequantized_spec
from ..spec import CellWeights, ModelSpec, RecurrentLayer
from .base import PreparedLSTM, state_views


class StepWorkspace:
    """One stream's output and the head's buffers, allocated once."""

    __slots__ = ("output", "head_buffers")

    def __init__(self, output: np.ndarray, head_buffers: list[np.ndarray]):
        #: (B, O): where each step leaves its output, the head's when the model has one
        self.output = output
        self.head_buffers = head_buffers


class NumpyLSTM(PreparedLSTM):
    backend = "numpy"

    def __init__(self, spec: ModelSpec, dtype: np.dtype, num_threads: int = 1, weights: str = "float32"):
        super().__init__(spec, dtype, num_threads, weights)
        # Weights cast once to the run dtype (the gate weights as their format stores them, widened to
        # float32); the spec's own arrays are left untouched.
        self._cells = [
            [
                CellWeights(
                    *(None if a is None else np.ascontiguousarray(a, dtype=self.dtype)
                      for a in (cell.w_ih, cell.w_hh, cell.bias, cell.w_hr, cell.peephole, cell.candidate_bias))
                )
                for cell in layer.cells
            ]
            for layer in dequantized_spec(spec, weights).layers
        ]
        self._head = PreparedHead(spec, self.dtype)

    def run_sequence(self, x, h, c, lengths=None):
        states = state_views(self.spec, h, c, x.shape[0])
        layer_input = x
        row = 0
        for layer, cells in zip(self.spec.layers, self._cells):
            outputs = []
            for d, cell in enumerate(cells):
                reverse = layer.direction == "reverse" or d == 1
                outputs.append(run_cell_sequence(layer, cell, layer_input, *states[row], reverse, lengths))
                row += 1
            layer_input = outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=-1)
        return layer_input

    def run_head(self, x):
        return self._head.apply(x) if self._head else x.copy()

    def new_workspace(self, batch_size):
        output = np.zeros((batch_size, self.spec.output_size), self.dtype)
        return StepWorkspace(output, self._head.new_buffers(batch_size))

    def step(self, x, h, c, workspace):
        states = state_views(self.spec, h, c, x.shape[0])
        layer_input = x
        for layer, cells, (h_row, c_row) in zip(self.spec.layers, self._cells, states):
            cell_step(layer, cells[0], layer_input @ cells[0].w_ih.T, h_row, c_row)
            layer_input = h_row
        self._head.apply_into(layer_input, workspace.output, workspace.head_buffers)


def run_cell_sequence(
    layer: RecurrentLayer, cell: CellWeights, x: np.ndarray, h: np.ndarray, c: np.ndarray, reverse: bool,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """One direction of one layer over ``x`` ``(B, T, I)``; updates ``h``/``c`` ``(B, ·)`` in place.

    With ``lengths``, each row is run on its own valid steps only (see ``PreparedLSTM.run_sequence``).
    """
    batch, steps, _ = x.shape
    x_proj = x @ cell.w_ih.T  # (B, T, G*H): the input projection of every step in one product
    y = np.zeros((batch, steps, layer.output_size), dtype=x.dtype)
    if lengths is None:
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            cell_step(layer, cell, x_proj[:, t], h, c)
            y[:, t] = h
        return y
    for b in range(batch):  # each row alone: slow, but the plainest statement of the semantics
        n = int(lengths[b])
        hb, cb = h[b:b + 1], c[b:b + 1]
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            cell_step(layer, cell, x_proj[b:b + 1, t], hb, cb)
            y[b, t] = hb[0]
    return y


def cell_step(layer: RecurrentLayer, cell: CellWeights, x_proj: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
    """One time step of one cell given ``x_proj = x @ w_ih.T`` ``(B, G*H)``; updates ``h`` (and ``c``) in place."""
    {"lstm": _lstm_step, "gru": _gru_step, "rnn": _rnn_step}[layer.kind](layer, cell, x_proj, h, c)


def _lstm_step(layer, cell, x_proj, h, c):
    H = layer.hidden_size
    z = x_proj + h @ cell.w_hh.T + cell.bias
    zi, zf, zg, zo = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
    if cell.peephole is not None:
        p_i, p_f, p_o = cell.peephole
        zi = zi + p_i * c
        zf = zf + p_f * c
    clip = _clipper(layer.clip)
    i = apply_activation(layer.gate_activation, clip(zi))
    f = 1 - i if layer.input_forget else apply_activation(layer.gate_activation, clip(zf))
    g = apply_activation(layer.cell_activation, clip(zg))
    c_new = f * c + i * g
    if cell.peephole is not None:
        zo = zo + p_o * c_new
    o = apply_activation(layer.gate_activation, clip(zo))
    h_full = o * apply_activation(layer.output_activation, c_new)
    c[...] = c_new
    h[...] = h_full @ cell.w_hr.T if cell.w_hr is not None else h_full


def _gru_step(layer, cell, x_proj, h, c):
    H = layer.hidden_size
    clip = _clipper(layer.clip)
    w_rz, w_n = cell.w_hh[:2 * H], cell.w_hh[2 * H:]
    z_rz = x_proj[:, :2 * H] + h @ w_rz.T + cell.bias[:2 * H]
    r = apply_activation(layer.gate_activation, clip(z_rz[:, :H]))
    z = apply_activation(layer.gate_activation, clip(z_rz[:, H:]))
    if layer.linear_before_reset:
        recurrent_n = r * (h @ w_n.T + cell.candidate_bias)
    else:
        recurrent_n = (r * h) @ w_n.T + cell.candidate_bias
    n = apply_activation(layer.cell_activation, clip(x_proj[:, 2 * H:] + cell.bias[2 * H:] + recurrent_n))
    h[...] = (1 - z) * n + z * h


def _rnn_step(layer, cell, x_proj, h, c):
    h[...] = apply_activation(layer.cell_activation, _clipper(layer.clip)(x_proj + h @ cell.w_hh.T + cell.bias))


def _clipper(bound):
    if bound is None:
        return lambda z: z
    return lambda z: np.clip(z, -bound, bound)
