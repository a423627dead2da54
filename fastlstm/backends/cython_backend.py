"""The Cython backend: the compiled kernels of ``fastlstm.backends._cykernels`` behind the ``PreparedLSTM`` interface.

The weights are packed once, at preparation, into ``LSTMKernels`` (layout in the extension's docstring); a
stream's ``step`` is that object's compiled method itself, so a call goes from ``Stream.step`` straight into
C with no Python frame in between. ``num_threads`` caps the extension's threads; it decides per call shape
how many pay (by hidden units at batch 1, by batch rows above).
"""

from __future__ import annotations

import numpy as np

from ..spec import ModelSpec
from .base import PreparedLSTM

try:
    from . import _cykernels
except ImportError as exc:  # not compiled in this checkout
    raise ImportError(
        "the Cython backend's extension fastlstm.backends._cykernels is not built; build it with "
        "`pip install -e .` (or `make install`) from the fastlstm source tree"
    ) from exc


class CythonLSTM(PreparedLSTM):
    backend = "cython"

    def __init__(self, spec: ModelSpec, dtype: np.dtype, num_threads: int = 1):
        super().__init__(spec, dtype, num_threads)
        self._kernels = _cykernels.LSTMKernels(spec, self.dtype, num_threads)
        # The bound compiled method shadows the class's `step` below: one call layer less per stream step.
        self.step = self._kernels.step

    def run_sequence(self, x, h, c, lengths=None):
        return self._kernels.run_sequence(x, h, c, lengths)

    def new_workspace(self, batch_size):
        return self._kernels.new_workspace(batch_size)

    def step(self, x, h, c, workspace):
        return self._kernels.step(x, h, c, workspace)
