"""The torch.save / torch.jit.save reader: faithful tensors, and nothing from a file is ever run.

Reference values come from ``torch.load`` of the same file. Hostile files are written by hand with
``pickle`` so that each test controls exactly which opcodes and globals the file holds.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import fastlstm
from fastlstm.errors import ModelFormatError
from fastlstm.importers.pytorch import unpickler
from fastlstm.importers.pytorch.unpickler import ScriptObject, read_torch_file

torch = pytest.importorskip("torch")

FORMATS = ["zip", "legacy"]


def save(obj, path, layout: str) -> str:
    torch.save(obj, path, _use_new_zipfile_serialization=(layout == "zip"))
    return str(path)


def assert_same(array: np.ndarray, tensor) -> None:
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    assert isinstance(array, np.ndarray)
    assert array.shape == tuple(tensor.shape)
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)


# ----------------------------------------------------------------------------------------- faithful tensors
@pytest.mark.parametrize("layout", FORMATS)
def test_every_dtype_is_read_exactly(tmp_path, layout):
    torch.manual_seed(0)
    tensors = OrderedDict(
        f32=torch.randn(3, 4),
        f64=torch.randn(5, dtype=torch.float64),
        f16=torch.randn(2, 3).half(),
        bf16=torch.randn(4, 2).bfloat16(),
        i64=torch.arange(-3, 3),
        i32=torch.arange(6, dtype=torch.int32).reshape(2, 3),
        i16=torch.arange(4, dtype=torch.int16),
        i8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        u8=torch.tensor([0, 200, 255], dtype=torch.uint8),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
    )
    path = save(tensors, tmp_path / "t.pt", layout)
    contents = read_torch_file(path)
    assert contents.layout == layout and not contents.is_torchscript
    assert list(contents.root) == list(tensors)
    for name, tensor in tensors.items():
        assert_same(contents.root[name], tensor)


@pytest.mark.parametrize("layout", FORMATS)
def test_views_offsets_strides_and_shared_storages(tmp_path, layout):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {
        "base": base,
        "transposed": base.t(),                 # strides (1, 10)
        "sliced": base[2:5, 3:9:2],             # offset 23, strides (10, 2)
        "row": base[4],                         # offset 40
        "column": base[:, 7],                   # offset 7, stride 10
    }
    path = save(tensors, tmp_path / "v.pt", layout)
    loaded = torch.load(path)
    assert loaded["sliced"].storage_offset() == 23  # the file really holds a view, not a copy
    root = read_torch_file(path).root
    for name, tensor in tensors.items():
        assert_same(root[name], tensor)


@pytest.mark.parametrize("layout", FORMATS)
def test_arrays_are_read_only(tmp_path, layout):
    root = read_torch_file(save({"w": torch.ones(3)}, tmp_path / "r.pt", layout)).root
    with pytest.raises(ValueError):
        root["w"][0] = 5.0


@pytest.mark.parametrize("layout", FORMATS)
def test_parameters_and_nested_checkpoints(tmp_path, layout):
    lstm = torch.nn.LSTM(2, 3)
    checkpoint = {
        "params": dict(lstm.named_parameters()),  # Parameters pickle through _rebuild_parameter
        "epoch": 7,
        "name": "run-1",
        "history": [0.5, 0.25],
        "shape": torch.Size([2, 3]),
        "nothing": None,
    }
    root = read_torch_file(save(checkpoint, tmp_path / "c.pt", layout)).root
    assert root["epoch"] == 7 and root["name"] == "run-1" and root["history"] == [0.5, 0.25]
    assert root["shape"] == (2, 3) and root["nothing"] is None
    for name, parameter in lstm.named_parameters():
        assert_same(root["params"][name], parameter.detach())


def test_big_endian_archives_are_byte_swapped(tmp_path):
    values = torch.tensor([1.5, -2.25, 3.0e-3, 1234.5], dtype=torch.float32)
    path = save({"w": values}, tmp_path / "le.pt", "zip")
    swapped = tmp_path / "be.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            dst.writestr(info.filename, data)
    root = read_torch_file(str(swapped)).root
    np.testing.assert_array_equal(root["w"], values.numpy())
    assert root["w"].dtype == np.float32 and root["w"].dtype.isnative


def test_torchscript_modules_become_inert_attribute_holders(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LeakyReLU(0.25))
    path = tmp_path / "s.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    contents = read_torch_file(str(path))
    assert contents.is_torchscript
    root = contents.root
    assert isinstance(root, ScriptObject) and root.type_name == "torch.nn.modules.container.Sequential"
    linear, leaky = root.attributes["0"], root.attributes["1"]
    assert linear.type_name == "torch.nn.modules.linear.Linear"
    assert_same(linear.attributes["weight"], model[0].weight.detach())
    assert leaky.constants["negative_slope"] == 0.25


# ----------------------------------------------------------------------------------------- hand-made files
class _Storage:
    """Stands for one storage in a hand-written pickle (turned into a persistent id)."""

    def __init__(self, key: str, numel: int, storage_type=None, view=None, location="cpu"):
        self.key, self.numel, self.storage_type, self.view = key, numel, storage_type or torch.FloatStorage, view
        self.location = location


class _Tensor:
    """Pickles as torch does: a call to ``torch._utils._rebuild_tensor_v2``."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def _pickle(obj, *, legacy: bool = False, protocol: int = 2) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                pid = ("storage", o.storage_type, o.key, o.location, o.numel)
                return pid + (o.view,) if legacy else pid
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def write_zip(path, data_pkl: bytes, storages: dict[str, bytes], extra: dict[str, bytes] | None = None) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", b"little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        for name, data in (extra or {}).items():
            archive.writestr(f"archive/{name}", data)
        archive.writestr("archive/version", b"3\n")
    return str(path)


