"""Random model descriptions for tests: every option of the canonical spec, non-trivial weights."""

from __future__ import annotations

import numpy as np

from fastlstm.activations import Activation
from fastlstm.spec import GATE_COUNTS, CellWeights, DenseLayer, ModelSpec, RecurrentLayer


def random_cell(rng, input_size, hidden_size, proj_size=0, peepholes=False, scale=0.3, kind="lstm"):
    recurrent = proj_size or hidden_size
    gates = GATE_COUNTS[kind]
    normal = lambda *shape: rng.normal(0.0, scale, shape).astype(np.float64)  # noqa: E731
    return CellWeights(
        w_ih=normal(gates * hidden_size, input_size),
        w_hh=normal(gates * hidden_size, recurrent),
        bias=normal(gates * hidden_size),
        w_hr=normal(proj_size, hidden_size) if proj_size else None,
        peephole=normal(3, hidden_size) if peepholes else None,
        candidate_bias=normal(hidden_size) if kind == "gru" else None,
    )


def random_stack(rng, kinds, hidden_sizes, input_size=5, directions=None, linear_before_reset=True,
                 head=(), output="sequence", scale=0.3, vocab_size=0, mask_value=None):
    """A validated ``ModelSpec`` of layers of the given ``kinds`` and ``hidden_sizes`` (one per layer), e.g.
    ``random_stack(rng, ["lstm", "gru"], [8, 5])``; GRU layers use ``linear_before_reset``; ``vocab_size``
    adds an embedding in front."""
    directions = directions or ["forward"] * len(kinds)
    layers, layer_input = [], input_size
    for kind, hidden, direction in zip(kinds, hidden_sizes, directions):
        count = 2 if direction == "bidirectional" else 1
        cells = tuple(random_cell(rng, layer_input, hidden, scale=scale, kind=kind) for _ in range(count))
        layers.append(RecurrentLayer(input_size=layer_input, hidden_size=hidden, cells=cells, direction=direction,
                                     kind=kind, linear_before_reset=linear_before_reset if kind == "gru" else True))
        layer_input = count * hidden
    dense_layers = []
    for out_features, activation in head:
        dense_layers.append(DenseLayer(rng.normal(0, 0.3, (out_features, layer_input)),
                                       rng.normal(0, 0.3, out_features), Activation.of(activation)))
        layer_input = out_features
    embedding = rng.normal(0, 1.0, (vocab_size, input_size)) if vocab_size else None
    return ModelSpec(tuple(layers), tuple(dense_layers), output, mask_value=mask_value,
                     embedding=embedding).validate()


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
        layers.append(RecurrentLayer(
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


def scoring_models(rng: np.random.Generator) -> dict:
    """Three small models the cluster integrations score: every-step output with a head, a mixed stack with a
    bidirectional layer that outputs its last step, and a token-id model."""
    import fastlstm

    return {
        "sequence": fastlstm.Model(random_spec(rng, input_size=4, hidden_size=6, num_layers=2, head=[(3, "tanh")])),
        "last_step": fastlstm.Model(random_stack(rng, ["gru", "lstm"], [5, 4], input_size=4,
                                                 directions=["bidirectional", "forward"], output="last_step")),
        "tokens": fastlstm.Model(random_stack(rng, ["lstm"], [6], input_size=3, vocab_size=13,
                                              head=[(2, "identity")])),
    }
