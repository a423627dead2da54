"""Keras importer: parity with Keras 3 for every supported layer and option, and every refusal.

Each model gets random weights (normal, scale 0.3, so a gate-order or transpose mistake shows), is saved as
``.keras`` and as a legacy ``.h5``, and is loaded from both files and from memory; fastlstm's float32 output
(NumPy backend) must match Keras' within 1e-5. Models whose input is integer (an ``Embedding`` first) get
random token ids. Models are built once per module and shared.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm.activations import Activation
from fastlstm.errors import InvalidModelError, ModelFormatError, UnsupportedModelError
from fastlstm.importers import _keras_hdf5
from fastlstm.importers import keras as keras_importer

from keras_helpers import KERAS_WARNINGS, h5py, keras  # noqa: E402  (skips the module without them)

pytestmark = KERAS_WARNINGS

L = keras.layers
TOLERANCE = 1e-5
BATCH, STEPS, FEATURES = 3, 6, 3
VOCAB = 11  # token ids of the models with an Embedding
LENGTHS = np.array([6, 4, 2])  # valid steps of each sequence in the masked models
FORMATS = ["keras", "h5"]


def sequential(*layers, batch_size=None):
    return keras.Sequential([keras.Input((STEPS, FEATURES), batch_size=batch_size), *layers])


def tokens(*layers):
    """A Sequential model reading (batch, time) token ids."""
    return keras.Sequential([keras.Input((STEPS,), dtype="int32"), *layers])


def functional_tokens():
    """Keras 3 writes the mask of a functional model's Embedding as an operation, not_equal(ids, 0)."""
    ids = keras.Input((STEPS,), dtype="int32")
    sequence = L.GRU(4, return_sequences=True)(L.Dropout(0.1)(L.Embedding(VOCAB, 3, mask_zero=True)(ids)))
    return keras.Model(ids, L.Dense(2)(L.LSTM(5)(sequence)))


def functional_masking():
    """... and a Masking layer's as any(not_equal(x, mask_value), axis=-1)."""
    inputs = keras.Input((STEPS, FEATURES))
    sequence = L.SimpleRNN(4, return_sequences=True)(L.Masking(0.0)(inputs))
    return keras.Model(inputs, L.Dense(2)(L.GRU(3, return_sequences=True)(sequence)))


def functional_explicit_mask():
    ids = keras.Input((STEPS,), dtype="int32")
    return keras.Model(ids, L.LSTM(4)(L.Embedding(VOCAB, 3)(ids), mask=keras.ops.not_equal(ids, 1)))


def functional_return_state():
    inputs = keras.Input((STEPS, FEATURES))
    sequence, _, _ = L.LSTM(4, return_sequences=True, return_state=True)(inputs)
    return keras.Model(inputs, L.Dense(2)(L.Dropout(0.2)(sequence)))


