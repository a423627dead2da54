"""Random model descriptions for tests: every option of the canonical spec, non-trivial weights."""

from __future__ import annotations

import numpy as np

from fastlstm.activations import Activation
from fastlstm.spec import DenseLayer, LSTMCellWeights, LSTMLayer, ModelSpec


def random_cell(rng, input_size, hidden_size, proj_size=0, peepholes=False, scale=0.3):
    recurrent = proj_size or hidden_size
    normal = lambda *shape: rng.normal(0.0, scale, shape).astype(np.float64)  # noqa: E731
    return LSTMCellWeights(
        w_ih=normal(4 * hidden_size, input_size),
        w_hh=normal(4 * hidden_size, recurrent),
        bias=normal(4 * hidden_size),
        w_hr=normal(proj_size, hidden_size) if proj_size else None,
        peephole=normal(3, hidden_size) if peepholes else None,
    )


def random_spec(
    rng,
    input_size=5,
    hidden_size=7,
    num_layers=1,
    direction="forward",
    proj_size=0,
    peepholes=False,
    clip=None,
    input_forget=False,
    activations=None,
    head=(),
    output="sequence",
    mask_value=None,
    scale=0.3,
):
    """A validated ``ModelSpec``; ``head`` lists (out_features, activation name) per dense layer."""
    layers = []
    layer_input = input_size
    gate, cell, out = activations or (Activation.of("sigmoid"), Activation.of("tanh"), Activation.of("tanh"))
    num_directions = 2 if direction == "bidirectional" else 1
    for _ in range(num_layers):
        cells = tuple(
            random_cell(rng, layer_input, hidden_size, proj_size, peepholes, scale) for _ in range(num_directions)
        )
        layers.append(LSTMLayer(
            input_size=layer_input, hidden_size=hidden_size, cells=cells, direction=direction,
            proj_size=proj_size, gate_activation=gate, cell_activation=cell, output_activation=out,
            clip=clip, input_forget=input_forget,
        ))
        layer_input = num_directions * (proj_size or hidden_size)
    dense_layers = []
    for out_features, activation in head:
        dense_layers.append(DenseLayer(
            weight=rng.normal(0, 0.3, (out_features, layer_input)),
            bias=rng.normal(0, 0.3, out_features),
            activation=Activation.of(activation),
        ))
        layer_input = out_features
    return ModelSpec(tuple(layers), tuple(dense_layers), output, mask_value).validate()
