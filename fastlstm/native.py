"""fastlstm's native file: a zip holding ``fastlstm.json`` (the model description) and one ``.npy`` per array.

Readable with the standard library and NumPy only; arrays are read with ``allow_pickle=False``, so a file
can hold nothing but plain numbers and JSON. Every field is checked against the schema (an unknown field is
refused, never skipped) and the result goes through ``ModelSpec.validate``.

Nothing is allocated on the file's word alone: each array's ``.npy`` header is read first and its shape
checked against the sizes the manifest declares, its byte count against the zip member's, and the bytes all
arrays declare against the file's size on disk (members are stored, or deflated by at most
``MAX_INFLATION``), so a small file cannot make the reader allocate much more than its own size.
"""

from __future__ import annotations

import io
import json
import os
import reprlib
import zipfile

import numpy as np

from .activations import ACTIVATION_PARAMS, Activation
from .errors import ModelFormatError
from .spec import GATE_COUNTS, CellWeights, DenseLayer, ModelSpec, RecurrentLayer

MANIFEST = "fastlstm.json"
FORMAT_NAME = "fastlstm"
# Version 2 added ``head_input_activation``, each layer's ``kind`` and ``linear_before_reset``, each GRU cell's
# ``candidate_bias`` and the ``embedding`` table; version 3 each cell's ``w_ih_scale`` and ``w_hh_scale`` (the
# per-row scales of weights imported from an 8-bit model). Files of earlier versions (none of the fields a
# later version added) still load.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_CELL_ARRAYS = ("w_ih", "w_hh", "bias", "w_hr", "peephole", "candidate_bias", "w_ih_scale", "w_hh_scale")
_MAX_MANIFEST_BYTES = 1 << 20
# How much larger than the whole file on disk its arrays may be once inflated. fastlstm writes arrays
# stored (1x); weights deflate by less than 2x, so only a crafted file comes near this.
MAX_INFLATION = 16
# The fields version 2 added; a version 1 file has none of them.
_VERSION_2_KEYS = {"head_input_activation", "embedding", "kind", "linear_before_reset", "candidate_bias"}
_VERSION_3_KEYS = {"w_ih_scale", "w_hh_scale"}
# The fields each readable version does not know.
_LATER_KEYS = {1: _VERSION_2_KEYS | _VERSION_3_KEYS, 2: _VERSION_3_KEYS, 3: set()}
_MODEL_KEYS = {"format", "version", "output", "mask_value", "source", "layers", "head", "head_input_activation",
               "embedding"}
_LAYER_KEYS = {"input_size", "hidden_size", "proj_size", "direction", "gate_activation", "cell_activation",
               "output_activation", "clip", "input_forget", "cells", "kind", "linear_before_reset"}
_DENSE_KEYS = {"weight", "bias", "activation"}


def is_native_zip(archive: zipfile.ZipFile) -> bool:
    return MANIFEST in archive.namelist()


def save_native(spec: ModelSpec, path) -> None:
    """Write ``spec`` to ``path`` (the extension is the caller's choice; ``.fastlstm`` by convention), or to a
    writable binary file object."""
    arrays: dict[str, np.ndarray] = {}

    def ref(key: str, array: np.ndarray | None) -> str | None:
        if array is None:
            return None
        arrays[key] = np.ascontiguousarray(array)
        return key

    layers = []
    for n, layer in enumerate(spec.layers):
        layers.append({
            "input_size": layer.input_size,
            "hidden_size": layer.hidden_size,
            "proj_size": layer.proj_size,
            "direction": layer.direction,
            "gate_activation": _activation_to_json(layer.gate_activation),
            "cell_activation": _activation_to_json(layer.cell_activation),
            "output_activation": _activation_to_json(layer.output_activation),
            "clip": layer.clip,
            "input_forget": layer.input_forget,
            "kind": layer.kind,
            "linear_before_reset": layer.linear_before_reset,
            "cells": [
                {name: ref(f"layers/{n}/cells/{d}/{name}", getattr(cell, name)) for name in _CELL_ARRAYS}
                for d, cell in enumerate(layer.cells)
            ],
        })
    head = [
        {
            "weight": ref(f"head/{n}/weight", dense.weight),
            "bias": ref(f"head/{n}/bias", dense.bias),
            "activation": _activation_to_json(dense.activation),
        }
        for n, dense in enumerate(spec.head)
    ]
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "output": spec.output, "mask_value": spec.mask_value,
                "source": spec.source, "layers": layers, "head": head,
                "head_input_activation": _activation_to_json(spec.head_input_activation),
                "embedding": ref("embedding", spec.embedding)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(key + ".npy", buffer.getvalue())


def native_bytes(spec: ModelSpec) -> bytes:
    """``spec`` as the bytes of a native file, written in memory."""
    buffer = io.BytesIO()
    save_native(spec, buffer)
    return buffer.getvalue()


