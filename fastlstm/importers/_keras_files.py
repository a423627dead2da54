"""Reading Keras model files without Keras: the config, the writer's version and each layer's weights.

Two layouts, read with ``zipfile``, ``json`` and ``h5py`` only (h5py through ``_keras_hdf5``, in a child
process, because the HDF5 library can crash or hang on a damaged file):

* ``.keras`` (Keras 3, and tf.keras 2.13+): a zip of ``config.json``, ``metadata.json`` (``keras_version``) and
  ``model.weights.h5``. In the H5, the variables of the k-th layer of a class live in
  ``layers/<snake_case class>[_k]/.../vars/<index>`` (``layers/lstm/cell/vars/0`` is the first LSTM's kernel,
  ``layers/bidirectional/forward_layer/cell/vars/1`` a recurrent kernel); tf.keras 2.13 wrote
  ``_layer_checkpoint_dependencies`` in place of ``layers``. The H5 is read from the archive into memory
  (``zipfile`` checks its CRC, so accidental damage stops here) and parsed from there; nothing is extracted.
* legacy ``.h5`` (``model.save("x.h5")``): the root attributes ``model_config`` (JSON) and ``keras_version``;
  group ``model_weights/<layer name>`` with attribute ``weight_names`` listing that layer's datasets in
  ``layer.get_weights()`` order, which is the order they are returned in.

Every failure to read is a ``ModelFormatError``; a weights-only file is refused as such.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError
from ._keras_graph import KerasLayer
from ._keras_hdf5 import Hdf5Contents, read_hdf5

CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
WEIGHTS_MEMBER = "model.weights.h5"
_NPZ_WEIGHTS_MEMBER = "model.weights.npz"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MAX_JSON_BYTES = 64 << 20
# A zip member may expand to at most this multiple of its stored size (DEFLATE cannot exceed ~1032:1, and
# Keras stores members uncompressed), or a declared size could drive an unbounded allocation.
_MAX_ZIP_EXPANSION = 1100
# Where each layer class keeps its variable groups inside its group of a Keras 3 weights file, in the order
# ``layer.get_weights()`` returns them.
_KERAS3_VARIABLE_GROUPS = {
    "LSTM": ("cell",),
    "Bidirectional": ("forward_layer/cell", "backward_layer/cell"),
    "Dense": ("",),
    "TimeDistributed": ("layer",),
}

WeightsOf = Callable[[KerasLayer], Sequence[np.ndarray]]


@dataclass
class SavedKerasModel:
    """What a file holds: the model config, the Keras version that wrote it, and its layers' weights."""

    model_config: dict
    keras_version: str | None
    weights_of: WeightsOf  # a layer's weights in layer.get_weights() order
    description: str  # "Keras file model.keras", for messages and ModelSpec.source


def read_keras_file(path: str) -> SavedKerasModel:
    """Read a ``.keras`` archive or a legacy ``.h5`` model file (told apart by their leading bytes)."""
    if importlib.util.find_spec("h5py") is None:
        raise ImportError("reading Keras model files needs h5py: pip install fastlstm[keras]")
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(len(_HDF5_MAGIC))
    if head.startswith(_HDF5_MAGIC):
        return _legacy_h5(read_hdf5(name, path=path), name)
    config, keras_version, weights_image = _read_archive(path, name)
    contents = read_hdf5(f"{name}: {WEIGHTS_MEMBER}", data=weights_image)
    return SavedKerasModel(config, keras_version, _Keras3Weights(contents, name).weights_of, f"Keras file {name}")


# ----------------------------------------------------------------------------------------- .keras archives
def _read_archive(path: str, name: str) -> tuple[dict, str | None, bytes]:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise ModelFormatError(f"{name}: not a readable zip archive: {exc}") from None
    with archive:
        members = set(archive.namelist())
        if CONFIG_MEMBER not in members:
            raise ModelFormatError(f"{name}: a .keras archive needs {CONFIG_MEMBER}; found {sorted(members)[:10]}")
        config = _parse_json(_member_bytes(archive, CONFIG_MEMBER, name, _MAX_JSON_BYTES), name, CONFIG_MEMBER)
        metadata = {}
        if METADATA_MEMBER in members:
            metadata = _parse_json(_member_bytes(archive, METADATA_MEMBER, name, _MAX_JSON_BYTES), name,
                                   METADATA_MEMBER)
        if WEIGHTS_MEMBER not in members:
            if _NPZ_WEIGHTS_MEMBER in members:
                raise UnsupportedModelError([f"{name}: weights saved as {_NPZ_WEIGHTS_MEMBER}; fastlstm reads the "
                                             f"default {WEIGHTS_MEMBER}"])
            raise ModelFormatError(f"{name}: the archive has no {WEIGHTS_MEMBER}")
        weights = _member_bytes(archive, WEIGHTS_MEMBER, name, limit=None)
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    return config, version if isinstance(version, str) else None, weights


