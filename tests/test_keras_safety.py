"""Keras files cannot run code, read other files, hang or exhaust memory: each hostile file is built here.

Every test builds a small real model with Keras, then damages or rewrites its file with h5py (or rewrites its
config), and checks that loading it is refused with a ``FastLSTMError`` naming what was wrong, quickly, and
without side effects. The HDF5 child costs about a quarter of a second per load.
"""

from __future__ import annotations

import io
import json
import os
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm.errors import FastLSTMError, InvalidModelError, ModelFormatError, UnsupportedModelError
from fastlstm.importers import _keras_files, _keras_graph, _keras_hdf5, _keras_hdf5_child
from fastlstm.importers import keras as keras_importer

from keras_helpers import KERAS_WARNINGS, h5py, keras  # noqa: E402  (skips the module without them)

pytestmark = KERAS_WARNINGS

L = keras.layers
STEPS, FEATURES, UNITS = 5, 3, 4
KERNEL_H5 = "/model_weights/lstm/safe/lstm/lstm_cell/kernel"  # in the legacy file of the saved model
KERNEL_KERAS = "/layers/lstm/cell/vars/0"  # in model.weights.h5 of the .keras archive


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small model saved in both formats: {"model", "x", "expected", "h5", "keras", "directory"}."""
    directory = tmp_path_factory.mktemp("safety")
    model = keras.Sequential([keras.Input((STEPS, FEATURES)), L.LSTM(UNITS, return_sequences=True, name="lstm"),
                              L.Dense(2, name="dense")], name="safe")
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    files = {}
    for fmt in ("h5", "keras"):
        files[fmt] = str(directory / f"model.{fmt}")
        model.save(files[fmt])
    with h5py.File(files["h5"], "r") as h5file:
        assert KERNEL_H5 in h5file
    x = rng.normal(size=(2, STEPS, FEATURES)).astype(np.float32)
    return dict(files, model=model, x=x, expected=keras.ops.convert_to_numpy(model(x)), directory=directory)


def copy_of(saved, fmt: str, tmp_path) -> str:
    path = str(tmp_path / f"copy.{fmt}")
    with open(saved[fmt], "rb") as source, open(path, "wb") as target:
        target.write(source.read())
    return path


def rewrite_keras_weights(path: str, edit) -> None:
    """Apply ``edit(h5file)`` to the ``model.weights.h5`` inside the ``.keras`` archive at ``path``."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    image = io.BytesIO(members["model.weights.h5"])
    with h5py.File(image, "r+") as h5file:
        edit(h5file)
    members["model.weights.h5"] = image.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def rewrite_keras_config(path: str, edit) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def replace_dataset(h5file, path: str, **create) -> None:
    shape, dtype = h5file[path].shape, h5file[path].dtype
    del h5file[path]
    if "link" in create:
        h5file[path] = create["link"]
    elif "layout" in create:
        h5file.create_virtual_dataset(path, create["layout"])
    else:
        h5file.create_dataset(path, shape=shape, dtype=dtype, **create)


def load(path):
    return fastlstm.load(path, backend="numpy")


# ----------------------------------------------------------------------------------------- A: no code runs
HOSTILE_MODULES = ("json", "numpy", "h5py", "sitecustomize", "usercustomize", "runpy", "io", "zlib", "mmap")


def test_modules_beside_the_model_or_in_the_working_directory_never_run(saved, tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for module in HOSTILE_MODULES:
        (hostile / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r} + '\\n')\n")
    for fmt in ("h5", "keras"):
        path = str(hostile / f"model.{fmt}")
        with open(saved[fmt], "rb") as source, open(path, "wb") as target:
            target.write(source.read())
    monkeypatch.chdir(hostile)
    monkeypatch.setenv("PYTHONPATH", str(hostile))
    monkeypatch.setenv("PYTHONSTARTUP", str(hostile / "json.py"))
    for fmt in ("h5", "keras"):
        for path in (f"model.{fmt}", str(hostile / f"model.{fmt}")):
            model = load(path)
            np.testing.assert_allclose(model.predict(saved["x"]), saved["expected"], rtol=0, atol=1e-5)
    assert not marker.exists(), f"code from the model's directory ran: {marker.read_text()}"