MODELS = {
    "sequence": lambda: sequential(L.LSTM(4, return_sequences=True)),
    "final_state_softmax_head": lambda: sequential(L.LSTM(4), L.Dense(5, activation="relu"),
                                                   L.Dense(3, activation="softmax")),
    "stacked_time_distributed": lambda: sequential(
        L.LSTM(4, return_sequences=True), L.LSTM(4, return_sequences=True),
        L.TimeDistributed(L.Dense(5, activation="tanh")), L.Dense(3, activation="softmax")),
    "bidirectional_concat": lambda: sequential(L.Bidirectional(L.LSTM(4, return_sequences=True)),
                                               L.Bidirectional(L.LSTM(4)), L.Dense(2)),
    # sum folded into the next LSTM's input weights, ave into the dense layer's
    "bidirectional_sum_then_ave": lambda: sequential(
        L.Bidirectional(L.LSTM(4, return_sequences=True), merge_mode="sum"), L.LSTM(4, return_sequences=True),
        L.Bidirectional(L.LSTM(4, return_sequences=True), merge_mode="ave"), L.Dense(3, activation="softmax")),
    "bidirectional_ave_final": lambda: sequential(L.Bidirectional(L.LSTM(4), merge_mode="ave")),
    "go_backwards_final": lambda: sequential(L.LSTM(4, return_sequences=True), L.LSTM(4, go_backwards=True),
                                             L.Dense(2)),
    "activations_and_no_bias": lambda: sequential(
        L.LSTM(4, return_sequences=True, use_bias=False, activation="softsign", recurrent_activation="hard_sigmoid"),
        L.LSTM(4, return_sequences=True, activation="elu", unroll=True),
        L.Dense(5, activation="leaky_relu"), L.Dense(2, activation="softplus", use_bias=False)),
    "noise_layers": lambda: sequential(
        L.Dropout(0.5), L.SpatialDropout1D(0.3), L.LSTM(4, return_sequences=True, dropout=0.3, recurrent_dropout=0.2),
        L.GaussianNoise(0.5), L.GaussianDropout(0.3), L.AlphaDropout(0.2), L.Dense(2)),
    "activation_layers": lambda: sequential(
        L.LSTM(4, return_sequences=True), L.Bidirectional(L.LSTM(4, return_sequences=True), merge_mode="sum"),
        L.Activation("tanh"), L.Dense(3), L.Softmax()),
    "stateful": lambda: sequential(L.LSTM(4, return_sequences=True, stateful=True), L.Dense(2), batch_size=BATCH),
    "masked_sequence": lambda: sequential(L.Masking(0.0), L.LSTM(4, return_sequences=True), L.Dense(2)),
    "masked_bidirectional_backwards": lambda: sequential(
        L.Masking(0.0), L.Bidirectional(L.LSTM(4, return_sequences=True)), L.LSTM(4, go_backwards=True), L.Dense(2)),
    "functional_return_state": functional_return_state,
    # RNN(LSTMCell) is an LSTM; RNN([LSTMCell, ...]) (StackedRNNCells) a stack of LSTM layers
    "rnn_lstm_cell": lambda: sequential(L.RNN(L.LSTMCell(4), return_sequences=True), L.Dense(2)),
    "rnn_stacked_cells_final": lambda: sequential(
        L.RNN([L.LSTMCell(4), L.LSTMCell(4, activation="softsign", use_bias=False)]), L.Dense(2)),
    "rnn_stacked_cells_sequence": lambda: sequential(
        L.RNN([L.LSTMCell(4), L.LSTMCell(4), L.LSTMCell(4)], return_sequences=True), L.LSTM(4, return_sequences=True)),
    "masked_rnn_stacked_cells_backwards": lambda: sequential(
        L.Masking(0.0), L.RNN([L.LSTMCell(4), L.LSTMCell(4)], go_backwards=True), L.Dense(2)),
    "bidirectional_rnn_cell": lambda: sequential(
        L.Bidirectional(L.RNN(L.LSTMCell(4), return_sequences=True), merge_mode="sum"), L.Dense(2)),
    "stateful_rnn_cell": lambda: sequential(L.RNN(L.LSTMCell(4), return_sequences=True, stateful=True, unroll=True),
                                            batch_size=BATCH),
    # stacks of different sizes keep one state entry per layer ("per_layer")
    "different_units_final": lambda: sequential(L.LSTM(8, return_sequences=True), L.LSTM(4), L.Dense(2)),
    "masked_different_units_bidirectional": lambda: sequential(
        L.Masking(0.0), L.Bidirectional(L.LSTM(5, return_sequences=True), merge_mode="sum"),
        L.Bidirectional(L.LSTM(3, return_sequences=True)), L.LSTM(2, return_sequences=True), L.Dense(2)),
    "rnn_stacked_cells_of_different_units": lambda: sequential(
        L.RNN([L.LSTMCell(6), L.LSTMCell(3)], return_sequences=True), L.Dense(2)),
    # GRU: Keras' z, r, h permuted to r, z, n; reset_after=True (two bias rows) and False (one)
    "gru_sequence": lambda: sequential(L.GRU(4, return_sequences=True), L.Dense(2)),
    "gru_reset_before": lambda: sequential(
        L.GRU(4, return_sequences=True, reset_after=False, recurrent_activation="hard_sigmoid", activation="softsign"),
        L.GRU(4, reset_after=False), L.Dense(2)),
    "gru_no_bias": lambda: sequential(L.GRU(3, return_sequences=True, use_bias=False),
                                      L.GRU(3, return_sequences=True, use_bias=False, reset_after=False)),
    "simple_rnn": lambda: sequential(L.SimpleRNN(4, return_sequences=True, activation="relu"),
                                     L.SimpleRNN(4, activation="elu", use_bias=False), L.Dense(2)),
    "mixed_kinds_and_sizes": lambda: sequential(L.LSTM(6, return_sequences=True), L.GRU(4, return_sequences=True),
                                                L.SimpleRNN(3, return_sequences=True, activation="tanh"), L.Dense(2)),
    "bidirectional_gru_sum_simple_rnn_concat": lambda: sequential(
        L.Bidirectional(L.GRU(4, return_sequences=True), merge_mode="sum"), L.Bidirectional(L.SimpleRNN(3)),
        L.Dense(2)),
    "bidirectional_gru_reset_before_ave": lambda: sequential(
        L.Bidirectional(L.GRU(4, reset_after=False), merge_mode="ave")),
    "rnn_gru_cell": lambda: sequential(L.RNN(L.GRUCell(4), return_sequences=True), L.Dense(2)),
    "rnn_simple_rnn_cell_backwards": lambda: sequential(L.RNN(L.SimpleRNNCell(4, activation="softsign"),
                                                              go_backwards=True)),
    "rnn_stacked_gru_cells": lambda: sequential(L.RNN([L.GRUCell(4), L.GRUCell(3, reset_after=False)],
                                                      return_sequences=True)),
    "rnn_stacked_simple_rnn_cells": lambda: sequential(L.RNN([L.SimpleRNNCell(4), L.SimpleRNNCell(4)]), L.Dense(2)),
    "bidirectional_rnn_gru_cell": lambda: sequential(L.Bidirectional(L.RNN(L.GRUCell(4), return_sequences=True)),
                                                     L.Dense(2)),
    "masked_gru_simple_rnn": lambda: sequential(L.Masking(0.0), L.GRU(4, return_sequences=True),
                                                L.SimpleRNN(3, return_sequences=True), L.Dense(2)),
    # Embedding in front: token ids in; mask_zero makes id 0 padding
    "tokens_lstm_stack": lambda: tokens(L.Embedding(VOCAB, 5), L.LSTM(8, return_sequences=True), L.LSTM(4),
                                        L.Dense(2)),
    "tokens_masked_gru": lambda: tokens(L.Embedding(VOCAB, 5, mask_zero=True), L.GRU(4, return_sequences=True),
                                        L.Dense(3)),
    "tokens_masked_lstm_final": lambda: tokens(L.Embedding(VOCAB, 4, mask_zero=True), L.LSTM(4), L.Dense(2)),
    "tokens_masked_bidirectional_final": lambda: tokens(L.Embedding(VOCAB, 4, mask_zero=True),
                                                        L.Bidirectional(L.LSTM(4)), L.Dense(2)),
    "tokens_masked_functional": functional_tokens,
    "masked_functional": functional_masking,
}


