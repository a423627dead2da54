"""PyTorch's dynamically quantized modules (``torch.ao.quantization.quantize_dynamic``) -> float state_dict names.

A dynamically quantized ``nn.LSTM`` (or ``nn.GRU``: the same, with 3 gates) keeps no ``weight_ih_l0``: its
state_dict holds one packed cell per layer and direction, ``<prefix>._all_weight_values.<k>.param``, a TorchBind
``CellParamsBase`` whose pickled state is

* ``("quantized_dynamic", [b_ih, b_hh], [], [reduce_range], [packed_ih, packed_hh])`` (``dtype=torch.qint8``):
  each packed Linear weight is ``(weight, bias)`` with ``weight`` a quantized tensor, 8-bit integers ``q``
  with a scale (per tensor, or per output row) and a zero point;
* ``("quantized_fp16", [], [], [], [packed_ih, packed_hh])`` (``dtype=torch.float16``): each packed weight is a
  float tensor holding float16 values (``(weight, bias)``).

A dynamically quantized ``nn.Linear`` holds ``<prefix>._packed_params._packed_params`` = ``(weight, bias)``
(a quantized or float16-valued weight), ``<prefix>._packed_params.dtype`` and ``<prefix>.scale`` /
``<prefix>.zero_point``, which a dynamic Linear leaves at 1.0 and 0 (a statically quantized Linear would
re-quantize its output with them: refused).

``dequantized`` rewrites such a dict into the names ``state_dict.translate`` reads (which tells an LSTM from a
GRU by ``weight_hh``'s rows, as for float modules): the recurrent weights become
``QuantizedWeight`` (float32 ``scale * q`` and the per-row scales, so that ``weights="int8"`` runs the file's
very integers), float16 weights become float32 (exactly), and Linear weights become float32 ``scale * (q -
zero_point)`` (the head runs in float32). PyTorch quantizes the data at run time too (``reduce_range`` only
changes how); fastlstm computes with the dequantized weights and float data. fastlstm holds 8-bit weights without
zero points: qint8 with zero point 0 (what PyTorch's default symmetric weight observer writes), per tensor or
per output row (axis 0); any other scheme or zero point is refused naming it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ...errors import InvalidModelError, ModelFormatError, UnsupportedModelError
from .unpickler import QuantizedTensor, TorchBindObject, TorchName

_CELL = re.compile(r"^(?:(?P<prefix>.+)\.)?_all_weight_values\.(?P<index>\d{1,9})\.param$")
_LINEAR = re.compile(r"^(?:(?P<prefix>.+)\.)?_packed_params\._packed_params$")
_CELL_CLASS = "__torch__.torch.classes.rnn.CellParamsBase"
_LINEAR_CLASS = "__torch__.torch.classes.quantized.LinearPackedParamsBase"
_REQUANTIZE_HINT = ("quantize with PyTorch's default dynamic qconfig (symmetric qint8 weights: "
                    "torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)), or "
                    "load the float model")
_MAX_NESTING = 64


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A recurrent weight read from 8-bit integers: ``values`` float32 ``(rows, columns)`` equal to
    ``scale[:, None] * q`` for integers ``q`` in -128..127 (``CellWeights.w_ih_scale``)."""

    values: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


def dequantized_checkpoint(root, source: str):
    """``root`` (a file's object) with ``dequantized`` applied to every dict in it (a checkpoint nests the
    state_dict), each dict once however often it is referenced, down to ``_MAX_NESTING`` levels."""
    done: dict[int, dict] = {}

    def rewrite(obj: dict, depth: int) -> dict:
        if id(obj) in done:
            return done[id(obj)]
        done[id(obj)] = obj  # a dict holding itself is left as it is there
        rewritten = dequantized(obj, source)
        done[id(obj)] = rewritten
        if depth < _MAX_NESTING:
            for key, value in rewritten.items():
                if isinstance(value, dict):
                    rewritten[key] = rewrite(value, depth + 1)
        return rewritten

    return rewrite(root, 0) if isinstance(root, dict) else root


