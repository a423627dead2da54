"""Reading ONNX protobuf messages safely: tensors to NumPy arrays and node attributes to Python values.

Nothing here trusts a size declared in the file. A tensor's ``dims`` are checked against the bytes or
values actually present before any array is made, so a corrupt or hostile file can make the importer
refuse, never allocate what it claims. Tensors stored outside the file (ONNX "external data") are
refused: fastlstm reads only the model file itself and never opens paths named inside it.

The functions take the ``onnx`` package's messages but need nothing from it beyond them.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidModelError, UnsupportedModelError

# TensorProto.DataType values (fixed by the ONNX standard, so no onnx import is needed for them).
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
FLOAT_TYPES = {FLOAT: "float32", DOUBLE: "float64", FLOAT16: "float16"}
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
# No tensor of an LSTM model comes near this; a larger declared size is corrupt or hostile.
MAX_TENSOR_ELEMENTS = 1 << 31
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# AttributeProto.AttributeType values.
_ATTRIBUTE_TYPES = {1: "float", 2: "int", 3: "string", 4: "tensor", 5: "graph", 6: "floats", 7: "ints",
                    8: "strings", 9: "tensors", 10: "graphs", 11: "sparse_tensor", 12: "sparse_tensors",
                    13: "type_proto", 14: "type_protos"}


def tensor_to_array(tensor, where: str) -> np.ndarray:
    """The NumPy array of a ``TensorProto``, after checking its declared shape against the data present.

    Raises ``UnsupportedModelError`` for external data and element types fastlstm has no use for, and
    ``InvalidModelError`` when the declared shape and the stored data disagree.
    """
    if tensor.data_location == _EXTERNAL or len(tensor.external_data):
        raise UnsupportedModelError([
            f"{where}: stored outside the model file (ONNX external data); fastlstm reads weights only from "
            "the .onnx file itself: save the model with its tensors inside (onnx.save_model(..., "
            "save_as_external_data=False))"])
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
    if kind == "floats":
        return kind, [float(v) for v in attribute.floats]
    if kind == "ints":
        return kind, [int(v) for v in attribute.ints]
    if kind == "strings":
        return kind, [_decode(s, where) for s in attribute.strings]
    if kind == "tensor":
        return kind, attribute.t
    return kind, None


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