@dataclass
class Built:
    model: object
    x: np.ndarray
    expected: np.ndarray  # Keras' output on x
    compared: np.ndarray  # boolean (B, T) mask of the output steps to compare (padding differs by design)
    files: dict[str, str]


def randomize(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])


def keras_output(model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def assert_close(actual: np.ndarray, expected: np.ndarray, where=None) -> None:
    assert actual.shape == expected.shape
    if where is not None and actual.ndim == 3:
        actual, expected = actual[where], expected[where]
    assert np.max(np.abs(actual - expected)) <= TOLERANCE


class Zoo:
    """Builds, saves and runs each model the first time a test asks for it."""

    def __init__(self, directory):
        self.directory = directory
        self.built: dict[str, Built] = {}

    def __getitem__(self, name: str) -> Built:
        if name not in self.built:
            model = MODELS[name]()
            randomize(model, seed=list(MODELS).index(name))
            rng = np.random.default_rng(1)
            if "int" in str(model.inputs[0].dtype):
                x = rng.integers(1, VOCAB, size=(BATCH, STEPS))
            else:
                x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype(np.float32)
            compared = np.ones((BATCH, STEPS), bool)
            if "masked" in name:
                compared = np.arange(STEPS)[None, :] < LENGTHS[:, None]
                x[~compared] = 0.0  # trailing padding
            files = {}
            for fmt in FORMATS:
                files[fmt] = str(self.directory / f"{name}.{fmt}")
                model.save(files[fmt])
            self.built[name] = Built(model, x, keras_output(model, x), compared, files)
        return self.built[name]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("keras_models"))


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_file_matches_keras(zoo, name, fmt):
    built = zoo[name]
    model = fastlstm.load(built.files[fmt], backend="numpy")
    assert_close(model.predict(built.x), built.expected, built.compared)


@pytest.mark.parametrize("name", list(MODELS))
def test_in_memory_model_matches_keras(zoo, name):
    built = zoo[name]
    model = fastlstm.Model(keras_importer.spec_from_keras_model(built.model), backend="numpy")
    assert "in memory" in model.spec.source
    assert_close(model.predict(built.x), built.expected, built.compared)


def test_load_sends_in_memory_keras_models_here(zoo):
    built = zoo["sequence"]
    assert_close(fastlstm.load(built.model, backend="numpy").predict(built.x), built.expected)