def write_legacy(path, object_pkl: bytes, storages: dict[str, tuple[int, bytes]], keys=None) -> str:
    with open(path, "wb") as f:
        for header in (unpickler.LEGACY_MAGIC_NUMBER, unpickler.LEGACY_PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}):
            pickle.dump(header, f, protocol=2)
        f.write(object_pkl)
        pickle.dump(sorted(storages) if keys is None else keys, f, protocol=2)
        for key in sorted(storages):
            numel, data = storages[key]
            f.write(struct.pack("<q", numel) + data)
    return str(path)


def floats(*values) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def test_hand_written_zip_and_legacy_files_read_back(tmp_path):
    storage = _Storage("0", 6)
    state = OrderedDict(w=_Tensor(storage, 1, (2, 2), (1, 2)))  # elements 1, 3 / 2, 4 -> [[1, 3], [2, 4]]
    data = floats(0, 1, 2, 3, 4, 5)
    zipped = read_torch_file(write_zip(tmp_path / "z.pt", _pickle(state), {"0": data})).root
    np.testing.assert_array_equal(zipped["w"], [[1, 3], [2, 4]])
    legacy_state = OrderedDict(w=_Tensor(_Storage("k", 6, view=("k", 2, 3)), 0, (3,), (1,)))  # a storage view
    legacy = read_torch_file(write_legacy(tmp_path / "l.pt", _pickle(legacy_state, legacy=True),
                                          {"k": (6, data)})).root
    np.testing.assert_array_equal(legacy["w"], [2, 3, 4])


def test_storages_saved_from_a_gpu_are_read(tmp_path):
    state = OrderedDict(w=_Tensor(_Storage("0", 2, location="cuda:0"), 0, (2,), (1,)))
    path = write_zip(tmp_path / "g.pt", _pickle(state), {"0": floats(7, 8)})
    np.testing.assert_array_equal(read_torch_file(path).root["w"], [7, 8])


