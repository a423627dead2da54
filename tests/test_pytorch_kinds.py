"""PyTorch GRU and RNN modules, embeddings of token ids and stacks of several recurrent modules: modules,
state_dict files and TorchScript archives, each against torch's own output (float32 within 1e-5)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastlstm
from fastlstm import UnsupportedModelError

torch = pytest.importorskip("torch")
nn = torch.nn
from torch_helpers import assert_close  # noqa: E402


def features(batch=3, steps=7, size=4, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, steps, size)).astype(np.float32)


@pytest.mark.parametrize("make", [
    lambda: nn.GRU(4, 6, num_layers=2, batch_first=True),
    lambda: nn.GRU(4, 6, batch_first=True, bidirectional=True, bias=False),
    lambda: nn.RNN(4, 6, num_layers=2, batch_first=True),
    lambda: nn.RNN(4, 6, batch_first=True, nonlinearity="relu", bidirectional=True),
], ids=["gru-2-layers", "gru-bidirectional-no-bias", "rnn-2-layers", "rnn-relu-bidirectional"])
@pytest.mark.parametrize("source", ["module", "state_dict", "torchscript"])
def test_gru_and_rnn_match_torch_with_state(make, source, tmp_path):
    torch.manual_seed(1)
    module = make().eval()
    x = features()
    rows = module.num_layers * (2 if module.bidirectional else 1)
    h0 = np.random.default_rng(2).normal(size=(rows, 3, 6)).astype(np.float32)
    with torch.no_grad():
        expected, h_n = module(torch.from_numpy(x), torch.from_numpy(h0))
    options = {}
    if source == "module":
        loaded = module
    elif source == "state_dict":
        loaded = str(tmp_path / "m.pt")
        torch.save(module.state_dict(), loaded)
        if module.mode == "RNN_RELU":
            options["rnn_nonlinearity"] = "relu"
    else:
        loaded = str(tmp_path / "m.ts")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(module), loaded)
    model = fastlstm.load(loaded, backend="numpy", **options)
    assert model.state_form == "h"
    y, h = model.predict(x, state=h0, return_state=True)
    assert_close(y, expected.numpy())
    assert_close(h, h_n.numpy())


class TextClassifier(nn.Module):
    """Token ids -> Embedding -> LSTM(8) -> GRU(5) -> Linear: two recurrent modules of different kinds and sizes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 6, padding_idx=0)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.gru = nn.GRU(8, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, ids):
        y, _ = self.lstm(self.embed(ids))
        y, _ = self.gru(y)
        return self.fc(y)


@pytest.mark.parametrize("source", ["module", "state_dict", "torchscript"])
def test_embedding_and_mixed_stack_match_torch(source, tmp_path):
    torch.manual_seed(3)
    net = TextClassifier().eval()
    ids = np.random.default_rng(4).integers(0, 30, (2, 9))
    with torch.no_grad():
        expected = net(torch.from_numpy(ids)).numpy()
    if source == "module":
        loaded = net
    elif source == "state_dict":
        loaded = str(tmp_path / "text.pt")
        torch.save(net.state_dict(), loaded)
    else:
        loaded = str(tmp_path / "text.ts")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(net), loaded)
    model = fastlstm.load(loaded, backend="numpy")
    assert model.takes_token_ids and model.state_form == "per_layer"
    assert_close(model.predict(ids), expected)
    stream = model.stream(batch_size=2)
    assert_close(np.stack([stream.step(ids[:, t]) for t in range(9)], axis=1), expected)
    (h_lstm, c_lstm), h_gru = stream.state
    assert h_lstm.shape == (1, 2, 8) and c_lstm.shape == (1, 2, 8) and h_gru.shape == (1, 2, 5)


def test_a_state_dict_rnn_warns_that_its_nonlinearity_is_not_recorded(tmp_path):
    path = str(tmp_path / "rnn.pt")
    torch.save(nn.RNN(4, 5).state_dict(), path)
    with pytest.warns(UserWarning, match=r"does not record its nonlinearity; running tanh.*rnn_nonlinearity='relu'"):
        fastlstm.load(path, backend="numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlstm.load(path, backend="numpy", rnn_nonlinearity="tanh")
    with pytest.raises(fastlstm.InvalidInputError, match=r"module '' computes 'tanh'|computes 'tanh'"):
        fastlstm.load(nn.RNN(4, 5), backend="numpy", rnn_nonlinearity="relu")


def test_an_embedding_that_renormalises_is_refused():
    net = TextClassifier()
    net.embed = nn.Embedding(30, 6, max_norm=1.0)
    with pytest.raises(UnsupportedModelError, match=r"'embed' \(nn.Embedding\): max_norm=1.0 renormalises"):
        fastlstm.load(net, backend="numpy")


def test_a_square_table_in_front_is_ambiguous_in_a_state_dict(tmp_path):
    net = nn.Module()
    net.embed = nn.Embedding(6, 6)
    net.lstm = nn.LSTM(6, 4)
    path = str(tmp_path / "square.pt")
    torch.save(net.state_dict(), path)
    with pytest.raises(fastlstm.ModelFormatError, match=r"nn.Embedding or a bias-free nn.Linear; say embedding='embed'"):
        fastlstm.load(path, backend="numpy")
    assert fastlstm.load(path, backend="numpy", embedding="embed").takes_token_ids
    assert fastlstm.load(net, backend="numpy").takes_token_ids  # a module says what it is


def test_a_custom_module_with_recurrent_parameter_names_is_refused():
    class MyCell(nn.Module):
        """Parameters named as nn.LSTMCell's, but its own forward(): running it as an LSTM would be wrong."""

        def __init__(self):
            super().__init__()
            self.weight_ih = nn.Parameter(torch.zeros(12, 4))
            self.weight_hh = nn.Parameter(torch.zeros(12, 3))

    class Subclass(nn.RNN):
        pass

    net = nn.Module()
    net.cell = MyCell()
    with pytest.raises(UnsupportedModelError, match=r"'cell' \(MyCell\).*named like a recurrent module's"):
        fastlstm.load(net, backend="numpy")
    with pytest.raises(UnsupportedModelError, match=r"named like a recurrent module's"):
        fastlstm.load(Subclass(4, 5, nonlinearity="relu"), backend="numpy")


def test_a_traced_embedding_whose_max_norm_is_not_recorded_must_be_named(tmp_path):
    torch.manual_seed(3)
    net = TextClassifier().eval()
    path = str(tmp_path / "traced.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 4, dtype=torch.long)), path)
    with pytest.raises(UnsupportedModelError, match=r"max_norm is not recorded.*embedding='embed'"):
        fastlstm.load(path, backend="numpy")
    ids = np.random.default_rng(4).integers(0, 30, (2, 9))
    with torch.no_grad():
        expected = net(torch.from_numpy(ids)).numpy()
    assert_close(fastlstm.load(path, backend="numpy", embedding="embed").predict(ids), expected)


def test_preparing_a_model_leaves_the_spec_arrays_writeable():
    from random_models import random_spec

    spec = random_spec(np.random.default_rng(0), peepholes=True)
    for backend in ("numpy", "numba", "cython"):
        fastlstm.Model(spec, backend=backend, dtype="float64")
        assert all(a.flags.writeable for layer in spec.layers for cell in layer.cells
                   for a in (cell.w_ih, cell.w_hh, cell.bias, cell.peephole))
