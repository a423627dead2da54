"""PyTorch importer: nn.LSTMCell models, checkpoint dicts, and messages that point at the right name.

Parity is checked against torch's own output (float32 within 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import ModelFormatError, UnsupportedModelError

torch = pytest.importorskip("torch")
nn = torch.nn
from torch_helpers import assert_close, inputs, torch_output  # noqa: E402


class CellLoop(nn.Module):
    """An nn.LSTMCell called once per time step, then a Linear layer on each step's hidden state."""

    def __init__(self, bias=True):
        super().__init__()
        torch.manual_seed(21)
        self.cell = nn.LSTMCell(4, 6, bias=bias)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outputs.append(self.fc(h))
        return torch.stack(outputs, dim=1)


# ----------------------------------------------------------------------------------------- nn.LSTMCell
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_module_matches_torch(bias):
    net = CellLoop(bias)
    model = fastlstm.load(net, backend="numpy")
    assert len(model.spec.layers) == 1 and model.spec.layers[0].hidden_size == 6
    assert_close(model.predict(inputs()), torch_output(net, inputs()))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_lstm_cell_state_dict_files_match_torch(tmp_path, layout):
    net = CellLoop()
    path = str(tmp_path / "cell.pt")
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=(layout == "zip"))
    assert_close(fastlstm.load(path, backend="numpy").predict(inputs()), torch_output(net, inputs()))
    bare = str(tmp_path / "bare.pt")
    torch.save(net.cell.state_dict(), bare)  # names without a prefix: weight_ih, weight_hh, bias_ih, bias_hh
    stream = fastlstm.load(bare, backend="numpy").stream(batch_size=3)
    h = torch.zeros(3, 6)
    c = torch.zeros(3, 6)
    x = inputs()
    for t in range(x.shape[1]):
        with torch.no_grad():
            h, c = net.cell(torch.from_numpy(x[:, t]), (h, c))
        assert_close(stream.step(x[:, t]), h.numpy())


def test_lstm_cell_torchscript_matches_torch(tmp_path):
    net = CellLoop().eval()
    path = str(tmp_path / "cell_script.pt")
    torch.jit.save(torch.jit.script(net), path)
    assert_close(fastlstm.load(path, backend="numpy").predict(inputs()), torch_output(net, inputs()))


@pytest.mark.parametrize("make", [lambda: nn.GRUCell(4, 5), lambda: nn.RNNCell(4, 5, nonlinearity="relu")])
def test_gru_and_rnn_cells_called_in_a_loop_match_torch(tmp_path, make):
    torch.manual_seed(3)
    cell = make().eval()
    path = str(tmp_path / "cell.pt")
    torch.save(cell.state_dict(), path)
    options = {"rnn_nonlinearity": "relu"} if isinstance(cell, nn.RNNCell) else {}
    model = fastlstm.load(path, backend="numpy", **options)
    x = inputs()
    h = torch.zeros(x.shape[0], 5)
    stream = model.stream(batch_size=x.shape[0])
    for t in range(x.shape[1]):
        with torch.no_grad():
            h = cell(torch.from_numpy(x[:, t]), h)
        assert_close(stream.step(x[:, t]), h.numpy())
    assert_close(fastlstm.load(cell, backend="numpy").predict(x)[:, -1], h.numpy())


# ----------------------------------------------------------------------------------------- checkpoints
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(22)
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out)


def trained_checkpoint(net):
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 4)).sum().backward()
    optimizer.step()
    return {"epoch": 3, "model_state": net.state_dict(), "optimizer_state": optimizer.state_dict(),
            "best_loss": 0.25, "rng_state": torch.get_rng_state()}


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_the_one_state_dict_of_a_checkpoint_loads_without_options(tmp_path, layout):
    net = Classifier()
    path = str(tmp_path / "ckpt.pt")
    torch.save(trained_checkpoint(net), path, _use_new_zipfile_serialization=(layout == "zip"))
    model = fastlstm.load(path, backend="numpy")
    assert_close(model.predict(inputs()), torch_output(net, inputs()))
    assert "checkpoint entry 'model_state'" in model.spec.source


def test_nested_checkpoint_entries_are_found(tmp_path):
    net = Classifier()
    path = str(tmp_path / "nested.pt")
    torch.save({"state": {"model": net.state_dict()}, "step": 10}, path)
    assert_close(fastlstm.load(path, backend="numpy").predict(inputs()), torch_output(net, inputs()))


def test_several_state_dicts_are_ambiguous_and_state_dict_key_chooses(tmp_path):
    net, ema = Classifier(), Classifier()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    path = str(tmp_path / "two.pt")
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "epoch": 7}, path)
    with pytest.raises(ModelFormatError) as info:
        fastlstm.load(path, backend="numpy")
    message = str(info.value)
    assert "2 state_dicts with LSTM parameters ('model' (6 tensors), 'ema' (6 tensors))" in message
    assert "state_dict_key='model'" in message and "'epoch' (int)" in message
    assert_close(fastlstm.load(path, backend="numpy", state_dict_key="ema").predict(inputs()),
                 torch_output(ema, inputs()))
    with pytest.raises(ModelFormatError, match=r"state_dict_key='emma'.*did you mean 'ema'\?"):
        fastlstm.load(path, backend="numpy", state_dict_key="emma")