def dequantized(state: dict, source: str, directions: dict[str, int] | None = None,
                dynamic_linears: frozenset[str] = frozenset()) -> dict:
    """``state`` with every dynamically quantized LSTM, GRU and Linear replaced by float names, in place of their
    first entry (the dict's order is its modules' order); other entries are kept as they are.

    A module tree supplies what a state_dict does not record: ``directions`` (1 or 2) of each quantized LSTM or
    GRU by its prefix, and the prefixes of Linear modules known to be dynamically quantized (``dynamic_linears``:
    their output scale and zero point play no part and need not be present).
    """
    cells: dict[str, dict[int, object]] = {}
    linears: set[str] = set()
    for name, value in state.items():
        match = _CELL.match(name) if isinstance(name, str) else None
        if match and isinstance(value, TorchBindObject):
            cells.setdefault(match["prefix"] or "", {})[int(match["index"])] = value
        match = _LINEAR.match(name) if isinstance(name, str) else None
        if match and isinstance(value, (tuple, list, TorchBindObject)):
            linears.add(match["prefix"] or "")
    if not cells and not linears:
        return state
    problems: list[str] = []
    unsupported: list[str] = []
    replacements: dict[str, dict] = {}
    consumed: set[str] = set()
    for prefix, by_index in cells.items():
        dotted = f"{prefix}." if prefix else ""
        first = f"{dotted}_all_weight_values.0.param"
        consumed.update(f"{dotted}_all_weight_values.{k}.param" for k in by_index)
        replacements[first] = _recurrent_names(prefix, by_index, source, problems, unsupported,
                                               (directions or {}).get(prefix))
    for prefix in linears:
        dotted = f"{prefix}." if prefix else ""
        names = [f"{dotted}_packed_params._packed_params", f"{dotted}_packed_params.dtype", f"{dotted}scale",
                 f"{dotted}zero_point"]
        consumed.update(n for n in names if n in state)
        replacements[names[0]] = _linear_names(prefix, state, problems, unsupported, prefix in dynamic_linears)
    if problems:
        raise InvalidModelError(problems, source)
    if unsupported:
        raise UnsupportedModelError(unsupported, f"{source}: {_REQUANTIZE_HINT}")
    result = OrderedDict()
    for name, value in state.items():
        if name in replacements:
            result.update(replacements[name])
        elif name not in consumed:
            result[name] = value
    return result


# ----------------------------------------------------------------------------------------- LSTM and GRU
def _recurrent_names(prefix: str, by_index: dict[int, object], source: str, problems: list[str],
                unsupported: list[str], directions: int | None) -> dict:
    """The ``weight_ih_l<k>[_reverse]`` ... names of one quantized LSTM's (or GRU's) cells."""
    dotted = f"{prefix}." if prefix else ""
    count = len(by_index)
    if sorted(by_index) != list(range(count)):
        problems.append(f"{dotted}_all_weight_values: cells {sorted(by_index)[:10]} are not 0..{count - 1}")
        return {}
    cells = []
    for k in range(count):
        where = f"{dotted}_all_weight_values.{k}.param"
        cell = _cell(by_index[k], where, problems, unsupported)
        if cell is None:
            return {}
        cells.append(cell)
    if directions is None:
        directions = _directions(cells, f"{dotted}_all_weight_values", source)
    elif count % directions:
        problems.append(f"{dotted}_all_weight_values: {count} cells for {directions} directions per layer")
        return {}
    names = {}
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(cells):
        layer, reverse = divmod(k, directions)
        suffix = f"_l{layer}{'_reverse' if reverse else ''}"
        names[f"{dotted}weight_ih{suffix}"] = w_ih
        names[f"{dotted}weight_hh{suffix}"] = w_hh
        if b_ih is not None:
            names[f"{dotted}bias_ih{suffix}"] = b_ih
            names[f"{dotted}bias_hh{suffix}"] = b_hh
    return names


