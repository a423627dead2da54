"""PyTorch importer: parity with torch for every LSTM variant and head, and every refusal.

Each model is run by torch and by fastlstm (NumPy backend) on the same input; float32 outputs must agree
within 1e-5. Files are written with ``torch.save`` in both layouts, and with ``torch.jit.save``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest

import fastlstm
from fastlstm.activations import Activation
from fastlstm.errors import InvalidModelError, ModelFormatError, UnsupportedModelError
from fastlstm.importers import pytorch

torch = pytest.importorskip("torch")
nn = torch.nn

TOLERANCE = 1e-5
LAYOUTS = ["zip", "legacy"]


def save_state(module, path, layout: str = "zip", state=None) -> str:
    torch.save(module.state_dict() if state is None else state, str(path),
               _use_new_zipfile_serialization=(layout == "zip"))
    return str(path)


def run_lstm(lstm: nn.LSTM, x: np.ndarray, state=None):
    """torch's output for batch-first ``x`` whatever the module's ``batch_first``: (y, (h_n, c_n))."""
    inputs = torch.from_numpy(x)
    if not lstm.batch_first:
        inputs = inputs.transpose(0, 1)
    hx = None if state is None else tuple(torch.from_numpy(s) for s in state)
    with torch.no_grad():
        y, (h, c) = lstm(inputs, hx)
    if not lstm.batch_first:
        y = y.transpose(0, 1)
    return y.numpy(), (h.numpy(), c.numpy())


def inputs(batch=3, steps=7, features=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


def assert_close(actual, expected, tolerance=TOLERANCE):
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= tolerance


LSTM_VARIANTS = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=1, bidirectional=True),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=2, proj_size=3),
    dict(num_layers=2, bidirectional=True, proj_size=3),
    dict(num_layers=2, bias=False),
    dict(num_layers=1, bidirectional=True, bias=False, proj_size=2),
]


# ----------------------------------------------------------------------------------------- bare LSTMs
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", LSTM_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_state_dict_file_matches_torch(tmp_path, layout, variant):
    torch.manual_seed(1)
    lstm = nn.LSTM(4, 6, batch_first=True, **variant)
    model = fastlstm.load(save_state(lstm, tmp_path / "m.pt", layout), backend="numpy")
    x = inputs()
    y, (h, c) = model.predict(x, return_state=True)
    y_ref, (h_ref, c_ref) = run_lstm(lstm, x)
    assert_close(y, y_ref)
    assert_close(h, h_ref)
    assert_close(c, c_ref)
    layer = model.spec.layers[0]
    assert len(model.spec.layers) == variant["num_layers"]
    assert layer.direction == ("bidirectional" if variant.get("bidirectional") else "forward")
    assert (layer.hidden_size, layer.proj_size) == (6, variant.get("proj_size", 0))


@pytest.mark.parametrize("variant", [dict(num_layers=2), dict(num_layers=2, bidirectional=True, proj_size=3)])
def test_initial_states_match_torch(tmp_path, variant):
    torch.manual_seed(2)
    lstm = nn.LSTM(4, 6, **variant)  # batch_first=False: only the module's input layout differs
    model = fastlstm.load(save_state(lstm, tmp_path / "m.pt"), backend="numpy")
    rng = np.random.default_rng(3)
    rows = variant["num_layers"] * (2 if variant.get("bidirectional") else 1)
    state = (rng.standard_normal((rows, 3, variant.get("proj_size", 6))).astype(np.float32),
             rng.standard_normal((rows, 3, 6)).astype(np.float32))
    x = inputs()
    y, (h, c) = model.predict(x, state=state, return_state=True)
    y_ref, (h_ref, c_ref) = run_lstm(lstm, x, state)
    assert_close(y, y_ref)
    assert_close(h, h_ref)
    assert_close(c, c_ref)


def test_float64_weights_stay_float64(tmp_path):
    torch.manual_seed(4)
    lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True).double()
    model = fastlstm.load(save_state(lstm, tmp_path / "d.pt"), backend="numpy", dtype="float64")
    assert model.spec.layers[0].cells[0].w_ih.dtype == np.float64
    x = inputs().astype(np.float64)
    assert_close(model.predict(x), run_lstm(lstm, x)[0], 1e-12)


@pytest.mark.parametrize("low", ["half", "bfloat16"])
def test_half_precision_weights_are_widened_to_float32(tmp_path, low):
    torch.manual_seed(5)
    lstm = nn.LSTM(4, 5, batch_first=True)
    getattr(lstm, low)()
    model = fastlstm.load(save_state(lstm, tmp_path / "h.pt"), backend="numpy")
    assert model.spec.layers[0].cells[0].w_hh.dtype == np.float32
    lstm.float()  # the same rounded weights, run by torch in float32
    x = inputs()
    assert_close(model.predict(x), run_lstm(lstm, x)[0])


# ----------------------------------------------------------------------------------------- heads
class LastStepClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(self.dropout(out[:, -1]))


class SequenceTagger(nn.Module):
    """A bidirectional encoder with an nn.Sequential head: the head's activations are visible."""

    def __init__(self, activation=None, final=None):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.rnn = nn.LSTM(4, 5, batch_first=True, bidirectional=True, proj_size=3)
        self.head = nn.Sequential(nn.Linear(6, 7), activation or nn.ReLU(), nn.Dropout(0.1), nn.Linear(7, 2),
                                  final or nn.Softmax(dim=-1))

    def forward(self, x):
        out, _ = self.encoder.rnn(x)
        return self.head(out)


