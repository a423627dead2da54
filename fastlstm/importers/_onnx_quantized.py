"""What the operators of ONNX Runtime's dynamic quantization mean in fastlstm's terms.

``onnxruntime.quantization.quantize_dynamic`` rewrites a float model's ``LSTM`` nodes into
``com.microsoft::DynamicQuantizeLSTM`` and its ``MatMul`` nodes into ``DynamicQuantizeLinear`` (the data
quantized to uint8 at run time), ``MatMulInteger``, a ``Cast`` to float and a ``Mul`` by the product of the data's
scale and the weight's scale; ONNX Runtime's optimizer may fuse that chain into ``com.microsoft::
DynamicQuantizeMatMul``. The weights of every one of them are 8-bit integers ``q`` with a scale and a zero
point, standing for ``scale * (q - zero_point)``; only the data is quantized at run time, and fastlstm does not
quantize the data: it computes with the dequantized weights in float32 (so its output equals ONNX Runtime's on
the float model holding those weights, and differs from ONNX Runtime's quantized run by the rounding of the
data to 8 bits).

* An LSTM's weights become float32 ``scale * (q - zero_point)`` with one scale per gate row (a per-tensor
  scale repeated on every row of its direction), kept in ``CellWeights.w_ih_scale``/``w_hh_scale`` so that
  ``weights="int8"`` runs the very integers of the file. That needs ``q - zero_point`` to be 8-bit
  integers: a zero point of 0 (what the quantizer writes for int8 weights, which it quantizes symmetrically),
  uint8 weights with the zero point 128, or any zero point when every ``q - zero_point`` of the direction
  still lies in -128..127. Otherwise the layer is refused, naming the zero point.
* A dense head's weights become float32 ``scale * (q - zero_point)`` whatever the zero point (the head runs in
  float32), with a scale per tensor or per output column.
* An embedding table the quantizer stored as 8-bit integers (``Gather`` of the integer table by the token ids,
  then ``DequantizeLinear``, possibly after a ``Transpose`` of the gathered integers) becomes the float32
  table ``(q - zero_point) * scale``: what ``DequantizeLinear`` computes for every row looked up.

Nothing here is run: the values of the chain around ``MatMulInteger`` are abstract (``QuantizedData``,
``DataScale``, ``DataZeroPoint``, ``IntegerProduct``), each tied to the ``Flow`` that was quantized, and the
chain becomes one dense layer only when it is complete and every part belongs to the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spec import INT8_RANGE, DenseLayer
from ._onnx_values import Const, Flow, Malformed, Refused

# ONNX TensorProto.DataType of a float, the only type a MatMulInteger result may be cast to here.
_FLOAT = 1
# How to make a model whose LSTM weights fastlstm can hold as 8-bit integers.
_SYMMETRIC_HINT = ("re-quantize with symmetric int8 weights (quantize_dynamic(..., weight_type=QuantType.QInt8, "
                   "extra_options={'WeightSymmetric': True}), the default for int8), or load the float model")


@dataclass(frozen=True, eq=False)
class QuantizedData:
    """``DynamicQuantizeLinear``'s first output: ``flow`` rounded to uint8 at run time."""

    flow: Flow


@dataclass(frozen=True, eq=False)
class DataZeroPoint:
    """``DynamicQuantizeLinear``'s third output: the zero point it chose for ``flow``."""

    flow: Flow


@dataclass(frozen=True, eq=False)
class DataScale:
    """``DynamicQuantizeLinear``'s second output (the scale it chose for ``flow``), times ``weight_scale`` once a
    ``Mul`` by a constant has applied it (None: not yet)."""

    flow: Flow
    weight_scale: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class IntegerProduct:
    """``MatMulInteger(QuantizedData(flow), weight)``: the integer product of the quantized data and the weight's
    integers, ``weight`` being ``q - zero_point`` (float64, ``(in, out)``); ``as_float`` once cast to float."""

    flow: Flow
    weight: np.ndarray
    as_float: bool = False


@dataclass(frozen=True, eq=False)
class QuantizedEmbedding:
    """The rows of an 8-bit ``table`` gathered by the token ids, not yet dequantized: ``flow`` is the embedding's
    Flow (the ids' axes, then the features), rearranged as the graph rearranges the integers."""

    flow: Flow
    table: np.ndarray


QUANTIZED_VALUES = (QuantizedData, DataZeroPoint, DataScale, IntegerProduct)