def _cell(cell, where: str, problems: list[str], unsupported: list[str]):
    """``(w_ih, w_hh, b_ih, b_hh)`` of one packed cell (module docstring), or None with the problem noted."""
    if cell.qualified_name != _CELL_CLASS:
        problems.append(f"{where}: a {cell.qualified_name}, expected a recurrent cell ({_CELL_CLASS})")
        return None
    state = cell.state
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[0], str)
            and all(isinstance(part, list) for part in state[1:])):
        problems.append(f"{where}: its state is not (kind, tensors, doubles, longs, packed weights)")
        return None
    kind, tensors, doubles, longs, packed = state
    if kind not in ("quantized_dynamic", "quantized_fp16"):
        unsupported.append(f"{where}: a cell of kind {kind!r}; fastlstm reads PyTorch's dynamically "
                           "quantized cells ('quantized_dynamic', 'quantized_fp16')")
        return None
    expected_tensors = 2 if kind == "quantized_dynamic" else 0
    if len(packed) != 2 or len(tensors) != expected_tensors or doubles or len(longs) > 1:
        problems.append(f"{where}: a {kind!r} cell holds {len(tensors)} tensors, {len(doubles)} doubles, "
                        f"{len(longs)} integers and {len(packed)} packed weights; expected {expected_tensors}, 0, at "
                        "most 1 (reduce_range) and 2 (weight_ih, weight_hh)")
        return None
    weights, biases = [], []
    for label, item in zip(("weight_ih", "weight_hh"), packed):
        weight_bias = _packed_linear(item, f"{where} {label}", problems)
        if weight_bias is None:
            return None
        weight, bias = weight_bias
        if isinstance(weight, QuantizedTensor):
            weight = _int8_rows(weight, f"{where} {label}", problems, unsupported)
        elif not (_is_float(weight) and weight.ndim == 2):
            problems.append(f"{where} {label}: expected a quantized or floating-point 2-D tensor, got "
                            f"{_describe(weight)}")
            weight = None
        weights.append(weight)
        biases.append(bias)
    if any(w is None for w in weights):
        return None
    # torch adds the biases packed with the weights; the cell's own copies (its tensors) must be the same
    if kind == "quantized_dynamic" and not all(
            (own is None and packed_bias is None) or (isinstance(own, np.ndarray) and _is_float(packed_bias)
                                                      and np.array_equal(own, packed_bias))
            for own, packed_bias in zip(tensors, biases)):
        problems.append(f"{where}: its biases differ from those packed with its weights")
        return None
    if any(b is not None and not _is_float(b) for b in biases) or (biases[0] is None) != (biases[1] is None):
        problems.append(f"{where}: biases {_describe(biases[0])}, {_describe(biases[1])}; expected two "
                        "floating-point tensors or none")
        return None
    return weights[0], weights[1], biases[0], biases[1]


def _directions(cells: list, where: str, source: str) -> int:
    """1 or 2: how the cells (layer after layer, directions in order) make layers, from their shapes alone
    (a state_dict does not record ``bidirectional``); refused when both readings fit."""
    fits = []
    for directions in (1, 2):
        if len(cells) % directions:
            continue
        hidden = cells[0][1].shape[1] if len(cells[0][1].shape) == 2 else None
        input_size = cells[0][0].shape[1] if len(cells[0][0].shape) == 2 else None
        expected = []
        for k in range(len(cells)):
            layer = k // directions
            expected.append((input_size if layer == 0 else directions * hidden, hidden))
        if all(len(c[0].shape) == 2 and len(c[1].shape) == 2 and (c[0].shape[1], c[1].shape[1]) == e
               for c, e in zip(cells, expected)):
            fits.append(directions)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise InvalidModelError([f"{where}: the cells' shapes ({', '.join(str(c[0].shape) for c in cells)}) make "
                                 "neither a stack of layers nor of bidirectional layers"], source)
    raise ModelFormatError(
        f"{source}: {where}: {len(cells)} quantized recurrent cells of input size {cells[0][0].shape[1]} and hidden "
        f"size {cells[0][1].shape[1]} are {len(cells)} layers or {len(cells) // 2} bidirectional layers, and a quantized "
        "module's state_dict does not say which; load the quantized module itself (in memory, or saved with "
        "torch.jit.save(torch.jit.script(model))), which records it")


