"""PyTorch importer: an activation applied to the LSTM's output before the first Linear layer.

``fc(relu(out))`` with an ``nn.ReLU`` registered between the LSTM and the Linear layer is read off the module
tree; a state_dict file cannot show it, so the ``head_input_activation`` option states it. Every activation
module of a model must be accounted for by an activation the loaded model runs, also when the options name
the head: otherwise it would be dropped and the outputs silently differ from torch's.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import ModelFormatError, UnsupportedModelError

torch = pytest.importorskip("torch")
nn = torch.nn
from torch_helpers import assert_close, inputs, torch_output  # noqa: E402


def assert_matches_torch(model, module, x):
    assert_close(model.predict(x), torch_output(module, x))


class ReluBeforeHead(nn.Module):
    """``sigmoid(fc(relu(lstm(x))))``: the activation between the LSTM and the head is a registered module."""

    def __init__(self, relu=None, last_step=False):
        super().__init__()
        torch.manual_seed(3)
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.relu = relu or nn.ReLU()
        self.fc = nn.Linear(8, 3)
        self.out = nn.Sigmoid()
        self.last_step = last_step

    def forward(self, x):
        y, _ = self.lstm(x)
        if self.last_step:
            y = y[:, -1]
        return self.out(self.fc(self.relu(y)))


class TwoReluHead(nn.Module):
    """``fc2(relu2(fc1(relu1(lstm(x)))))``"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(6, 5)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc2(self.relu2(self.fc1(self.relu1(y))))


@pytest.mark.parametrize("relu", [nn.ReLU, nn.Tanh, lambda: nn.LeakyReLU(0.2), nn.Hardsigmoid])
def test_activation_module_before_the_first_linear_is_read_from_the_module(relu):
    net = ReluBeforeHead(relu())
    model = fastlstm.load(net, backend="numpy")
    assert model.spec.head_input_activation.name != "identity"
    assert [d.activation.name for d in model.spec.head] == ["sigmoid"]
    assert_matches_torch(model, net, inputs())


def test_activation_before_the_head_with_last_step_output():
    net = ReluBeforeHead(last_step=True)
    assert_matches_torch(fastlstm.load(net, backend="numpy", output="last_step"), net, inputs())


def test_activation_after_the_lstm_without_a_head():
    net = nn.Sequential()
    net.add_module("lstm", nn.LSTM(4, 5, batch_first=True))
    net.add_module("act", nn.Tanh())
    model = fastlstm.load(net, backend="numpy")
    assert model.spec.head == () and model.spec.head_input_activation.name == "tanh"
    lstm_out, _ = net.lstm(torch.from_numpy(inputs()))
    expected = torch.tanh(lstm_out).detach().numpy()
    assert_close(model.predict(inputs()), expected)


def test_softmax_on_the_lstm_output_is_refused():
    net = nn.Module()
    net.lstm = nn.LSTM(4, 5)
    net.softmax = nn.Softmax(dim=-1)
    with pytest.raises(UnsupportedModelError, match=r"'softmax' \(nn.Softmax\): softmax applied to the LSTM's output"):
        fastlstm.load(net, backend="numpy")


def test_stating_the_head_does_not_drop_the_activation_module():
    """The model of issue 7: following the old hint (head=, head_activations=) dropped the ReLU silently."""
    net = ReluBeforeHead()
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(net, backend="numpy", head=["fc"], head_activations=["sigmoid"])
    assert info.value.unsupported == ["'relu' (nn.ReLU, computing relu): not among the activations run"]
    assert "head_input_activation" in str(info.value) and "ignore=['relu']" in str(info.value)
    model = fastlstm.load(net, backend="numpy", head=["fc"], head_activations=["sigmoid"], head_input_activation="relu")
    assert_matches_torch(model, net, inputs())
    # A stated activation that computes another function does not account for the module either.
    with pytest.raises(UnsupportedModelError, match="'relu' \\(nn.ReLU"):
        fastlstm.load(net, backend="numpy", head_input_activation="tanh")


def test_each_activation_module_needs_its_own_stated_activation():
    net = TwoReluHead()
    # One stated relu accounts for one of the two ReLU modules, not both.
    with pytest.raises(UnsupportedModelError, match=r"'relu2' \(nn.ReLU"):
        fastlstm.load(net, backend="numpy", head=["fc1", "fc2"], head_activations=[None, "relu"])
    model = fastlstm.load(net, backend="numpy", head=["fc1", "fc2"], head_activations=["relu", None],
                          head_input_activation="relu")
    assert_matches_torch(model, net, inputs())
    assert_matches_torch(fastlstm.load(net, backend="numpy"), net, inputs())


def test_hard_sigmoid_with_other_parameters_does_not_account_for_torch_hardsigmoid():
    net = ReluBeforeHead(nn.Hardsigmoid())
    with pytest.raises(UnsupportedModelError, match=r"computing hard_sigmoid\(alpha=0.1666"):
        fastlstm.load(net, backend="numpy", head_input_activation="hard_sigmoid")  # Keras' alpha=0.2


def test_state_dict_files_need_the_option(tmp_path):
    """A state_dict records no activations: the ReLU is invisible and must be stated."""
    net = ReluBeforeHead()
    path = str(tmp_path / "m.pt")
    torch.save(net.state_dict(), path)
    x = inputs()
    model = fastlstm.load(path, backend="numpy", head_activations=["sigmoid"], head_input_activation="relu")
    assert_matches_torch(model, net, x)
    # What the README warns about: without the option the file loads as an LSTM -> Linear -> sigmoid model.
    unstated = fastlstm.load(path, backend="numpy", head_activations=["sigmoid"])
    assert unstated.spec.head_input_activation.name == "identity"
    assert np.max(np.abs(unstated.predict(x) - torch_output(net, x))) > 1e-3


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_files_read_the_activation_module(tmp_path, how):
    net = ReluBeforeHead().eval()
    x = inputs()
    path = str(tmp_path / "m.pt")
    compiled = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.from_numpy(x))
    torch.jit.save(compiled, path)
    assert_matches_torch(fastlstm.load(path, backend="numpy"), net, x)
    with pytest.raises(UnsupportedModelError, match="'relu' \\(nn.ReLU"):
        fastlstm.load(path, backend="numpy", head=["fc"], head_activations=["sigmoid"])


def test_activation_registered_before_the_lstm_must_be_stated():
    net = nn.Module()
    net.act = nn.ReLU()
    net.lstm = nn.LSTM(4, 5)
    net.fc = nn.Linear(5, 2)
    with pytest.raises(ModelFormatError, match=r"'act' \(nn.ReLU\).*head_input_activation"):
        fastlstm.load(net, backend="numpy")
    assert fastlstm.load(net, backend="numpy", head_input_activation="relu", head_activations=[None]) \
        .spec.head_input_activation.name == "relu"