def spec_from_native_bytes(data, name: str = "native model bytes") -> ModelSpec:
    """Read the model in ``data``, the bytes of a native file (``name`` is used in messages).

    The same checks as a file on disk, with the size of ``data`` bounding what its arrays may declare.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ModelFormatError(f"{name}: expected the bytes of a fastlstm native file, got {type(data).__name__}")
    data = bytes(data)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # zipfile raises BadZipFile, ValueError, EOFError, NotImplementedError, ...
        raise ModelFormatError(f"{name}: not a fastlstm native file ({len(data)} bytes): {exc}") from None
    with archive:
        if not is_native_zip(archive):
            raise ModelFormatError(f"{name}: a zip archive without {MANIFEST}, not a fastlstm native file")
        return load_native(archive, name, len(data))


def load_native(archive: zipfile.ZipFile, name: str, file_bytes: int | None = None) -> ModelSpec:
    """Read the model in an open native ``archive`` (the file at path ``name``, also used in messages), whose
    size is ``file_bytes`` (default: the size of the file at ``name``)."""
    try:
        info = archive.getinfo(MANIFEST)
        if info.file_size > _MAX_MANIFEST_BYTES:
            raise ModelFormatError(f"{name}: {MANIFEST} is {info.file_size} bytes, larger than any model description")
        _check_compression(info, name)
        manifest = json.loads(archive.read(MANIFEST).decode("utf-8"))
    except ModelFormatError:
        raise
    except Exception as exc:  # zlib, zipfile, UTF-8 and JSON errors, a RecursionError from deep nesting
        raise ModelFormatError(f"{name}: cannot read {MANIFEST}: {exc}") from None
    reader = _ManifestReader(archive, name, os.path.getsize(name) if file_bytes is None else file_bytes)
    return reader.model(manifest)


def _check_compression(info: zipfile.ZipInfo, name: str) -> None:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ModelFormatError(f"{name}: member {info.filename!r} uses zip compression method {info.compress_type}; "
                               "native files are stored or deflated")


class _ManifestReader:
    """Turns the JSON manifest into a ``ModelSpec``, raising ``ModelFormatError`` on any malformed field."""

    def __init__(self, archive: zipfile.ZipFile, name: str, file_bytes: int):
        self.archive = archive
        self.name = name
        self.members = {info.filename: info for info in archive.infolist()}
        #: what the arrays may still declare: the file's size times the largest inflation a real file has
        self.bytes_left = MAX_INFLATION * file_bytes

    def fail(self, where: str, message: str):
        raise ModelFormatError(f"{self.name}: {MANIFEST}: {where}: {message}")

    def keys(self, obj, allowed: set[str], where: str) -> None:
        if not isinstance(obj, dict):
            self.fail(where, f"expected an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            self.fail(where, f"unknown field(s) {unknown}: written by a newer fastlstm? (this one reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")

    def field(self, obj, key: str, kind, where: str):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(where, f"missing field {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"{where}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def size(self, obj, key: str, where: str, minimum: int = 1) -> int:
        value = self.field(obj, key, int, where)
        if value < minimum:
            self.fail(f"{where}.{key}", f"expected an integer >= {minimum}, got {value}")
        return value

    def array(self, key, where: str, shape: tuple[int | None, ...]) -> np.ndarray | None:
        """The array stored under ``key``, whose shape must be ``shape`` (``None``: any size on that axis)."""
        if key is None:
            return None
        member = f"{key}.npy" if isinstance(key, str) else None
        if member not in self.members:
            self.fail(where, f"refers to array {key!r}, which the file does not contain")
        info = self.members[member]
        _check_compression(info, self.name)
        try:
            with self.archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    self.fail(where, f"array {key!r} has .npy format version {version}; expected 1.0 or 2.0")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                declared_shape, fortran_order, dtype = read_header(f, max_header_size=1 << 12)
                if dtype not in (np.float32, np.float64):
                    self.fail(where, f"array {key!r} has dtype {dtype}; expected float32 or float64")
                if len(declared_shape) != len(shape) or any(
                        want is not None and want != got for want, got in zip(shape, declared_shape)):
                    wanted = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
                    self.fail(where, f"array {key!r} has shape {declared_shape}; the manifest's sizes need {wanted}")
                nbytes = int(np.prod(declared_shape, dtype=object)) * dtype.itemsize
                if info.file_size != f.tell() + nbytes:
                    self.fail(where, f"array {key!r} declares {nbytes} bytes of data but its zip member holds "
                                     f"{info.file_size - f.tell()}")
                if nbytes > self.bytes_left:
                    self.fail(where, f"the arrays declare more bytes than a {MAX_INFLATION}x inflation of the "
                                     "file could hold: the file is truncated or crafted")
                self.bytes_left -= nbytes
                data = np.frombuffer(f.read(nbytes), dtype=dtype)
        except ModelFormatError:
            raise
        except Exception as exc:  # zlib, zipfile (bad CRC, truncated) and .npy header errors
            raise ModelFormatError(f"{self.name}: array {key!r} is unreadable: {exc}") from None
        if data.size * dtype.itemsize != nbytes:
            self.fail(where, f"array {key!r} is truncated")
        return data.reshape(declared_shape, order="F" if fortran_order else "C").copy()

    def activation(self, value, where: str) -> Activation:
        if (not isinstance(value, list) or len(value) != 3 or not isinstance(value[0], str)
                or value[0] not in ACTIVATION_PARAMS):
            self.fail(where, f"expected [name, alpha, beta] with a known name, got {reprlib.repr(value)}")
        return Activation(value[0], self.number(value[1], f"{where}[1]"), self.number(value[2], f"{where}[2]"))

    def number(self, value, where: str) -> float:
        """A JSON number as a float; an integer too large for one (JSON allows any) is refused, not raised."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(where, f"expected a number, got {reprlib.repr(value)}")
        try:
            return float(value)
        except OverflowError:
            self.fail(where, f"the number {reprlib.repr(value)} is too large")

    def number_or_none(self, obj: dict, key: str, where: str) -> float | None:
        value = obj.get(key)
        return None if value is None else self.number(value, f"{where}.{key}")

    def model(self, manifest) -> ModelSpec:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            self.fail("format", f"expected {FORMAT_NAME!r}")
        version = manifest.get("version")
        if version not in READABLE_VERSIONS:
            self.fail("version", f"this fastlstm reads versions {READABLE_VERSIONS}, the file is version {version!r}")
        known = lambda keys: keys - _LATER_KEYS[version]  # noqa: E731
        self.keys(manifest, known(_MODEL_KEYS), "model")
        layers = []
        expected_input = None
        for n, layer in enumerate(self.field(manifest, "layers", list, "model")):
            where = f"layers[{n}]"
            self.keys(layer, known(_LAYER_KEYS), where)
            input_size = self.size(layer, "input_size", where)
            hidden_size = self.size(layer, "hidden_size", where)
            proj_size = self.size(layer, "proj_size", where, minimum=0)
            direction = self.field(layer, "direction", str, where)
            kind = self.field(layer, "kind", str, where) if "kind" in layer else "lstm"
            if kind not in GATE_COUNTS:
                self.fail(f"{where}.kind", f"expected one of {sorted(GATE_COUNTS)}, got {reprlib.repr(kind)}")
            gates = GATE_COUNTS[kind]
            recurrent = proj_size or hidden_size
            shapes = {"w_ih": (gates * hidden_size, input_size), "w_hh": (gates * hidden_size, recurrent),
                      "bias": (gates * hidden_size,), "w_hr": (proj_size, hidden_size), "peephole": (3, hidden_size),
                      "candidate_bias": (hidden_size,), "w_ih_scale": (gates * hidden_size,),
                      "w_hh_scale": (gates * hidden_size,)}
            cells = []
            cell_entries = self.field(layer, "cells", list, where)
            if len(cell_entries) > 2:
                self.fail(f"{where}.cells", f"expected one or two cells (directions), got {len(cell_entries)}")
            for d, cell in enumerate(cell_entries):
                cw = f"{where}.cells[{d}]"
                self.keys(cell, known(set(_CELL_ARRAYS)), cw)
                cells.append(CellWeights(*(self.array(cell.get(k), f"{cw}.{k}", shapes[k]) for k in _CELL_ARRAYS)))
            layers.append(RecurrentLayer(
                input_size=input_size,
                hidden_size=hidden_size,
                proj_size=proj_size,
                direction=direction,
                cells=tuple(cells),
                gate_activation=self.activation(layer.get("gate_activation"), f"{where}.gate_activation"),
                cell_activation=self.activation(layer.get("cell_activation"), f"{where}.cell_activation"),
                output_activation=self.activation(layer.get("output_activation"), f"{where}.output_activation"),
                clip=self.number_or_none(layer, "clip", where),
                input_forget=self.field(layer, "input_forget", bool, where),
                kind=kind,
                linear_before_reset=(self.field(layer, "linear_before_reset", bool, where)
                                     if "linear_before_reset" in layer else True),
            ))
            expected_input = (2 if direction == "bidirectional" else 1) * recurrent
        head = []
        for n, dense in enumerate(self.field(manifest, "head", list, "model")):
            where = f"head[{n}]"
            self.keys(dense, _DENSE_KEYS, where)
            weight = self.array(self.field(dense, "weight", str, where), f"{where}.weight", (None, expected_input))
            expected_input = int(weight.shape[0])
            head.append(DenseLayer(weight, self.array(dense.get("bias"), f"{where}.bias", (expected_input,)),
                                   self.activation(dense.get("activation"), f"{where}.activation")))
        source = self.field(manifest, "source", str, "model") if "source" in manifest else ""
        head_input = manifest.get("head_input_activation")
        first_input = layers[0].input_size if layers else None
        embedding = self.array(manifest.get("embedding"), "embedding", (None, first_input))
        spec = ModelSpec(layers=tuple(layers), head=tuple(head), embedding=embedding,
                         output=self.field(manifest, "output", str, "model"),
                         mask_value=self.number_or_none(manifest, "mask_value", "model"),
                         head_input_activation=(Activation.of("identity") if head_input is None
                                                else self.activation(head_input, "head_input_activation")),
                         source=source)
        return spec.validate()


def _activation_to_json(act: Activation) -> list:
    return [act.name, act.alpha, act.beta]