def test_pickle_protocol_4_frames_are_read(tmp_path):
    state = OrderedDict(w=_Tensor(_Storage("0", 3), 0, (3,), (1,)))
    path = write_legacy(tmp_path / "p4.pt", _pickle(state, legacy=True, protocol=4), {"0": (3, floats(1, 2, 3))})
    np.testing.assert_array_equal(read_torch_file(path).root["w"], [1, 2, 3])


# ----------------------------------------------------------------------------------------- hostile files
class _RunsShell:
    def __init__(self, marker):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


class _RunsEval:
    def __init__(self, marker):
        self.source = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        import builtins
        return (builtins.eval, (self.source,))


HOSTILE = [_RunsShell, _RunsEval]


@pytest.mark.parametrize("payload", HOSTILE)
def test_hostile_plain_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(ModelFormatError, match=r"system|eval"):
        fastlstm.load(str(path), backend="numpy")
    assert not marker.exists()


@pytest.mark.parametrize("payload", HOSTILE)
def test_hostile_object_after_a_valid_legacy_header_is_refused(tmp_path, payload):
    marker = tmp_path / "marker"
    evil = OrderedDict(w=payload(marker))
    path = write_legacy(tmp_path / "evil.pt", pickle.dumps(evil, protocol=2), {})
    with pytest.raises(ModelFormatError, match=r"(system|eval).*not allowed"):
        fastlstm.load(path, backend="numpy")
    assert not marker.exists()


@pytest.mark.parametrize("payload", HOSTILE)
@pytest.mark.parametrize("torchscript", [False, True])
def test_hostile_pickle_inside_a_zip_archive_is_refused(tmp_path, payload, torchscript):
    marker = tmp_path / "marker"
    extra = {"code/__torch__.py": b"class Net(Module):\n  pass\n"} if torchscript else {}
    path = write_zip(tmp_path / "evil.pt", pickle.dumps({"w": payload(marker)}, protocol=2), {}, extra)
    with pytest.raises(ModelFormatError, match=r"(system|eval).*not allowed"):
        fastlstm.load(path, backend="numpy")
    assert not marker.exists()


def test_torchscript_code_is_never_executed(tmp_path):
    """A constant line in an archive's code is read as a literal only; an expression there is ignored."""
    marker = tmp_path / "marker"
    code = (f"class LeakyReLU(Module):\n"
            f"  negative_slope : Final[float] = __import__('os').system('touch {marker}')\n"
            f"  def forward(self, x):\n    return __import__('os').system('touch {marker}')\n").encode()

    # A scripted LeakyReLU object: NEWOBJ of the __torch__ class, then BUILD with its attributes.
    data = b"\x80\x02c__torch__.torch.nn.modules.activation\nLeakyReLU\n)\x81}X\x08\x00\x00\x00trainingK\x00sb."
    path = write_zip(tmp_path / "ts.pt", data, {},
                     {"code/__torch__/torch/nn/modules/activation.py": code})
    contents = read_torch_file(path)
    assert contents.root.type_name == "torch.nn.modules.activation.LeakyReLU"
    assert contents.root.constants == {}
    assert not marker.exists()


def test_torchscript_classes_are_refused_outside_torchscript_archives(tmp_path):
    data = b"\x80\x02c__torch__\nNet\n)\x81}b."
    path = write_zip(tmp_path / "x.pt", data, {})
    with pytest.raises(ModelFormatError, match=r"__torch__\.Net.*not allowed"):
        read_torch_file(path)


def test_script_objects_cannot_be_called_with_arguments(tmp_path):
    data = b"\x80\x02c__torch__\nNet\nX\x01\x00\x00\x00a\x85R."  # REDUCE: Net("a")
    path = write_zip(tmp_path / "x.pt", data, {}, {"code/__torch__.py": b""})
    with pytest.raises(ModelFormatError, match="arguments"):
        read_torch_file(path)


def test_build_on_foreign_objects_is_refused(tmp_path):
    data = b"\x80\x02]}b."  # BUILD a list with a dict state
    path = write_zip(tmp_path / "x.pt", data, {})
    with pytest.raises(ModelFormatError, match="BUILD"):
        read_torch_file(path)