def test_what_the_layers_become(zoo):
    spec = fastlstm.load(zoo["bidirectional_sum_then_ave"].files["keras"], backend="numpy").spec
    assert [layer.direction for layer in spec.layers] == ["bidirectional", "forward", "bidirectional"]
    assert spec.layers[1].input_size == 8  # the sum of 4 + 4 folded into (16, 8) input weights
    assert spec.output == "sequence" and spec.head[0].weight.shape == (3, 8)
    spec = fastlstm.load(zoo["go_backwards_final"].files["h5"], backend="numpy").spec
    assert [layer.direction for layer in spec.layers] == ["forward", "reverse"] and spec.output == "final_state"
    spec = fastlstm.load(zoo["activations_and_no_bias"].files["keras"], backend="numpy").spec
    assert spec.layers[0].gate_activation == Activation("hard_sigmoid", 1 / 6, 0.5)  # Keras 3's definition
    assert spec.layers[0].cell_activation == spec.layers[0].output_activation == Activation("softsign")
    assert not np.any(spec.layers[0].cells[0].bias)
    assert fastlstm.load(zoo["masked_sequence"].files["keras"], backend="numpy").spec.mask_value == 0.0
    spec = fastlstm.load(zoo["gru_reset_before"].files["h5"], backend="numpy").spec
    assert [(layer.kind, layer.linear_before_reset) for layer in spec.layers] == [("gru", False), ("gru", False)]
    assert not np.any(spec.layers[0].cells[0].candidate_bias)  # reset_after=False: no recurrent bias
    assert spec.layers[0].gate_activation == Activation("hard_sigmoid", 1 / 6, 0.5)
    assert spec.layers[0].cell_activation == Activation("softsign") and spec.state_form == "h"
    spec = fastlstm.load(zoo["gru_sequence"].files["keras"], backend="numpy").spec
    keras_bias = zoo["gru_sequence"].model.layers[0].get_weights()[2]  # (2, 3H): input, recurrent; z, r, h
    np.testing.assert_array_equal(spec.layers[0].cells[0].candidate_bias, keras_bias[1, 8:])
    np.testing.assert_allclose(spec.layers[0].cells[0].bias[:4], keras_bias[0, 4:8] + keras_bias[1, 4:8])  # r
    spec = fastlstm.load(zoo["mixed_kinds_and_sizes"].files["keras"], backend="numpy").spec
    assert [layer.kind for layer in spec.layers] == ["lstm", "gru", "rnn"] and spec.state_form == "per_layer"
    spec = fastlstm.load(zoo["tokens_masked_gru"].files["keras"], backend="numpy").spec
    assert spec.embedding.shape == (VOCAB, 5) and spec.mask_value == 0 and spec.takes_token_ids
    assert fastlstm.load(zoo["tokens_lstm_stack"].files["h5"], backend="numpy").spec.mask_value is None


def test_streaming_equals_whole_sequence(zoo):
    built = zoo["stacked_time_distributed"]
    model = fastlstm.load(built.files["keras"], backend="numpy")
    stream = model.stream(batch_size=BATCH)
    streamed = np.stack([stream.step(built.x[:, t]) for t in range(STEPS)], axis=1)
    np.testing.assert_allclose(streamed, model.predict(built.x), rtol=0, atol=1e-6)
    assert_close(streamed, built.expected)


# Models streamed step by step must give Keras' outputs: every step of a sequence output (its valid steps when
# masked: x holds trailing padding there), the last step of a final-state one (bidirectional models do not stream).
STREAMED = ["stacked_time_distributed", "different_units_final", "masked_sequence",
            "rnn_stacked_cells_of_different_units", "gru_sequence", "gru_reset_before", "simple_rnn",
            "mixed_kinds_and_sizes", "rnn_stacked_gru_cells", "masked_gru_simple_rnn", "tokens_lstm_stack",
            "tokens_masked_gru", "tokens_masked_functional", "masked_functional"]


@pytest.mark.parametrize("name", STREAMED)
def test_stream_matches_keras(zoo, name):
    built = zoo[name]
    model = fastlstm.load(built.files["keras"], backend="numpy")
    stream = model.stream(batch_size=BATCH)
    streamed = np.stack([stream.step(built.x[:, t]) for t in range(STEPS)], axis=1)
    if built.expected.ndim == 3:
        assert_close(streamed, built.expected, built.compared)
    else:
        assert_close(streamed[:, -1], built.expected)


# A stream skips a masked step anywhere, as Keras does (predict() takes trailing padding only).
MIDDLE_PADDING = ["tokens_masked_gru", "tokens_masked_lstm_final", "masked_gru_simple_rnn"]


@pytest.mark.parametrize("name", MIDDLE_PADDING)
def test_stream_skips_masked_steps_in_the_middle_as_keras(zoo, name):
    built = zoo[name]
    x = built.x.copy()
    x[0, 1:3] = 0  # padding between valid steps; row 1 keeps its trailing padding, row 2 none
    x[2, 0] = 0
    x[1, LENGTHS[1]:] = 0
    x[2, LENGTHS[2]:] = built.x[2, 0]
    expected = keras_output(built.model, x)
    model = fastlstm.load(built.files["h5"], backend="numpy")
    stream = model.stream(batch_size=BATCH)
    streamed = np.stack([stream.step(x[:, t]) for t in range(STEPS)], axis=1)
    assert_close(streamed if expected.ndim == 3 else streamed[:, -1], expected)
    with pytest.raises(fastlstm.errors.InvalidInputError, match="masked time steps"):
        model.predict(x)