def _int8_rows(tensor: QuantizedTensor, where: str, problems: list[str],
               unsupported: list[str]) -> QuantizedWeight | None:
    """A recurrent weight as float32 ``scale * q`` with one scale per row, if it is qint8 with zero point 0."""
    parameters = _row_parameters(tensor, where, problems, unsupported)
    if parameters is None:
        return None
    values, scale, zero = parameters
    if values.dtype != np.int8 or np.any(zero != 0):
        points = sorted({int(z) for z in zero})
        kind = {"int8": "qint8", "uint8": "quint8", "int32": "qint32"}.get(values.dtype.name, values.dtype.name)
        unsupported.append(f"{where}: {kind} weights with zero point(s) "
                           f"{', '.join(map(str, points[:5]))}; fastlstm holds 8-bit weights as int8 values times a "
                           "scale, without zero points (qint8, zero point 0)")
        return None
    row_scale = scale.astype(np.float32)
    return QuantizedWeight(row_scale[:, None] * values.astype(np.float32), row_scale)


def _row_parameters(tensor: QuantizedTensor, where: str, problems: list[str], unsupported: list[str]):
    """``(values, scale, zero_point)`` of a quantized 2-D ``(rows, in)`` weight, one scale and zero point per
    row (a per-tensor pair repeated), checked; None after reporting what is wrong."""
    values = tensor.values
    if values.ndim != 2 or 0 in values.shape:
        problems.append(f"{where}: expected a 2-D weight, got shape {values.shape}")
        return None
    rows = values.shape[0]
    if tensor.qscheme == "per_tensor_affine":
        scale, zero = np.full(rows, tensor.scale, np.float64), np.full(rows, tensor.zero_point, np.int64)
    elif tensor.qscheme == "per_channel_affine" and tensor.axis == 0:
        scale, zero = _channel_parameters(tensor, rows, where, problems)
        if scale is None:
            return None
    else:
        axis = f" along axis {tensor.axis}" if tensor.axis is not None else ""
        unsupported.append(f"{where}: quantization scheme {tensor.qscheme}{axis}; fastlstm reads per_tensor_affine and "
                           "per_channel_affine along the rows (axis 0)")
        return None
    if not _valid_scales(scale, where, problems):
        return None
    return values, scale, zero


def _channel_parameters(tensor: QuantizedTensor, rows: int, where: str, problems: list[str]):
    scale, zero = tensor.scale, tensor.zero_point
    if not (isinstance(scale, np.ndarray) and isinstance(zero, np.ndarray) and scale.shape == (rows,)
            and zero.shape == (rows,) and scale.dtype.kind == "f" and zero.dtype.kind in "iu"):
        problems.append(f"{where}: per-channel scales {_describe(scale)} and zero points {_describe(zero)}; expected "
                        f"{rows} of each (one per row)")
        return None, None
    return scale.astype(np.float64), zero.astype(np.int64)


def _valid_scales(scale: np.ndarray, where: str, problems: list[str]) -> bool:
    if np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(scale.astype(np.float32) > 0):
        return True
    bad = float(scale[~(np.isfinite(scale) & (scale.astype(np.float32) > 0))][0])
    problems.append(f"{where}: scale {bad!r}; a scale must be a finite number > 0 (in float32)")
    return False


# ----------------------------------------------------------------------------------------- Linear
def _linear_names(prefix: str, state: dict, problems: list[str], unsupported: list[str], dynamic: bool) -> dict:
    """``<prefix>.weight`` and ``<prefix>.bias`` of a dynamically quantized Linear, in float32 (``dynamic``: the
    module's class says it is, so its output scale and zero point need no check)."""
    dotted = f"{prefix}." if prefix else ""
    where = f"{dotted}_packed_params._packed_params"
    weight_bias = _packed_state(state[where], where, problems)
    if weight_bias is None:
        return {}
    weight, bias = weight_bias
    output_scale, output_zero = state.get(f"{dotted}scale"), state.get(f"{dotted}zero_point")
    if not dynamic and not (_number(output_scale) == 1.0 and _number(output_zero) == 0):
        unsupported.append(f"{dotted}scale / {dotted}zero_point = {_describe(output_scale)} / "
                           f"{_describe(output_zero)}: a Linear whose output is re-quantized (static quantization); "
                           "fastlstm reads dynamically quantized Linear layers (output scale 1.0, zero point 0)")
        return {}
    dtype = state.get(f"{dotted}_packed_params.dtype")
    if dtype is not None and not (isinstance(dtype, TorchName) and dtype.name in ("qint8", "quint8", "float16")):
        problems.append(f"{dotted}_packed_params.dtype: {_describe(dtype)}; expected torch.qint8 or torch.float16")
        return {}
    if isinstance(weight, QuantizedTensor):
        weight = _dequantized_matrix(weight, where, problems, unsupported)
    elif not _is_float(weight):
        problems.append(f"{where}: expected a quantized or floating-point weight, got {_describe(weight)}")
        return {}
    if weight is None:
        return {}
    names = {f"{dotted}weight": weight}
    if bias is not None:
        names[f"{dotted}bias"] = bias
    return names


