"""Specs as an importer of an already-quantized model produces them: gate weights that are a per-row scale
times 8-bit integers, with the scales in ``CellWeights.w_ih_scale`` / ``w_hh_scale``."""

from __future__ import annotations

import dataclasses

import numpy as np

from fastlstm.spec import ModelSpec


def as_imported_int8(spec: ModelSpec, rng) -> ModelSpec:
    """``spec`` with every cell's ``w_ih`` and ``w_hh`` replaced by ``scale[r] * q`` (float32) for integers
    ``q`` in -128..127 and scales unlike what fastlstm's own quantization would pick (so a test can tell
    whether the imported scales were used), carrying those scales."""
    layers = []
    for layer in spec.layers:
        cells = []
        for cell in layer.cells:
            fields = {}
            for name in ("w_ih", "w_hh"):
                weights = np.asarray(getattr(cell, name))
                rows = weights.shape[0]
                scale = (np.abs(weights).max(axis=1) / rng.uniform(60, 120, rows)).astype(np.float32)
                scale = np.where(scale > 0, scale, np.float32(0.01)).astype(np.float32)
                q = np.clip(np.rint(weights / scale[:, None]), -128, 127).astype(np.float32)
                fields[name] = scale[:, None] * q
                fields[f"{name}_scale"] = scale
            cells.append(dataclasses.replace(cell, **fields))
        layers.append(dataclasses.replace(layer, cells=tuple(cells)))
    return dataclasses.replace(spec, layers=tuple(layers)).validate()
