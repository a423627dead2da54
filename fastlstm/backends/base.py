"""What a backend provides: a model's LSTM stack prepared for one dtype, run over sequences or one step.

A backend turns a validated ``ModelSpec`` into a ``PreparedLSTM`` once (packing weights in the layout its
kernels stream); the prepared object is immutable and shared by every ``predict`` call and every stream.
Per-stream mutable data (state and scratch buffers) lives in the workspace the backend hands out, so
threads never share scratch space.

**State layout.** Backends see the recurrent state as two C-contiguous arrays, ``h`` and ``c``, of the run
dtype, defined by their memory: for each row of ``spec.state_rows()`` in order (layer by layer, forward
direction first) a ``(B, h_size)`` block of ``h`` and a ``(B, c_size)`` block of ``c`` (empty for a GRU or
RNN row), each row-major. Their shape does not matter: ``fastlstm.model`` passes flat 1-D arrays, and for a
stack of equal-sized layers PyTorch's ``(rows, B, size)`` array is the same memory. ``fastlstm.state``
turns the user's state form into this layout and back.

**The dense head is the backend's**: the head's input activation and dense layers (``fastlstm.spec``) run in
the same call as the recurrent step (``step`` leaves the model's output in the workspace's ``output``), so a
stream step is one call into compiled code, and over whole sequences in ``run_head``. The NumPy backend runs
it with ``fastlstm.head.PreparedHead``, the reference; the compiled ones in their kernels, from the stages of
``fastlstm.backends._cells.plan_head`` packed once beside the cells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..spec import ModelSpec


def state_blocks(spec: ModelSpec, batch: int) -> list[tuple[int, int, int, int]]:
    """Per state row: ``(h_start, h_size, c_start, c_size)``, offsets into the flat ``h`` and ``c``."""
    blocks, h_start, c_start = [], 0, 0
    for row in spec.state_rows():
        blocks.append((h_start, row.h_size, c_start, row.c_size))
        h_start += batch * row.h_size
        c_start += batch * row.c_size
    return blocks


def state_views(spec: ModelSpec, h: np.ndarray, c: np.ndarray, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per state row, ``(B, h_size)`` and ``(B, c_size)`` views of ``h`` and ``c`` (layout above)."""
    h, c = h.reshape(-1), c.reshape(-1)  # views: the arrays are C-contiguous
    return [(h[hs:hs + batch * hn].reshape(batch, hn), c[cs:cs + batch * cn].reshape(batch, cn))
            for hs, hn, cs, cn in state_blocks(spec, batch)]


def flat_state_sizes(spec: ModelSpec, batch: int) -> tuple[int, int]:
    """Items of the flat ``h`` and ``c`` for ``batch`` rows."""
    rows = spec.state_rows()
    return batch * sum(r.h_size for r in rows), batch * sum(r.c_size for r in rows)


class PreparedLSTM(ABC):
    """A ``ModelSpec``'s recurrent stack ready to run in ``dtype`` on one backend."""

    #: backend name, as accepted by ``fastlstm.load(..., backend=...)``
    backend: str = ""

    def __init__(self, spec: ModelSpec, dtype: np.dtype, num_threads: int = 1, weights: str = "float32"):
        self.spec = spec
        self.dtype = np.dtype(dtype)
        #: how the gate weights are stored (``fastlstm.quantize.WEIGHT_FORMATS``, already checked against
        #: ``dtype``); every backend takes them from ``fastlstm.quantize.stored_weights``
        self.weights = weights
        #: the most threads a call may use; a backend uses fewer where more would not pay (small weights)
        self.num_threads = num_threads

    @classmethod
    def unsupported(cls, spec: ModelSpec) -> str | None:
        """Why this backend cannot run ``spec`` (``None`` when it can); ``"auto"`` then tries the next one."""
        return None

    @abstractmethod
    def run_sequence(self, x: np.ndarray, h: np.ndarray, c: np.ndarray,
                     lengths: np.ndarray | None = None) -> np.ndarray:
        """Run every layer over whole sequences.

        ``x`` is ``(B, T, I)``, C-contiguous, of ``self.dtype``. ``h`` and ``c`` (flat, layout in the module
        docstring) hold the initial state on entry and are overwritten with the final state. Returns the last
        layer's output ``(B, T, D * (P or H))``, a new C-contiguous array.

        ``lengths`` (``None``, or int64 ``(B,)`` with ``1 <= lengths[b] <= T``, already checked) gives each
        sequence's own length, with ONNX ``sequence_lens`` semantics: row ``b`` runs steps
        ``0 .. lengths[b]-1`` only (a reverse direction runs them from ``lengths[b]-1`` down to 0), outputs at
        ``t >= lengths[b]`` are zero, and the final state is the one after the row's last valid step.
        """

    @abstractmethod
    def run_head(self, x: np.ndarray) -> np.ndarray:
        """The dense head over ``x`` ``(N, F)``, C-contiguous of ``self.dtype``, F the recurrent output size
        (``spec.recurrent_output_size``): the model's output ``(N, O)``, a new array (a copy of ``x`` for a
        model without a head)."""

    @abstractmethod
    def new_workspace(self, batch_size: int) -> object:
        """Scratch buffers for ``step`` at this batch size, allocated once per stream; the object's ``output``
        attribute is the ``(B, O)`` array (``O = spec.output_size``) where each step leaves its output."""

    @abstractmethod
    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray, workspace: object) -> None:
        """Advance a forward-only stack by one time step, in place, and run the head on its new output.

        ``x`` is ``(B, I)`` C-contiguous of ``self.dtype``; ``h``/``c`` (flat, layout in the module docstring)
        are updated in place; ``workspace.output`` gets the head applied to the top layer's new h (that h
        itself without a head). Allocates nothing.
        """
