"""The Numba backend: the jitted kernels of ``_numba_kernels`` behind the ``PreparedLSTM`` interface.

Preparation packs every cell's weights and the dense head's once into one flat buffer plus two small int64
tables of sizes, offsets and options, one for the cells and one for the head's stages (layout in
``_numba_kernels``). The kernels take that buffer and the tables as arguments, so one compiled kernel per
dtype serves every model, and a stream step passes eight arrays: x, h, c, the stream's output and scratch,
the weights and the two tables (Numba's dispatch costs about 0.05 us per array argument). The step runs the
recurrent stack and the head in that one call.
"""

from __future__ import annotations

import numpy as np

from ..spec import ModelSpec
from . import _numba_kernels as kernels
from .blas_threads import available_cores, thread_query_address
from ._cells import CellPlan, HeadStagePlan, aligned_zeros, padded, plan_cells, plan_head
from .base import PreparedLSTM


def pack_cells(plans: tuple[CellPlan, ...], head_stages: tuple[HeadStagePlan, ...], dtype,
               num_threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weights, cells, head)`` for the planner's cells and head stages, in the layout of
    ``_numba_kernels``' docstring."""
    dtype = np.dtype(dtype)
    segments: list[tuple[int, np.ndarray]] = []
    end = 0

    def place(array) -> int:
        nonlocal end
        start = end
        segments.append((start, np.asarray(array, dtype=dtype)))
        end = start + padded(np.size(array), dtype)
        return start

    def place_narrow(values) -> int:
        """``values`` (uint16 or int8) as their bytes, in float32 items (the kernels view them back)."""
        raw = np.ascontiguousarray(values).tobytes()
        raw += bytes(-len(raw) % dtype.itemsize)
        return place(np.frombuffer(raw, dtype=dtype))

    rows = []
    h_start = c_start = 0
    for plan in plans:
        H = plan.hidden_size
        recurrent = np.asarray(plan.w_hh).T
        reset_before_linear = plan.kind == "gru" and not plan.linear_before_reset
        row = np.zeros(kernels.NUM_COLUMNS, np.int64)
        row[kernels.COL_KIND] = kernels.KIND_CODES[plan.kind]
        row[kernels.COL_GATES] = plan.num_gates
        row[kernels.COL_INPUT_SIZE] = plan.input_size
        row[kernels.COL_HIDDEN_SIZE] = H
        row[kernels.COL_PROJ_SIZE] = plan.proj_size
        row[kernels.COL_INPUT] = place(np.asarray(plan.w_ih).T)
        row[kernels.COL_RECURRENT] = place(recurrent[:, :2 * H] if reset_before_linear else recurrent)
        row[kernels.COL_RECURRENT_N] = place(recurrent[:, 2 * H:]) if reset_before_linear else -1
        row[kernels.COL_BIAS] = place(plan.bias)
        row[kernels.COL_RECURRENT_BIAS] = (
            -1 if plan.candidate_bias is None else place(np.concatenate([np.zeros(2 * H), plan.candidate_bias])))
        row[kernels.COL_PEEPHOLE] = -1 if plan.peephole is None else place(plan.peephole)
        row[kernels.COL_PROJECTION] = -1 if plan.w_hr is None else place(np.asarray(plan.w_hr).T)
        row[kernels.COL_PARAMS] = place((plan.clip,) + plan.activation_params)
        codes = plan.activation_codes
        row[kernels.COL_ACTIVATIONS] = codes[0] | codes[1] << 8 | codes[2] << 16
        row[kernels.COL_INPUT_FORGET] = plan.input_forget
        row[kernels.COL_LINEAR_BEFORE_RESET] = plan.linear_before_reset
        row[kernels.COL_STANDARD] = plan.standard
        row[kernels.COL_REVERSE] = plan.reverse
        row[kernels.COL_DIRECTIONS] = plan.num_directions
        gate_weights = np.size(plan.w_ih) + np.size(plan.w_hh)
        narrow = plan.weight_format != "float32"
        # Narrow weights stay in the hand loop at batch 1: BLAS would read their float values, 2 or 4x the bytes.
        row[kernels.COL_BLAS_GEMV] = (not narrow and num_threads > 1
                                      and gate_weights * dtype.itemsize >= kernels.BLAS_GEMV_MIN_BYTES)
        row[kernels.COL_NUM_THREADS] = num_threads
        row[kernels.COL_BLAS_THREAD_QUERY] = thread_query_address()
        row[kernels.COL_BLAS_CORES] = available_cores()
        row[kernels.COL_WEIGHT_FORMAT] = kernels.WEIGHT_FORMAT_CODES[plan.weight_format]
        row[kernels.COL_INPUT_NARROW] = row[kernels.COL_RECURRENT_NARROW] = row[kernels.COL_RECURRENT_N_NARROW] = -1
        row[kernels.COL_INPUT_SCALE] = row[kernels.COL_RECURRENT_SCALE] = -1
        if narrow:
            narrow_recurrent = plan.w_hh_stored.values.T
            row[kernels.COL_INPUT_NARROW] = place_narrow(plan.w_ih_stored.values.T)
            row[kernels.COL_RECURRENT_NARROW] = place_narrow(
                narrow_recurrent[:, :2 * H] if reset_before_linear else narrow_recurrent)
            if reset_before_linear:
                row[kernels.COL_RECURRENT_N_NARROW] = place_narrow(narrow_recurrent[:, 2 * H:])
            if plan.weight_format == "int8":
                row[kernels.COL_INPUT_SCALE] = place(plan.w_ih_stored.scale)
                row[kernels.COL_RECURRENT_SCALE] = place(plan.w_hh_stored.scale)
        row[kernels.COL_H_START] = h_start
        row[kernels.COL_C_START] = c_start
        h_start += plan.recurrent_size
        c_start += plan.state_size
        rows.append(row)
    head_rows = []
    for stage in head_stages:
        row = np.zeros(kernels.HEAD_NUM_COLUMNS, np.int64)
        row[kernels.HEAD_IN] = stage.in_features
        row[kernels.HEAD_OUT] = stage.out_features
        dense = stage.weight is not None
        row[kernels.HEAD_WEIGHT] = place(np.asarray(stage.weight).T) if dense else -1
        bias = np.zeros(stage.out_features) if stage.bias is None else stage.bias
        row[kernels.HEAD_BIAS] = place(bias) if dense else -1
        row[kernels.HEAD_ACTIVATION] = stage.activation_code
        row[kernels.HEAD_PARAMS] = place((stage.alpha, stage.beta))
        head_rows.append(row)
    weights = aligned_zeros(end, dtype)
    for start, array in segments:
        weights[start:start + array.size] = array.ravel()
    cells = np.array(rows, dtype=np.int64).reshape(len(rows), kernels.NUM_COLUMNS)
    head = np.array(head_rows, dtype=np.int64).reshape(len(head_rows), kernels.HEAD_NUM_COLUMNS)
    return weights, cells, head


