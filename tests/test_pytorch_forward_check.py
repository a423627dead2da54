"""PyTorch importer: what ``forward()`` computes beyond the module tree is checked, never silently dropped.

An in-memory module is run once on a probe and compared with the loaded model; a TorchScript archive's
``forward()`` code is read (never run) for calls the loaded model does not account for. ``torch.softmax``,
``F.relu``, ``out * 2`` and ``out[:, -1]`` in ``forward()`` leave no trace in the module tree: without the
check they would load as a model computing something else.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings
import zipfile

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import UnsupportedModelError

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
from torch_helpers import assert_close, inputs, torch_output  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "make_examples.py"


class LstmThenLinear(nn.Module):
    """An LSTM and a Linear layer; ``how`` chooses what forward() does around them with functional calls."""

    def __init__(self, how: str = "plain", batch_first: bool = True):
        super().__init__()
        torch.manual_seed(5)
        self.lstm = nn.LSTM(4, 6, batch_first=batch_first)
        self.fc = nn.Linear(6, 3)
        self.how = how

    def forward(self, x):
        y, (h, _) = self.lstm(x)
        if self.how == "softmax":
            return torch.softmax(self.fc(y), dim=-1)
        if self.how == "relu":
            return self.fc(F.relu(y))
        if self.how == "scaled":
            return self.fc(y) * 2
        if self.how == "last_step":
            return self.fc(y[:, -1] if self.lstm.batch_first else y[-1])
        if self.how == "final_state":
            return self.fc(h[-1])
        return self.fc(y)


class ScriptableSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return torch.softmax(self.fc(y), dim=-1)


class ScriptableRelu(ScriptableSoftmax):
    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(F.relu(y))


class ScriptableScaled(ScriptableSoftmax):
    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y) * 2


class ScriptableLastStep(ScriptableSoftmax):
    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


def scaled(y):
    return y * 2


class ScriptableHelper(ScriptableSoftmax):
    def forward(self, x):
        y, _ = self.lstm(x)
        return scaled(self.fc(y))


# The options that say what each forward() computes (None: fastlstm cannot run it).
RIGHT_OPTIONS = {"softmax": {"head_activations": ["softmax"]}, "relu": {"head_input_activation": "relu"},
                 "scaled": None, "last_step": {"output": "last_step"}, "final_state": {"output": "final_state"}}
SCRIPTABLE = {"softmax": (ScriptableSoftmax, r"torch\.softmax"),
              "relu": (ScriptableRelu, r"torch\.(nn\.functional\.)?relu"),
              "scaled": (ScriptableScaled, r"torch\.mul"), "last_step": (ScriptableLastStep, r"torch\.select")}


def load_quietly(source, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a check that could not run would warn
        return fastlstm.load(source, backend="numpy", **options)


# ----------------------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("how", list(RIGHT_OPTIONS))
def test_functional_calls_in_forward_are_refused(how):
    with pytest.raises(UnsupportedModelError, match="differ by up to|returns shape") as info:
        fastlstm.load(LstmThenLinear(how), backend="numpy")
    message = str(info.value)
    assert "functional call" in message and "head_activations=" in message and "output=" in message


@pytest.mark.parametrize("how", [h for h, options in RIGHT_OPTIONS.items() if options is not None])
def test_the_right_options_pass_the_check_and_match_torch(how):
    net = LstmThenLinear(how)
    model = load_quietly(net, **RIGHT_OPTIONS[how])
    assert_close(model.predict(inputs()), torch_output(net, inputs()))


def test_plain_forward_passes():
    net = LstmThenLinear("plain")
    assert_close(load_quietly(net).predict(inputs()), torch_output(net, inputs()))


def test_time_first_modules_are_probed_time_first():
    net = LstmThenLinear("last_step", batch_first=False)
    with pytest.raises(UnsupportedModelError, match="returns shape"):
        fastlstm.load(net, backend="numpy")
    model = load_quietly(net, output="last_step")
    x = inputs()
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x).transpose(0, 1)).numpy()
    assert_close(model.predict(x), expected)


@pytest.mark.parametrize("output", ["sequence", "last_step", "final_state"])
def test_a_bare_lstm_passes_in_every_output_mode(output):
    torch.manual_seed(7)
    lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
    assert load_quietly(lstm, output=output).spec.output == output


def test_verify_false_skips_the_check():
    net = LstmThenLinear("scaled")
    model = fastlstm.load(net, backend="numpy", verify=False)
    # The user vouched for it: the model runs fc(out), half of what forward() returns.
    assert_close(model.predict(inputs()) * 2, torch_output(net, inputs()))


def test_verify_takes_a_bool():
    with pytest.raises(TypeError, match="verify"):
        fastlstm.load(LstmThenLinear(), backend="numpy", verify="no")


def test_a_forward_needing_other_arguments_warns():
    class NeedsLengths(LstmThenLinear):
        def forward(self, x, lengths):
            return super().forward(x)

    with pytest.warns(UserWarning, match=r"could not be checked against the module's forward\(\).*TypeError"):
        model = fastlstm.load(NeedsLengths(), backend="numpy")
    assert model.output_size == 3


def test_the_warning_points_at_the_callers_line():
    class NeedsLengths(LstmThenLinear):
        def forward(self, x, lengths):
            return super().forward(x)

    with pytest.warns(UserWarning, match="could not be checked") as record:
        fastlstm.load(NeedsLengths(), backend="numpy")
    assert [w.filename for w in record if "could not be checked" in str(w.message)] == [__file__]


@pytest.mark.parametrize("how", ["script", "trace"])
def test_in_memory_scripted_and_traced_modules_are_run_too(how):
    net = ScriptableSoftmax().eval()
    compiled = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.from_numpy(inputs()))
    with pytest.raises(UnsupportedModelError, match="differ by up to"):
        fastlstm.load(compiled, backend="numpy")
    load_quietly(compiled, head_activations=["softmax"])


def test_a_forward_returning_no_tensor_warns():
    class ReturnsDict(LstmThenLinear):
        def forward(self, x):
            return {"scores": super().forward(x)}

    with pytest.warns(UserWarning, match="returned a dict"):
        fastlstm.load(ReturnsDict(), backend="numpy")


def test_a_tuple_returning_forward_is_compared_by_its_first_element():
    class WithState(LstmThenLinear):
        def forward(self, x):
            y, state = self.lstm(x)
            return torch.sigmoid(self.fc(y)), state

    with pytest.raises(UnsupportedModelError, match="differ by up to"):
        fastlstm.load(WithState(), backend="numpy")
    load_quietly(WithState(), head_activations=["sigmoid"])


class Stateful(nn.Module):
    """Dropout in training mode, random numbers drawn in any mode, and a buffer forward() changes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.lstm = nn.LSTM(4, 6, num_layers=2, dropout=0.5, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)
        self.counter = nn.Module()  # not part of the network: ignored when loading
        self.counter.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.counter.calls += 1
        y, _ = self.lstm(x)
        y = y + 0 * torch.randn_like(y)  # draws random numbers in eval mode too, changing no value
        return self.fc(self.drop(y))