def test_a_gru_config_older_than_reset_after_resets_before_the_product(zoo):
    built = zoo["bidirectional_gru_reset_before_ave"]

    def without_reset_after(value):
        if isinstance(value, dict):
            return {key: without_reset_after(item) for key, item in value.items() if key != "reset_after"}
        return [without_reset_after(item) for item in value] if isinstance(value, list) else value

    config = {"class_name": "Sequential", "config": without_reset_after(json.loads(json.dumps(
        built.model.get_config())))}
    assert "reset_after" not in json.dumps(config)
    spec = keras_importer.spec_from_keras_config(config, lambda layer: built.model.get_layer(layer.name).get_weights(),
                                                 keras_version="2.0.8", source="old")
    assert not any(layer.linear_before_reset for layer in spec.layers)
    assert_close(fastlstm.Model(spec, backend="numpy").predict(built.x), built.expected)


def test_stacks_of_different_sizes_keep_a_state_per_layer(zoo):
    built = zoo["different_units_final"]
    model = fastlstm.load(built.files["h5"], backend="numpy")
    assert model.spec.state_form == "per_layer"
    assert [layer.hidden_size for layer in model.spec.layers] == [8, 4]
    _, state = model.predict(built.x, return_state=True)
    (h0, c0), (h1, c1) = state
    assert h0.shape == c0.shape == (1, BATCH, 8) and h1.shape == c1.shape == (1, BATCH, 4)
    dense = model.spec.head[0]  # the final state of the last layer is what the Dense head reads
    assert_close(h1[0] @ dense.weight.T + dense.bias, built.expected)


@pytest.mark.parametrize("layer", [L.LSTM, L.GRU])
def test_keras2_files_get_keras2_hard_sigmoid(tmp_path, layer):
    """Keras 2 defined hard_sigmoid as clip(0.2x + 0.5), Keras 3 as clip(x/6 + 0.5): the writer's version decides."""
    model = sequential(layer(4, return_sequences=True, recurrent_activation="hard_sigmoid"))
    randomize(model, seed=7)
    path = str(tmp_path / "keras2.h5")
    model.save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["keras_version"] = "2.12.0"
    reference = sequential(layer(4, return_sequences=True,
                                 recurrent_activation=lambda z: keras.ops.clip(0.2 * z + 0.5, 0.0, 1.0)))
    reference.set_weights(model.get_weights())
    x = np.random.default_rng(2).normal(size=(BATCH, STEPS, FEATURES)).astype(np.float32)
    keras2_output = keras_output(reference, x)
    assert np.max(np.abs(keras2_output - keras_output(model, x))) > 100 * TOLERANCE  # the definitions differ

    loaded = fastlstm.load(path, backend="numpy")
    assert loaded.spec.layers[0].gate_activation == Activation("hard_sigmoid", 0.2, 0.5)
    assert_close(loaded.predict(x), keras2_output)

    with h5py.File(path, "r+") as f:
        del f.attrs["keras_version"]
    with pytest.raises(UnsupportedModelError, match="hard_sigmoid"):
        fastlstm.load(path, backend="numpy")


# ----------------------------------------------------------------------------------------- refusals
def test_unsupported_layers_are_named_together(tmp_path):
    model = sequential(L.Conv1D(4, 2, padding="same"), L.LSTM(4, return_sequences=True), L.LayerNormalization(),
                       L.Dense(2))
    path = str(tmp_path / "conv_norm.keras")
    model.save(path)
    for load in (lambda: fastlstm.load(path, backend="numpy"), lambda: keras_importer.spec_from_keras_model(model)):
        with pytest.raises(UnsupportedModelError) as info:
            load()
        message = str(info.value)
        assert ("layer Conv1D 'conv1d' at position 0 is not supported; supported: InputLayer, Embedding, Masking, "
                "LSTM, GRU, SimpleRNN") in message
        assert "layer LayerNormalization 'layer_normalization' at position 2 is not supported" in message
        assert len(info.value.unsupported) == 2


def branching_model():
    inputs = keras.Input((STEPS, FEATURES))
    merged = L.Concatenate()([L.LSTM(4)(inputs), L.LSTM(4)(inputs)])
    return keras.Model(inputs, L.Dense(2)(merged))


def states_as_outputs():
    inputs = keras.Input((STEPS, FEATURES))
    output, state_h, _ = L.LSTM(4, return_state=True)(inputs)
    return keras.Model(inputs, [output, state_h])


def separate_directions():
    inputs = keras.Input((STEPS, FEATURES))
    forward, backward = L.Bidirectional(L.LSTM(4), merge_mode=None)(inputs)
    return keras.Model(inputs, [forward, backward])


def dropout_at_inference():
    inputs = keras.Input((STEPS, FEATURES))
    return keras.Model(inputs, L.Dropout(0.5)(L.LSTM(4)(inputs), training=True))


def lora_embedding():
    model = tokens(L.Embedding(VOCAB, 4), L.LSTM(4))
    model.layers[0].enable_lora(2)
    return model