def test_hdf5_plugin_and_driver_variables_do_not_reach_the_child(saved, monkeypatch):
    monkeypatch.setenv("HDF5_DRIVER", "family")  # would make the library open other files
    monkeypatch.setenv("HDF5_PLUGIN_PATH", "/nonexistent")
    np.testing.assert_allclose(load(saved["h5"]).predict(saved["x"]), saved["expected"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- B: no other file read
@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(np.arange(FEATURES * 4 * UNITS, dtype="<f4").tobytes())
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5file:
        h5file["kernel"] = np.ones((FEATURES, 4 * UNITS), "<f4")
    return str(path), str(other)


def outside_references(secret_file, other_file):
    """Ways a dataset can take its values from outside the file (each a replace_dataset keyword)."""
    layout = h5py.VirtualLayout(shape=(FEATURES, 4 * UNITS), dtype="<f4")
    layout[:] = h5py.VirtualSource(other_file, "kernel", shape=(FEATURES, 4 * UNITS))
    return {
        "external storage": ({"external": [(secret_file, 0, FEATURES * 4 * UNITS * 4)]}, "external file"),
        "external storage in /proc": ({"external": [("/proc/self/environ", 0, FEATURES * 4 * UNITS * 4)]},
                                      "external file"),
        "virtual dataset": ({"layout": layout}, "virtual dataset"),
        "external link": ({"link": h5py.ExternalLink(other_file, "/kernel")}, "link to another file"),
        "fletcher32 filter": ({"fletcher32": True, "chunks": True}, "fletcher32"),
        "lzf filter": ({"compression": "lzf", "chunks": True}, "lzf"),
    }


CASES = ["external storage", "external storage in /proc", "virtual dataset", "external link",
         "fletcher32 filter", "lzf filter"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_a_kernel_that_points_outside_the_file_is_refused(saved, secret, tmp_path, fmt, case):
    create, reason = outside_references(*secret)[case]
    path = copy_of(saved, fmt, tmp_path)
    dataset = KERNEL_H5 if fmt == "h5" else KERNEL_KERAS
    if fmt == "h5":
        with h5py.File(path, "r+") as h5file:
            replace_dataset(h5file, dataset, **create)
    else:
        rewrite_keras_weights(path, lambda h5file: replace_dataset(h5file, dataset, **create))
    with pytest.raises(ModelFormatError, match=reason) as info:
        load(path)
    assert dataset in str(info.value) or dataset.rsplit("/", 1)[0] in str(info.value)


def test_an_unused_dataset_pointing_outside_is_refused_too(saved, secret, tmp_path):
    path = copy_of(saved, "h5", tmp_path)
    with h5py.File(path, "r+") as h5file:
        h5file.create_dataset("/unused", shape=(4,), dtype="<f4", external=[(secret[0], 0, 16)])
    with pytest.raises(ModelFormatError, match="/unused stores its values in 1 external file"):
        load(path)


def test_compressed_weights_load(saved, tmp_path):
    """h5repack-style deflate + shuffle, decoded by the child chunk by chunk, gives Keras' output."""
    path = copy_of(saved, "h5", tmp_path)
    with h5py.File(path, "r+") as h5file:
        datasets = []
        h5file.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in datasets:
            values = h5file[name][()]
            if values.dtype.kind == "f" and values.ndim:
                del h5file[name]
                h5file.create_dataset(name, data=values, compression="gzip", shuffle=True,
                                      chunks=tuple(max(1, n // 2) for n in values.shape))
    assert h5py.File(path, "r")[KERNEL_H5].compression == "gzip"
    np.testing.assert_allclose(load(path).predict(saved["x"]), saved["expected"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- C: no hangs
def nested_global_heaps(size: int) -> bytes:
    """An HDF5-looking image full of global heap collections, each nested in the one before: a scan that
    walks each collection to its end looks at every byte once per collection."""
    superblock = bytearray(b"\x89HDF\r\n\x1a\n" + bytes(24))
    superblock[14] = 8  # version 0 superblock, 8-byte lengths
    units = (size - len(superblock)) // 32
    image = bytearray(superblock)
    for n in range(units):
        image += (1).to_bytes(2, "little") + bytes(6) + (16).to_bytes(8, "little")  # an object of 16 bytes ...
        image += b"GCOL\x01\x00\x00\x00" + ((units - n) * 32 - 16).to_bytes(8, "little")  # ... opening a collection
    return bytes(image)


def test_global_heap_scan_is_linear():
    image = nested_global_heaps(256 << 10)
    start = time.perf_counter()
    _keras_hdf5_child.refuse_endless_global_heap(image)
    assert time.perf_counter() - start < 1.0


def test_the_caller_only_sniffs_and_hands_off(tmp_path):
    path = tmp_path / "heaps.h5"
    path.write_bytes(nested_global_heaps(256 << 10))
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match="heaps.h5"):
        load(str(path))
    assert time.perf_counter() - start < 5.0


def chain_config(layers: int) -> dict:
    """A Keras 3 functional config: Input -> LSTM -> ``layers`` linear Activation layers -> output."""
    def tensor(name):
        return {"class_name": "__keras_tensor__", "config": {"shape": [None, STEPS, UNITS], "dtype": "float32",
                                                              "keras_history": [name, 0, 0]}}
    entries = [{"class_name": "InputLayer", "name": "input", "inbound_nodes": [],
                "config": {"name": "input", "batch_shape": [None, STEPS, FEATURES], "dtype": "float32"}},
               {"class_name": "LSTM", "name": "lstm", "inbound_nodes": [{"args": [tensor("input")], "kwargs": {}}],
                "config": {"name": "lstm", "units": UNITS, "return_sequences": True}}]
    previous = "lstm"
    for n in range(layers):
        entries.append({"class_name": "Activation", "name": f"a{n}",
                        "config": {"name": f"a{n}", "activation": "linear"},
                        "inbound_nodes": [{"args": [tensor(previous)], "kwargs": {}}]})
        previous = f"a{n}"
    return {"class_name": "Functional", "config": {"name": "chain", "layers": entries,
                                                   "input_layers": ["input", 0, 0], "output_layers": [previous, 0, 0]}}


def lstm_weights(layer):
    rng = np.random.default_rng(0)
    return [rng.normal(size=shape).astype(np.float32)
            for shape in ((FEATURES, 4 * UNITS), (UNITS, 4 * UNITS), (4 * UNITS,))] if layer.name == "lstm" else []


def translate(config, weights_of=lstm_weights, keras_version="3.5.0"):
    return keras_importer.spec_from_keras_config(config, weights_of, keras_version=keras_version, source="test")


def test_a_long_layer_chain_is_walked_in_linear_time():
    start = time.perf_counter()
    spec = translate(chain_config(_keras_graph.MAX_LAYERS - 2))
    assert time.perf_counter() - start < 3.0
    assert len(spec.layers) == 1 and spec.head == ()


def test_mask_operations_are_matched_in_linear_time():
    """Keras 3's mask operations (not_equal, any) are matched to the Masking layers they serve without
    comparing every pair: a config of a thousand of each on one input is refused at once."""
    def tensor(name):
        return {"class_name": "__keras_tensor__", "config": {"keras_history": [name, 0, 0]}}
    operation = {"module": "keras.src.ops.numpy", "registered_name": None}
    count = (_keras_graph.MAX_LAYERS - 1) // 3
    entries = [{"class_name": "InputLayer", "name": "input", "inbound_nodes": [], "config": {"name": "input"}}]
    for n in range(count):
        entries += [
            {"class_name": "Masking", "name": f"m{n}", "config": {"name": f"m{n}", "mask_value": 0.0},
             "inbound_nodes": [{"args": [tensor("input")], "kwargs": {}}]},
            {**operation, "class_name": "NotEqual", "name": f"ne{n}", "config": {"name": f"ne{n}"},
             "inbound_nodes": [{"args": [tensor("input"), 0.0], "kwargs": {}}]},
            {**operation, "class_name": "Any", "name": f"any{n}", "config": {"name": f"any{n}", "axis": -1},
             "inbound_nodes": [{"args": [tensor(f"ne{n}")], "kwargs": {}}]}]
    config = {"class_name": "Functional", "config": {"name": "masks", "layers": entries,
                                                     "input_layers": ["input", 0, 0], "output_layers": ["m0", 0, 0]}}
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match="do not form a single chain") as refused:
        translate(config)
    assert "NotEqual" not in str(refused.value) and "Any" not in str(refused.value)  # each matched to its layer
    assert time.perf_counter() - start < 3.0


def test_too_many_layers_are_refused_naming_the_limit():
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match=f"40002 layers; fastlstm reads models of at most "
                                                    f"{_keras_graph.MAX_LAYERS}"):
        translate(chain_config(40_000))
    assert time.perf_counter() - start < 5.0


def test_config_size_and_depth_limits(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(_keras_files, "MAX_CONFIG_BYTES", 1 << 20)  # the same check, with less to write
    path = copy_of(saved, "keras", tmp_path)
    rewrite_keras_config(path, lambda config: config["config"].update(padding="x" * (1 << 20)))
    with pytest.raises(ModelFormatError, match="config.json declares .* bytes, more than a model config needs"):
        load(path)
    deep = "[" * 5000 + "]" * 5000
    for text in (deep, '{"a": ' * 101 + "1" + "}" * 101):
        with pytest.raises(ModelFormatError, match=f"levels deep; the limit for a model config is "
                                                   f"{_keras_files.MAX_CONFIG_DEPTH}"):
            _keras_files.parse_config_json(text, "test", "config.json")
    assert _keras_files.parse_config_json('{"a": "[[[[{{{{"}', "test", "config.json") == {"a": "[[[[{{{{"}
    # h5py hands undecodable bytes of a text attribute over as lone surrogates
    assert _keras_files.parse_config_json('{"a": "\udca2"}', "test", "model_config") == {"a": "\udca2"}
    start = time.perf_counter()  # a string opened at every other byte and never closed: scanned once
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        _keras_files.parse_config_json('"\\' * 400_000, "test", "config.json")
    assert time.perf_counter() - start < 1.0


# ----------------------------------------------------------------------------------------- D: no memory blow-up
def test_huge_units_with_tiny_weights_is_refused_before_allocating(saved, tmp_path):
    model = keras.Sequential([keras.Input((STEPS, FEATURES)), L.Bidirectional(L.LSTM(UNITS), merge_mode="ave")])
    path = str(tmp_path / "ave.keras")
    model.save(path)

    def declare_huge_units(config):
        config["config"]["layers"][1]["config"]["layer"]["config"]["units"] = 6000
        config["config"]["layers"][1]["config"]["backward_layer"]["config"]["units"] = 6000
    rewrite_keras_config(path, declare_huge_units)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelError, match=r"expected \(3, 24000\)"):
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def test_identity_layers_are_bounded_by_the_weights():
    """Each activation layer that follows no linear dense layer becomes an identity dense layer: a config of
    a few KB must not make the importer allocate more than the model's weights."""
    config = chain_config(0)
    entries = config["config"]["layers"]
    for n in range(60):
        entries.append(dict(chain_config(1)["config"]["layers"][2], name=f"act{n}"))
        entries[-1]["config"] = {"name": f"act{n}", "activation": ("relu", "tanh")[n % 2]}
        entries[-1]["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0] = entries[-2]["name"]
    config["config"]["output_layers"] = ["act59", 0, 0]

    def wide_weights(layer):
        return [np.zeros((FEATURES, 4 * 256), np.float32), np.zeros((256, 4 * 256), np.float32),
                np.zeros(4 * 256, np.float32)] if layer.name == "lstm" else []
    for entry in entries:
        if entry["name"] == "lstm":
            entry["config"]["units"] = 256
    with pytest.raises(UnsupportedModelError, match="more identity-matrix values than the model has weights"):
        translate(config, wide_weights)
    config["config"]["layers"] = entries[:6]
    config["config"]["output_layers"] = ["act3", 0, 0]
    assert len(translate(config, wide_weights).head) == 4


def test_an_unused_compressed_dataset_is_never_inflated(saved, tmp_path, monkeypatch):
    """512 MB of zeros compressed to a few KB, in a dataset the model does not use."""
    path = copy_of(saved, "h5", tmp_path)
    chunk = zlib.compress(bytes(4 << 20), 9)
    with h5py.File(path, "r+") as h5file:
        junk = h5file.create_dataset("/junk", shape=(128, 1 << 20), chunks=(1, 1 << 20), dtype="<f4",
                                     compression="gzip")
        for row in range(128):
            junk.id.write_direct_chunk((row, 0), chunk)
    monkeypatch.setattr(_keras_hdf5, "BASE_MEMORY_LIMIT", 400 << 20)  # less than the junk inflates to
    np.testing.assert_allclose(load(path).predict(saved["x"]), saved["expected"], rtol=0, atol=1e-5)


def test_a_chunk_that_inflates_past_its_size_is_refused(saved, tmp_path):
    path = copy_of(saved, "h5", tmp_path)
    with h5py.File(path, "r+") as h5file:
        replace_dataset(h5file, KERNEL_H5, chunks=(FEATURES, 4 * UNITS), compression="gzip")
        h5file[KERNEL_H5].id.write_direct_chunk((0, 0), zlib.compress(bytes(16 << 20)))
    with pytest.raises(ModelFormatError, match=f"{KERNEL_H5}: a chunk inflates to more than its declared 192 bytes"):
        load(path)


def test_the_child_has_a_memory_limit(saved, monkeypatch):
    monkeypatch.setattr(_keras_hdf5, "BASE_MEMORY_LIMIT", 16 << 20)  # too little to import h5py
    with pytest.raises(ModelFormatError, match="MemoryError|failed|crashed"):
        load(saved["h5"])


# ----------------------------------------------------------------------------------------- E: errors
@pytest.mark.parametrize("version", ["v3.1", "².1", "", "3 .1", "1" * 40, 3])
def test_odd_keras_versions_are_named(saved, tmp_path, version):
    path = copy_of(saved, "keras", tmp_path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    metadata = json.loads(members["metadata.json"])
    metadata["keras_version"] = version
    members["metadata.json"] = json.dumps(metadata).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFormatError, match="keras_version"):
        load(path)


JUNK = [None, -1, 0, 10 ** 400, "x", "", [], {}, True, 1.5, float("nan"), [None], {"class_name": "LSTM"},
        {"config": {}}, ["a", 0, 0], [["a", 0, 0]], {"module": "keras", "config": 5}, "[" * 500]


def config_paths(value, path=()):
    """Every place in a JSON value, as a path of keys and indices."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from config_paths(item, path + (key,))


def functional_with_masks():
    """Token ids through an Embedding (mask_zero), then each recurrent kind: Keras 3 writes the mask as an
    operation of the config."""
    ids = keras.Input((STEPS,), dtype="int32")
    sequence = L.Embedding(7, FEATURES, mask_zero=True)(ids)
    sequence = L.Bidirectional(L.GRU(UNITS, return_sequences=True, reset_after=False), merge_mode="sum")(sequence)
    sequence = L.RNN([L.SimpleRNNCell(UNITS), L.GRUCell(2)], return_sequences=True)(sequence)
    return keras.Model(ids, L.Dense(3, activation="softmax")(L.SimpleRNN(3)(sequence)))


RICH_MODELS = {
    "sequential": lambda: keras.Sequential([
        keras.Input((STEPS, FEATURES)), L.Masking(), L.Bidirectional(L.LSTM(UNITS, return_sequences=True),
                                                                     merge_mode="ave"),
        L.RNN([L.LSTMCell(UNITS), L.LSTMCell(UNITS)], return_sequences=True), L.TimeDistributed(L.Dense(3)),
        L.Activation("relu"), L.Softmax()]),
    "functional_with_masks": functional_with_masks,
}


@pytest.fixture(scope="module", params=list(RICH_MODELS))
def rich_model(request):
    model = RICH_MODELS[request.param]()
    config = {"class_name": type(model).__name__, "config": json.loads(json.dumps(model.get_config()))}
    weights = {layer.name: layer.get_weights() for layer in model.layers}
    translate(config, lambda layer: weights.get(layer.name, []))  # the undamaged config loads
    return config, weights


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_any_damaged_config_raises_a_fastlstm_error(rich_model, data):
    """Whatever value replaces whatever part of a config, the importer answers or raises a FastLSTMError."""
    config, weights = rich_model
    config = json.loads(json.dumps(config))
    paths = [path for path in config_paths(config) if path]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        *parents, last = data.draw(st.sampled_from(paths), label="path")
        target = config
        try:
            for key in parents:
                target = target[key]
            target[last] = data.draw(st.sampled_from(JUNK), label="value")
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this place
    try:
        translate(config, lambda layer: weights.get(layer.name, []),
                  keras_version=data.draw(st.sampled_from(["3.5.0", "2.4.0", None]), label="version"))
    except FastLSTMError:
        pass


def test_keras_1_files_are_refused_by_version(saved, tmp_path):
    path = copy_of(saved, "h5", tmp_path)
    with h5py.File(path, "r+") as h5file:
        h5file.attrs["keras_version"] = "1.2.2"
    with pytest.raises(UnsupportedModelError, match="written by Keras 1.2.2"):
        load(path)
