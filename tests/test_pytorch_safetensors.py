"""safetensors files: read by fastlstm's own reader, translated like a state_dict, hostile headers refused.

The ``safetensors`` package is used to write files when it is installed; otherwise files are written here
following the format's specification (8-byte little-endian header size, JSON header, byte buffer).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import ModelFormatError
from fastlstm.importers.pytorch.safetensors import read_safetensors

torch = pytest.importorskip("torch")
nn = torch.nn

TOLERANCE = 1e-5
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.uint8: "U8"}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> str:
    """Write ``tensors`` (torch tensors by name) as the specification describes, or with the package if present."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return str(path)
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        raw = tensor.view(torch.int16).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    return write_raw(path, json.dumps(header).encode(), b"".join(chunks))


def write_raw(path, header: bytes, data: bytes = b"", declared_size: int | None = None) -> str:
    header += b" " * (-len(header) % 8)  # the reference writer pads the header to 8 bytes with spaces
    size = len(header) if declared_size is None else declared_size
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", size) + header + data)
    return str(path)


def inputs(batch=3, steps=5, features=4) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, steps, features)).astype(np.float32)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(31)
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.lstm(x)[0])


def torch_output(module, x):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


# ----------------------------------------------------------------------------------------- faithful reads
def test_every_dtype_is_read_exactly(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4).half(), "c": torch.randn(3, 1).bfloat16(),
               "d": torch.randn(2).double(), "e": torch.arange(5), "f": torch.zeros(0, 3), "g": torch.tensor(2.5)}
    arrays, metadata = read_safetensors(write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"}))
    assert metadata == {"format": "pt"}
    assert sorted(arrays) == sorted(tensors)
    for name, tensor in tensors.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert arrays[name].dtype == expected.dtype and arrays[name].shape == expected.shape
        np.testing.assert_array_equal(arrays[name], expected)
        assert not arrays[name].flags.writeable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_state_dict_in_safetensors_matches_torch(tmp_path, dtype):
    net = Tagger().to(dtype).float()  # weights rounded to dtype, run in float32 by both
    path = write_safetensors(tmp_path / "m.safetensors", {k: v.to(dtype) for k, v in net.state_dict().items()})
    model = fastlstm.load(path, backend="numpy")
    assert model.spec.source == "safetensors m.safetensors"
    actual, expected = model.predict(inputs()), torch_output(net, inputs())
    assert actual.shape == expected.shape and np.max(np.abs(actual - expected)) <= TOLERANCE


def test_the_extension_is_not_what_is_recognised(tmp_path):
    net = Tagger()
    path = write_safetensors(tmp_path / "weights.bin", dict(net.state_dict()))
    assert np.max(np.abs(fastlstm.load(path, backend="numpy").predict(inputs()) - torch_output(net, inputs()))) \
        <= TOLERANCE


def test_several_linear_layers_must_be_named_since_the_file_sorts_them(tmp_path):
    net = nn.Module()
    torch.manual_seed(2)
    net.lstm = nn.LSTM(4, 5, batch_first=True)
    net.z_first = nn.Linear(5, 5)
    net.a_second = nn.Linear(5, 5)  # sorted names put it first: order cannot be read from the file
    path = write_safetensors(tmp_path / "h.safetensors", dict(net.state_dict()))
    with pytest.raises(ModelFormatError, match=r"does not record the order.*head=\[\.\.\.\]"):
        fastlstm.load(path, backend="numpy")
    model = fastlstm.load(path, backend="numpy", head=["z_first", "a_second"], head_activations=[None, None])
    with torch.no_grad():
        expected = net.a_second(net.z_first(net.lstm(torch.from_numpy(inputs()))[0])).numpy()
    assert np.max(np.abs(model.predict(inputs()) - expected)) <= TOLERANCE


def test_unused_tensors_are_refused_and_options_apply(tmp_path):
    net = Tagger()
    state = dict(net.state_dict(), **{"embedding.weight": torch.ones(10, 4)})
    path = write_safetensors(tmp_path / "u.safetensors", state)
    with pytest.raises(fastlstm.UnsupportedModelError, match=r"embedding.weight \(shape \(10, 4\)\)"):
        fastlstm.load(path, backend="numpy")
    fastlstm.load(path, backend="numpy", ignore=["embedding"])
    with pytest.raises(TypeError, match="state_dict_key"):
        fastlstm.load(path, backend="numpy", state_dict_key="model")


# ----------------------------------------------------------------------------------------- hostile headers
def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, pattern", [
    ({"w": entry(offsets=(0, 16))}, bytes(8), r"data_offsets.*<= 8"),
    ({"w": entry(offsets=(8, 0))}, bytes(8), r"data_offsets.*begin <= end"),
    ({"w": entry(offsets=(-8, 0))}, bytes(8), r"data_offsets"),
    ({"w": entry(shape=(3,))}, bytes(8), r"span 8 bytes; shape \[3\] of F32 needs 12"),
    ({"w": entry(shape=(1 << 40, 1 << 40), offsets=(0, 8))}, bytes(8), r"shape: expected"),
    ({"w": entry(shape=(-2,))}, bytes(8), r"shape: expected"),
    ({"w": entry(shape=(2.0,))}, bytes(8), r"shape: expected"),
    ({"w": entry(dtype="C64")}, bytes(8), r"dtype 'C64' is not one of"),
    ({"w": entry(), "v": entry(shape=(1,), offsets=(4, 8))}, bytes(8), r"overlap"),
    ({"w": dict(entry(), extra=1)}, bytes(8), r"exactly the fields"),
    ({"w": entry(), "__metadata__": {"format": 1}}, bytes(8), r"__metadata__"),
    ([1, 2], b"", r"a JSON list, not an object"),
])
def test_malformed_headers_are_refused(tmp_path, header, data, pattern):
    path = write_raw(tmp_path / "bad.safetensors", json.dumps(header).encode(), data)
    with pytest.raises(ModelFormatError, match=pattern):
        read_safetensors(path)


