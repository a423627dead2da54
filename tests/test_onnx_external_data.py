"""ONNX models whose tensors live in a data file beside the ``.onnx`` file (ONNX "external data").

PyTorch's ``torch.onnx.export(model, args, "m.onnx")`` writes ``m.onnx.data`` by default; such models load
from their path and give PyTorch's output within 1e-5. Locations that lead anywhere but a regular file in
the model's own directory, and offsets or lengths that disagree with the file or the declared shape, are
refused with ``ModelFormatError`` naming the tensor and the location, before any data is read.
"""

from __future__ import annotations

import os
import tracemalloc
import warnings

import pytest

import fastlstm
from fastlstm.errors import ModelFormatError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto  # noqa: E402

from test_onnx_import import assert_close, lstm_model, random_inputs, run_ort  # noqa: E402


def load(source):
    return fastlstm.load(source, backend="numpy")


def save_with_external_data(model, directory, name="m.onnx", data="m.onnx.data"):
    """Save ``model`` with every initializer in one data file (as torch.onnx.export does); its path."""
    path = os.path.join(directory, name)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=0, convert_attribute=True)
    return path


def reference_model():
    return lstm_model("bidirectional", peepholes=True, outputs=("Y",))


def external_entries(tensor) -> dict:
    return {entry.key: entry.value for entry in tensor.external_data}


def set_entry(tensor, key, value):
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def rewrite(path, change):
    """Apply ``change`` to the first initializer of the model at ``path`` (still external) and save it."""
    model = onnx.load(path, load_external_data=False)
    change(model.graph.initializer[0])
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return model.graph.initializer[0].name


