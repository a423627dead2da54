"""What a backend provides: a model's LSTM stack prepared for one dtype, run over sequences or one step.

A backend turns a validated ``ModelSpec`` into a ``PreparedLSTM`` once (packing weights in the layout its
kernels stream); the prepared object is immutable and shared by every ``predict`` call and every stream.
Per-stream mutable data (state and scratch buffers) lives in the workspace the backend hands out, so
threads never share scratch space.

The dense head is not a backend's business: ``fastlstm.head`` runs it the same way for all backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..spec import ModelSpec


class PreparedLSTM(ABC):
    """A ``ModelSpec``'s LSTM layers ready to run in ``dtype`` on one backend."""

    #: backend name, as accepted by ``fastlstm.load(..., backend=...)``
    backend: str = ""

    def __init__(self, spec: ModelSpec, dtype: np.dtype, num_threads: int = 1):
        self.spec = spec
        self.dtype = np.dtype(dtype)
        #: the most threads a call may use; a backend uses fewer where more would not pay (small weights)
        self.num_threads = num_threads

    @abstractmethod
    def run_sequence(self, x: np.ndarray, h: np.ndarray, c: np.ndarray,
                     lengths: np.ndarray | None = None) -> np.ndarray:
        """Run every layer over whole sequences.

        ``x`` is ``(B, T, I)``, C-contiguous, of ``self.dtype``. ``h`` ``(rows, B, P or H)`` and ``c``
        ``(rows, B, H)`` (``rows = num_layers * num_directions``) hold the initial state on entry and are
        overwritten with the final state. Returns the last layer's output ``(B, T, D * (P or H))``, a new
        C-contiguous array.

        ``lengths`` (``None``, or int64 ``(B,)`` with ``1 <= lengths[b] <= T``, already checked) gives each
        sequence's own length, with ONNX ``sequence_lens`` semantics: row ``b`` runs steps
        ``0 .. lengths[b]-1`` only (a reverse direction runs them from ``lengths[b]-1`` down to 0), outputs at
        ``t >= lengths[b]`` are zero, and the final state is the one after the row's last valid step.
        """

    @abstractmethod
    def new_workspace(self, batch_size: int) -> object:
        """Scratch buffers for ``step`` at this batch size, allocated once per stream."""

    @abstractmethod
    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray, workspace: object) -> np.ndarray:
        """Advance a forward-only stack by one time step, in place.

        ``x`` is ``(B, I)`` C-contiguous of ``self.dtype``; ``h``/``c`` are ``(layers, B, ·)`` and are updated
        in place. Returns the last layer's new hidden output ``(B, P or H)`` (a view of ``h``; allocates
        nothing).
        """
