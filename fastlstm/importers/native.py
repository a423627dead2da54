"""fastlstm's native file: a zip holding ``fastlstm.json`` (the model description) and one ``.npy`` per array.

Readable with the standard library and NumPy only; arrays are read with ``allow_pickle=False``, so a file
can hold nothing but plain numbers and JSON. Every field is checked against the schema and the result goes
through ``ModelSpec.validate``.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from ..activations import ACTIVATION_PARAMS, Activation
from ..errors import ModelFormatError
from ..spec import DenseLayer, LSTMCellWeights, LSTMLayer, ModelSpec

MANIFEST = "fastlstm.json"
FORMAT_NAME = "fastlstm"
FORMAT_VERSION = 1
_CELL_ARRAYS = ("w_ih", "w_hh", "bias", "w_hr", "peephole")
_MAX_MANIFEST_BYTES = 1 << 20


def is_native_zip(archive: zipfile.ZipFile) -> bool:
    return MANIFEST in archive.namelist()


def save_native(spec: ModelSpec, path) -> None:
    """Write ``spec`` to ``path`` (the extension is the caller's choice; ``.fastlstm`` by convention)."""
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
                "source": spec.source, "layers": layers, "head": head}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(key + ".npy", buffer.getvalue())


def load_native(archive: zipfile.ZipFile, name: str) -> ModelSpec:
    """Read the model in an open native ``archive``; ``name`` is used in messages."""
    try:
        info = archive.getinfo(MANIFEST)
        if info.file_size > _MAX_MANIFEST_BYTES:
            raise ModelFormatError(f"{name}: {MANIFEST} is {info.file_size} bytes, larger than any model description")
        manifest = json.loads(archive.read(MANIFEST).decode("utf-8"))
    except ModelFormatError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"{name}: cannot read {MANIFEST}: {exc}") from None
    reader = _ManifestReader(archive, name)
    return reader.model(manifest)


class _ManifestReader:
    """Turns the JSON manifest into a ``ModelSpec``, raising ``ModelFormatError`` on any malformed field."""

    def __init__(self, archive: zipfile.ZipFile, name: str):
        self.archive = archive
        self.name = name
        self.members = {info.filename: info for info in archive.infolist()}

    def fail(self, where: str, message: str):
        raise ModelFormatError(f"{self.name}: {MANIFEST}: {where}: {message}")

    def field(self, obj, key: str, kind, where: str):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(where, f"missing field {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"{where}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def array(self, key, where: str) -> np.ndarray | None:
        if key is None:
            return None
        member = f"{key}.npy" if isinstance(key, str) else None
        if member not in self.members:
            self.fail(where, f"refers to array {key!r}, which the file does not contain")
        try:
            with self.archive.open(member) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
        except Exception as exc:
            raise ModelFormatError(f"{self.name}: array {key!r} is unreadable: {exc}") from None
        if array.dtype not in (np.float32, np.float64):
            self.fail(where, f"array {key!r} has dtype {array.dtype}; expected float32 or float64")
        return array

    def activation(self, value, where: str) -> Activation:
        if (not isinstance(value, list) or len(value) != 3 or value[0] not in ACTIVATION_PARAMS
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[1:])):
            self.fail(where, f"expected [name, alpha, beta] with a known name, got {value!r}")
        return Activation(value[0], float(value[1]), float(value[2]))

    def model(self, manifest) -> ModelSpec:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            self.fail("format", f"expected {FORMAT_NAME!r}")
        version = manifest.get("version")
        if version != FORMAT_VERSION:
            self.fail("version", f"this fastlstm reads version {FORMAT_VERSION}, the file is version {version!r}")
        layers = []
        for n, layer in enumerate(self.field(manifest, "layers", list, "model")):
            where = f"layers[{n}]"
            cells = []
            for d, cell in enumerate(self.field(layer, "cells", list, where)):
                if not isinstance(cell, dict):
                    self.fail(f"{where}.cells[{d}]", "expected an object")
                cells.append(LSTMCellWeights(*(self.array(cell.get(k), f"{where}.cells[{d}].{k}") for k in _CELL_ARRAYS)))
            clip = layer.get("clip") if isinstance(layer, dict) else None
            if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool)):
                self.fail(f"{where}.clip", f"expected a number or null, got {clip!r}")
            layers.append(LSTMLayer(
                input_size=self.field(layer, "input_size", int, where),
                hidden_size=self.field(layer, "hidden_size", int, where),
                proj_size=self.field(layer, "proj_size", int, where),
                direction=self.field(layer, "direction", str, where),
                cells=tuple(cells),
                gate_activation=self.activation(layer.get("gate_activation"), f"{where}.gate_activation"),
                cell_activation=self.activation(layer.get("cell_activation"), f"{where}.cell_activation"),
                output_activation=self.activation(layer.get("output_activation"), f"{where}.output_activation"),
                clip=None if clip is None else float(clip),
                input_forget=self.field(layer, "input_forget", bool, where),
            ))
        head = []
        for n, dense in enumerate(self.field(manifest, "head", list, "model")):
            where = f"head[{n}]"
            weight = self.array(self.field(dense, "weight", str, where), f"{where}.weight")
            head.append(DenseLayer(weight, self.array(dense.get("bias"), f"{where}.bias"),
                                   self.activation(dense.get("activation"), f"{where}.activation")))
        mask_value = manifest.get("mask_value")
        if mask_value is not None and (not isinstance(mask_value, (int, float)) or isinstance(mask_value, bool)):
            self.fail("mask_value", f"expected a number or null, got {mask_value!r}")
        source = manifest.get("source", "")
        spec = ModelSpec(layers=tuple(layers), head=tuple(head),
                         output=self.field(manifest, "output", str, "model"),
                         mask_value=None if mask_value is None else float(mask_value),
                         source=source if isinstance(source, str) else "")
        return spec.validate()


def _activation_to_json(act: Activation) -> list:
    return [act.name, act.alpha, act.beta]