def step_releases_gil(plans: tuple[CellPlan, ...], head_stages: tuple[HeadStagePlan, ...], batch: int) -> bool:
    """Whether a stream step of this batch size reads enough weights (the cells' and the head's) to release the
    GIL while it runs."""
    weights = sum(plan.weights_per_step for plan in plans) + sum(stage.weights for stage in head_stages)
    return weights * batch >= kernels.RELEASE_GIL_MIN_WEIGHTS


class StepWorkspace:
    """One stream's scratch and output for ``NumbaLSTM.step``; nothing in it is shared: streams on different
    threads each have their own."""

    __slots__ = ("batch_size", "output", "scratch", "kernel")

    def __init__(self, batch_size: int, output: np.ndarray, scratch: np.ndarray, kernel):
        self.batch_size = batch_size
        #: (B, O): where each step leaves its output, the head's when the model has one
        self.output = output
        self.scratch = scratch
        #: the jitted step: one that releases the GIL, or for small steps one that keeps it
        self.kernel = kernel


class NumbaLSTM(PreparedLSTM):
    """A spec's recurrent stack (LSTM, GRU and simple RNN layers of any sizes) on the jitted kernels;
    immutable after construction, shared by every stream.

    Kernels compile on first use per dtype and per rank of the state arrays (about 10 s each for the stream
    step and for whole sequences) and load from the on-disk cache afterwards. Threads: the kernels run on the
    calling thread; BLAS runs batched GEMMs on its own threads, so only while it is set to no more threads
    than ``num_threads`` (the hand loops otherwise); ``num_threads > 1`` also lets batch-1 products of large
    matrices go to BLAS (see ``_numba_kernels``).
    """

    backend = "numba"

    def __init__(self, spec: ModelSpec, dtype: np.dtype, num_threads: int = 1, weights: str = "float32"):
        super().__init__(spec, dtype, num_threads, weights)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype: expected float32 or float64, got {self.dtype}")
        self._plans, self._head_stages = plan_cells(spec, weights), plan_head(spec)
        self._weights, self._cells, self._head = pack_cells(self._plans, self._head_stages, self.dtype, num_threads)
        self._streamable = spec.is_unidirectional_forward

    def run_sequence(self, x, h, c, lengths=None):
        if lengths is None:
            lengths = np.full(x.shape[0], x.shape[1], dtype=np.int64)
        return kernels.run_stack(x, h, c, np.ascontiguousarray(lengths, dtype=np.int64), self._weights, self._cells)

    def run_head(self, x):
        return kernels.run_head(x, self._weights, self._cells, self._head)

    def new_workspace(self, batch_size):
        if not self._streamable:
            raise ValueError("step(): only models whose layers are all forward can be stepped")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        scratch = aligned_zeros(kernels.step_scratch_size(self._cells, self._head, batch_size), self.dtype)
        output = np.zeros((batch_size, self.spec.output_size), self.dtype)
        releases_gil = step_releases_gil(self._plans, self._head_stages, batch_size)
        kernel = kernels.step_stack if releases_gil else kernels.step_stack_holding_gil
        return StepWorkspace(batch_size, output, scratch, kernel)

    def step(self, x, h, c, workspace):
        # The kernel checks every shape (and the scratch and output sizes) before it writes anything.
        workspace.kernel(x, h, c, workspace.output, workspace.scratch, self._weights, self._cells, self._head)