REFUSED = {
    "reversed_sequence": (lambda: sequential(L.LSTM(4, return_sequences=True, go_backwards=True)),
                          "reversed time order"),
    "merge_mul": (lambda: sequential(L.Bidirectional(L.LSTM(4), merge_mode="mul")), "merge_mode='mul'"),
    "merge_none": (separate_directions, "merge_mode=None"),
    "dense_first": (lambda: sequential(L.Dense(4), L.LSTM(4)), "comes before the first recurrent layer"),
    "lstm_after_final_state": (lambda: sequential(L.LSTM(4), L.RepeatVector(2), L.LSTM(4)), "RepeatVector"),
    "unsupported_activation": (lambda: sequential(L.LSTM(4, activation="gelu")), "activation 'gelu'"),
    "branches": (branching_model, "Concatenate"),
    "states_as_outputs": (states_as_outputs, "return_state=True"),
    "dropout_at_inference": (dropout_at_inference, "training=True"),
    "gru_softmax": (lambda: sequential(L.GRU(4, activation="softmax")), "activation='softmax' is not elementwise"),
    "bidirectional_of_two_kinds": (lambda: sequential(L.Bidirectional(
        L.GRU(4), backward_layer=L.LSTM(4, go_backwards=True))), "differ in kind"),
    "gru_reversed_sequence": (lambda: sequential(L.GRU(4, return_sequences=True, go_backwards=True)),
                              "reversed time order"),
    "masking_after_embedding": (lambda: tokens(L.Embedding(VOCAB, 4), L.Masking(0.0), L.LSTM(4)),
                                "Masking 'masking\\w*' at position 1 comes after Embedding"),
    "embedding_after_masking": (lambda: tokens(L.Masking(0), L.Embedding(VOCAB, 4), L.LSTM(4)),
                                "Embedding 'embedding\\w*' at position 1 comes after Masking"),
    "embedding_lora": (lora_embedding, "LoRA-adapted"),
    "explicit_mask": (functional_explicit_mask, "called with a tensor as 'mask'"),
    "integer_input_without_embedding": (lambda: keras.Sequential([keras.Input((STEPS, FEATURES), dtype="int32"),
                                                                  L.LSTM(4)]), "dtype 'int32' without an Embedding"),
    "bidirectional_stacked_cells": (lambda: sequential(L.Bidirectional(L.RNN([L.LSTMCell(4), L.LSTMCell(4)]))),
                                    "Bidirectional over stacked cells"),
    "rnn_reversed_sequence": (lambda: sequential(L.RNN(L.LSTMCell(4), return_sequences=True, go_backwards=True)),
                              "reversed time order"),
    "rnn_states_as_outputs": (lambda: sequential(L.RNN(L.LSTMCell(4), return_state=True)), "return_state=True"),
    "mixed_precision": (lambda: sequential(L.LSTM(4, dtype="mixed_float16")), "dtype policy 'mixed_float16'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.filterwarnings("ignore:Layer .* was passed an input with a mask attached")  # Keras, on Masking first
def test_refused_models_say_why(name):
    build, reason = REFUSED[name]
    with pytest.raises(UnsupportedModelError, match=reason):
        keras_importer.spec_from_keras_model(build())


def layer_config(config: dict, class_name: str) -> dict:
    return next(entry["config"] for entry in config["config"]["layers"] if entry["class_name"] == class_name)


def rename_cell(config: dict) -> None:
    layer_config(config, "RNN")["cell"]["class_name"] = "PeepholeLSTMCell"


# Edits of a saved config, and what the importer must say: nothing in a config is ignored without a word.
CONFIG_EDITS = {
    "unknown option set to 0": (lambda c: layer_config(c, "LSTM").update(mystery_option=0),
                                UnsupportedModelError, "option mystery_option=0 is not one fastlstm knows"),
    "unknown Masking option": (lambda c: layer_config(c, "Masking").update(mystery=False),
                               UnsupportedModelError, r"Masking 'masking\w*'.*option mystery=False"),
    "ragged input": (lambda c: layer_config(c, "InputLayer").update(ragged=True), UnsupportedModelError,
                     "ragged=True"),
    "use_bias as text": (lambda c: layer_config(c, "LSTM").update(use_bias="false"), ModelFormatError,
                         "use_bias='false', expected true or false"),
    "return_sequences as a number": (lambda c: layer_config(c, "LSTM").update(return_sequences=1), ModelFormatError,
                                     "return_sequences=1, expected true or false"),
    "huge mask value": (lambda c: layer_config(c, "Masking").update(mask_value=10 ** 400), UnsupportedModelError,
                        "fastlstm masks with a finite number"),
    "float16 policy": (lambda c: layer_config(c, "Dense").update(dtype="float16"), UnsupportedModelError,
                       "dtype policy 'float16'"),
}
# The same for the other kinds and the embedding: (model, edit, error, message).
OTHER_CONFIG_EDITS = {
    "sparse embedding": ("tokens_masked_gru", lambda c: layer_config(c, "Embedding").update(sparse=True),
                         UnsupportedModelError, "sparse=True"),
    "quantized embedding": ("tokens_masked_gru", lambda c: layer_config(c, "Embedding").update(
        quantization_config={"mode": "int8"}), UnsupportedModelError, "quantized"),
    "mask_zero as text": ("tokens_masked_gru", lambda c: layer_config(c, "Embedding").update(mask_zero="true"),
                          ModelFormatError, "mask_zero='true', expected true or false"),
    "embedding size": ("tokens_masked_gru", lambda c: layer_config(c, "Embedding").update(output_dim=0),
                       ModelFormatError, "output_dim=0, expected a positive integer"),
    "unknown embedding option": ("tokens_masked_gru", lambda c: layer_config(c, "Embedding").update(scale=2.0),
                                 UnsupportedModelError, "option scale=2.0 is not one fastlstm knows"),
    # reset_after absent: a Keras older than the option, which reset before the product and had one bias row
    "reset_after dropped": ("gru_sequence", lambda c: layer_config(c, "GRU").pop("reset_after"),
                            InvalidModelError, r"weight 2 has shape \(2, 12\), expected \(12,\)"),
    "reset_after as text": ("gru_sequence", lambda c: layer_config(c, "GRU").update(reset_after="no"),
                            ModelFormatError, "reset_after='no', expected true or false"),
    "simple RNN with a recurrent_activation": (
        "simple_rnn", lambda c: layer_config(c, "SimpleRNN").update(recurrent_activation="sigmoid"),
        UnsupportedModelError, "option recurrent_activation='sigmoid' is not one fastlstm knows"),
    "another cell": ("rnn_gru_cell", rename_cell, UnsupportedModelError,
                     "LSTMCell, GRUCell, SimpleRNNCell cells only"),
    # Bidirectional's options mean nothing on a TimeDistributed: unknown there, not skipped
    "merge_mode on TimeDistributed": ("stacked_time_distributed",
                                      lambda c: layer_config(c, "TimeDistributed").update(merge_mode="mul"),
                                      UnsupportedModelError, "option merge_mode='mul' is not one fastlstm knows"),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS) + list(OTHER_CONFIG_EDITS))
def test_config_options_are_translated_or_refused(zoo, edit):
    name, change, error, message = OTHER_CONFIG_EDITS.get(edit) or ("masked_sequence", *CONFIG_EDITS[edit])
    model = zoo[name].model
    config = {"class_name": "Sequential", "config": json.loads(json.dumps(model.get_config()))}
    keras_importer.spec_from_keras_config(config, lambda layer: model.get_layer(layer.name).get_weights(),
                                          keras_version="3.5.0", source="edited")
    change(config)
    with pytest.raises(error, match=message):
        keras_importer.spec_from_keras_config(config, lambda layer: model.get_layer(layer.name).get_weights(),
                                              keras_version="3.5.0", source="edited")


@keras.saving.register_keras_serializable(package="spoof")
class LSTM(L.LSTM):
    """A user's class that reuses Keras' class name: its call() is not in the file."""

    def call(self, sequences, initial_state=None, mask=None, training=False):
        return 2 * super().call(sequences, initial_state, mask, training)


def test_a_custom_class_named_like_a_keras_one_is_refused(tmp_path):
    model = sequential(LSTM(4), L.Dense(2))
    path = str(tmp_path / "custom.keras")
    model.save(path)
    for load in (lambda: fastlstm.load(path, backend="numpy"), lambda: keras_importer.spec_from_keras_model(model)):
        with pytest.raises(UnsupportedModelError, match="a custom class \\(registered_name='spoof>LSTM'"):
            load()


# Where, in a zoo model's config, a serialised layer or cell can name a user's class.
SPOOFED = {
    "Bidirectional layer": ("bidirectional_concat", lambda layers: layers[1]["config"]["layer"]),
    "RNN cell": ("rnn_lstm_cell", lambda layers: layers[1]["config"]["cell"]),
    "stacked cell": ("rnn_stacked_cells_final", lambda layers: layers[1]["config"]["cell"]["config"]["cells"][1]),
    "TimeDistributed layer": ("stacked_time_distributed", lambda layers: layers[3]["config"]["layer"]),
}


@pytest.mark.parametrize("where", list(SPOOFED))
def test_custom_classes_inside_wrappers_are_refused(zoo, where):
    name, inner = SPOOFED[where]
    model = zoo[name].model
    config = {"class_name": "Sequential", "config": json.loads(json.dumps(model.get_config()))}
    inner(config["config"]["layers"]).update(module="mine.layers", registered_name="mine>Spoof")
    with pytest.raises(UnsupportedModelError, match="registered_name='mine>Spoof'"):
        keras_importer.spec_from_keras_config(config, lambda layer: model.get_layer(layer.name).get_weights(),
                                              keras_version="3.5.0", source="spoofed")


def test_options_do_not_apply(zoo):
    with pytest.raises(TypeError, match="do not apply"):
        fastlstm.load(zoo["sequence"].files["keras"], backend="numpy", head=[])
    with pytest.raises(TypeError, match="do not apply"):
        keras_importer.spec_from_keras_model(zoo["sequence"].model, head=[])


def test_weights_only_file_is_refused(zoo, tmp_path):
    path = str(tmp_path / "only.weights.h5")
    zoo["sequence"].model.save_weights(path)
    with pytest.raises(ModelFormatError, match="weights only"):
        fastlstm.load(path, backend="numpy")


# ----------------------------------------------------------------------------------------- damaged files
CORRUPTION = settings(max_examples=10, deadline=None, database=None)


@pytest.fixture(scope="module")
def pristine(zoo):
    """The bytes of a small model's files, and a directory to write damaged copies to."""
    built = zoo["bidirectional_concat"]
    contents = {}
    for fmt in FORMATS:
        with open(built.files[fmt], "rb") as f:
            contents[fmt] = f.read()
    return contents, os.path.dirname(built.files["keras"])


def load_bytes(data: bytes, directory: str, fmt: str):
    path = os.path.join(directory, f"damaged.{fmt}")
    with open(path, "wb") as f:
        f.write(data)
    return fastlstm.load(path, backend="numpy")


@pytest.mark.parametrize("fmt", FORMATS)
@CORRUPTION
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_are_format_errors(pristine, fmt, fraction):
    contents, directory = pristine
    data = contents[fmt]
    with pytest.raises(ModelFormatError):
        load_bytes(data[:int(fraction * len(data))], directory, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@CORRUPTION
@given(data=st.data())
def test_bit_flips_load_or_raise_format_errors(pristine, fmt, data):
    """A flipped bit either leaves a loadable model (e.g. in a weight) or is reported; nothing else escapes.
    A flip inside the JSON config can turn "LSTM" into an unknown layer name: that is refused as unsupported."""
    contents, directory = pristine
    damaged = bytearray(contents[fmt])
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        position = data.draw(st.integers(0, len(damaged) - 1), label="byte")
        damaged[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    try:
        load_bytes(bytes(damaged), directory, fmt)
    except (ModelFormatError, UnsupportedModelError):
        pass


@pytest.mark.parametrize("magic", [b"\x89HDF\r\n\x1a\n", b"PK\x03\x04", b""])
@CORRUPTION
@given(noise=st.binary(max_size=4096))
def test_random_bytes_are_format_errors(pristine, magic, noise):
    with pytest.raises(ModelFormatError):
        load_bytes(magic + noise, pristine[1], "keras")


def test_damaged_config_is_a_format_error(pristine):
    contents, directory = pristine
    rewritten = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(contents["keras"])) as source, zipfile.ZipFile(rewritten, "w") as target:
        for member in source.namelist():
            payload = source.read(member)
            if member == "config.json":
                config = json.loads(payload)
                config["config"]["layers"][-1]["config"]["units"] = 3  # the dense kernel is (8, 2)
                payload = json.dumps(config).encode()
            target.writestr(member, payload)
    with pytest.raises(ModelFormatError, match="expected"):
        load_bytes(rewritten.getvalue(), directory, "keras")


def test_hdf5_global_heap_that_would_loop_forever_fails_at_once(pristine):
    """HDF5 loops forever on a global heap entry of index 0 and size 0; the importer recognises it first."""
    contents, directory = pristine
    damaged = bytearray(contents["h5"])
    position = damaged.index(b"GCOL\x01\x00\x00\x00") + 16  # the first object after the collection header
    while int.from_bytes(damaged[position:position + 2], "little") != 0:  # walk to the free-space entry
        position += 16 + -(-int.from_bytes(damaged[position + 8:position + 16], "little") // 8) * 8
    damaged[position + 8:position + 16] = bytes(8)
    with pytest.raises(ModelFormatError, match="loop"):
        load_bytes(bytes(damaged), directory, "h5")


@pytest.mark.parametrize("child, reported", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crashed"),
    ("import time; time.sleep(30)", "did not finish"),
])
def test_hdf5_library_crash_or_hang_is_a_format_error(pristine, monkeypatch, child, reported):
    monkeypatch.setattr(_keras_hdf5, "_RUN_CHILD", child)
    monkeypatch.setattr(_keras_hdf5, "BASE_TIME_LIMIT_S", 1.0)
    with pytest.raises(ModelFormatError, match=reported):
        load_bytes(pristine[0]["h5"], pristine[1], "h5")