def test_model_parts_saved_beside_the_state_dict_are_refused(tmp_path):
    torch.manual_seed(23)
    lstm, fc = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 2)
    path = str(tmp_path / "parts.pt")
    torch.save({"lstm": lstm.state_dict(), "head": fc.state_dict(), "epoch": 1}, path)
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(path, backend="numpy")
    assert info.value.unsupported == ["head.weight (shape (2, 5))", "head.bias (shape (2,))"]
    assert "ignore=['head']" in str(info.value)
    model = fastlstm.load(path, backend="numpy", ignore=["head"])  # the user says the LSTM alone is the model
    with torch.no_grad():
        expected = lstm(torch.from_numpy(inputs()))[0].numpy()
    assert_close(model.predict(inputs()), expected)


def test_values_that_are_not_tensors_nor_plain_data_are_refused_by_name(tmp_path):
    lstm = nn.LSTM(4, 5)
    path = str(tmp_path / "odd.pt")
    torch.save(dict(lstm.state_dict(), extra=torch.ones(3).storage(), **{"note": "ok"}), path)
    with pytest.raises(UnsupportedModelError, match=r"extra \(a StorageReference\)"):
        fastlstm.load(path, backend="numpy")
    keyed = str(tmp_path / "keyed.pt")
    torch.save({**lstm.state_dict(), ("x", 1): torch.ones(2)}, keyed)  # a key no state_dict has
    with pytest.raises(UnsupportedModelError, match=r"\('x', 1\) \(shape \(2,\)\)"):
        fastlstm.load(keyed, backend="numpy")


def test_a_checkpoint_without_lstm_says_what_it_holds(tmp_path):
    path = str(tmp_path / "none.pt")
    torch.save({"epoch": 1, "weights": {"fc.weight": torch.ones(2, 2)}}, path)
    with pytest.raises(ModelFormatError, match=r"no recurrent parameters found.*weights.fc.weight"):
        fastlstm.load(path, backend="numpy")


# ----------------------------------------------------------------------------------------- messages
class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Classifier()

    def forward(self, x):
        return self.model(x)


def test_missing_names_suggest_the_closest_existing_one(tmp_path):
    net = Wrapped()
    path = str(tmp_path / "w.pt")
    torch.save(net.state_dict(), path)
    with pytest.raises(ModelFormatError, match=r"fc.weight: missing.*did you mean 'model.fc'\?"):
        fastlstm.load(path, backend="numpy", head=["fc"])
    with pytest.raises(ModelFormatError, match=r"lstm='lstm'.*did you mean 'model.lstm'\?"):
        fastlstm.load(path, backend="numpy", lstm="lstm")
    with pytest.raises(ModelFormatError, match=r"ignore=\['model.fcc'\].*did you mean 'model.fc'\?"):
        fastlstm.load(path, backend="numpy", ignore=["model.fcc"])
    model = fastlstm.load(path, backend="numpy", head=["model.fc"], lstm="model.lstm")
    assert_close(model.predict(inputs()), torch_output(net, inputs()))


def test_the_ignore_hint_never_names_the_lstm():
    class Encoder(nn.Module):  # a custom module with its own parameter, holding the LSTM
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.rnn = nn.LSTM(4, 5)

    net = nn.Module()
    net.encoder = Encoder()
    net.norm = nn.LayerNorm(5)
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(net, backend="numpy")
    assert "'encoder' (Encoder)" in str(info.value)
    assert "ignore=['norm']" in str(info.value)


def test_state_dict_key_applies_to_checkpoints_only(tmp_path):
    net = Classifier()
    with pytest.raises(TypeError, match="state_dict_key .* does not apply to an in-memory module"):
        fastlstm.load(net, backend="numpy", state_dict_key="model")
    path = str(tmp_path / "s.pt")
    torch.jit.save(torch.jit.script(net), path)
    with pytest.raises(TypeError, match="does not apply to a TorchScript archive"):
        fastlstm.load(path, backend="numpy", state_dict_key="model")


def test_torchscript_tensors_held_in_list_attributes_are_refused(tmp_path):
    class ListHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.scales = [torch.ones(5)]  # a List[Tensor] attribute: not a parameter, still used by forward

        def forward(self, x):
            return self.lstm(x)[0] * self.scales[0]

    path = str(tmp_path / "list.pt")
    torch.jit.save(torch.jit.script(ListHead()), path)
    with pytest.raises(UnsupportedModelError, match=r"scales.0 \(shape \(5,\)\)"):
        fastlstm.load(path, backend="numpy")


def test_in_memory_tensor_attributes_that_are_not_parameters_are_refused():
    class PlainAttributes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.offset = torch.ones(5)  # neither a parameter nor a buffer: not in the state_dict
            self.extras = {"scale": [torch.full((5,), 2.0)]}

        def forward(self, x):
            return self.lstm(x)[0] * self.extras["scale"][0] + self.offset

    net = PlainAttributes()
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(net, backend="numpy")
    assert [u.partition(":")[0] for u in info.value.unsupported] == ["'extras.scale.0'", "'offset'"]
    assert "ignore=['extras.scale.0', 'offset']" in str(info.value)
    # Ignoring them does not hide that forward() uses them: the check against forward() refuses the result ...
    with pytest.raises(UnsupportedModelError, match="differ by up to"):
        fastlstm.load(net, backend="numpy", ignore=["extras", "offset"])
    # ... unless the user vouches for it.
    fastlstm.load(net, backend="numpy", ignore=["extras", "offset"], verify=False)