def _dequantized_matrix(tensor: QuantizedTensor, where: str, problems: list[str],
                        unsupported: list[str]) -> np.ndarray | None:
    """float32 ``scale * (q - zero_point)`` of a quantized ``(out, in)`` weight, per tensor or per output row."""
    parameters = _row_parameters(tensor, where, problems, unsupported)
    if parameters is None:
        return None
    values, scale, zero = parameters
    integers = values.astype(np.int64) - zero[:, None]
    return scale.astype(np.float32)[:, None] * integers.astype(np.float32)


# ----------------------------------------------------------------------------------------- helpers
def _packed_linear(item, where: str, problems: list[str]):
    """``(weight, bias)`` of a TorchBind ``LinearPackedParamsBase``."""
    if not isinstance(item, TorchBindObject) or item.qualified_name != _LINEAR_CLASS:
        problems.append(f"{where}: {_describe(item)}, expected packed Linear weights ({_LINEAR_CLASS})")
        return None
    return _packed_state(item.state, where, problems)


def _packed_state(state, where: str, problems: list[str]):
    """``(weight, bias)`` from a packed Linear's state or a quantized Linear's ``_packed_params``."""
    if isinstance(state, TorchBindObject) and state.qualified_name == _LINEAR_CLASS:
        state = state.state
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        problems.append(f"{where}: expected (weight, bias), got {_describe(state)}")
        return None
    weight, bias = state
    if bias is not None and not _is_float(bias):
        problems.append(f"{where}: the bias is {_describe(bias)}, expected a floating-point tensor or None")
        return None
    return weight, bias


def _is_float(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _number(value):
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(-1)[0].item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return repr(value.reshape(-1)[0].item())
        return f"a {value.dtype} tensor of shape {value.shape}"
    if isinstance(value, QuantizedTensor):
        return f"a quantized tensor of shape {value.values.shape}"
    if isinstance(value, TorchBindObject):
        return f"a {value.qualified_name or 'TorchBind object'}"
    if isinstance(value, TorchName):
        return f"torch.{value.name}"
    return type(value).__name__ if not isinstance(value, (int, float, str, type(None))) else repr(value)


# ----------------------------------------------------------------------------------------- in-memory objects
def from_torch(value, torch):
    """An in-memory state_dict value of a quantized module (a TorchBind ``torch.ScriptObject``, a quantized
    tensor, a tuple of them, a dtype) as the unpickler would read it from a file; None if it is none of these.

    The object's own ``__getstate__`` gives its state: the user's object in memory, which torch already runs.
    """
    if isinstance(value, torch.ScriptObject):
        state, qualified_name = value.__getstate__()
        if qualified_name not in (_CELL_CLASS, _LINEAR_CLASS):
            return None
        obj = TorchBindObject()
        obj.qualified_name, obj.state = qualified_name, _converted(state, torch)
        return obj
    if isinstance(value, torch.dtype):
        return TorchName("dtype", str(value).removeprefix("torch."))
    if isinstance(value, (tuple, list)) or (isinstance(value, torch.Tensor) and value.is_quantized):
        return _converted(value, torch)
    return None


def _converted(value, torch):
    if isinstance(value, torch.ScriptObject):
        return from_torch(value, torch)
    if isinstance(value, (tuple, list)):
        return type(value)(_converted(v, torch) for v in value)
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if not value.is_quantized:
            return value.numpy()
        qscheme = str(value.qscheme()).removeprefix("torch.")
        values = value.int_repr().numpy()
        if qscheme in ("per_tensor_affine", "per_tensor_symmetric"):
            return QuantizedTensor(values, qscheme, float(value.q_scale()), int(value.q_zero_point()))
        return QuantizedTensor(values, qscheme, value.q_per_channel_scales().numpy(),
                               value.q_per_channel_zero_points().numpy(), int(value.q_per_channel_axis()))
    return value
