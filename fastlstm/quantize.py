"""8- and 16-bit storage of the recurrent gate weights: what ``weights="int8"`` and ``"bfloat16"`` store.

A model's gate weights (``w_ih`` and ``w_hh`` of every cell) can be kept in one of ``WEIGHT_FORMATS``:

* ``"float32"``: as the spec holds them, in the run dtype (float64 too);
* ``"bfloat16"``: each weight rounded to the nearest bfloat16 (the upper 16 bits of a float32, ties to even);
* ``"int8"``: symmetric 8-bit integers with one scale per gate row, ``w[r, k] ~ scale[r] * q[r, k]``,
  ``scale[r] = max_k |w[r, k]| / 127`` and ``q`` in -127..127; ``w_ih`` and ``w_hh`` each have their own
  scales. A cell imported from an already-quantized model (``CellWeights.w_ih_scale`` / ``w_hh_scale``) keeps
  its scales and exact integers instead of being quantized afresh.

Activations, state and every sum stay float32: only the bytes of the weights a step streams shrink. The
projection (``w_hr``), biases, peepholes, the embedding and the dense head stay in the run dtype.

``stored_weights`` is the one function that turns a spec's weights into what a format stores; every backend
takes its weights from it, and ``dequantized`` gives the float32 values a format represents, which the NumPy
backend (the reference the compiled backends are tested against) runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import InvalidInputError, UnsupportedModelError
from .spec import CellWeights, ModelSpec, int8_values

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
# The integers fastlstm's own int8 quantization uses: symmetric, so that -w quantizes to -q.
INT8_LIMIT = 127


@dataclass(frozen=True, eq=False)
class StoredWeights:
    """One weight matrix ``(rows, cols)`` as a format stores it.

    ``values``: float32 for ``"float32"``; uint16 bit patterns (the upper half of a float32) for
    ``"bfloat16"``; int8 for ``"int8"``, with ``scale`` ``(rows,)`` float32 (``None`` for the other formats).
    """

    format: str
    values: np.ndarray
    scale: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        """The float32 weights this storage represents (for int8 ``scale[r] * q[r, k]``, rounded once)."""
        if self.format == "bfloat16":
            return (self.values.astype(np.uint32) << 16).view(np.float32)
        if self.format == "int8":
            return self.scale[:, None] * self.values.astype(np.float32)
        return self.values


def weight_format(requested, spec: ModelSpec, dtype: np.dtype) -> str:
    """The format the gate weights run in: ``requested`` checked, or by default ``"int8"`` for a float32
    model whose cells carry 8-bit scales and ``"float32"`` otherwise.

    The 8- and 16-bit formats run in float32 only: a float64 model would gain nothing from them, so it is
    refused (a float64 run of an imported 8-bit model computes its exact products ``scale * q`` anyway).
    """
    if requested is None:
        carries_scales = any(cell.w_ih_scale is not None or cell.w_hh_scale is not None
                             for layer in spec.layers for cell in layer.cells)
        return "int8" if carries_scales and np.dtype(dtype) == np.float32 else "float32"
    if not isinstance(requested, str) or requested not in WEIGHT_FORMATS:
        raise InvalidInputError(f"weights: expected None or one of {WEIGHT_FORMATS}, got {requested!r}")
    if requested != "float32" and np.dtype(dtype) != np.float32:
        raise InvalidInputError(f"weights={requested!r} runs in float32 only (activations, state and sums stay "
                                f"float32); got dtype={np.dtype(dtype)}: use dtype='float32' or weights='float32'")
    return requested


def stored_weights(weights: np.ndarray, scale: np.ndarray | None, format: str, where: str = "weights",
                   ) -> StoredWeights:
    """``weights`` ``(rows, cols)`` in ``format``; ``scale`` is the cell's imported 8-bit scale or ``None``.

    For ``"int8"`` with ``scale`` the integers are the exact ones the imported model stores
    (``spec.int8_values``); without, each row is quantized symmetrically with its own scale (a row of zeros
    gets scale 1 and zeros). ``where`` names the weights in an error.
    """
    if format == "float32":
        return StoredWeights(format, np.ascontiguousarray(weights, dtype=np.float32))
    if format == "bfloat16":
        return StoredWeights(format, _bfloat16_bits(np.asarray(weights, np.float32), where))
    if format != "int8":
        raise ValueError(f"unknown weight format {format!r}")
    if scale is not None:
        return StoredWeights(format, int8_values(weights, scale), np.ascontiguousarray(scale, dtype=np.float32))
    weights = np.asarray(weights, np.float64)
    largest = np.max(np.abs(weights), axis=1) if weights.shape[1] else np.zeros(weights.shape[0])
    row_scale = np.where(largest > 0, largest / INT8_LIMIT, 1.0).astype(np.float32)
    q = np.clip(np.rint(weights / row_scale.astype(np.float64)[:, None]), -INT8_LIMIT, INT8_LIMIT)
    return StoredWeights(format, q.astype(np.int8), row_scale)


def _bfloat16_bits(weights: np.ndarray, where: str) -> np.ndarray:
    """The bfloat16 nearest each float32 (ties to even), as its 16-bit pattern."""
    bits = weights.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    exponent_all_ones = (rounded & 0x7F80) == 0x7F80
    if np.any(exponent_all_ones):
        raise UnsupportedModelError([f"{where}: a weight of magnitude {np.max(np.abs(weights)):.3g} rounds to "
                                     "infinity in bfloat16"], hint="run it with weights='float32'")
    return rounded


def cell_gate_weights(cell: CellWeights, format: str, where: str = "cell") -> tuple[StoredWeights, StoredWeights]:
    """``(w_ih, w_hh)`` of one cell as ``format`` stores them."""
    return (stored_weights(cell.w_ih, cell.w_ih_scale, format, f"{where}.w_ih"),
            stored_weights(cell.w_hh, cell.w_hh_scale, format, f"{where}.w_hh"))


def dequantized_spec(spec: ModelSpec, format: str) -> ModelSpec:
    """``spec`` with every cell's gate weights replaced by the float32 values ``format`` stores (the spec
    itself for ``"float32"``): what a backend without 8- or 16-bit kernels runs, exactly."""
    if format == "float32":
        return spec
    layers = []
    for n, layer in enumerate(spec.layers):
        cells = []
        for d, cell in enumerate(layer.cells):
            w_ih, w_hh = cell_gate_weights(cell, format, f"layers[{n}].cells[{d}]")
            cells.append(replace(cell, w_ih=w_ih.dequantized(), w_hh=w_hh.dequantized()))
        layers.append(replace(layer, cells=tuple(cells)))
    return replace(spec, layers=tuple(layers))
