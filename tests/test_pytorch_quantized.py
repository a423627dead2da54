"""PyTorch's dynamically quantized models (``torch.ao.quantization.quantize_dynamic``): their state_dicts saved
with ``torch.save``, read without torch.

fastlstm computes with the dequantized weights in float32, so it must equal a float ``nn.LSTM``/``nn.Linear``
holding torch's own dequantized weights within 1e-5. The quantized module also rounds the data to 8 bits (7
with ``reduce_range``) at every step: with weights of standard deviation 0.5 the measured difference is 0.8-1.6 %
of the largest output, while swapping two gates of ``weight_hh`` gives 5-12 %; the tests assert 3 %. float16
dynamic quantization keeps float16 weights and float data: fastlstm matches it within 1e-5.
"""

from __future__ import annotations

import struct
import warnings
import zipfile
from dataclasses import replace

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import FastLSTMError, InvalidModelError, ModelFormatError, UnsupportedModelError
from fastlstm.model import Model
from fastlstm.spec import int8_values

torch = pytest.importorskip("torch")
from torch_helpers import assert_close, inputs  # noqa: E402

nn = torch.nn
# torch quantizes the data at run time; fastlstm does not (module docstring): the bound on the difference,
# relative to the largest output.
QUANTIZED_DATA_BOUND = 0.03


class LSTMWithHead(nn.Module):
    def __init__(self, layers=1, bidirectional=False, input_size=4, hidden=8):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), 3)
        with torch.no_grad():  # larger than PyTorch's initialisation, so that a misplaced weight shows
            for parameter in self.parameters():
                parameter.normal_(0, 0.5)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y)


