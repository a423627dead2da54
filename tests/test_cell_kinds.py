"""GRU and simple RNN layers, stacks of any sizes, embeddings and the state rule: the NumPy reference against
PyTorch's own modules (weights copied by hand, so the importers are not involved), then every backend against
the reference."""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from fastlstm import InvalidInputError, InvalidModelError
from fastlstm.activations import Activation
from fastlstm.spec import CellWeights, ModelSpec, RecurrentLayer
from random_models import random_stack

torch = pytest.importorskip("torch")

BACKENDS = ["numpy", "numba", "cython"]


def torch_layer_spec(module, kind: str) -> ModelSpec:
    """A spec holding a one-layer ``nn.GRU`` / ``nn.RNN`` (gate order r, z, n: PyTorch's is the spec's)."""
    cells = []
    for suffix in ([""] + (["_reverse"] if module.bidirectional else [])):
        p = {name: getattr(module, f"{name}_l0{suffix}").detach().double().numpy()
             for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        H = module.hidden_size
        if kind == "gru":
            bias = np.concatenate([p["bias_ih"][:2 * H] + p["bias_hh"][:2 * H], p["bias_ih"][2 * H:]])
            cells.append(CellWeights(p["weight_ih"], p["weight_hh"], bias, candidate_bias=p["bias_hh"][2 * H:]))
        else:
            cells.append(CellWeights(p["weight_ih"], p["weight_hh"], p["bias_ih"] + p["bias_hh"]))
    activation = Activation.of(getattr(module, "nonlinearity", "tanh"))
    layer = RecurrentLayer(module.input_size, module.hidden_size, tuple(cells),
                           direction="bidirectional" if module.bidirectional else "forward", kind=kind,
                           cell_activation=activation)
    return ModelSpec((layer,)).validate()


@pytest.mark.parametrize("kind, options", [("gru", {}), ("gru", {"bidirectional": True}), ("rnn", {}),
                                           ("rnn", {"nonlinearity": "relu"}), ("rnn", {"bidirectional": True})])
def test_reference_equals_pytorch(kind, options):
    torch.manual_seed(0)
    module = {"gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind](4, 6, batch_first=True, **options)
    x = np.random.default_rng(1).normal(size=(3, 7, 4)).astype(np.float32)
    h0 = np.random.default_rng(2).normal(size=(2 if options.get("bidirectional") else 1, 3, 6)).astype(np.float32)
    with torch.no_grad():
        expected, h_n = module(torch.from_numpy(x), torch.from_numpy(h0))
    model = fastlstm.Model(torch_layer_spec(module, kind), backend="numpy")
    y, h = model.predict(x, state=h0, return_state=True)
    assert model.state_form == "h"
    np.testing.assert_allclose(y, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(h, h_n.numpy(), atol=1e-5)


def test_gru_reset_before_linear_equations():
    """The variant PyTorch lacks, against its equation written out in NumPy."""
    rng = np.random.default_rng(3)
    spec = random_stack(rng, ["gru"], [5], input_size=3, linear_before_reset=False)
    cell = spec.layers[0].cells[0]
    x = rng.normal(size=(2, 4, 3))
    h = np.zeros((2, 5))
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    outputs = []
    for t in range(4):
        W, R, b, b_hn = cell.w_ih, cell.w_hh, cell.bias, cell.candidate_bias
        r = sigmoid(x[:, t] @ W[:5].T + h @ R[:5].T + b[:5])
        z = sigmoid(x[:, t] @ W[5:10].T + h @ R[5:10].T + b[5:10])
        n = np.tanh(x[:, t] @ W[10:].T + b[10:] + (r * h) @ R[10:].T + b_hn)
        h = (1 - z) * n + z * h
        outputs.append(h)
    y = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x)
    np.testing.assert_allclose(y, np.stack(outputs, axis=1), atol=1e-12)


def test_mixed_stack_state_is_one_entry_per_layer():
    rng = np.random.default_rng(4)
    spec = random_stack(rng, ["lstm", "gru", "rnn"], [8, 5, 3], input_size=4,
                        directions=["bidirectional", "forward", "forward"])
    model = fastlstm.Model(spec, backend="numpy")
    assert model.state_form == "per_layer"
    x = rng.normal(size=(2, 6, 4))
    state = ((rng.normal(size=(2, 2, 8)), rng.normal(size=(2, 2, 8))), rng.normal(size=(1, 2, 5)),
             rng.normal(size=(1, 2, 3)))
    y, final = model.predict(x, state=state, return_state=True)
    assert y.shape == (2, 6, 3)
    assert [np.shape(part) for part in final[0]] == [(2, 2, 8), (2, 2, 8)]
    assert final[1].shape == (1, 2, 5) and final[2].shape == (1, 2, 3)
    np.testing.assert_array_equal(state[1], np.asarray(state[1]))  # the caller's arrays are not written


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mixed_stack_streams_and_splits_in_time(backend):
    """Halves run one after the other with the state carried, and a stream step by step, equal the whole."""
    rng = np.random.default_rng(9)
    spec = random_stack(rng, ["gru", "lstm", "rnn"], [7, 4, 6], input_size=3, head=[(2, "tanh")])
    x = rng.normal(size=(2, 8, 3))
    model = fastlstm.Model(spec, backend="numpy", dtype="float64")
    whole, final = model.predict(x, return_state=True)
    first, middle = model.predict(x[:, :5], return_state=True)
    second, final_again = model.predict(x[:, 5:], state=middle, return_state=True)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-12)
    for a, b in zip(final, final_again):  # per layer: h for the GRU and the RNN, (h, c) for the LSTM
        np.testing.assert_allclose(np.stack(a) if isinstance(a, tuple) else a,
                                   np.stack(b) if isinstance(b, tuple) else b, atol=1e-12)
    assert fastlstm.backends.backend_class(backend).unsupported(spec) is None  # every backend runs every kind
    stream = fastlstm.Model(spec, backend=backend).stream(batch_size=2)
    streamed = np.stack([stream.step(x[:, t]) for t in range(8)], axis=1)
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    for a, b in zip(stream.state, final):
        np.testing.assert_allclose(np.stack(a) if isinstance(a, tuple) else a,
                                   np.stack(b) if isinstance(b, tuple) else b, atol=1e-5)


def test_state_form_errors_name_the_expected_form():
    rng = np.random.default_rng(5)
    gru = fastlstm.Model(random_stack(rng, ["gru", "gru"], [5, 5], input_size=3), backend="numpy")
    x = rng.normal(size=(2, 4, 3))
    with pytest.raises(InvalidInputError, match=r"no cell state; expected an array h of shape \(2, 2, 5\)"):
        gru.predict(x, state=(np.zeros((2, 2, 5)), np.zeros((2, 2, 5))))
    mixed = fastlstm.Model(random_stack(rng, ["lstm", "lstm"], [6, 4], input_size=3), backend="numpy")
    with pytest.raises(InvalidInputError, match=r"one entry per layer: \(\(\(1, 2, 6\), \(1, 2, 6\)\), \(\(1, 2, 4\), \(1, 2, 4\)\)\)"):
        mixed.predict(x, state=(np.zeros((2, 2, 6)), np.zeros((2, 2, 6))))


def test_kind_specific_fields_are_refused_elsewhere():
    rng = np.random.default_rng(6)
    spec = random_stack(rng, ["rnn"], [4], input_size=3)
    layer = spec.layers[0]
    bad = RecurrentLayer(layer.input_size, 4, layer.cells, kind="rnn", gate_activation=Activation.of("relu"),
                         linear_before_reset=False)
    with pytest.raises(InvalidModelError) as info:
        ModelSpec((bad,)).validate()
    text = str(info.value)
    assert "gate_activation: a rnn layer has no such activation" in text
    assert "linear_before_reset: GRU only" in text
    gru = random_stack(rng, ["gru"], [4], input_size=3).layers[0]
    missing = RecurrentLayer(3, 4, (CellWeights(gru.cells[0].w_ih, gru.cells[0].w_hh, gru.cells[0].bias),), kind="gru")
    with pytest.raises(InvalidModelError, match="candidate_bias: missing"):
        ModelSpec((missing,)).validate()


def test_embedding_takes_token_ids():
    rng = np.random.default_rng(7)
    spec = random_stack(rng, ["gru"], [5], input_size=3, vocab_size=11)
    model = fastlstm.Model(spec, backend="numpy", dtype="float64")
    ids = rng.integers(0, 11, (2, 6))
    features = spec.embedding[ids]
    plain = fastlstm.Model(ModelSpec(spec.layers), backend="numpy", dtype="float64")
    np.testing.assert_allclose(model.predict(ids), plain.predict(features), atol=1e-12)
    stream = model.stream(batch_size=2)
    streamed = np.stack([stream.step(ids[:, t]) for t in range(6)], axis=1)
    np.testing.assert_allclose(streamed, plain.predict(features), atol=1e-12)
    one = model.stream()
    np.testing.assert_allclose(one.step(int(ids[0, 0])), plain.predict(features[0, :1])[0], atol=1e-12)
    with pytest.raises(InvalidInputError, match=r"token ids must lie in 0..10 \(the vocabulary has 11 tokens\); got \[11\]"):
        model.predict(np.array([[1, 11]]))
    with pytest.raises(InvalidInputError, match="integer token ids"):
        model.predict(np.array([[0.5, 1.0]]))
    before = stream.state
    for bad in (np.array([3, -1]), np.array([3, -1], np.int8), np.array([11, 0], np.uint16)):
        with pytest.raises(InvalidInputError, match="vocabulary"):
            stream.step(bad)
    np.testing.assert_array_equal(stream.state, before)
    for bad, message in ((11, "vocabulary"), (-1, "vocabulary"), (True, "integer token ids"), (2.5, "integer")):
        with pytest.raises(InvalidInputError, match=message):
            one.step(bad)
    np.testing.assert_allclose(model.stream().step(np.int16(4)), model.stream().step(4), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_runs_every_kind(backend):
    """Every backend runs a mixed stack, and auto picks the fastest (a compiled one)."""
    rng = np.random.default_rng(8)
    spec = random_stack(rng, ["lstm", "gru", "rnn"], [6, 4, 5], input_size=3)
    x = rng.normal(size=(2, 5, 3))
    reference = fastlstm.Model(spec, backend="numpy").predict(x)
    np.testing.assert_allclose(fastlstm.Model(spec, backend=backend).predict(x), reference, atol=1e-5)
    auto = fastlstm.Model(spec)
    assert auto.backend != "numpy"
    np.testing.assert_allclose(auto.predict(x), reference, atol=1e-5)
