"""The dense head (an elementwise activation of the recurrent output, then a chain of ``Linear`` + activation
layers), run the same way for every backend.

``PreparedHead.apply`` serves whole-sequence predictions; ``apply_into`` runs the head of a stream into buffers
allocated once, so a streaming step allocates nothing here.
"""

from __future__ import annotations

import numpy as np

from .activations import apply_activation
from .spec import ModelSpec


class PreparedHead:
    """The head's weights cast once to the run dtype, transposed for ``x @ weight_t``."""

    def __init__(self, spec: ModelSpec, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.input_activation = spec.head_input_activation
        self.input_size = spec.lstm_output_size
        self.layers = spec.head
        self.weights_t = [np.ascontiguousarray(d.weight.T, dtype=dtype) for d in self.layers]
        self.biases = [None if d.bias is None else np.asarray(d.bias, dtype=dtype) for d in self.layers]

    def __bool__(self) -> bool:
        return bool(self.layers) or self.input_activation.name != "identity"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Run the head over the last axis of ``x`` (any leading shape); returns a new array."""
        if self.input_activation.name != "identity":
            x = apply_activation(self.input_activation, x)
        for dense, w_t, b in zip(self.layers, self.weights_t, self.biases):
            x = x @ w_t
            if b is not None:
                x += b
            if dense.activation.name != "identity":
                x = apply_activation(dense.activation, x)
        return x

    def buffer_sizes(self) -> list[int]:
        """Feature sizes of the buffers ``new_buffers`` makes per batch row (for allocation estimates)."""
        activated = [self.input_size] if self.input_activation.name != "identity" else []
        return activated + [w_t.shape[1] for w_t in self.weights_t] + [1]

    def new_buffers(self, batch_size: int) -> list[np.ndarray]:
        """Buffers for ``apply_into``: the activated input (when there is an input activation), one output per
        dense layer, then a ``(B, 1)`` scratch column."""
        return [np.empty((batch_size, size), dtype=self.dtype) for size in self.buffer_sizes()]

    def apply_into(self, x: np.ndarray, buffers: list[np.ndarray]) -> np.ndarray:
        """Run the head on ``x`` ``(B, F)`` into preallocated ``buffers``; returns the last output buffer."""
        scratch = buffers[-1]
        if self.input_activation.name != "identity":
            activated, buffers = buffers[0], buffers[1:]
            activated[...] = x
            _activate_in_place(self.input_activation, activated, scratch)
            x = activated
        for dense, w_t, b, out in zip(self.layers, self.weights_t, self.biases, buffers):
            np.matmul(x, w_t, out=out)
            if b is not None:
                out += b
            _activate_in_place(dense.activation, out, scratch)
            x = out
        return x


def _activate_in_place(activation, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out = activation(out)`` without allocating, for the common head activations.

    ``scratch`` is a ``(B, 1)`` buffer for softmax's row maxima and sums. Other activations fall back to
    the reference evaluation (which allocates).
    """
    name = activation.name
    if name == "identity":
        return
    if name == "relu":
        np.maximum(out, 0, out=out)
    elif name == "tanh":
        np.tanh(out, out=out)
    elif name == "sigmoid":  # 0.5 * tanh(x / 2) + 0.5: the same function, with no overflow in exp
        out *= 0.5
        np.tanh(out, out=out)
        out *= 0.5
        out += 0.5
    elif name == "softmax":  # ufunc reductions: half the call overhead of np.max / np.sum
        np.maximum.reduce(out, axis=-1, keepdims=True, out=scratch)
        out -= scratch
        np.exp(out, out=out)
        np.add.reduce(out, axis=-1, keepdims=True, out=scratch)
        out /= scratch
    else:
        out[...] = apply_activation(activation, out)