def test_the_check_leaves_the_module_and_the_rng_as_found():
    net = Stateful().train()
    net.fc.eval()  # a mix of modes, restored exactly
    modes = [m.training for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    model = load_quietly(net, ignore=["counter"])  # in training mode; checked in eval mode, where dropout is off
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in net.modules()] == modes
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_close(model.predict(inputs()), torch_output(net, inputs()))


def test_a_dynamically_quantized_module_passes():
    torch.manual_seed(9)
    net = torch.ao.quantization.quantize_dynamic(LstmThenLinear().eval(), {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    load_quietly(net)
    softmax = torch.ao.quantization.quantize_dynamic(LstmThenLinear("softmax").eval(), {nn.LSTM, nn.Linear},
                                                     dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError, match="differ by up to"):
        fastlstm.load(softmax, backend="numpy")


def _examples():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundled_examples_in_memory():
    examples = _examples()
    with pytest.raises(UnsupportedModelError, match="differ by up to"):
        fastlstm.load(examples.KeywordSpotter(), backend="numpy")  # its forward() calls torch.softmax
    for module, options in ((examples.KeywordSpotter(), {"head_activations": ["softmax"]}),
                            (examples.SensorForecaster(), {}), (examples.IntentTagger(), {})):
        load_quietly(module, **options)


# ----------------------------------------------------------------------------------------- TorchScript
def save_compiled(net, path, how: str) -> str:
    net = net.eval()
    compiled = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.from_numpy(inputs()))
    torch.jit.save(compiled, str(path))
    return str(path)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("kind", list(SCRIPTABLE))
def test_torchscript_calls_in_forward_are_refused_and_named(tmp_path, how, kind):
    cls, call = SCRIPTABLE[kind]
    path = save_compiled(cls(), tmp_path / "m.pt", how)
    with pytest.raises(UnsupportedModelError, match=call) as info:
        fastlstm.load(path, backend="numpy")
    assert "verify=False" in str(info.value)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("kind", [k for k in SCRIPTABLE if RIGHT_OPTIONS[k] is not None])
def test_torchscript_with_the_right_options_loads_and_matches_torch(tmp_path, how, kind):
    net = SCRIPTABLE[kind][0]()
    model = load_quietly(save_compiled(net, tmp_path / "m.pt", how), **RIGHT_OPTIONS[kind])
    assert_close(model.predict(inputs()), torch_output(net, inputs()))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_last_step_option_needs_a_choice_of_steps(tmp_path, how):
    path = save_compiled(LstmThenLinear() if how == "trace" else ScriptableRelu(), tmp_path / "m.pt", how)
    with pytest.raises(UnsupportedModelError, match="chooses no time step"):
        fastlstm.load(path, backend="numpy", output="last_step",
                      **({} if how == "trace" else {"head_input_activation": "relu"}))


def test_torchscript_helper_functions_are_read_too(tmp_path):
    path = save_compiled(ScriptableHelper(), tmp_path / "m.pt", "script")
    with pytest.raises(UnsupportedModelError, match=r"torch\.mul"):
        fastlstm.load(path, backend="numpy")


def test_torchscript_verify_false_skips_the_code(tmp_path):
    net = ScriptableScaled()
    model = fastlstm.load(save_compiled(net, tmp_path / "m.pt", "script"), backend="numpy", verify=False)
    assert_close(model.predict(inputs()) * 2, torch_output(net, inputs()))


def test_torchscript_without_its_code_warns(tmp_path):
    path = save_compiled(ScriptableSoftmax(), tmp_path / "m.pt", "script")
    stripped = tmp_path / "stripped.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(stripped, "w") as target:
        for info in source.infolist():
            user_code = "/code/" in info.filename and info.filename.endswith(".py") and "/torch/" not in info.filename
            if not user_code:
                target.writestr(info, source.read(info))
    with pytest.warns(UserWarning, match="could not be checked.*ScriptableSoftmax"):
        fastlstm.load(str(stripped), backend="numpy")


def test_torchscript_of_a_bare_lstm_has_no_user_code_to_check(tmp_path):
    torch.manual_seed(10)
    lstm = nn.LSTM(4, 5, batch_first=True)
    path = save_compiled(lstm, tmp_path / "lstm.pt", "script")
    assert load_quietly(path, output="final_state").output_size == 5
