"""The Cython backend: the compiled kernels of ``fastlstm.backends._cykernels`` behind ``PreparedLSTM``.

``pack_for_extension`` turns the planner's cells (LSTM, GRU and simple RNN, of any sizes) into the
extension's layout (described in its docstring) with NumPy, and ``pack_head_for_extension`` the planner's
head stages; the extension's ``LSTMKernels`` receives those arrays and numbers and reads nothing of the spec.
Its kernels take the flat state of ``fastlstm.backends.base`` as it is. A stream's ``step`` is that object's
compiled method itself, so a call goes from ``Stream.step`` straight into C with no Python frame in between,
and runs the recurrent step and the dense head there. ``num_threads`` caps the extension's threads; it decides
per call shape how many pay (by hidden units at batch 1, by batch rows above).
"""

from __future__ import annotations

import numpy as np

from ..spec import ModelSpec
from . import cpu
from ._cells import CellPlan, HeadStagePlan, aligned_zeros, padded, plan_cells, plan_head
from .base import PreparedLSTM

try:
    from . import _cykernels  # the instruction-set level chosen for this CPU (fastlstm.backends.cpu)
except ImportError as exc:  # not compiled in this checkout
    raise ImportError(
        f"the Cython backend's extension fastlstm.backends._cykernels.{cpu.KERNEL_LEVEL} is not built; build it "
        "with `pip install -e .` (or `make install`) from the fastlstm source tree"
    ) from exc


def pack_for_extension(plan: CellPlan, dtype: np.dtype) -> dict:
    """One cell in the extension's layout: padded ``[w_ih | 0 | w_hh | 0]`` rows (G*H of them), float32 GEMM
    panels (and those of a reset-first GRU's candidate rows alone), with 8- or 16-bit weights the same rows
    as the format stores them (and the int8 rows' scales), bias, peepholes, the GRU candidate bias and the
    padded projection, with the sizes, strides, codes and flags ``LSTMKernels`` reads."""
    H, I, P, R = plan.hidden_size, plan.input_size, plan.proj_size, plan.recurrent_size
    G = plan.num_gates * H
    Ip, Rp, Hp = padded(I, dtype), padded(R, dtype), padded(H, dtype)
    K = Ip + Rp
    weights = aligned_zeros(G * K, dtype).reshape(G, K)
    weights[:, :I] = plan.w_ih
    weights[:, Ip:Ip + R] = plan.w_hh
    bias = aligned_zeros(G, dtype)
    bias[:] = plan.bias
    packed = candidate_packed = None
    if dtype == np.float32:
        packed = _panels(weights, dtype)
        if plan.kind == "gru" and not plan.linear_before_reset:
            # The candidate's rows multiply r * h' apart from the others: panels of their own.
            candidate_packed = _panels(weights[2 * H:], dtype)
    projection = None
    if P:
        projection = aligned_zeros(P * Hp, dtype).reshape(P, Hp)
        projection[:, :H] = plan.w_hr

    narrow_weights = scales = None
    if plan.weight_format != "float32":
        stored_ih, stored_hh = plan.w_ih_stored, plan.w_hh_stored
        narrow_weights = aligned_zeros(G * K, stored_ih.values.dtype).reshape(G, K)
        narrow_weights[:, :I] = stored_ih.values
        narrow_weights[:, Ip:Ip + R] = stored_hh.values
        if plan.weight_format == "int8":
            scales = np.ascontiguousarray(np.stack([stored_ih.scale, stored_hh.scale]), dtype=np.float32)

    def contiguous(array):  # a copy: the extension marks what it holds read-only, the spec's arrays stay as given
        return None if array is None else np.array(array, dtype=dtype, order="C", copy=True)

    return dict(
        layer=plan.layer, direction=plan.direction, num_directions=plan.num_directions, reverse=plan.reverse,
        num_gates=plan.num_gates, linear_before_reset=plan.linear_before_reset,
        input_size=I, hidden_size=H, proj_size=P, input_stride=Ip, rec_stride=Rp, hidden_stride=Hp,
        activation_codes=plan.activation_codes, activation_params=plan.activation_params, clip=plan.clip,
        input_forget=plan.input_forget, standard=plan.standard,
        weights=weights, weight_format=plan.weight_format, narrow_weights=narrow_weights, scales=scales,
        packed=packed, candidate_packed=candidate_packed, bias=bias, projection=projection,
        peephole=contiguous(plan.peephole), candidate_bias=contiguous(plan.candidate_bias),
    )


def pack_head_for_extension(stages: tuple[HeadStagePlan, ...], dtype: np.dtype) -> list[dict]:
    """The head's stages in the extension's layout: per stage its sizes, activation code and parameters, and
    its weight ``(out, in)`` and bias as C-contiguous copies in ``dtype`` (None where the stage has none)."""
    return [dict(in_features=stage.in_features, out_features=stage.out_features,
                 weight=_owned_copy(stage.weight, dtype), bias=_owned_copy(stage.bias, dtype),
                 activation_code=stage.activation_code, alpha=stage.alpha, beta=stage.beta)
            for stage in stages]


def _owned_copy(array, dtype: np.dtype) -> np.ndarray | None:
    """A C-contiguous copy in ``dtype`` (None stays None): the extension marks what it holds read-only, and
    the spec's arrays stay as given."""
    return None if array is None else np.array(array, dtype=dtype, order="C", copy=True)


def _panels(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``rows`` (n, K) as panels of PANEL_ROWS rows, each stored k-major (the last one zero-padded):
    ``panels[p, k, j] = rows[p * PANEL_ROWS + j, k]``."""
    panel = _cykernels.PANEL_ROWS
    count, K = -(-rows.shape[0] // panel), rows.shape[1]
    whole = np.zeros((count * panel, K), dtype)
    whole[:rows.shape[0]] = rows
    panels = aligned_zeros(count * K * panel, dtype).reshape(count, K, panel)
    panels[:] = whole.reshape(count, panel, K).transpose(0, 2, 1)
    return panels


class CythonLSTM(PreparedLSTM):
    backend = "cython"

    def __init__(self, spec: ModelSpec, dtype: np.dtype, num_threads: int = 1, weights: str = "float32"):
        super().__init__(spec, dtype, num_threads, weights)
        cells = [pack_for_extension(plan, self.dtype) for plan in plan_cells(spec, weights)]
        head = pack_head_for_extension(plan_head(spec), self.dtype)
        self._kernels = _cykernels.LSTMKernels(self.dtype, num_threads, cells, head)
        # The bound compiled method shadows the class's `step` below: one call layer less per stream step.
        self.step = self._kernels.step

    def run_sequence(self, x, h, c, lengths=None):
        return self._kernels.run_sequence(x, h, c, lengths)

    def run_head(self, x):
        return self._kernels.run_head(x)

    def new_workspace(self, batch_size):
        return self._kernels.new_workspace(batch_size)

    def step(self, x, h, c, workspace):
        self._kernels.step(x, h, c, workspace)