@pytest.mark.parametrize("layout", FORMATS)
def test_a_whole_pickled_module_is_refused_with_advice(tmp_path, layout):
    path = save(torch.nn.LSTM(2, 3), tmp_path / "m.pt", layout)
    with pytest.raises(ModelFormatError, match=r"torch.nn.modules.rnn.LSTM.*state_dict\(\)"):
        fastlstm.load(path, backend="numpy")


# ----------------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("layout", FORMATS)
def test_truncated_files_are_refused(tmp_path, layout):
    path = save({"w": torch.randn(64, 16)}, tmp_path / "t.pt", layout)
    data = open(path, "rb").read()
    for cut in (len(data) // 10, len(data) // 2, len(data) - 100, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            fastlstm.load(str(truncated), backend="numpy")


@pytest.mark.parametrize("leading", [b"", b"\x80", b"PK\x03\x04"])
def test_random_bytes_are_refused(tmp_path, leading):
    rng = np.random.default_rng(0)
    for n in range(20):
        path = tmp_path / f"r{n}.pt"
        path.write_bytes(leading + rng.bytes(int(rng.integers(1, 4000))))
        with pytest.raises(ModelFormatError):
            fastlstm.load(str(path), backend="numpy")


def test_a_plain_pickle_is_not_a_torch_file(tmp_path):
    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ModelFormatError, match="magic number"):
        read_torch_file(str(path))


def test_huge_sizes_claimed_by_a_file_are_refused_without_allocating(tmp_path):
    huge = 1 << 46
    state = OrderedDict(w=_Tensor(_Storage("0", huge), 0, (huge,), (1,)))
    legacy = write_legacy(tmp_path / "l.pt", _pickle(state, legacy=True), {"0": (huge, b"")})
    with pytest.raises(ModelFormatError, match="truncated"):
        read_torch_file(legacy)
    zipped = write_zip(tmp_path / "z.pt", _pickle(state), {"0": floats(1, 2)})
    with pytest.raises(ModelFormatError, match="data/0"):
        read_torch_file(zipped)
    # A memo index near 2**32: the C unpickler would size its memo from it.
    memo_bomb = b"\x80\x02K\x01r\xf0\xff\xff\xff."
    path = write_zip(tmp_path / "m.pt", memo_bomb, {})
    assert read_torch_file(path).root == 1


@pytest.mark.parametrize("opcode, length_format", [
    (pickle.BYTEARRAY8, "<Q"), (pickle.BINBYTES8, "<Q"), (pickle.BINUNICODE8, "<Q"), (pickle.BINBYTES, "<I"),
    (pickle.BINUNICODE, "<I"), (pickle.BINSTRING, "<i"), (pickle.LONG4, "<i"), (pickle.FRAME, "<Q"),
    (pickle.SHORT_BINBYTES, "<B"), (pickle.SHORT_BINUNICODE, "<B"), (pickle.SHORT_BINSTRING, "<B"),
    (pickle.LONG1, "<B")])
@pytest.mark.parametrize("layout", FORMATS)
def test_declared_lengths_beyond_the_pickle_are_refused_before_reading(tmp_path, opcode, length_format, layout):
    """A length-prefixed opcode may not declare more bytes than the pickle has left (BYTEARRAY8 used to
    allocate what it declared: an 800-byte file asked for 1.6 GB)."""
    length = {"<Q": 1 << 40, "<I": (1 << 32) - 1, "<i": (1 << 31) - 1, "<B": 200}[length_format]
    body = b"\x80\x05" + opcode + struct.pack(length_format, length) + b"abcd."
    if layout == "zip":
        path = write_zip(tmp_path / "z.pt", body, {})
    else:
        path = write_legacy(tmp_path / "l.pt", body, {})
    with pytest.raises(ModelFormatError, match=rf"declares {length} bytes; the pickle has \d+ left"):
        read_torch_file(path)


