"""Specs as an importer of an already-quantized model produces them: gate weights that are a per-row scale
times 8-bit integers, with the scales in ``CellWeights.w_ih_scale`` / ``w_hh_scale``."""

from __future__ import annotations

import dataclasses

import numpy as np

from fastlstm.spec import GATE_COUNTS, CellWeights, ModelSpec, RecurrentLayer


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


def torch_init_stack(rng, kinds, input_size, hidden_size) -> ModelSpec:
    """A forward stack of ``kinds`` layers of one hidden size with PyTorch's default initialisation
    (every weight and both biases uniform in +-1/sqrt(H)): the weight scale of a freshly built or lightly
    trained ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, whose recurrence neither explodes nor dies out."""
    bound = 1 / np.sqrt(hidden_size)
    uniform = lambda *shape: rng.uniform(-bound, bound, shape)  # noqa: E731
    layers, layer_input = [], input_size
    for kind in kinds:
        rows = GATE_COUNTS[kind] * hidden_size
        cell = CellWeights(uniform(rows, layer_input), uniform(rows, hidden_size), uniform(rows) + uniform(rows),
                           candidate_bias=uniform(hidden_size) if kind == "gru" else None)
        layers.append(RecurrentLayer(layer_input, hidden_size, (cell,), kind=kind))
        layer_input = hidden_size
    return ModelSpec(tuple(layers)).validate()
