"""Reading Keras model files without Keras: the config, the writer's version and each layer's weights.

Two layouts, read with ``zipfile``, ``json`` and ``h5py`` only (h5py through ``_keras_hdf5``, in a child
process, because the HDF5 library can crash or hang on a damaged file):

* ``.keras`` (Keras 3, and tf.keras 2.13+): a zip of ``config.json``, ``metadata.json`` (``keras_version``) and
  ``model.weights.h5``. In the H5, the variables of the k-th layer of a class live in
  ``layers/<snake_case class>[_k]/.../vars/<index>`` (``layers/lstm/cell/vars/0`` is the first LSTM's kernel,
  ``layers/bidirectional/forward_layer/cell/vars/1`` a recurrent kernel, ``layers/rnn/cell/cells/lstm_cell_1/
  vars/2`` the bias of the second cell of an ``RNN([LSTMCell, LSTMCell])``); tf.keras 2.13 wrote
  ``_layer_checkpoint_dependencies`` in place of ``layers``. The H5 is read from the archive into memory
  (``zipfile`` checks its CRC, so accidental damage stops here) and handed to the HDF5 child; nothing is
  extracted.
* legacy ``.h5`` (``model.save("x.h5")``): the root attributes ``model_config`` (JSON) and ``keras_version``;
  group ``model_weights/<layer name>`` with attribute ``weight_names`` listing that layer's datasets in
  ``layer.get_weights()`` order, which is the order they are returned in.

A layer's weights are first only declared (``StoredDataset``: path, dtype, shape); the importer checks them
against the config and then reads the ones the model needs in one request, so no dataset is read that the
model does not use, nor one whose declared shape is not the one the config implies. Configs are limited in
size (``MAX_CONFIG_BYTES``) and nesting (``MAX_CONFIG_DEPTH``) before they are parsed.

Every failure to read is a ``ModelFormatError``; a weights-only file is refused as such.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError
from ._keras_graph import KerasLayer, saved_names
from ._keras_hdf5 import Hdf5File, StoredDataset

CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
WEIGHTS_MEMBER = "model.weights.h5"
_NPZ_WEIGHTS_MEMBER = "model.weights.npz"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Limits on a model config (JSON): a Keras config takes a few KB per layer and nests about 12 deep.
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 100
# A zip member may expand to at most this multiple of its stored size (DEFLATE cannot exceed ~1032:1, and
# Keras stores members uncompressed), or a declared size could drive an unbounded allocation.
_MAX_ZIP_EXPANSION = 1100
# Where each layer class keeps its variable groups inside its group of a Keras 3 weights file, in the order
# ``layer.get_weights()`` returns them (recurrent layers: see ``_variable_groups``).
_KERAS3_VARIABLE_GROUPS = {"Dense": ("",), "Embedding": ("",), "TimeDistributed": ("layer",)}
_RECURRENT_CLASSES = ("LSTM", "GRU", "SimpleRNN", "RNN")

# A layer's weights in ``layer.get_weights()`` order, as arrays or as datasets declared but not yet read.
WeightsOf = Callable[[KerasLayer], Sequence["np.ndarray | StoredDataset"]]
# Declared weights -> their arrays.
ReadWeights = Callable[[list], list[np.ndarray]]


@dataclass
class SavedKerasModel:
    """What a file holds: the model config, the Keras version that wrote it, and its layers' weights.

    ``weights_of`` declares a layer's weights without reading them; ``read`` reads the ones the model needs,
    all at once, after the importer has checked their declared shapes. Close it (or use ``with``) when done.
    """

    model_config: dict
    keras_version: str | None
    weights_of: WeightsOf
    read: ReadWeights
    description: str  # "Keras file model.keras", for messages and ModelSpec.source
    hdf5: Hdf5File

    def __enter__(self) -> SavedKerasModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.hdf5.close()


def open_keras_file(path: str) -> SavedKerasModel:
    """Open a ``.keras`` archive or a legacy ``.h5`` model file (told apart by their leading bytes).

    This process reads the zip and its JSON members only; everything HDF5 happens in ``_keras_hdf5``'s child.
    """
    if importlib.util.find_spec("h5py") is None:
        raise ImportError("reading Keras model files needs h5py: pip install fastlstm[keras]")
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(len(_HDF5_MAGIC))
    if head.startswith(_HDF5_MAGIC):
        return _legacy_h5(Hdf5File(name, path=path), name)
    config, keras_version, weights_image = _read_archive(path, name)
    hdf5 = Hdf5File(f"{name}: {WEIGHTS_MEMBER}", data=weights_image)
    return SavedKerasModel(config, keras_version, _Keras3Weights(hdf5, name).weights_of,
                           _reader(hdf5), f"Keras file {name}", hdf5)


def parse_config_json(data, name: str, what: str):
    """Parse a model config after checking its size and nesting depth (linear in its length)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(f"{name}: {what} is not valid JSON: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{name}: {what} is {len(data)} characters long; the limit for a model config "
                               f"is {MAX_CONFIG_BYTES}")
    depth = _nesting_depth(data)
    if depth > MAX_CONFIG_DEPTH:
        raise ModelFormatError(f"{name}: {what} nests {depth} levels deep; the limit for a model config is "
                               f"{MAX_CONFIG_DEPTH}")
    try:
        return json.loads(data)
    except Exception as exc:  # JSONDecodeError, and anything else a damaged text can raise
        raise ModelFormatError(f"{name}: {what} is not valid JSON: {exc}") from None