def test_header_sizes_are_checked_against_the_file(tmp_path):
    header = json.dumps({"w": entry()}).encode()
    too_big = write_raw(tmp_path / "a.safetensors", header, bytes(8), declared_size=1 << 62)
    with pytest.raises(ModelFormatError, match=r"a.safetensors: the header declares 4611686018427387904 bytes"):
        read_safetensors(too_big)
    short = tmp_path / "b.safetensors"
    short.write_bytes(b"\x10\x00\x00\x00\x00")
    with pytest.raises(ModelFormatError, match="b.safetensors: 5 bytes, too short"):
        read_safetensors(str(short))
    # Sniffing does not take a file whose declared header exceeds it for safetensors.
    with pytest.raises(ModelFormatError, match="not a model file fastlstm recognises"):
        fastlstm.load(too_big, backend="numpy")


def test_invalid_json_and_deep_nesting_are_format_errors(tmp_path):
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for n, header in enumerate([b"{not json", b"{\xff\xfe}", deep]):
        with pytest.raises(ModelFormatError, match="not valid JSON"):
            read_safetensors(write_raw(tmp_path / f"j{n}.safetensors", header))


def test_a_truncated_data_section_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "t.safetensors", {"w": torch.ones(4)})
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-4])
    with pytest.raises(ModelFormatError, match=r"data_offsets.*<= 12"):
        read_safetensors(str(cut))


class TokensGruRnn(nn.Module):
    """Embedding -> GRU(4) -> RNN(5) -> Linear: a file that sorts its tensors loses this order."""

    def __init__(self, gru_hidden=4):
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.b_gru = nn.GRU(3, gru_hidden, batch_first=True)
        self.a_rnn = nn.RNN(gru_hidden, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, ids):
        return self.fc(self.a_rnn(self.b_gru(self.embed(ids))[0])[0])


def test_the_one_order_in_which_recurrent_modules_chain_is_found(tmp_path):
    torch.manual_seed(8)
    net = TokensGruRnn().eval()
    path = write_safetensors(tmp_path / "tokens.safetensors", net.state_dict())
    ids = np.random.default_rng(9).integers(0, 7, (2, 6))
    with pytest.raises(fastlstm.UnsupportedModelError, match=r"embed.weight"):  # unordered: never guessed
        fastlstm.load(path, backend="numpy", rnn_nonlinearity="tanh")
    model = fastlstm.load(path, backend="numpy", rnn_nonlinearity="tanh", embedding="embed")
    assert [layer.kind for layer in model.spec.layers] == ["gru", "rnn"] and model.takes_token_ids
    with torch.no_grad():
        expected = net(torch.from_numpy(ids)).numpy()
    assert np.max(np.abs(model.predict(ids) - expected)) <= 1e-5


def test_recurrent_modules_that_chain_in_several_orders_must_be_named(tmp_path):
    net = nn.Module()
    net.first = nn.LSTM(4, 4)
    net.second = nn.GRU(4, 4)
    path = write_safetensors(tmp_path / "two.safetensors", net.state_dict())
    with pytest.raises(ModelFormatError, match=r"2 orders chain by shape; name them in the order they run with lstm="):
        fastlstm.load(path, backend="numpy")
    assert [l.kind for l in fastlstm.load(path, backend="numpy", lstm=["second", "first"]).spec.layers] == ["gru", "lstm"]
