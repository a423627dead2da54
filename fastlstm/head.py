"""The dense head (an elementwise activation of the recurrent output, then a chain of ``Linear`` + activation
layers) in NumPy: the readable reference the compiled kernels are tested against.

Every backend runs the head (``fastlstm.backends.base``): the NumPy backend with ``PreparedHead`` below, the
compiled ones inside their kernels, in the same call as the recurrent step. ``PreparedHead.apply`` serves
whole-sequence predictions; ``apply_into`` runs the head of a stream into buffers allocated once.
"""

from __future__ import annotations

import numpy as np

from .activations import apply_activation
from .spec import ModelSpec


def has_head(spec: ModelSpec) -> bool:
    """Whether ``spec`` transforms its recurrent output at all (dense layers or an input activation)."""
    return bool(spec.head) or spec.head_input_activation.name != "identity"


def head_buffer_sizes(spec: ModelSpec) -> list[int]:
    """Feature sizes per batch row of what a backend may allocate to run the head, for allocation estimates:
    every stage's output (the activated input, each dense layer's), the widest once more (the compiled
    kernels alternate between two buffers of it), and a scratch column."""
    sizes = [spec.recurrent_output_size] if spec.head_input_activation.name != "identity" else []
    sizes += [dense.out_features for dense in spec.head]
    return sizes + [max(sizes, default=0), 1]


class PreparedHead:
    """The head's weights cast once to the run dtype, transposed for ``x @ weight_t``."""

    def __init__(self, spec: ModelSpec, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.input_activation = spec.head_input_activation
        self.input_size = spec.recurrent_output_size
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

    def new_buffers(self, batch_size: int) -> list[np.ndarray]:
        """Buffers for ``apply_into``: the activated input (when dense layers follow an input activation), the
        output of every dense layer but the last, then a ``(B, 1)`` scratch column."""
        sizes = [self.input_size] if self.input_activation.name != "identity" and self.layers else []
        sizes += [w_t.shape[1] for w_t in self.weights_t[:-1]]
        return [np.empty((batch_size, size), dtype=self.dtype) for size in sizes + [1]]

    def apply_into(self, x: np.ndarray, out: np.ndarray, buffers: list[np.ndarray]) -> None:
        """Run the head on ``x`` ``(B, F)`` into ``out`` ``(B, O)`` through ``buffers`` (``new_buffers``); without
        a head, ``out`` gets ``x``."""
        scratch, targets = buffers[-1], buffers[:-1] + [out]
        if self.input_activation.name != "identity":
            activated = targets.pop(0)
            activated[...] = x
            _activate_in_place(self.input_activation, activated, scratch)
            x = activated
        if not self.layers:
            out[...] = x
        for dense, w_t, b, target in zip(self.layers, self.weights_t, self.biases, targets):
            np.matmul(x, w_t, out=target)
            if b is not None:
                target += b
            _activate_in_place(dense.activation, target, scratch)
            x = target


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