class AttributeHead(nn.Module):
    """Head modules as plain attributes, registered in the order forward() uses them."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc2(self.act(self.fc1(out)))


def module_output(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_head_from_a_state_dict_with_last_step_output(tmp_path, layout):
    torch.manual_seed(6)
    net = LastStepClassifier()
    model = fastlstm.load(save_state(net, tmp_path / "c.pt", layout), backend="numpy", output="last_step")
    assert [d.out_features for d in model.spec.head] == [3]
    x = inputs()
    assert_close(model.predict(x), module_output(net, x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_head_chain_with_activations_given_as_options(tmp_path, layout):
    torch.manual_seed(7)
    net = SequenceTagger()
    path = save_state(net, tmp_path / "t.pt", layout)
    model = fastlstm.load(path, backend="numpy", head_activations=["relu", "softmax"])
    assert [d.activation.name for d in model.spec.head] == ["relu", "softmax"]
    x = inputs()
    assert_close(model.predict(x), module_output(net, x))
    # Without activations the file cannot say them: identity, with a warning for a multi-layer head.
    with pytest.warns(UserWarning, match="head_activations"):
        plain = fastlstm.load(path, backend="numpy")
    assert [d.activation.name for d in plain.spec.head] == ["identity", "identity"]


def test_explicit_head_and_activation_objects(tmp_path):
    torch.manual_seed(8)
    net = SequenceTagger(activation=nn.LeakyReLU(0.2))
    path = save_state(net, tmp_path / "t.pt")
    model = fastlstm.load(path, backend="numpy", lstm="encoder.rnn", head=["head.0", "head.3"],
                          head_activations=[Activation.of("leaky_relu", alpha=0.2), "softmax"])
    x = inputs()
    assert_close(model.predict(x), module_output(net, x))


def test_head_can_be_switched_off(tmp_path):
    torch.manual_seed(9)
    net = LastStepClassifier()
    model = fastlstm.load(save_state(net, tmp_path / "c.pt"), backend="numpy", head=[], ignore=["fc"])
    assert model.spec.head == ()
    x = inputs()
    assert_close(model.predict(x), run_lstm(net.lstm, x)[0])


def test_final_state_output_matches_torch_h_n(tmp_path):
    torch.manual_seed(10)
    lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
    model = fastlstm.load(save_state(lstm, tmp_path / "b.pt"), backend="numpy", output="final_state")
    x = inputs()
    _, (h, _) = run_lstm(lstm, x)
    assert_close(model.predict(x), np.concatenate([h[-2], h[-1]], axis=-1))


# ----------------------------------------------------------------------------------------- in memory, TorchScript
def test_in_memory_lstm():
    torch.manual_seed(11)
    lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2)
    model = fastlstm.load(lstm, backend="numpy")
    x = inputs()
    assert_close(model.predict(x), run_lstm(lstm, x)[0])


@pytest.mark.parametrize("activation, name", [
    (nn.ReLU(), "relu"), (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.LeakyReLU(0.2), "leaky_relu"),
    (nn.ELU(0.7), "elu"), (nn.Softplus(), "softplus"), (nn.Softsign(), "softsign"), (nn.Hardsigmoid(), "hard_sigmoid"),
])
def test_in_memory_module_head_and_activations_are_read_from_its_structure(activation, name):
    torch.manual_seed(12)
    net = SequenceTagger(activation=activation)
    model = fastlstm.load(net, backend="numpy")
    assert [d.activation.name for d in model.spec.head] == [name, "softmax"]
    x = inputs()
    assert_close(model.predict(x), module_output(net, x))


def test_in_memory_module_with_attribute_head():
    torch.manual_seed(13)
    net = AttributeHead()
    model = fastlstm.load(net, backend="numpy")
    assert [d.activation.name for d in model.spec.head] == ["tanh", "identity"]
    assert model.spec.head[1].bias is None
    x = inputs()
    assert_close(model.predict(x), module_output(net, x))


def test_in_memory_module_with_output_option():
    torch.manual_seed(14)
    net = LastStepClassifier()
    model = fastlstm.load(net, backend="numpy", output="last_step")
    x = inputs()
    assert_close(model.predict(x), module_output(net, x))


def test_in_memory_state_dict():
    torch.manual_seed(15)
    net = LastStepClassifier()
    spec = pytorch.spec_from_module(net.state_dict(), output="last_step")
    x = inputs()
    assert_close(fastlstm.Model(spec, backend="numpy").predict(x), module_output(net, x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_files_load_without_torch_jit(tmp_path, how, monkeypatch):
    torch.manual_seed(16)
    net = SequenceTagger(final=nn.Sigmoid()).eval()
    x = inputs()
    compiled = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.from_numpy(x))
    path = tmp_path / "ts.pt"
    torch.jit.save(compiled, str(path))
    expected = module_output(net, x)

    def no_jit_load(*args, **kwargs):
        raise AssertionError("the importer must not call torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", no_jit_load)
    model = fastlstm.load(str(path), backend="numpy")
    assert model.spec.source.startswith("TorchScript")
    assert [d.activation.name for d in model.spec.head] == ["relu", "sigmoid"]
    assert_close(model.predict(x), expected)
    assert_close(fastlstm.load(compiled, backend="numpy").predict(x), expected)  # the in-memory script module too


def test_torchscript_parametrised_activations(tmp_path):
    torch.manual_seed(17)
    net = SequenceTagger(activation=nn.LeakyReLU(0.3)).eval()
    x = inputs()
    scripted, traced = tmp_path / "s.pt", tmp_path / "t.pt"
    torch.jit.save(torch.jit.script(net), str(scripted))
    torch.jit.save(torch.jit.trace(net, torch.from_numpy(x)), str(traced))
    expected = module_output(net, x)
    # Scripted archives declare negative_slope and dim as constants; traced ones inline them into code.
    assert_close(fastlstm.load(str(scripted), backend="numpy").predict(x), expected)
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(str(traced), backend="numpy")
    assert ["negative_slope" in info.value.unsupported[0], "its dim" in info.value.unsupported[1]] == [True, True]
    model = fastlstm.load(str(traced), backend="numpy",
                          head_activations=[Activation.of("leaky_relu", alpha=0.3), "softmax"])
    assert_close(model.predict(x), expected)


def test_checkpoint_dicts(tmp_path):
    torch.manual_seed(18)
    net = LastStepClassifier()
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 4)).sum().backward()
    optimizer.step()
    x = inputs()
    simple = save_state(net, tmp_path / "a.pt", state={"model": net.state_dict(), "epoch": 3})
    assert_close(fastlstm.load(simple, backend="numpy", output="last_step").predict(x), module_output(net, x))
    full = save_state(net, tmp_path / "b.pt", state={"model": net.state_dict(), "optimizer": optimizer.state_dict()})
    # The one state_dict of a checkpoint is found; the optimizer's tensors are not model parts.
    model = fastlstm.load(full, backend="numpy", output="last_step")
    assert_close(model.predict(x), module_output(net, x))
    assert model.spec.source == "PyTorch state_dict b.pt (checkpoint entry 'model')"
    model = fastlstm.load(full, backend="numpy", output="last_step", ignore=["optimizer"])
    assert_close(model.predict(x), module_output(net, x))


# ----------------------------------------------------------------------------------------- refusals
class TwoLSTMs(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.rnn = nn.LSTM(4, 5, batch_first=True)
        self.decoder = nn.LSTM(5, 5, batch_first=True)


def test_several_recurrent_modules_chain_in_registration_order(tmp_path):
    torch.manual_seed(19)
    net = TwoLSTMs()
    path = save_state(net, tmp_path / "two.pt")
    x = inputs()
    expected = run_lstm(net.decoder, run_lstm(net.encoder.rnn, x)[0])[0]
    model = fastlstm.load(path, backend="numpy")
    assert [(l.input_size, l.hidden_size) for l in model.spec.layers] == [(4, 5), (5, 5)]
    assert_close(model.predict(x), expected)
    # Naming one runs that one alone; the other must then be skipped, never dropped silently.
    with pytest.raises(UnsupportedModelError, match=r"decoder\.weight_ih_l0"):
        fastlstm.load(path, backend="numpy", lstm="encoder.rnn")
    model = fastlstm.load(path, backend="numpy", lstm="encoder.rnn", ignore=["decoder"])
    assert_close(model.predict(x), run_lstm(net.encoder.rnn, x)[0])
    with pytest.raises(ModelFormatError, match=r"lstm='nope': no recurrent parameters under that prefix"):
        fastlstm.load(path, backend="numpy", lstm="nope")


def test_recurrent_modules_that_do_not_chain_need_their_order(tmp_path):
    net = nn.Module()
    net.a = nn.LSTM(4, 6, batch_first=True)
    net.b = nn.GRU(5, 4, batch_first=True)  # takes 5 features: cannot follow a (6)
    path = save_state(net, tmp_path / "nochain.pt")
    with pytest.raises(ModelFormatError, match=r"do not chain in registration order.*'b' takes 5 features but 'a' outputs 6.*lstm=\["):
        fastlstm.load(path, backend="numpy")
    with pytest.raises(ModelFormatError, match=r"do not chain in the order given by lstm="):
        fastlstm.load(path, backend="numpy", lstm=["a", "b"])
    assert len(fastlstm.load(path, backend="numpy", lstm=["b", "a"]).spec.layers) == 2  # b (5->4) then a (4->6)


def test_linear_layers_that_do_not_chain_are_ambiguous(tmp_path):
    torch.manual_seed(20)
    net = nn.Module()
    net.lstm = nn.LSTM(4, 6)
    net.fc = nn.Linear(6, 3)
    net.aux = nn.Linear(6, 1)
    path = save_state(net, tmp_path / "h.pt")
    with pytest.raises(ModelFormatError, match=r"fc \(6->3\), aux \(6->1\).*head=\["):
        fastlstm.load(path, backend="numpy")
    with pytest.raises(ModelFormatError, match=r"head=\["):
        fastlstm.load(net, backend="numpy")
    model = fastlstm.load(path, backend="numpy", head=["fc"], ignore=["aux"])
    assert [d.out_features for d in model.spec.head] == [3]


def test_missing_tensors_are_named(tmp_path):
    torch.manual_seed(21)
    state = nn.LSTM(4, 5, num_layers=2, bidirectional=True).state_dict()
    del state["weight_hh_l1_reverse"]
    del state["bias_hh_l0"]
    path = save_state(None, tmp_path / "m.pt", state=state)
    with pytest.raises(InvalidModelError, match="weight_hh_l1_reverse: missing") as info:
        fastlstm.load(path, backend="numpy")
    assert any("bias_hh_l0" in p for p in info.value.problems)
    net = LastStepClassifier()
    with pytest.raises(InvalidModelError, match=r"nope\.weight: missing"):
        fastlstm.load(save_state(net, tmp_path / "c.pt"), backend="numpy", head=["nope"], ignore=["fc"])


def test_misshaped_tensors_are_named(tmp_path):
    torch.manual_seed(22)
    state = nn.LSTM(4, 5, num_layers=2).state_dict()
    state["weight_ih_l1"] = torch.zeros(20, 7)
    state["bias_ih_l0"] = torch.zeros(19)
    with pytest.raises(InvalidModelError, match=r"weight_ih_l1: expected shape \(20, 5\), got \(20, 7\)") as info:
        fastlstm.load(save_state(None, tmp_path / "m.pt", state=state), backend="numpy")
    assert any("bias_ih_l0" in p for p in info.value.problems)
    state = LastStepClassifier().state_dict()
    state["fc.weight"] = torch.zeros(3, 9)
    with pytest.raises(InvalidModelError, match=r"fc\.weight: expected shape \(\?, 8\)"):
        fastlstm.load(save_state(None, tmp_path / "h.pt", state=state), backend="numpy", head=["fc"])
    state = nn.LSTM(4, 5).state_dict()
    state["weight_hh_l0"] = torch.zeros(18, 5)
    with pytest.raises(InvalidModelError, match=r"weight_hh_l0: expected 4 \* hidden_size rows"):
        fastlstm.load(save_state(None, tmp_path / "r.pt", state=state), backend="numpy")
    state = nn.LSTM(4, 5).state_dict()
    state["weight_ih_l0"] = state["weight_ih_l0"].to(torch.int32)
    with pytest.raises(InvalidModelError, match=r"weight_ih_l0: expected a floating-point tensor"):
        fastlstm.load(save_state(None, tmp_path / "i.pt", state=state), backend="numpy")


def test_option_errors(tmp_path):
    path = save_state(LastStepClassifier(), tmp_path / "c.pt")
    accepted = "accepted: lstm, head, head_activations, head_input_activation, output, ignore"
    with pytest.raises(TypeError, match=rf"unknown option\(s\) heads.*{accepted}"):
        fastlstm.load(path, backend="numpy", heads=["fc"])
    with pytest.raises(TypeError, match="unknown option"):
        fastlstm.load(nn.LSTM(2, 3), backend="numpy", batch_first=True)
    with pytest.raises(TypeError, match="head: expected a list"):
        fastlstm.load(path, backend="numpy", head="fc")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        fastlstm.load(path, backend="numpy", head_activations=["swish"])
    with pytest.raises(ValueError, match="output"):
        fastlstm.load(path, backend="numpy", output="everything")
    with pytest.raises(ValueError, match="head_input_activation: softmax is not elementwise"):
        fastlstm.load(path, backend="numpy", head_input_activation="softmax")
    with pytest.raises(ValueError, match="head_input_activation: unknown activation 'swish'"):
        fastlstm.load(path, backend="numpy", head_input_activation="swish")
    with pytest.raises(ValueError, match=r"head_activations: 2 given for a head of 1"):
        fastlstm.load(path, backend="numpy", head_activations=["relu", "relu"])
    with pytest.raises(ModelFormatError, match=r"ignore=\['nothing'\]"):
        fastlstm.load(path, backend="numpy", ignore=["nothing"])


def test_unused_tensors_are_refused_with_advice(tmp_path):
    net = nn.Module()
    net.embedding = nn.Embedding(10, 4)
    net.lstm = nn.LSTM(4, 6)
    net.norm = nn.LayerNorm(6)
    net.fc = nn.Linear(6, 2)
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(save_state(net, tmp_path / "u.pt"), backend="numpy")
    listed = " ".join(info.value.unsupported)
    assert "norm.weight" in listed and "norm.bias" in listed and "embedding" not in listed  # the embedding runs
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(net, backend="numpy")
    listed = {u.partition(":")[0] for u in info.value.unsupported}
    assert listed == {"'norm' (nn.LayerNorm)"}


def test_recurrent_modules_between_others_are_refused(tmp_path):
    """A module registered between two recurrent modules cannot be placed: refused, never dropped."""
    net = nn.Module()
    net.lstm = nn.LSTM(4, 5)
    net.act = nn.Tanh()
    net.gru = nn.GRU(5, 5)
    with pytest.raises(UnsupportedModelError, match=r"'act' \(nn.Tanh\): registered between two recurrent modules"):
        fastlstm.load(net, backend="numpy")
    net.act = nn.Dropout(0.5)  # a no-op at inference is fine there
    assert len(fastlstm.load(net, backend="numpy").spec.layers) == 2


def test_custom_and_unknown_modules_are_unsupported():
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    net = nn.Module()
    net.lstm = nn.LSTM(4, 5)
    net.scale = Scale()
    net.fc = nn.Linear(5, 2)
    net.gelu = nn.GELU()
    with pytest.raises(UnsupportedModelError) as info:
        fastlstm.load(net, backend="numpy")
    assert [u.partition(":")[0] for u in info.value.unsupported] == ["'scale' (Scale)", "'gelu' (nn.GELU)"]
    # Stating the head's activations does not make an activation module fastlstm cannot run disappear.
    with pytest.raises(UnsupportedModelError, match=r"'gelu' \(nn.GELU\)"):
        fastlstm.load(net, backend="numpy", ignore=["scale"], head=["fc"], head_activations=["tanh"])
    model = fastlstm.load(net, backend="numpy", ignore=["scale", "gelu"], head=["fc"], head_activations=["tanh"])
    assert model.spec.head[0].activation.name == "tanh"


def test_activations_whose_place_is_unknown_are_refused():
    net = nn.Module()
    net.act = nn.ReLU()  # registered before the LSTM: where forward() applies it cannot be told
    net.lstm = nn.LSTM(4, 5)
    net.fc = nn.Linear(5, 2)
    with pytest.raises(ModelFormatError, match=r"'act' \(nn.ReLU\).*head_activations"):
        fastlstm.load(net, backend="numpy")
    model = fastlstm.load(net, backend="numpy", head_activations=["relu"])
    assert model.spec.head[0].activation.name == "relu"


def test_activation_settings_fastlstm_cannot_match_are_refused():
    for activation, pattern in [(nn.Softplus(beta=2.0), "beta=2.0"), (nn.Softmax(dim=1), "dim=1")]:
        net = nn.Module()
        net.lstm = nn.LSTM(4, 5)
        net.head = nn.Sequential(nn.Linear(5, 2), activation)
        with pytest.raises(UnsupportedModelError, match=pattern):
            fastlstm.load(net, backend="numpy")


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "t.pt"
    torch.save([torch.zeros(3)], str(path))
    with pytest.raises(ModelFormatError, match="expected a state_dict"):
        fastlstm.load(str(path), backend="numpy")
    torch.save({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ModelFormatError, match="no recurrent parameters"):
        fastlstm.load(str(path), backend="numpy")


def test_spec_from_state_dict_is_the_shared_translator():
    torch.manual_seed(23)
    net = AttributeHead()
    state = OrderedDict((k, v.numpy()) for k, v in net.state_dict().items())
    spec = pytorch.spec_from_state_dict(state, source="test dict", head_activations=["tanh", None])
    assert spec.source == "test dict"
    x = inputs()
    assert_close(fastlstm.Model(spec, backend="numpy").predict(x), module_output(net, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pytorch.spec_from_state_dict(state, source="test dict", head_activations=["tanh", "identity"])