def test_payloads_within_the_pickle_still_read(tmp_path):
    data = pickle.dumps({"b": bytearray(b"xyz"), "s": "\u00e9t\u00e9", "n": 1 << 100, "u": b"q" * 300}, protocol=5)
    assert read_torch_file(write_zip(tmp_path / "p.pt", data, {})).root == {
        "b": bytearray(b"xyz"), "s": "\u00e9t\u00e9", "n": 1 << 100, "u": b"q" * 300}


@pytest.mark.parametrize("opcode", [pickle.EXT1 + b"\xf0", pickle.EXT2 + b"\xf0\x00",
                                    pickle.EXT4 + b"\xf0\x00\x00\x00"])
def test_extension_registry_opcodes_are_refused(tmp_path, opcode):
    """copyreg's extension registry is process state: a file may not reach a class through it."""
    import copyreg

    copyreg.add_extension("collections", "OrderedDict", 0xF0)
    try:
        path = write_zip(tmp_path / "e.pt", b"\x80\x02" + opcode + b")R.", {})
        with pytest.raises(ModelFormatError, match="extension-registry opcode"):
            read_torch_file(path)
    finally:
        copyreg.remove_extension("collections", "OrderedDict", 0xF0)


def test_a_small_compressed_pickle_cannot_build_a_huge_structure(tmp_path):
    """2 million empty lists (about 130 MB of objects) from a data.pkl of a few KB once deflated."""
    data = b"\x80\x02](" + b"]" * 2_000_000 + b"e."
    compressed = tmp_path / "bomb.pt"
    with zipfile.ZipFile(compressed, "w") as archive:
        archive.writestr("archive/data.pkl", data, compress_type=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(compressed) < 10_000
    with pytest.raises(ModelFormatError, match="builds more objects than a pickle of its size"):
        read_torch_file(str(compressed))
    # The budget grows with what the pickle occupies in the file: stored uncompressed, the same pickle reads.
    assert len(read_torch_file(write_zip(tmp_path / "stored.pt", data, {})).root) == 2_000_000


def test_sizes_strides_and_offsets_beyond_2_48_are_refused(tmp_path):
    """Their byte products would not fit int64 (NumPy raised OverflowError or ValueError)."""
    storage = {"0": floats(1, 2, 3, 4)}
    for size, stride, offset in [((1,), (1 << 70,), 0), ((0, 1 << 70), (1, 1), 0), ((1,), (1,), 1 << 60)]:
        state = OrderedDict(w=_Tensor(_Storage("0", 4), offset, size, stride))
        with pytest.raises(ModelFormatError, match=r"expected an integer in \[0, 2\*\*48\]"):
            fastlstm.load(write_zip(tmp_path / "s.pt", _pickle(state), storage), backend="numpy")
    empty = OrderedDict(w=_Tensor(_Storage("0", 4), 0, (0, 1 << 40, 1 << 40), (1, 1, 1)))
    with pytest.raises(ModelFormatError, match="an empty tensor whose other dimensions"):
        read_torch_file(write_zip(tmp_path / "e.pt", _pickle(empty), storage))


def test_deeply_nested_header_values_are_described_without_recursing(tmp_path):
    nested = b"\x80\x02" + b"]" * 3000 + b"a" * 2999 + b"."
    path = tmp_path / "n.pt"
    path.write_bytes(nested)  # a legacy file whose magic number is 3000 nested lists
    with pytest.raises(ModelFormatError, match=r"n.pt: not a torch.save file \(it starts with a pickle of \[\[\["):
        fastlstm.load(str(path), backend="numpy")
    with open(path, "wb") as f:
        pickle.dump(unpickler.LEGACY_MAGIC_NUMBER, f, protocol=2)
        f.write(nested)
    with pytest.raises(ModelFormatError, match=r"protocol version \[\[\["):
        fastlstm.load(str(path), backend="numpy")


@pytest.mark.parametrize("field", ["version needed", "compression method"])
def test_unsupported_zip_features_are_format_errors(tmp_path, field):
    """zipfile raises NotImplementedError for a zip version or compression method it does not know."""
    path = save({"w": torch.ones(3)}, tmp_path / "z.pt", "zip")
    data = bytearray(open(path, "rb").read())
    central = data.index(b"PK\x01\x02")  # the first central directory entry
    offset = central + (6 if field == "version needed" else 10)
    data[offset:offset + 2] = struct.pack("<H", 99)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="broken.pt"):
        read_torch_file(str(broken))