# ----------------------------------------------------------------------------------------- exported models
class Tagger:
    """A bidirectional two-layer PyTorch LSTM with a dense head applied to every step (time major)."""

    @staticmethod
    def build():
        torch = pytest.importorskip("torch")
        nn = torch.nn

        class Module(nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
                self.fc = nn.Linear(10, 3)

            def forward(self, x):
                return self.fc(self.lstm(x)[0])

        torch.manual_seed(0)
        return Module().eval()


def test_torch_onnx_export_with_its_defaults_loads_from_its_path(tmp_path):
    """``torch.onnx.export(model, args, path)`` as PyTorch 2.13 runs it by default (the dynamo exporter)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")  # PyTorch's default exporter needs it
    module = Tagger.build()
    path = tmp_path / "tagger.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(6, 2, 4),), str(path))
    assert (tmp_path / "tagger.onnx.data").exists()  # the weights went to external data
    exported = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in exported.graph.initializer)
    x = random_inputs(batch=2, steps=6)
    expected = module(torch.from_numpy(x.transpose(1, 0, 2))).detach().numpy().transpose(1, 0, 2)
    assert_close(load(str(path)).predict(x), expected)


def test_legacy_export_saved_with_external_data_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    module = Tagger.build()
    path = tmp_path / "tagger.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(6, 2, 4),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "t", 1: "b"}})
    save_with_external_data(onnx.load(str(path)), str(tmp_path), "tagger.onnx", "weights.bin")
    assert os.path.getsize(tmp_path / "weights.bin") > 0
    x = random_inputs()
    expected = module(torch.from_numpy(x.transpose(1, 0, 2))).detach().numpy().transpose(1, 0, 2)
    assert_close(load(str(path)).predict(x), expected)


def test_external_data_in_a_subdirectory_and_constant_nodes(tmp_path):
    """Locations may name subdirectories of the model's directory; Constant tensors may be external too."""
    model = reference_model()
    weights = model.graph.initializer[0]
    constant = onnx.helper.make_node("Constant", [], [weights.name], value=weights)
    del model.graph.initializer[0]
    model.graph.node.insert(0, constant)
    (tmp_path / "data").mkdir()
    path = save_with_external_data(model, str(tmp_path), data="data/weights.bin")
    stored = onnx.load(path, load_external_data=False)
    assert stored.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    x = random_inputs()
    expected = run_ort(onnx.load(path), {"X": x.transpose(1, 0, 2)})[0]
    y = load(path).predict(x)
    steps, directions, batch, hidden = expected.shape
    assert_close(y, expected.transpose(2, 0, 1, 3).reshape(batch, steps, -1))


def test_only_the_tensor_bytes_are_read_from_a_large_data_file(tmp_path):
    """The data file is 1 GiB (sparse); the tensors sit at its end; loading reads kilobytes."""
    path = save_with_external_data(reference_model(), str(tmp_path))
    data_path = tmp_path / "m.onnx.data"
    payload = data_path.read_bytes()
    padding = 1 << 30
    with open(data_path, "r+b") as f:
        f.truncate(padding + len(payload))
        f.seek(padding)
        f.write(payload)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        set_entry(tensor, "offset", str(int(external_entries(tensor).get("offset", "0")) + padding))
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    tracemalloc.start()
    try:
        imported = load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000
    assert imported.spec.layers[0].hidden_size == 5


# ----------------------------------------------------------------------------------------- refusals
def test_in_memory_model_with_external_tensors_is_refused(tmp_path):
    path = save_with_external_data(reference_model(), str(tmp_path))
    model = onnx.load(path, load_external_data=False)
    with pytest.raises(ModelFormatError, match=r"initializer 'W' \(external data 'm.onnx.data'\).*no directory"):
        load(model)
    assert load(onnx.load(path)).spec.layers[0].hidden_size == 5  # loaded with its data: works as before


@pytest.mark.parametrize("location, message", [
    ("/etc/passwd", "absolute"),
    ("../m.onnx.data", "climbs out"),
    ("data/../../m.onnx.data", "climbs out"),
    ("..\\m.onnx.data", "climbs out"),
    ("C:/m.onnx.data", "absolute"),
])
def test_locations_outside_the_model_directory_are_refused(tmp_path, location, message):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_with_external_data(reference_model(), str(model_dir))
    (tmp_path / "m.onnx.data").write_bytes((model_dir / "m.onnx.data").read_bytes())  # a valid file out there
    name = rewrite(path, lambda tensor: set_entry(tensor, "location", location))
    with pytest.raises(ModelFormatError, match=f"initializer '{name}'.*{message}") as info:
        load(path)
    assert repr(location) in str(info.value)


def test_a_symbolic_link_leading_outside_is_refused_and_one_inside_is_followed(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_with_external_data(reference_model(), str(model_dir))
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes((model_dir / "m.onnx.data").read_bytes())
    (model_dir / "link.bin").symlink_to(outside)
    (model_dir / "inside.bin").symlink_to(model_dir / "m.onnx.data")
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        set_entry(tensor, "location", "inside.bin")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    assert load(path).spec.layers[0].hidden_size == 5
    rewrite(path, lambda tensor: set_entry(tensor, "location", "link.bin"))
    with pytest.raises(ModelFormatError, match=r"initializer 'W' \(external data 'link.bin'\).*outside"):
        load(path)
    os.symlink(tmp_path, model_dir / "up")
    rewrite(path, lambda tensor: set_entry(tensor, "location", "up/elsewhere.bin"))
    with pytest.raises(ModelFormatError, match=r"'up/elsewhere.bin'.*outside"):
        load(path)


@pytest.mark.parametrize("entries, message", [
    ({"offset": "100000"}, "past the end"),
    ({"offset": "0", "length": "100000"}, "past the end"),
    ({"length": "4"}, "needs 640 bytes, the external data holds 4"),
    ({"offset": "-1"}, "not a byte count"),
    ({"length": "1e3"}, "not a byte count"),
    ({"offset": "9" * 400}, "not a byte count"),
    ({"checksum": "0" * 40}, "checksum"),
    ({"owner": "x"}, "unknown external_data key"),
])
def test_offsets_and_lengths_are_checked_before_reading(tmp_path, entries, message):
    path = save_with_external_data(reference_model(), str(tmp_path))

    def change(tensor):
        for key, value in entries.items():
            set_entry(tensor, key, value)

    rewrite(path, change)
    with pytest.raises(ModelFormatError, match=f"initializer 'W'.*{message}"):
        load(path)


def test_data_without_a_length_runs_to_the_end_of_the_file(tmp_path):
    """Without a length, the data is everything from the offset on: it must be the declared size exactly."""
    path = save_with_external_data(reference_model(), str(tmp_path))
    model = onnx.load(path, load_external_data=False)
    weights = model.graph.initializer[0]
    entries = external_entries(weights)
    start, length = int(entries.get("offset", "0")), int(entries["length"])
    data = (tmp_path / "m.onnx.data").read_bytes()[start:start + length]
    (tmp_path / "w.bin").write_bytes(data)
    del weights.external_data[:]
    weights.external_data.add(key="location", value="w.bin")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    assert load(path).spec.layers[0].input_size == 4
    (tmp_path / "w.bin").write_bytes(data + b"\0")
    with pytest.raises(ModelFormatError, match="holds 641 \\(from the offset to the end of the file\\)"):
        load(path)


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_locations_that_are_not_regular_files_are_refused(tmp_path, kind):
    path = save_with_external_data(reference_model(), str(tmp_path))
    if kind == "directory":
        (tmp_path / "target").mkdir()
    elif kind == "fifo":
        os.mkfifo(tmp_path / "target")  # opening it must not wait for a writer
    rewrite(path, lambda tensor: set_entry(tensor, "location", "target"))
    with pytest.raises(ModelFormatError, match="'target'.*(cannot open|not a regular file)"):
        load(path)


def test_external_location_without_external_flag_or_with_inline_data_is_refused(tmp_path):
    path = save_with_external_data(reference_model(), str(tmp_path))
    rewrite(path, lambda tensor: setattr(tensor, "data_location", TensorProto.DEFAULT))
    with pytest.raises(ModelFormatError, match="data_location is not EXTERNAL"):
        load(path)
    rewrite(path, lambda tensor: (setattr(tensor, "data_location", TensorProto.EXTERNAL),
                                  setattr(tensor, "raw_data", b"\0" * 640)))
    with pytest.raises(ModelFormatError, match="also holds values in the file"):
        load(path)


def test_an_undecodable_location_is_a_format_error(tmp_path):
    path = save_with_external_data(reference_model(), str(tmp_path))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data.replace(b"m.onnx.data", b"\xff.onnx.data"))
    with pytest.raises(ModelFormatError, match="external_data entry is not valid UTF-8"):
        load(path)
