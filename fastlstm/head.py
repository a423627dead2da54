"""The dense head (a chain of ``Linear`` + activation layers), run the same way for every backend.

``PreparedHead.apply`` serves whole-sequence predictions; ``apply_into`` runs the head of a stream into buffers
allocated once, so a streaming step allocates nothing here.
"""

from __future__ import annotations

import numpy as np

from .activations import apply_activation
from .spec import DenseLayer


class PreparedHead:
    """The head's weights cast once to the run dtype, transposed for ``x @ weight_t``."""

    def __init__(self, layers: tuple[DenseLayer, ...], dtype: np.dtype):
        self.layers = layers
        self.weights_t = [np.ascontiguousarray(d.weight.T, dtype=dtype) for d in layers]
        self.biases = [None if d.bias is None else np.asarray(d.bias, dtype=dtype) for d in layers]

    def __bool__(self) -> bool:
        return bool(self.layers)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Run the head over the last axis of ``x`` (any leading shape); returns a new array."""
        for dense, w_t, b in zip(self.layers, self.weights_t, self.biases):
            x = x @ w_t
            if b is not None:
                x += b
            if dense.activation.name != "identity":
                x = apply_activation(dense.activation, x)
        return x

    def new_buffers(self, batch_size: int) -> list[np.ndarray]:
        """One output buffer per dense layer for ``apply_into``."""
        return [np.empty((batch_size, w_t.shape[1]), dtype=w_t.dtype) for w_t in self.weights_t]

    def apply_into(self, x: np.ndarray, buffers: list[np.ndarray]) -> np.ndarray:
        """Run the head on ``x`` ``(B, F)`` into preallocated ``buffers``; returns the last buffer."""
        for dense, w_t, b, out in zip(self.layers, self.weights_t, self.biases, buffers):
            np.matmul(x, w_t, out=out)
            if b is not None:
                out += b
            name = dense.activation.name
            if name == "relu":
                np.maximum(out, 0, out=out)
            elif name == "tanh":
                np.tanh(out, out=out)
            elif name != "identity":  # the rarer ones: reference evaluation, copied back
                out[...] = apply_activation(dense.activation, out)
            x = out
        return x