def _member_bytes(archive: zipfile.ZipFile, member: str, name: str, limit: int | None) -> bytes:
    """The bytes of ``member``, its declared size checked before reading and its CRC checked by ``zipfile``."""
    info = archive.getinfo(member)
    if limit is not None and info.file_size > limit:
        raise ModelFormatError(f"{name}: {member} declares {info.file_size} bytes, more than a model config needs")
    if info.file_size > _MAX_ZIP_EXPANSION * max(info.compress_size, 1024):
        raise ModelFormatError(f"{name}: {member} declares {info.file_size} bytes but stores only "
                               f"{info.compress_size}; refusing to expand it")
    try:
        with archive.open(info) as f:
            data = f.read(info.file_size + 1)
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, NotImplementedError (compression) ...
        raise ModelFormatError(f"{name}: cannot read {member}: {exc}") from None
    if len(data) != info.file_size:
        raise ModelFormatError(f"{name}: {member} holds {len(data)} bytes, not the {info.file_size} declared")
    return data


def _parse_json(data, name: str, what: str):
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, RecursionError on absurd nesting
        raise ModelFormatError(f"{name}: {what} is not valid JSON: {exc}") from None


class _Keras3Weights:
    """Finds a layer's variables in a Keras 3 ``model.weights.h5`` by the layer's saved name."""

    def __init__(self, contents: Hdf5Contents, name: str):
        self.contents = contents
        self.name = name
        attributes = contents.attributes
        if "/layers" not in attributes and "/_layer_checkpoint_dependencies" in attributes:
            self.root = "/_layer_checkpoint_dependencies"
        else:
            self.root = "/layers"

    def weights_of(self, layer: KerasLayer) -> list[np.ndarray]:
        subgroups = _KERAS3_VARIABLE_GROUPS.get(layer.class_name)
        if subgroups is None:  # the importer only asks for layers that hold weights
            raise ModelFormatError(f"{self.name}: no weight layout known for {layer.class_name}")
        group = f"{self.root}/{layer.saved_name}"
        where = f"{WEIGHTS_MEMBER}: {group}"
        attributes = self.contents.attributes
        if group not in attributes:
            raise ModelFormatError(f"{self.name}: {where} is missing (the weights of {layer.describe()})")
        # Keras 3 records the layer's name on its "vars" group: a mismatch means the groups are numbered
        # differently than this importer numbers them, and weights would land on the wrong layer.
        recorded = attributes.get(f"{group}/vars", {}).get("name")
        if isinstance(recorded, str) and recorded != layer.name:
            raise ModelFormatError(f"{self.name}: {where} holds the weights of layer {recorded!r}, expected "
                                   f"{layer.name!r}")
        weights = []
        for subgroup in subgroups:
            variables = f"{group}/{subgroup}/vars" if subgroup else f"{group}/vars"
            if variables not in attributes:
                raise ModelFormatError(f"{self.name}: {WEIGHTS_MEMBER}: {variables} is missing")
            members = [path[len(variables) + 1:] for path in attributes if path.startswith(variables + "/")]
            members = sorted((m for m in members if "/" not in m), key=lambda m: (len(m), m))
            if members != [str(i) for i in range(len(members))]:
                raise ModelFormatError(f"{self.name}: {WEIGHTS_MEMBER}: {variables}: expected variables 0..n-1, "
                                       f"found {members}")
            weights += [_array(self.contents, f"{variables}/{m}", self.name) for m in members]
        return weights


# ----------------------------------------------------------------------------------------- legacy .h5 files
def _legacy_h5(contents: Hdf5Contents, name: str) -> SavedKerasModel:
    attributes = contents.attributes
    root = attributes.get("/", {})
    if "model_config" not in root:
        if "layer_names" in root or "/layers" in attributes or "/vars" in attributes:
            raise ModelFormatError(
                f"{name} holds weights only (written by save_weights), not a model: it has no architecture. "
                "Save the whole model with model.save('model.keras'), or load the weights into the model in "
                "Keras and pass the keras.Model to fastlstm.load")
        raise ModelFormatError(f"{name}: an HDF5 file without a Keras 'model_config' attribute is not a "
                               "Keras model file")
    config = _parse_json(_text(root["model_config"], name, "model_config"), name, "model_config")
    version = root.get("keras_version")
    if "/model_weights" not in attributes:
        raise ModelFormatError(f"{name}: the model file has no 'model_weights' group (saved without weights)")

    def weights_of(layer: KerasLayer) -> list[np.ndarray]:
        group = f"/model_weights/{layer.name}"
        if group not in attributes:
            raise ModelFormatError(f"{name}: {group} is missing (the weights of {layer.describe()})")
        weight_names = attributes[group].get("weight_names", [])
        if isinstance(weight_names, str):
            weight_names = [weight_names]
        if not isinstance(weight_names, list) or not all(isinstance(n, str) for n in weight_names):
            raise ModelFormatError(f"{name}: {group}: weight_names is not a list of names")
        return [_array(contents, f"{group}/{weight_name}", name) for weight_name in weight_names]

    return SavedKerasModel(config, _text(version, name, "keras_version") if version is not None else None,
                           weights_of, f"Keras legacy HDF5 file {name}")


def _text(value, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise ModelFormatError(f"{name}: attribute {what}: expected text, got {type(value).__name__}")
    return value


def _array(contents: Hdf5Contents, path: str, name: str) -> np.ndarray:
    if path in contents.arrays:
        return contents.arrays[path]
    if path in contents.other_datasets:
        raise ModelFormatError(f"{name}: {path} holds {contents.other_datasets[path]} values, not floats")
    raise ModelFormatError(f"{name}: weight {path} is listed but missing")
