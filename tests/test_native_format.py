"""Model.save / fastlstm.load round trip, and the native reader's refusal of malformed files."""

from __future__ import annotations

import dataclasses
import io
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
        (lambda m: m.update(version=99), "this fastlstm reads versions \\(1, 2, 3\\)"),
        (lambda m: m["layers"][0].update(hidden_size="5"), r"layers\[0\].hidden_size: expected int"),
        (lambda m: m["layers"][0]["cells"][0].update(w_ih="nowhere"), "which the file does not contain"),
        (lambda m: m["layers"][0].update(gate_activation=["swish", 0, 0]), "known name"),
        (lambda m: m["layers"][0].update(hidden_size=6), r"has shape \(20, 3\); the manifest's sizes need \(24, 3\)"),
        (lambda m: m["layers"][0].update(dropout=0.5), r"layers\[0\]: unknown field\(s\) \['dropout'\]"),
        (lambda m: m.update(head_input_activation=["relu", float("nan"), 0]), "parameters must be finite"),
        (lambda m: m["layers"][0].update(hidden_size=0), r"hidden_size: expected an integer >= 1"),
        (lambda m: m.update(source=["not", "text"]), r"model.source: expected str"),
        (lambda m: m["layers"][0]["cells"].extend(m["layers"][0]["cells"]), r"expected one or two cells"),
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
    with pytest.raises(ModelFormatError, match="dtype object"):
        fastlstm.load(bad)


def as_version_2(manifest):
    """A manifest rewritten as version 2 wrote it: without the fields version 3 added."""
    manifest["version"] = 2
    for layer in manifest["layers"]:
        for cell in layer["cells"]:
            del cell["w_ih_scale"], cell["w_hh_scale"]


def as_version_1(manifest):
    """A manifest of an LSTM stack rewritten as version 1 wrote it: without the fields 2 and 3 added."""
    as_version_2(manifest)
    manifest["version"] = 1
    for key in ("head_input_activation", "embedding"):
        del manifest[key]
    for layer in manifest["layers"]:
        del layer["kind"], layer["linear_before_reset"]
        for cell in layer["cells"]:
            del cell["candidate_bias"]


def test_version_1_file_still_loads(saved, tmp_path):
    model, path = saved
    old = tmp_path / "v1.fastlstm"
    rewrite_manifest(path, old, as_version_1)
    x = np.random.default_rng(2).normal(size=(1, 4, 3))
    np.testing.assert_array_equal(fastlstm.load(old, backend="numpy", dtype="float64").predict(x), model.predict(x))


def test_head_input_activation_round_trips(tmp_path):
    spec = random_spec(np.random.default_rng(3), input_size=3, hidden_size=5, head=[(2, "identity")])
    spec = dataclasses.replace(spec, head_input_activation=Activation.of("elu", 0.7))
    path = tmp_path / "act.fastlstm"
    fastlstm.Model(spec, backend="numpy").save(path)
    loaded = fastlstm.load(path, backend="numpy")
    assert loaded.spec.head_input_activation == Activation("elu", 0.7, 0.0)