def quantize(module, dtype=torch.qint8, qconfig=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        spec = {nn.LSTM: qconfig, nn.Linear: qconfig} if qconfig is not None else {nn.LSTM, nn.Linear}
        return torch.ao.quantization.quantize_dynamic(module, spec, dtype=dtype)


def quantized_model(layers=1, bidirectional=False, dtype=torch.qint8, seed=0, **sizes):
    torch.manual_seed(seed)
    return quantize(LSTMWithHead(layers, bidirectional, **sizes).eval(), dtype)


def float_twin(quantized) -> nn.Module:
    """A float module holding torch's own dequantization of the quantized module's weights."""
    lstm = quantized.lstm
    twin = LSTMWithHead(lstm.num_layers, lstm.bidirectional, lstm.input_size, lstm.hidden_size).eval()
    with torch.no_grad():
        for name, weight in {**lstm.get_weight(), **lstm.get_bias()}.items():
            getattr(twin.lstm, name).copy_(weight.dequantize() if weight.is_quantized else weight)
        weight = quantized.fc.weight()
        twin.fc.weight.copy_(weight.dequantize() if weight.is_quantized else weight)
        twin.fc.bias.copy_(quantized.fc.bias())
    return twin


def run(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def assert_near_quantized_run(actual, expected):
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= QUANTIZED_DATA_BOUND * np.max(np.abs(expected))


def save(obj, path, layout="zip"):
    torch.save(obj, str(path), _use_new_zipfile_serialization=(layout == "zip"))
    return path


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_quantized_state_dicts_match_torch(tmp_path, layers, bidirectional, layout):
    quantized = quantized_model(layers, bidirectional)
    model = fastlstm.load(save(quantized.state_dict(), tmp_path / "q.pt", layout), backend="numpy")
    x = inputs(steps=7, seed=1)
    y = model.predict(x)
    reference = run(float_twin(quantized), x)
    assert_close(y, reference)
    assert_near_quantized_run(y, run(quantized, x))
    assert np.max(np.abs(reference - run(LSTMWithHead(layers, bidirectional).eval(), x))) > 1e-3  # not a no-op


def test_the_spec_holds_torchs_integers_and_scales(tmp_path):
    quantized = quantized_model(2, True)
    spec = fastlstm.load(save(quantized.state_dict(), tmp_path / "q.pt"), backend="numpy").spec
    weights = quantized.lstm.get_weight()
    for n, layer in enumerate(spec.layers):
        for d, cell in enumerate(layer.cells):
            suffix = f"_l{n}{'_reverse' if d else ''}"
            for ours, scale, name in ((cell.w_ih, cell.w_ih_scale, "weight_ih"), (cell.w_hh, cell.w_hh_scale,
                                                                                  "weight_hh")):
                theirs = weights[name + suffix]
                np.testing.assert_array_equal(int8_values(ours, scale), theirs.int_repr().numpy())
                np.testing.assert_array_equal(scale, np.full(scale.shape, theirs.q_scale(), np.float32))
    assert spec.head[0].weight.dtype == np.float32  # the head runs in float32


def test_per_channel_quantized_weights_keep_one_scale_per_row(tmp_path):
    torch.manual_seed(0)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    quantized = quantize(LSTMWithHead(1, False).eval(), qconfig=qconfig)
    model = fastlstm.load(save(quantized.state_dict(), tmp_path / "q.pt"), backend="numpy")
    scales = model.spec.layers[0].cells[0].w_ih_scale
    assert len(set(scales.tolist())) > 1
    x = inputs(seed=2)
    assert_close(model.predict(x), run(float_twin(quantized), x))


def test_float16_dynamic_quantization_is_read_exactly(tmp_path):
    quantized = quantized_model(2, True, dtype=torch.float16)
    model = fastlstm.load(save(quantized.state_dict(), tmp_path / "q16.pt"), backend="numpy")
    assert all(cell.w_ih_scale is None for layer in model.spec.layers for cell in layer.cells)
    x = inputs(seed=3)
    assert_close(model.predict(x), run(quantized, x))
    assert_close(model.predict(x), run(float_twin(quantized), x))


def test_a_checkpoint_nesting_a_quantized_state_dict(tmp_path):
    quantized = quantized_model(1, False)
    path = save({"epoch": 3, "model": quantized.state_dict()}, tmp_path / "checkpoint.pt")
    x = inputs(seed=4)
    assert_close(fastlstm.load(path, backend="numpy").predict(x), run(float_twin(quantized), x))


def test_streaming_a_quantized_model_equals_its_whole_sequence_output(tmp_path):
    model = fastlstm.load(save(quantized_model(2, True).state_dict(), tmp_path / "q.pt"), backend="numpy")
    x = inputs(batch=2, steps=5, seed=5)
    with pytest.raises(FastLSTMError):  # a bidirectional model does not stream; a forward one does
        model.stream()
    forward = fastlstm.load(save(quantized_model(2, False).state_dict(), tmp_path / "f.pt"), backend="numpy")
    stream = forward.stream(batch_size=2)
    steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert_close(steps, forward.predict(x), 1e-6)


def test_the_quantized_data_bound_catches_a_gate_swap(tmp_path):
    """The bound against torch's quantized run is tight enough to see two gates of weight_hh swapped."""
    quantized = quantized_model(2, True)
    model = fastlstm.load(save(quantized.state_dict(), tmp_path / "q.pt"), backend="numpy")
    hidden = model.spec.layers[0].hidden_size
    order = [0, 3, 2, 1]  # f and o swapped

    def swapped(array):
        return np.ascontiguousarray(array.reshape(4, hidden, *array.shape[1:])[order].reshape(array.shape))

    layers = tuple(replace(layer, cells=tuple(replace(c, w_hh=swapped(c.w_hh), w_hh_scale=swapped(c.w_hh_scale))
                                              for c in layer.cells)) for layer in model.spec.layers)
    wrong = Model(replace(model.spec, layers=layers), backend="numpy")
    x = inputs(steps=7, seed=1)
    with pytest.raises(AssertionError):
        assert_near_quantized_run(wrong.predict(x), run(quantized, x))


@pytest.mark.parametrize("source", ["in-memory", "scripted", "traced"])
def test_quantized_modules_in_memory_and_in_torchscript_archives_match_torch(tmp_path, source):
    # input size = hidden size: two cells are one bidirectional layer or two layers; the module says which
    quantized = quantized_model(1, True, input_size=8, hidden=8)
    x = inputs(features=8, seed=6)
    if source == "in-memory":
        model = fastlstm.load(quantized, backend="numpy")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive = (torch.jit.script(quantized) if source == "scripted"
                       else torch.jit.trace(quantized, torch.from_numpy(x)))
        torch.jit.save(archive, str(tmp_path / "q.pt"))
        model = fastlstm.load(tmp_path / "q.pt", backend="numpy")
    assert model.spec.layers[0].direction == "bidirectional" and model.spec.layers[0].cells[0].w_hh_scale is not None
    assert_close(model.predict(x), run(float_twin(quantized), x))
    assert_near_quantized_run(model.predict(x), run(quantized, x))


class GRUWithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.normal_(0, 0.5)

    def forward(self, x):
        return self.fc(self.gru(x)[0])


@pytest.mark.parametrize("source", ["state_dict", "in-memory"])
def test_a_quantized_gru_matches_torch(tmp_path, source):
    torch.manual_seed(0)
    module = GRUWithHead().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(module, {nn.GRU, nn.Linear}, dtype=torch.qint8)
    loaded = quantized if source == "in-memory" else save(quantized.state_dict(), tmp_path / "gru.pt")
    model = fastlstm.load(loaded, backend="numpy")
    assert model.spec.layers[0].kind == "gru" and model.spec.layers[1].cells[1].w_ih_scale is not None
    twin = GRUWithHead().eval()
    with torch.no_grad():
        for name, weight in {**quantized.gru.get_weight(), **quantized.gru.get_bias()}.items():
            getattr(twin.gru, name).copy_(weight.dequantize() if weight.is_quantized else weight)
        twin.fc.weight.copy_(quantized.fc.weight().dequantize())
        twin.fc.bias.copy_(quantized.fc.bias())
    x = inputs(seed=8)
    assert_close(model.predict(x), run(twin, x))
    assert_near_quantized_run(model.predict(x), run(quantized, x))


def test_a_quantized_module_with_an_activation_module_in_its_head():
    quantized = quantized_model(1, False)

    class WithTanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = quantized.lstm, nn.Sequential(quantized.fc, nn.Tanh())

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = fastlstm.load(WithTanh().eval(), backend="numpy")
    assert model.spec.head[0].activation.name == "tanh"
    x = inputs(seed=7)
    assert_close(model.predict(x), np.tanh(run(float_twin(quantized), x)))


# ----------------------------------------------------------------------------------------- refusals
def test_two_cells_of_one_size_are_ambiguous_without_the_module(tmp_path):
    quantized = quantized_model(2, False, input_size=8, hidden=8)  # or one bidirectional layer: same shapes
    with pytest.raises(ModelFormatError, match="are 2 layers or 1 bidirectional layers"):
        fastlstm.load(save(quantized.state_dict(), tmp_path / "q.pt"), backend="numpy")


def with_first_cell(quantized, weight_ih=None, weight_hh=None, packed_bias_hh=None):
    """The quantized module with its first cell rebuilt from its own parts, some replaced: the weights (quantized
    tensors) and the recurrent bias packed with ``weight_hh`` (the cell keeps its own copy of the biases)."""
    lstm = quantized.lstm
    weights, biases = lstm.get_weight(), lstm.get_bias()
    weight_ih = weights["weight_ih_l0"] if weight_ih is None else weight_ih
    weight_hh = weights["weight_hh_l0"] if weight_hh is None else weight_hh
    packed_bias_hh = biases["bias_hh_l0"] if packed_bias_hh is None else packed_bias_hh
    packed_ih = torch.ops.quantized.linear_prepack(weight_ih, biases["bias_ih_l0"])
    packed_hh = torch.ops.quantized.linear_prepack(weight_hh, packed_bias_hh)
    lstm._all_weight_values[0].param = torch.ops.quantized.make_quantized_cell_params_dynamic(
        packed_ih, packed_hh, biases["bias_ih_l0"], biases["bias_hh_l0"], True)
    return quantized


def test_a_nonzero_zero_point_is_refused_naming_it(tmp_path):
    quantized = quantized_model(1, False)
    float_weight = quantized.lstm.get_weight()["weight_ih_l0"].dequantize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shifted = torch.quantize_per_tensor(float_weight, 0.01, 3, torch.qint8)
    path = save(with_first_cell(quantized, weight_ih=shifted).state_dict(), tmp_path / "q.pt")
    with pytest.raises(UnsupportedModelError, match=r"(?s)weight_ih: qint8 weights with zero point\(s\) 3.*qconfig"):
        fastlstm.load(path, backend="numpy")


def test_a_statically_quantized_linear_is_refused(tmp_path):
    quantized = quantized_model(1, False)
    quantized.fc.scale, quantized.fc.zero_point = 0.5, 2
    with pytest.raises(UnsupportedModelError, match=r"fc.scale / fc.zero_point = 0.5 / 2: a Linear whose output is "
                                                    r"re-quantized"):
        fastlstm.load(save(quantized.state_dict(), tmp_path / "q.pt"), backend="numpy")


def rewritten(path, out_path, change):
    """A copy of a torch.save zip archive whose data.pkl bytes went through ``change``."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                changed = change(data)
                assert changed != data
                data = changed
            target.writestr(info, data)
    return out_path


@pytest.mark.parametrize("value, message", [(0.0, r"scale 0\.0; a scale must be a finite number > 0"),
                                            (float("nan"), r"scale nan"), (-0.01, r"scale -0\.01")])
def test_invalid_scales_are_refused(tmp_path, value, message):
    quantized = quantized_model(1, False)
    scale = quantized.lstm.get_weight()["weight_ih_l0"].q_scale()
    path = save(quantized.state_dict(), tmp_path / "q.pt")
    bad = rewritten(path, tmp_path / "bad.pt",
                    lambda data: data.replace(b"G" + struct.pack(">d", scale), b"G" + struct.pack(">d", value)))
    with pytest.raises(InvalidModelError, match=message):
        fastlstm.load(bad, backend="numpy")


def test_unknown_torchbind_classes_are_refused_before_anything_is_called(tmp_path):
    path = save(quantized_model(1, False).state_dict(), tmp_path / "q.pt")
    bad = rewritten(path, tmp_path / "bad.pt", lambda data: data.replace(b"rnn.CellParamsBase", b"rnn.CellParamsBasX"))
    with pytest.raises(ModelFormatError, match=r"TorchBind class __torch__\.torch\.classes\.rnn\.CellParamsBasX is "
                                               r"not one fastlstm reads"):
        fastlstm.load(bad, backend="numpy")


def test_a_cell_whose_recurrent_weight_has_the_wrong_shape_is_invalid(tmp_path):
    quantized = quantized_model(1, False)
    # the input weight (32, 4) where the recurrent one (32, 8) belongs
    wrong = with_first_cell(quantized, weight_hh=quantized.lstm.get_weight()["weight_ih_l0"])
    with pytest.raises(InvalidModelError, match=r"lstm.weight_hh_l0: expected shape \(32, 8\), got \(32, 4\)"):
        fastlstm.load(save(wrong.state_dict(), tmp_path / "q.pt"), backend="numpy")


def test_a_cell_whose_packed_bias_differs_from_its_own_is_invalid(tmp_path):
    quantized = quantized_model(1, False)
    wrong = with_first_cell(quantized, packed_bias_hh=quantized.lstm.get_bias()["bias_hh_l0"] + 1)
    with pytest.raises(InvalidModelError, match="its biases differ from those packed with its weights"):
        fastlstm.load(save(wrong.state_dict(), tmp_path / "q.pt"), backend="numpy")


def test_whole_quantized_modules_pickled_with_torch_save_are_refused_as_every_pickled_module(tmp_path):
    path = save(quantized_model(1, False), tmp_path / "whole.pt")
    with pytest.raises(ModelFormatError, match="torch.save\\(model.state_dict\\(\\), path\\)"):
        fastlstm.load(path, backend="numpy")


def test_a_checkpoint_of_shared_nested_dicts_is_walked_once_per_dict(tmp_path):
    """80 levels of two references to the same dict: 2**80 paths, 80 dicts (a small file)."""
    shared = quantized_model(1, False).state_dict()
    for _ in range(80):
        shared = {"a": shared, "b": shared}
    path = save(shared, tmp_path / "nested.pt")
    with pytest.raises(FastLSTMError):
        fastlstm.load(path, backend="numpy")
