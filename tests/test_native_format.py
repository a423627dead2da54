"""Model.save / fastlstm.load round trip, and the native reader's refusal of malformed files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlstm
from fastlstm import ModelFormatError
from fastlstm.activations import Activation
from random_models import random_spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    spec = random_spec(rng, input_size=3, hidden_size=5, num_layers=2, direction="bidirectional", proj_size=2,
                       peepholes=True, clip=2.5, input_forget=True,
                       activations=(Activation.of("hard_sigmoid", 1 / 6, 0.5), Activation.of("tanh"),
                                    Activation.of("softsign")),
                       head=[(4, "relu"), (2, "softmax")], output="last_step", mask_value=-1.0)
    path = tmp_path_factory.mktemp("native") / "model.fastlstm"
    model = fastlstm.Model(spec, backend="numpy", dtype="float64")
    model.save(path)
    return model, path


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded = fastlstm.load(path, backend="numpy", dtype="float64")
    x = np.random.default_rng(1).normal(size=(2, 6, 3))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.spec.output == "last_step" and loaded.spec.mask_value == -1.0
    assert loaded.spec.layers[0].gate_activation == Activation("hard_sigmoid", 1 / 6, 0.5)
    assert loaded.spec.layers[1].clip == 2.5 and loaded.spec.layers[1].input_forget


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastlstm.load(tmp_path / "absent.fastlstm")


def test_directory_and_unknown_bytes(tmp_path):
    with pytest.raises(ModelFormatError, match="directory"):
        fastlstm.load(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(ModelFormatError, match="not a model file fastlstm recognises"):
        fastlstm.load(junk)


def rewrite_manifest(src, dst, change):
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["fastlstm.json"])
    change(manifest)
    members["fastlstm.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(version=99), "this fastlstm reads version 1"),
        (lambda m: m["layers"][0].update(hidden_size="5"), r"layers\[0\].hidden_size: expected int"),
        (lambda m: m["layers"][0]["cells"][0].update(w_ih="nowhere"), "which the file does not contain"),
        (lambda m: m["layers"][0].update(gate_activation=["swish", 0, 0]), "known name"),
        (lambda m: m["layers"][0].update(hidden_size=6), r"expected shape \(24, 3\), got \(20, 3\)"),
        (lambda m: m.pop("layers"), "missing field 'layers'"),
    ],
)
def test_malformed_manifest_is_refused(saved, tmp_path, change, message):
    _, path = saved
    bad = tmp_path / "bad.fastlstm"
    rewrite_manifest(path, bad, change)
    with pytest.raises(ModelFormatError, match=message):
        fastlstm.load(bad)


def test_pickled_array_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "pickled.fastlstm"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
    members["layers/0/cells/0/w_ih.npy"] = buffer.getvalue()
    with zipfile.ZipFile(bad, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFormatError, match="unreadable"):
        fastlstm.load(bad)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_corrupted_files_raise_format_error(saved, tmp_path_factory, data):
    _, path = saved
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            position = data.draw(st.integers(0, len(raw) - 1), label="position")
            raw[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    bad = tmp_path_factory.mktemp("corrupt") / "bad.fastlstm"
    bad.write_bytes(bytes(raw))
    try:
        fastlstm.load(bad, backend="numpy")
    except ModelFormatError:
        pass  # the expected outcome for almost every corruption
    # A flip that leaves a valid file (e.g. inside a weight's mantissa) may load: that is fine.