def dequantized_table(embedding: QuantizedEmbedding, scale_value, zero_value, what: str) -> np.ndarray:
    """``DequantizeLinear`` of gathered embedding rows: the float32 table ``(q - zero_point) * scale``, with one
    scale and zero point for the whole table (the quantizer's)."""
    table = embedding.table
    scale = scale_array(scale_value, f"{what} scale")
    zero = np.zeros((), table.dtype) if zero_value is None else integer_array(zero_value, f"{what} zero point")
    if scale.size != 1 or zero.size != 1:
        raise Refused(f"{what} dequantizes an embedding with {scale.size} scales and {zero.size} zero points; "
                      "fastlstm follows one of each for the whole table")
    if zero.dtype != table.dtype:
        raise Malformed(f"{what}: the zero point is {zero.dtype} but the table is {table.dtype}")
    integers = (table.astype(np.int32) - zero.astype(np.int32).reshape(())).astype(np.float32)
    return integers * scale.reshape(())


# ----------------------------------------------------------------------------------------- weights
def integer_array(value, what: str) -> np.ndarray:
    """A constant of int8 or uint8 values (a quantized weight or its zero point)."""
    if not isinstance(value, Const):
        raise Refused(f"{what} must be a constant (an initializer or Constant node)")
    if value.array.dtype not in (np.int8, np.uint8):
        raise Malformed(f"{what} must hold int8 or uint8 values, got {value.array.dtype}")
    return value.array


def scale_array(value, what: str) -> np.ndarray:
    """A constant of finite scales > 0, as float32 (the type ONNX Runtime multiplies in)."""
    if value is None:
        raise Malformed(f"{what} is missing")
    if not isinstance(value, Const):
        raise Refused(f"{what} must be a constant (an initializer or Constant node)")
    array = value.array
    if array.dtype != np.float32:
        raise Malformed(f"{what} must hold float32 values, got {array.dtype}")
    if not np.all(np.isfinite(array)) or not np.all(array > 0):
        bad = float(array[~(np.isfinite(array) & (array > 0))].reshape(-1)[0])
        raise Malformed(f"{what} holds {bad!r}; a scale must be a finite number > 0")
    return array


def lstm_weight(q_value, scale_value, zero_value, name: str, op: str,
                directions: int) -> tuple[np.ndarray, np.ndarray]:
    """The float32 weights ``scale * (q - zero_point)`` of a ``DynamicQuantizeLSTM`` input ``name`` ("W" or "R"),
    in the standard LSTM's layout ``(directions, 4*hidden, size)`` (the contrib op stores them transposed,
    ``(directions, size, 4*hidden)``), and their per-row scales ``(directions, 4*hidden)``, both in ONNX's gate
    order; refused unless ``q - zero_point`` are 8-bit integers (module docstring)."""
    q = integer_array(q_value, name).astype(np.int64)
    size = "hidden_size" if name == "R" else "input_size"
    if (q.ndim != 3 or q.shape[0] != directions or q.shape[2] % 4 or 0 in q.shape
            or (name == "R" and q.shape[2] != 4 * q.shape[1])):
        raise Malformed(f"{name} has shape {q.shape}, expected ({directions}, {size}, 4*hidden_size) (the contrib "
                        "op's layout, transposed relative to the LSTM operator's)")
    rows = q.shape[2]
    if zero_value is None:
        raise Malformed(f"{name}_zero_point is missing")
    zero = integer_array(zero_value, f"{name}_zero_point")
    scale = scale_array(scale_value, f"{name}_scale")
    accepted = ((directions,), (directions, rows))
    problems = [f"{label} has shape {array.shape}, expected {accepted[0]} (per tensor) or {accepted[1]} (per "
                "row)" for label, array in ((f"{name}_scale", scale), (f"{name}_zero_point", zero))
                if array.shape not in accepted]
    if not problems and zero.shape != scale.shape:
        problems.append(f"{name}_zero_point has shape {zero.shape} but {name}_scale has {scale.shape}")
    if not problems and zero.dtype != q_value.array.dtype:
        problems.append(f"{name}_zero_point is {zero.dtype} but {name} is {q_value.array.dtype}")
    if problems:
        raise Malformed("; ".join(problems))
    zero = zero.astype(np.int64).reshape(directions, -1)
    if np.any(zero != zero[:, :1]):
        raise Refused(f"{op}: {name}_zero_point differs between the rows of a direction (asymmetric per-channel "
                      "quantization); ONNX Runtime reads one zero point per direction and refuses such a node, and "
                      f"fastlstm holds 8-bit weights without zero points: {_SYMMETRIC_HINT}")
    integers = q - zero[:, :1, None]
    low, high = INT8_RANGE
    outside = [f"direction {d}: zero point {zero[d, 0]}, so {name} - zero_point spans "
               f"{integers[d].min()}..{integers[d].max()}" for d in range(directions)
               if integers[d].min() < low or integers[d].max() > high]
    if outside:
        raise Refused(f"{op}: {name} is {q_value.array.dtype} ({'; '.join(outside)}), outside the 8-bit range "
                      f"{low}..{high} fastlstm holds quantized weights in; {_SYMMETRIC_HINT}")
    rows_scale = np.broadcast_to(scale.reshape(directions, -1), (directions, rows)).astype(np.float32)
    weights = rows_scale[:, :, None] * integers.transpose(0, 2, 1).astype(np.float32)
    return weights, np.ascontiguousarray(rows_scale)