def _nesting_depth(text: str) -> int:
    """The deepest nesting of JSON arrays and objects in ``text`` (brackets inside strings do not count)."""
    # A string runs to its closing quote, or to the end of an unterminated one: each character is matched once.
    brackets = re.sub(r'"(?:[^"\\]|\\.)*+"?', "", text, flags=re.DOTALL)
    steps = np.frombuffer(brackets.encode("utf-8", "replace"), np.uint8)  # lone surrogates from h5py included
    changes = (np.isin(steps, (ord("["), ord("{"))).astype(np.int64)
               - np.isin(steps, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(changes).max(initial=0))


def _reader(hdf5: Hdf5File) -> Callable[[list[StoredDataset]], list[np.ndarray]]:
    def read(stored: list[StoredDataset]) -> list[np.ndarray]:
        arrays = hdf5.read(list(dict.fromkeys(dataset.path for dataset in stored)))
        return [arrays[dataset.path] for dataset in stored]

    return read


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
        config = parse_config_json(_member_bytes(archive, CONFIG_MEMBER, name, MAX_CONFIG_BYTES), name,
                                   CONFIG_MEMBER)
        metadata = {}
        if METADATA_MEMBER in members:
            metadata = parse_config_json(_member_bytes(archive, METADATA_MEMBER, name, MAX_CONFIG_BYTES), name,
                                         METADATA_MEMBER)
        if WEIGHTS_MEMBER not in members:
            if _NPZ_WEIGHTS_MEMBER in members:
                raise UnsupportedModelError([f"{name}: weights saved as {_NPZ_WEIGHTS_MEMBER}; fastlstm reads the "
                                             f"default {WEIGHTS_MEMBER}"])
            raise ModelFormatError(f"{name}: the archive has no {WEIGHTS_MEMBER}")
        weights = _member_bytes(archive, WEIGHTS_MEMBER, name, limit=None)
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    return config, None if version is None else _text(version, name, f"{METADATA_MEMBER} keras_version"), weights


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


class _Keras3Weights:
    """Finds a layer's variables in a Keras 3 ``model.weights.h5`` by the layer's saved name."""

    def __init__(self, hdf5: Hdf5File, name: str):
        self.hdf5 = hdf5
        self.name = name
        attributes = hdf5.attributes
        if "/layers" not in attributes and "/_layer_checkpoint_dependencies" in attributes:
            self.root = "/_layer_checkpoint_dependencies"
        else:
            self.root = "/layers"
        self.children: dict[str, list[str]] = defaultdict(list)  # group -> names of its members
        for path in attributes:
            parent, _, child = path.rpartition("/")
            self.children[parent].append(child)

    def weights_of(self, layer: KerasLayer) -> list[StoredDataset]:
        group = f"{self.root}/{layer.saved_name}"
        where = f"{WEIGHTS_MEMBER}: {group}"
        attributes = self.hdf5.attributes
        if group not in attributes:
            raise ModelFormatError(f"{self.name}: {where} is missing (the weights of {layer.describe()})")
        # Keras 3 records the layer's name on its "vars" group: a mismatch means the groups are numbered
        # differently than this importer numbers them, and weights would land on the wrong layer.
        recorded = attributes.get(f"{group}/vars", {}).get("name")
        if isinstance(recorded, str) and recorded != layer.name:
            raise ModelFormatError(f"{self.name}: {where} holds the weights of layer {recorded!r}, expected "
                                   f"{layer.name!r}")
        weights = []
        for subgroup in _variable_groups(layer, self.name):
            variables = f"{group}/{subgroup}/vars" if subgroup else f"{group}/vars"
            if variables not in attributes:
                raise ModelFormatError(f"{self.name}: {WEIGHTS_MEMBER}: {variables} is missing")
            members = sorted(self.children.get(variables, []), key=lambda m: (len(m), m))
            if members != [str(i) for i in range(len(members))]:
                raise ModelFormatError(f"{self.name}: {WEIGHTS_MEMBER}: {variables}: expected variables 0..n-1, "
                                       f"found {members[:10]}")
            weights += [_stored(self.hdf5, f"{variables}/{m}", self.name) for m in members]
        return weights


def _variable_groups(layer: KerasLayer, name: str) -> list[str]:
    """The groups holding ``layer``'s variables, relative to its own group, in ``get_weights()`` order."""
    if layer.class_name == "Bidirectional":
        return [group for wrapped, prefix in (("layer", "forward_layer"), ("backward_layer", "backward_layer"))
                for group in _cell_groups(prefix, layer.config.get(wrapped) or layer.config.get("layer"))]
    if layer.class_name in _RECURRENT_CLASSES:
        return _cell_groups("", {"class_name": layer.class_name, "config": layer.config})
    if layer.class_name in _KERAS3_VARIABLE_GROUPS:
        return list(_KERAS3_VARIABLE_GROUPS[layer.class_name])
    # the importer only asks for layers that hold weights
    raise ModelFormatError(f"{name}: no weight layout known for {layer.class_name}")


def _cell_groups(prefix: str, recurrent_layer) -> list[str]:
    """A recurrent layer's cell group(s): ``cell``, or one group per cell of a StackedRNNCells, named as
    keras.saving names the items of a list (snake_case class name, numbered)."""
    cell = f"{prefix}/cell" if prefix else "cell"
    config = recurrent_layer.get("config", {}) if isinstance(recurrent_layer, dict) else {}
    stacked = config.get("cell") if recurrent_layer.get("class_name") == "RNN" else None
    cells = stacked.get("config", {}).get("cells") if isinstance(stacked, dict) else None
    if not isinstance(stacked, dict) or stacked.get("class_name") != "StackedRNNCells" or not isinstance(cells, list):
        return [cell]
    names = saved_names([c["class_name"] if isinstance(c, dict) and isinstance(c.get("class_name"), str) else ""
                         for c in cells])
    return [f"{cell}/cells/{n}" for n in names]


# ----------------------------------------------------------------------------------------- legacy .h5 files
def _legacy_h5(hdf5: Hdf5File, name: str) -> SavedKerasModel:
    try:
        attributes = hdf5.attributes
        root = attributes.get("/", {})
        if "model_config" not in root:
            if "layer_names" in root or "/layers" in attributes or "/vars" in attributes:
                raise ModelFormatError(
                    f"{name} holds weights only (written by save_weights), not a model: it has no architecture. "
                    "Save the whole model with model.save('model.keras'), or load the weights into the model in "
                    "Keras and pass the keras.Model to fastlstm.load")
            raise ModelFormatError(f"{name}: an HDF5 file without a Keras 'model_config' attribute is not a "
                                   "Keras model file")
        config = parse_config_json(_text(root["model_config"], name, "attribute model_config"), name, "model_config")
        version = root.get("keras_version")
        if "/model_weights" not in attributes:
            raise ModelFormatError(f"{name}: the model file has no 'model_weights' group (saved without weights)")
    except BaseException:
        hdf5.close()
        raise

    def weights_of(layer: KerasLayer) -> list[StoredDataset]:
        group = f"/model_weights/{layer.name}"
        if group not in attributes:
            raise ModelFormatError(f"{name}: {group} is missing (the weights of {layer.describe()})")
        weight_names = attributes[group].get("weight_names", [])
        if isinstance(weight_names, str):
            weight_names = [weight_names]
        if not isinstance(weight_names, list) or not all(isinstance(n, str) for n in weight_names):
            raise ModelFormatError(f"{name}: {group}: weight_names is not a list of names")
        return [_stored(hdf5, f"{group}/{weight_name}", name) for weight_name in weight_names]

    return SavedKerasModel(config, _text(version, name, "attribute keras_version") if version is not None else None,
                           weights_of, _reader(hdf5), f"Keras legacy HDF5 file {name}", hdf5)


def _text(value, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise ModelFormatError(f"{name}: {what}: expected text, got {type(value).__name__}")
    return value


def _stored(hdf5: Hdf5File, path: str, name: str) -> StoredDataset:
    dataset = hdf5.datasets.get(path)
    if dataset is None:
        raise ModelFormatError(f"{name}: weight {path} is listed but missing")
    if dataset.dtype is None or dataset.shape is None:
        raise ModelFormatError(f"{name}: {path} holds {dataset.declared_dtype} values, not floats")
    return dataset
