"""Reading ONNX protobuf messages safely: tensors to NumPy arrays and node attributes to Python values.

Nothing here trusts a size declared in the file. A tensor's ``dims`` are checked against the bytes or
values actually present before any array is made, so a corrupt or hostile file can make the importer
refuse, never allocate what it claims.

Tensors stored outside the model file (ONNX "external data", what ``torch.onnx.export`` writes as
``model.onnx.data`` beside ``model.onnx``) are read by ``ExternalData``, only from regular files inside the
model file's own directory: a location that is absolute, climbs out with ``..``, or resolves (through a
symbolic link) to a file outside that directory is refused, as is an offset or length past the end of
the file or a length that disagrees with the tensor's declared shape. Only the tensor's own bytes are
read, after those checks. A model held in memory has no directory, so its external tensors are refused.

The functions take the ``onnx`` package's messages but need nothing from it beyond them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidModelError, ModelFormatError, UnsupportedModelError

# TensorProto.DataType values (fixed by the ONNX standard, so no onnx import is needed for them).
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
FLOAT_TYPES = {FLOAT: "float32", DOUBLE: "float64", FLOAT16: "float16"}
INTEGER_TYPES = {INT64: "int64", INT32: "int32"}  # what token ids may be
NUMPY_TYPES = {
    FLOAT: np.dtype("<f4"), DOUBLE: np.dtype("<f8"), FLOAT16: np.dtype("<f2"),
    INT64: np.dtype("<i8"), INT32: np.dtype("<i4"), INT16: np.dtype("<i2"), INT8: np.dtype("i1"),
    UINT16: np.dtype("<u2"), UINT8: np.dtype("u1"), BOOL: np.dtype("?"),
}
# Where each type's values live when raw_data is not used (the TensorProto documentation's table).
_TYPED_FIELD = {
    FLOAT: "float_data", DOUBLE: "double_data", INT64: "int64_data",
    INT32: "int32_data", INT16: "int32_data", INT8: "int32_data", UINT16: "int32_data", UINT8: "int32_data",
    BOOL: "int32_data", FLOAT16: "int32_data",  # float16 values are stored as their 16-bit patterns
}
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
# No tensor of an LSTM model comes near this; a larger declared size is corrupt or hostile.
MAX_TENSOR_ELEMENTS = 1 << 31
# Attribute lists (activations, axes, perm, starts, ...) hold a few values; a longer one is corrupt.
MAX_ATTRIBUTE_VALUES = 4096
_DEFAULT, _EXTERNAL = 0, 1  # TensorProto.DataLocation
# The keys of TensorProto.external_data the ONNX standard defines. "basepath" is written by some of the onnx
# package's own tools and, as there, plays no part in finding the file: locations are relative to the model.
_EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum", "basepath")
_MAX_DIGITS = 20  # an offset or length (in bytes) longer than this is no file on any disk

# AttributeProto.AttributeType values.
_ATTRIBUTE_TYPES = {1: "float", 2: "int", 3: "string", 4: "tensor", 5: "graph", 6: "floats", 7: "ints",
                    8: "strings", 9: "tensors", 10: "graphs", 11: "sparse_tensor", 12: "sparse_tensors",
                    13: "type_proto", 14: "type_protos"}


@dataclass(frozen=True)
class ExternalData:
    """Where a model's external tensor data may be read from: ``directory`` (the model file's own), or
    nowhere (None) for a model held in memory. ``source`` names the model in messages."""

    directory: str | None
    source: str

    def read(self, tensor, where: str, nbytes: int) -> bytes:
        """The ``nbytes`` bytes of ``tensor``'s external data, after checking where they are and their size."""
        entries: dict[str, str] = {}
        for entry in tensor.external_data:
            if not isinstance(entry.key, str) or not isinstance(entry.value, str):  # protobuf's undecodable text
                raise ModelFormatError(f"{self.source}: {where}: an external_data entry is not valid UTF-8")
            if entry.key in entries:
                raise ModelFormatError(f"{self.source}: {where}: external_data gives {entry.key!r} twice")
            entries[entry.key] = entry.value
        unknown = sorted(set(entries) - set(_EXTERNAL_DATA_KEYS))
        if unknown:
            raise ModelFormatError(f"{self.source}: {where}: unknown external_data key(s) "
                                   f"{', '.join(repr(k[:100]) for k in unknown)}; the ONNX standard defines "
                                   f"{', '.join(_EXTERNAL_DATA_KEYS[:4])}")
        location = entries.get("location", "")
        if not location:
            raise ModelFormatError(f"{self.source}: {where}: stored as external data without a location")
        label = f"{self.source}: {where} (external data {location[:200]!r})"
        if self.directory is None:
            raise ModelFormatError(
                f"{label}: the tensor is stored in a file beside the .onnx file, and a model held in memory has "
                "no directory to read it from: pass the .onnx file's path to fastlstm.load, or load the "
                "ModelProto with onnx.load(path), which reads the data in")
        parts = re.split(r"[\\/]", location)
        if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location) \
                or ".." in parts or "\x00" in location:
            raise ModelFormatError(f"{label}: the location is absolute or climbs out of the model's directory; "
                                   "fastlstm reads external data only from files in the directory of the "
                                   ".onnx file")
        root = os.path.realpath(self.directory)
        target = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, target]) != root:
            raise ModelFormatError(f"{label}: the location leads (through a symbolic link) outside the model's "
                                   "directory; fastlstm reads external data only from files in the directory "
                                   "of the .onnx file")
        offset = _byte_count(entries, "offset", label)
        length = _byte_count(entries, "length", label)
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below as not a file); O_NOFOLLOW:
        # the resolved file must not have become a symbolic link since it was checked.
        try:
            descriptor = os.open(target, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
                                 | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise ModelFormatError(f"{label}: cannot open the data file ({exc.strerror})") from None
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            os.close(descriptor)
            raise ModelFormatError(f"{label}: not a regular file")
        with open(descriptor, "rb", buffering=0) as data_file:
            size = status.st_size
            start = offset or 0
            if start > size or (length is not None and start + length > size):
                raise ModelFormatError(f"{label}: offset {start} and length {length} point past the end of the "
                                       f"file ({size} bytes)")
            stored = size - start if length is None else length
            if stored != nbytes:
                raise ModelFormatError(f"{label}: the declared shape {list(tensor.dims)} needs {nbytes} bytes, "
                                       f"the external data holds {stored}"
                                       + ("" if length is not None else " (from the offset to the end of the file)"))
            data_file.seek(start)
            data = _read_exactly(data_file, nbytes)
        if len(data) != nbytes:
            raise ModelFormatError(f"{label}: the file ended after {len(data)} of {nbytes} bytes")
        checksum = entries.get("checksum")
        if checksum is not None and hashlib.sha1(data).hexdigest() != checksum.lower():
            raise ModelFormatError(f"{label}: the data's SHA-1 digest is not the checksum the model gives")
        return data


def _read_exactly(data_file, nbytes: int) -> bytes:
    """Up to ``nbytes`` bytes (fewer only at the end of the file), read into one buffer of that size."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    filled = 0
    while filled < nbytes:
        count = data_file.readinto(view[filled:])
        if not count:
            break
        filled += count
    return bytes(view[:filled]) if filled < nbytes else bytes(buffer)


def _byte_count(entries: dict[str, str], key: str, label: str) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > _MAX_DIGITS:
        raise ModelFormatError(f"{label}: {key} {value[:40]!r} is not a byte count")
    return int(value)


def tensor_to_array(tensor, where: str, external: ExternalData | None = None) -> np.ndarray:
    """The NumPy array of a ``TensorProto``, after checking its declared shape against the data present.

    External data is read through ``external`` (refused without one). Raises ``UnsupportedModelError`` for
    element types fastlstm has no use for, ``InvalidModelError`` when the declared shape and the stored data
    disagree, and ``ModelFormatError`` for external data that cannot be read safely.
    """
    if tensor.data_location not in (_DEFAULT, _EXTERNAL):
        raise InvalidModelError([f"{where}: data_location {tensor.data_location} is neither DEFAULT nor "
                                 "EXTERNAL"], "ONNX model")
    if tensor.data_location == _DEFAULT and len(tensor.external_data):
        raise InvalidModelError([f"{where}: lists external_data but its data_location is not EXTERNAL"],
                                "ONNX model")
    if tensor.HasField("segment"):
        raise UnsupportedModelError([f"{where}: a segmented tensor (TensorProto.segment)"])
    dtype = NUMPY_TYPES.get(tensor.data_type)
    if dtype is None:
        raise UnsupportedModelError([f"{where}: element type {tensor.data_type} (TensorProto.DataType); "
                                     "fastlstm reads float, double, float16, integer and bool tensors"])
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        raise InvalidModelError([f"{where}: negative dimension in shape {dims}"], "ONNX model")
    count = math.prod(dims)
    if count > MAX_TENSOR_ELEMENTS:
        raise InvalidModelError([f"{where}: declared shape {dims} ({count} elements) is absurdly large"],
                                "ONNX model")
    raw = tensor.raw_data
    typed = getattr(tensor, _TYPED_FIELD[tensor.data_type])
    strays = [name for name in _VALUE_FIELDS if name != _TYPED_FIELD[tensor.data_type] and len(getattr(tensor, name))]
    if strays:
        raise InvalidModelError([f"{where}: a {dtype.name} tensor with values in {', '.join(strays)}, which "
                                 f"that type does not use"], "ONNX model")
    if tensor.data_location == _EXTERNAL:
        if raw or len(typed):
            raise InvalidModelError([f"{where}: stored as external data but also holds values in the file"],
                                    "ONNX model")
        if external is None:
            external = ExternalData(None, "ONNX model")
        raw = external.read(tensor, where, count * dtype.itemsize)
    if raw:
        if len(typed):
            raise InvalidModelError([f"{where}: holds both raw_data and typed values"], "ONNX model")
        if len(raw) != count * dtype.itemsize:
            raise InvalidModelError([
                f"{where}: declared shape {dims} needs {count * dtype.itemsize} bytes of {dtype.name} data, "
                f"the file holds {len(raw)}"], "ONNX model")
        array = np.frombuffer(raw, dtype=dtype).copy()
    else:
        if len(typed) != count:
            raise InvalidModelError([
                f"{where}: declared shape {dims} needs {count} values, the file holds {len(typed)}"], "ONNX model")
        if tensor.data_type == FLOAT16:
            bits = np.asarray(typed, dtype=np.int64)
            if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
                raise InvalidModelError([f"{where}: float16 values outside 16 bits"], "ONNX model")
            array = bits.astype(np.uint16).view(np.float16)
        else:
            array = np.asarray(typed, dtype=np.float64 if dtype.kind == "f" else np.int64)
            if dtype.kind in "iu" and array.size and (array.min() < np.iinfo(dtype).min
                                                      or array.max() > np.iinfo(dtype).max):
                raise InvalidModelError([f"{where}: values outside the range of {dtype.name}"], "ONNX model")
            array = array.astype(dtype)
    return array.reshape(dims)


def attribute_value(attribute, where: str):
    """``(kind, value)`` of an ``AttributeProto``; kind is "float", "int", "string", "tensor", "floats", ...

    Strings are decoded (UTF-8); tensors are returned as the ``TensorProto`` message (convert with
    ``tensor_to_array``); graphs and other kinds are returned as their messages, for the caller to refuse.
    Lists longer than ``MAX_ATTRIBUTE_VALUES`` are refused before they are converted (the Constant
    operator's ``value_floats``/``value_ints`` are read with ``attribute_array`` instead).
    """
    if attribute.ref_attr_name:
        raise InvalidModelError([f"{where}: refers to a function attribute ({attribute.ref_attr_name!r}) "
                                 "outside a function"], "ONNX model")
    kind = _ATTRIBUTE_TYPES.get(attribute.type)
    if kind is None:
        raise InvalidModelError([f"{where}: attribute has no valid type ({attribute.type})"], "ONNX model")
    if kind == "float":
        return kind, float(attribute.f)
    if kind == "int":
        return kind, int(attribute.i)
    if kind == "string":
        return kind, _decode(attribute.s, where)
    if kind in ("floats", "ints", "strings"):
        count = len(getattr(attribute, kind))
        if count > MAX_ATTRIBUTE_VALUES:
            raise InvalidModelError([f"{where}: holds {count} values; no attribute fastlstm reads needs more "
                                     f"than {MAX_ATTRIBUTE_VALUES}"], "ONNX model")
    if kind == "floats":
        return kind, [float(v) for v in attribute.floats]
    if kind == "ints":
        return kind, [int(v) for v in attribute.ints]
    if kind == "strings":
        return kind, [_decode(s, where) for s in attribute.strings]
    if kind == "tensor":
        return kind, attribute.t
    return kind, None


def attribute_array(attribute, dtype: np.dtype) -> np.ndarray:
    """A ``floats`` or ``ints`` attribute as a 1-D array, converted without an intermediate Python list."""
    values = attribute.floats if dtype.kind == "f" else attribute.ints
    if len(values) > MAX_TENSOR_ELEMENTS:
        raise InvalidModelError([f"attribute {attribute.name!r} holds {len(values)} values"], "ONNX model")
    return np.fromiter(values, dtype=dtype, count=len(values))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidModelError([f"{where}: string is not valid UTF-8"], "ONNX model") from None


def declared_dims(value_info) -> tuple[int | None, ...] | None:
    """The shape a graph input or output declares: an int per static dimension, None per symbolic one.

    None when no tensor shape is declared.
    """
    type_proto = value_info.type
    if type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in type_proto.tensor_type.shape.dim:
        dims.append(int(dim.dim_value) if dim.WhichOneof("value") == "dim_value" and dim.dim_value > 0 else None)
    return tuple(dims)


def declared_element_type(value_info) -> int | None:
    type_proto = value_info.type
    if type_proto.WhichOneof("value") != "tensor_type":
        return None
    return int(type_proto.tensor_type.elem_type)