def dense_weight(q_value, scale: np.ndarray | None, zero_value, what: str) -> np.ndarray:
    """The float32 ``(out, in)`` weight of a quantized ``(in, out)`` matrix: ``scale * (q - zero_point)`` with a
    scale and zero point per tensor or per output column (the integers of ``integer_weight``)."""
    integers = integer_weight(q_value, zero_value, what)
    return _dequantized(integers, scale, what)


def integer_weight(q_value, zero_value, what: str) -> np.ndarray:
    """``q - zero_point`` of a quantized ``(in, out)`` matrix (float64), the zero point per tensor or per column
    (absent: 0)."""
    q = integer_array(q_value, what)
    if q.ndim != 2 or 0 in q.shape:
        raise Refused(f"{what} has shape {q.shape}; fastlstm runs 2-D dense weights")
    zero = np.zeros((), np.int64)
    if zero_value is not None:
        zero = integer_array(zero_value, f"{what} zero point")
        if zero.dtype != q.dtype:
            raise Malformed(f"{what} zero point is {zero.dtype} but the weight is {q.dtype}")
        if zero.shape not in ((), (1,), (q.shape[1],)):
            raise Malformed(f"{what} zero point has shape {zero.shape}, expected one value or {q.shape[1]} (one "
                            "per output column)")
    return q.astype(np.float64) - zero.astype(np.float64)


def _dequantized(integers: np.ndarray, scale: np.ndarray | None, what: str) -> np.ndarray:
    """``(scale * integers).T`` in float32 for a scale per tensor or per column of ``integers`` (None: 1)."""
    if scale is None:
        return np.ascontiguousarray(integers.T.astype(np.float32))
    if scale.shape not in ((), (1,), (integers.shape[1],)):
        raise Malformed(f"{what} scale has shape {scale.shape}, expected one value or {integers.shape[1]} (one "
                        "per output column)")
    return np.ascontiguousarray((scale.astype(np.float32) * integers.astype(np.float32)).T)


# ----------------------------------------------------------------------------------------- the MatMul chain
def dynamic_quantize_linear(flow: Flow) -> list:
    """``DynamicQuantizeLinear(flow)``: the quantized data, its scale and its zero point."""
    return [QuantizedData(flow), DataScale(flow), DataZeroPoint(flow)]


def matmul_integer(inputs: list, what: str) -> IntegerProduct:
    """``MatMulInteger(a, b, a_zero_point, b_zero_point)`` of data quantized by ``DynamicQuantizeLinear`` (with
    its own zero point) and a constant weight."""
    data, weight, data_zero, weight_zero = (list(inputs) + [None] * 4)[:4]
    if not isinstance(data, QuantizedData):
        raise Refused(f"{what} multiplies a tensor that is not data quantized by DynamicQuantizeLinear")
    if not (isinstance(data_zero, DataZeroPoint) and data_zero.flow is data.flow):
        raise Refused(f"{what}: the data's zero point is not the one DynamicQuantizeLinear chose for it")
    return IntegerProduct(data.flow, integer_weight(weight, weight_zero, f"{what} B"))


def cast(product: IntegerProduct, to: int, what: str) -> IntegerProduct:
    if to != _FLOAT:
        raise Refused(f"{what} casts an integer product to element type {to}; fastlstm follows a cast to float")
    return IntegerProduct(product.flow, product.weight, as_float=True)


def multiply(first, second, what: str):
    """``Mul`` in the chain: the data's scale times the weight's (a constant), or the integer product (cast to
    float) times that combined scale, which makes the dense layer: ``(flow, DenseLayer)``."""
    for a, b in ((first, second), (second, first)):
        if isinstance(a, DataScale) and a.weight_scale is None and isinstance(b, Const):
            scale = b.array
            if scale.dtype != np.float32 or scale.ndim > 1:
                raise Malformed(f"{what}: the weight's scale must be float32, one value or one per output column; "
                                f"got {scale.dtype} of shape {scale.shape}")
            return DataScale(a.flow, scale_array(b, f"{what} weight scale"))
        if isinstance(a, IntegerProduct) and isinstance(b, DataScale):
            if not a.as_float:
                raise Refused(f"{what} multiplies the integer product before it is cast to float")
            if b.flow is not a.flow:
                raise Refused(f"{what} scales an integer product by the scale of other data")
            return a.flow, DenseLayer(weight=_dequantized(a.weight, b.weight_scale, what))
    raise Refused(f"{what} combines the parts of a dynamically quantized MatMul in a way fastlstm does not follow "
                  "(it follows DynamicQuantizeLinear, MatMulInteger, Cast to float and Mul by the two scales, as "
                  "onnxruntime's quantize_dynamic writes them)")