def _with_member(path, dst, name: str, data: bytes, compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members[name] = data
    with zipfile.ZipFile(dst, "w") as archive:
        for n, payload in members.items():
            archive.writestr(n, payload, compress_type=compression if n == name else zipfile.ZIP_STORED)


def test_array_header_is_checked_before_anything_is_allocated(saved, tmp_path):
    """A .npy header declaring 10**12 floats in a member of a few bytes is refused from the header alone."""
    _, path = saved
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    bad = tmp_path / "huge.fastlstm"
    _with_member(path, bad, "head/0/weight.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(ModelFormatError, match="head/0/weight"):
        fastlstm.load(bad)


def test_deflate_bomb_is_refused_before_inflating(tmp_path):
    """Arrays that deflate to far more than the file (here 256 MiB of zeros in about 256 KiB) are refused."""
    H, I = 4096, 4096
    manifest = {"format": "fastlstm", "version": 2, "output": "sequence", "mask_value": None, "source": "",
                "head": [], "head_input_activation": ["identity", 0.0, 0.0],
                "layers": [{"input_size": I, "hidden_size": H, "proj_size": 0, "direction": "forward",
                            "gate_activation": ["sigmoid", 0, 0], "cell_activation": ["tanh", 0, 0],
                            "output_activation": ["tanh", 0, 0], "clip": None, "input_forget": False,
                            "cells": [{"w_ih": "w_ih", "w_hh": "w_hh", "bias": "bias", "w_hr": None,
                                       "peephole": None}]}]}
    bad = tmp_path / "bomb.fastlstm"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("fastlstm.json", json.dumps(manifest))
        for name, shape in (("w_ih", (4 * H, I)), ("w_hh", (4 * H, H)), ("bias", (4 * H,))):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            payload = header.getvalue() + bytes(4 * int(np.prod(shape)))
            archive.writestr(name + ".npy", payload, compress_type=zipfile.ZIP_DEFLATED)
    assert bad.stat().st_size < 1 << 20
    with pytest.raises(ModelFormatError, match="more bytes than a 16x inflation"):
        fastlstm.load(bad)


def test_unsupported_compression_is_a_format_error(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bzip.fastlstm"
    with zipfile.ZipFile(path) as archive:
        member = archive.read("layers/0/cells/0/w_ih.npy")
    _with_member(path, bad, "layers/0/cells/0/w_ih.npy", member, compression=zipfile.ZIP_BZIP2)
    with pytest.raises(ModelFormatError, match="compression method"):
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


def test_a_zip_of_an_unsupported_version_is_a_format_error(saved, tmp_path):
    """zipfile raises NotImplementedError for a member that needs a newer zip version: still a ModelFormatError."""
    _, path = saved
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")  # the first central-directory entry: 'version needed' at offset 6
    raw[central + 6:central + 8] = (99).to_bytes(2, "little")
    bad = tmp_path / "version.fastlstm"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="cannot be opened: zip file version"):
        fastlstm.load(bad)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["layers"][0].update(cell_activation=[{"a": 1}, 0, 0]), "known name"),
    (lambda m: m["layers"][0].update(clip=10**400), r"clip: the number .* is too large"),
    (lambda m: m["layers"][0].update(gate_activation=["sigmoid", 10**400, 0]), r"gate_activation\[1\]: the number"),
    (lambda m: m.update(mask_value=-10**400), r"mask_value: the number"),
])
def test_json_values_no_python_type_can_hold_are_format_errors(saved, tmp_path, change, message):
    """Found by the fuzzer: a dict as an activation name (unhashable) and integers beyond float's range."""
    _, path = saved
    bad = tmp_path / "values.fastlstm"
    rewrite_manifest(path, bad, change)
    with pytest.raises(ModelFormatError, match=message):
        fastlstm.load(bad)


@pytest.mark.parametrize("kinds, sizes, options", [
    (["gru"], [5], {"linear_before_reset": False}),
    (["gru", "rnn", "lstm"], [6, 4, 3], {"directions": ["bidirectional", "forward", "reverse"]}),
    (["lstm", "gru"], [6, 4], {"vocab_size": 9, "mask_value": 0.0, "head": [(2, "softmax")]}),
])
def test_every_kind_size_and_embedding_round_trips(tmp_path, kinds, sizes, options):
    """A GRU (both variants, with its candidate bias), a simple RNN, stacks of mixed sizes and an embedding
    all survive save and load, computing exactly what they did."""
    from random_models import random_stack

    spec = random_stack(np.random.default_rng(5), kinds, sizes, input_size=3, **options)
    model = fastlstm.Model(spec, backend="numpy", dtype="float64")
    path = tmp_path / "kinds.fastlstm"
    model.save(path)
    loaded = fastlstm.load(path, backend="numpy", dtype="float64")
    assert [l.kind for l in loaded.spec.layers] == kinds
    x = (np.random.default_rng(6).integers(1, 9, (2, 5)) if spec.embedding is not None
         else np.random.default_rng(6).normal(size=(2, 5, 3)))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert loaded.spec.mask_value == spec.mask_value


def test_a_version_1_file_cannot_hold_the_fields_version_2_added(saved, tmp_path):
    _, path = saved

    def as_version_1_with_kind(manifest):
        as_version_1(manifest)
        manifest["layers"][0]["kind"] = "gru"

    bad = tmp_path / "v1kind.fastlstm"
    rewrite_manifest(path, bad, as_version_1_with_kind)
    with pytest.raises(ModelFormatError, match=r"unknown field\(s\) \['kind'\]"):
        fastlstm.load(bad)
