"""The activation functions a model may name, their parameters, and their NumPy reference definitions.

One table serves everyone: the model description validates names against it, the NumPy backend evaluates
it, and the compiled backends switch on ``Activation.code`` (the position in ``ACTIVATION_CODES``), so a
kernel's numbering can never drift from this list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> (parameters it takes, default values). The maths of each is in `apply_activation`.
# Parametrised forms follow the ONNX operator definitions (the broadest of the sources we import):
#   affine(x) = alpha*x + beta              hard_sigmoid(x) = clip(alpha*x + beta, 0, 1)
#   leaky_relu(x) = x if x >= 0 else alpha*x   thresholded_relu(x) = x if x > alpha else 0
#   scaled_tanh(x) = alpha*tanh(beta*x)      elu(x) = x if x >= 0 else alpha*(exp(x) - 1)
# Keras' two hard_sigmoids are both hard_sigmoid: Keras 2 / tf.keras alpha=0.2, Keras 3 alpha=1/6 (beta=0.5).
ACTIVATION_PARAMS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "identity": ((), ()),
    "sigmoid": ((), ()),
    "tanh": ((), ()),
    "relu": ((), ()),
    "affine": (("alpha", "beta"), (1.0, 0.0)),
    "leaky_relu": (("alpha",), (0.01,)),
    "thresholded_relu": (("alpha",), (1.0,)),
    "scaled_tanh": (("alpha", "beta"), (1.0, 1.0)),
    "hard_sigmoid": (("alpha", "beta"), (0.2, 0.5)),
    "elu": (("alpha",), (1.0,)),
    "softsign": ((), ()),
    "softplus": ((), ()),
    # softmax is not elementwise: allowed in a dense head only, over the last axis.
    "softmax": ((), ()),
}
ACTIVATION_CODES: dict[str, int] = {name: code for code, name in enumerate(ACTIVATION_PARAMS)}
ELEMENTWISE = frozenset(ACTIVATION_PARAMS) - {"softmax"}


@dataclass(frozen=True)
class Activation:
    """An activation function with its parameters (unused parameters are 0)."""

    name: str
    alpha: float = 0.0
    beta: float = 0.0

    @classmethod
    def of(cls, name: str, alpha: float | None = None, beta: float | None = None) -> "Activation":
        """Build ``name`` with the given parameters, filling the documented defaults for those left out."""
        if name not in ACTIVATION_PARAMS:
            raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATION_PARAMS)}")
        params, defaults = ACTIVATION_PARAMS[name]
        values = dict(zip(params, defaults))
        if alpha is not None:
            values["alpha"] = float(alpha)
        if beta is not None:
            values["beta"] = float(beta)
        return cls(name, values.get("alpha", 0.0), values.get("beta", 0.0))

    @property
    def code(self) -> int:
        """The integer the compiled kernels switch on."""
        return ACTIVATION_CODES[self.name]

    def __str__(self) -> str:
        params = ACTIVATION_PARAMS.get(self.name, ((), ()))[0]
        if not params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{p}={getattr(self, p)!r}" for p in params) + ")"


SIGMOID = Activation("sigmoid")
TANH = Activation("tanh")
IDENTITY = Activation("identity")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Two-sided form so that exp never overflows (exp of a non-positive number only).
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def apply_activation(act: Activation, x: np.ndarray) -> np.ndarray:
    """Reference evaluation of ``act`` on ``x`` (returns a new array of x's dtype)."""
    a = x.dtype.type(act.alpha)
    b = x.dtype.type(act.beta)
    name = act.name
    if name == "identity":
        return x.copy()
    if name == "sigmoid":
        return _sigmoid(x)
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, 0)
    if name == "affine":
        return a * x + b
    if name == "leaky_relu":
        return np.where(x >= 0, x, a * x)
    if name == "thresholded_relu":
        return np.where(x > a, x, 0).astype(x.dtype, copy=False)
    if name == "scaled_tanh":
        return a * np.tanh(b * x)
    if name == "hard_sigmoid":
        return np.clip(a * x + b, 0, 1)
    if name == "elu":
        return np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0)))
    if name == "softsign":
        return x / (1 + np.abs(x))
    if name == "softplus":
        return np.logaddexp(x, 0).astype(x.dtype, copy=False)
    if name == "softmax":
        shifted = x - np.max(x, axis=-1, keepdims=True)
        e = np.exp(shifted)
        return e / np.sum(e, axis=-1, keepdims=True)
    raise ValueError(f"unknown activation {name!r}")