def test_views_outside_their_storage_are_refused(tmp_path):
    storage = {"0": floats(1, 2, 3, 4)}
    beyond = OrderedDict(w=_Tensor(_Storage("0", 4), 2, (3,), (1,)))
    with pytest.raises(ModelFormatError, match="beyond"):
        read_torch_file(write_zip(tmp_path / "a.pt", _pickle(beyond), storage))
    expanded = OrderedDict(w=_Tensor(_Storage("0", 4), 0, (1000, 1000), (0, 0)))
    with pytest.raises(ModelFormatError, match="expanded or overlapping"):
        read_torch_file(write_zip(tmp_path / "b.pt", _pickle(expanded), storage))
    negative = OrderedDict(w=_Tensor(_Storage("0", 4), 0, (2,), (-1,)))
    with pytest.raises(ModelFormatError, match="stride"):
        read_torch_file(write_zip(tmp_path / "c.pt", _pickle(negative), storage))


def test_storage_bookkeeping_must_match(tmp_path):
    state = OrderedDict(w=_Tensor(_Storage("0", 4), 0, (4,), (1,)))
    with pytest.raises(ModelFormatError, match="data/0 is missing"):
        read_torch_file(write_zip(tmp_path / "a.pt", _pickle(state), {}))
    with pytest.raises(ModelFormatError, match="expect"):
        read_torch_file(write_zip(tmp_path / "b.pt", _pickle(state), {"0": floats(1, 2, 3)}))
    legacy_state = _pickle(state, legacy=True)
    with pytest.raises(ModelFormatError, match="records 3 elements"):
        read_torch_file(write_legacy(tmp_path / "c.pt", legacy_state, {"0": (3, floats(1, 2, 3, 4))}))
    with pytest.raises(ModelFormatError, match="key list"):
        read_torch_file(write_legacy(tmp_path / "d.pt", legacy_state, {"0": (4, floats(1, 2, 3, 4))},
                                     keys=["0", "other"]))
    conflicting = OrderedDict(a=_Tensor(_Storage("0", 4), 0, (4,), (1,)),
                              b=_Tensor(_Storage("0", 2, torch.DoubleStorage), 0, (2,), (1,)))
    with pytest.raises(ModelFormatError, match="referenced as"):
        read_torch_file(write_zip(tmp_path / "e.pt", _pickle(conflicting), {"0": floats(1, 2, 3, 4)}))


def test_unsupported_storage_types_are_named(tmp_path):
    path = save({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.pt", "zip")
    with pytest.raises(ModelFormatError, match="ComplexFloatStorage"):
        read_torch_file(path)


def test_deeply_nested_pickles_are_refused(tmp_path):
    data = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."  # 5000 nested lists
    path = write_zip(tmp_path / "deep.pt", data, {})
    with pytest.raises(ModelFormatError, match="nested"):
        read_torch_file(path)


def test_the_reader_does_not_import_torch(tmp_path):
    """Reading a file needs NumPy only: run the reader in a fresh interpreter where torch cannot be imported."""
    import subprocess

    lstm = torch.nn.LSTM(2, 3)
    path = save(lstm.state_dict(), tmp_path / "s.pt", "zip")
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import fastlstm\n"
        f"model = fastlstm.load({path!r}, backend='numpy')\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(model.input_size)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
