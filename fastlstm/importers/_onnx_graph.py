"""The ONNX graph walk: from the graph's outputs back to what they need, then forward through each node.

Only the nodes the outputs depend on are looked at (dead branches are ignored), in the file's order (ONNX
requires it to be topological). Each node's inputs are abstract values (see ``_onnx_values``) and so are
its outputs: LSTM, GRU and RNN nodes become ``RecurrentLayer``s, a ``Gather`` of a constant table by the
integer model input is the embedding, layout nodes rearrange Flows, ``Gemm``/``MatMul``/``Add`` and
activations build the dense head. A node fastlstm cannot follow is recorded and its outputs poisoned, so
one pass lists every unsupported op and attribute, not only the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..activations import IDENTITY, Activation
from ..errors import InvalidModelError, ModelFormatError, UnsupportedModelError
from ..spec import DIRECTIONS, DenseLayer
from . import _onnx_quantized as quantized
from . import _onnx_values as v
from ._onnx_proto import (FLOAT_TYPES, INTEGER_TYPES, NUMPY_TYPES, ExternalData, attribute_array,
                          attribute_value, declared_dims, declared_element_type, tensor_to_array)
from ._onnx_gru import GRU_ATTRIBUTES, RNN_ATTRIBUTES, gru_layer, rnn_layer
from ._onnx_lstm import (LSTM_ATTRIBUTES, LayerRecord, StateSource, checked_activation, lstm_layer,
                          node_activations, output_mode, state_inputs, state_rows)
from ._onnx_values import (BATCH, DIRS, FEATURES, HIDDEN, INPUT_AXIS, TIME, Axis, Const, Dims, Flow,
                           GraphInput, InputRows, Malformed, Part, Poison, Product, Refused, Zeros)

_STANDARD_DOMAINS = ("", "ai.onnx")
# ONNX Runtime's contrib operators; fastlstm reads the ones its dynamic quantization writes.
_MICROSOFT_DOMAIN = "com.microsoft"
_FLOATS, _INTS = 6, 7  # AttributeProto.AttributeType
# A folded constant or an identity dense layer larger than this is not something a recurrent model needs.
_MAX_FOLDED_ELEMENTS = 1 << 26
_MAX_IDENTITY_FEATURES = 4096
# Integer constant arithmetic (shape computations) is folded exactly, in Python integers, up to this size.
_MAX_EXACT_INTEGER_FOLD = 1 << 16
# Axes, starts, indices, shapes: one entry per dimension of a tensor, and no tensor has more than this many.
_MAX_RANK = 64

# The recurrent operators: (attributes, default activations of one direction, outputs in order).
_RECURRENT_OPERATORS = {
    "LSTM": (LSTM_ATTRIBUTES, ("Sigmoid", "Tanh", "Tanh"), ("Y", "Y_h", "Y_c")),
    "GRU": (GRU_ATTRIBUTES, ("Sigmoid", "Tanh"), ("Y", "Y_h")),
    "RNN": (RNN_ATTRIBUTES, ("Tanh",), ("Y", "Y_h")),
}
# com.microsoft::DynamicQuantizeLSTM: the LSTM operator with 8-bit weights (it has no layout attribute).
_QUANTIZED_LSTM = "DynamicQuantizeLSTM"
_QUANTIZED_LSTM_ATTRIBUTES = {name: spec for name, spec in LSTM_ATTRIBUTES.items() if name != "layout"}

_NO_RECURRENT_NODE = (
    "the graph has no LSTM, GRU or RNN node: the recurrence was exported unrolled (MatMul, Sigmoid, Tanh, ... "
    "per time step) or inside a Loop or Scan, which fastlstm does not turn back into a recurrent layer. Load the "
    "source model instead (the PyTorch module, state_dict or TorchScript file, or the Keras .keras/.h5 file), or "
    "export it with each layer kept as one ONNX LSTM, GRU or RNN node (torch.onnx.export does so for nn.LSTM and "
    "nn.GRU, and for nn.RNN with dynamo=False; tf2onnx 1.9.3 or later for Keras)")

# Elementwise activation operators -> (catalogue name, {attribute: default}).
_ACTIVATION_OPS = {
    "Relu": ("relu", {}), "Tanh": ("tanh", {}), "Sigmoid": ("sigmoid", {}), "Softsign": ("softsign", {}),
    "Softplus": ("softplus", {}), "LeakyRelu": ("leaky_relu", {"alpha": 0.01}), "Elu": ("elu", {"alpha": 1.0}),
    "ThresholdedRelu": ("thresholded_relu", {"alpha": 1.0}),
    "HardSigmoid": ("hard_sigmoid", {"alpha": 0.2, "beta": 0.5}),
}


@dataclass
class GraphResult:
    """What the walk found: the layers in order, the head, the output mode and how to call the model."""

    layers: list[LayerRecord]
    head: tuple[DenseLayer, ...]
    output: str
    input_name: str
    input_layout: tuple[str, ...]
    sequence_lens: str | None
    state_inputs: dict[str, str]
    state_outputs: list[str] = field(default_factory=list)
    main_output: str | None = None
    embedding: np.ndarray | None = None


class GraphReader:
    """Walks one ``GraphProto``; ``read()`` returns a ``GraphResult`` or raises listing every problem."""

    def __init__(self, graph, opset: int, source: str, external: ExternalData):
        self.graph = graph
        self.opset = opset
        self.source = source
        self.external = external
        self.unsupported: list[str] = []
        self.invalid: list[str] = []
        self.unknown_operators: list[tuple[str, str, object]] = []  # (operator, where, node)
        self.values: dict[str, object] = {}
        self.initializers: dict[str, object] = {}
        for tensor in graph.initializer:
            if tensor.name in self.initializers:
                raise ModelFormatError(f"{source}: initializer {tensor.name!r} is defined twice")
            self.initializers[tensor.name] = tensor
        if len(graph.sparse_initializer):
            self.unsupported.append("sparse initializers (GraphProto.sparse_initializer)")
        self.graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in self.initializers}
        self.layers: dict[int, LayerRecord] = {}
        self.data_input: str | None = None
        self.binding: dict[str, str] = {}  # input-axis role -> canonical role, once a layer reads the input
        self.embedding: np.ndarray | None = None  # the (vocab, E) table a Gather by the token ids reads
        self.quantized_table: np.ndarray | None = None  # the same, stored as 8-bit integers (_dequantize_linear)
        self.input_layout: tuple[str, ...] = ()
        self.time_size: int | None = None
        self.batch_size: int | None = None
        self.needed_outputs: set[str] = set()

    # ------------------------------------------------------------------------------------ the walk
    def read(self) -> GraphResult:
        nodes = list(self.graph.node)
        needed = self._needed_nodes(nodes)
        for index, node in enumerate(nodes):
            if index in needed:
                self._evaluate(node, index)
        if not any((node.op_type in _RECURRENT_OPERATORS and node.domain in _STANDARD_DOMAINS)
                   or (node.op_type == _QUANTIZED_LSTM and node.domain == _MICROSOFT_DOMAIN) for node in nodes):
            raise UnsupportedModelError([_NO_RECURRENT_NODE] + self._operators_by_type() + self.unsupported
                                        + self.invalid)
        result = None
        if not self.invalid and not self.unsupported and not self.unknown_operators:
            # outputs are classified only after a clean walk
            try:
                result = self._finish()
            except Refused as exc:
                self.unsupported.append(str(exc))
        if self.invalid:
            raise InvalidModelError(self.invalid, self.source)
        self.unsupported[:0] = [f"{where}: operator {op} is not supported{self._data_inputs(node)}"
                                for op, where, node in self.unknown_operators]
        if self.unsupported:
            raise UnsupportedModelError(self.unsupported, hint=(
                "fastlstm runs ONNX graphs made of LSTM, GRU and RNN nodes (and ONNX Runtime's dynamically quantized "
                "DynamicQuantizeLSTM), an embedding (Gather), the layout "
                "operators exporters put around them (Transpose, Squeeze, Unsqueeze, Reshape, Slice, Gather, "
                "Concat, ...), and a dense head "
                "(Gemm, or MatMul and Add, also dynamically quantized, with elementwise activations or Softmax)."))
        return result

    def _needed_nodes(self, nodes) -> set[int]:
        """Indices of the nodes the graph outputs depend on (ConstantOfShape needs only its fill value)."""
        producers: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for name in node.output:
                if not name:
                    continue
                if name in producers or name in self.initializers or name in self.graph_inputs:
                    raise ModelFormatError(f"{self.source}: tensor {name!r} is defined more than once")
                producers[name] = index
        self.producers = producers
        if not len(self.graph.output):
            raise ModelFormatError(f"{self.source}: the graph has no outputs")
        needed: set[int] = set()
        seen: set[str] = set()
        stack = []
        for output in self.graph.output:
            if output.name not in producers and output.name not in self.initializers \
                    and output.name not in self.graph_inputs:
                raise ModelFormatError(f"{self.source}: graph output {output.name!r} is produced by no node")
            stack.append(output.name)
        while stack:
            name = stack.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            index = producers.get(name)
            if index is None or index in needed:
                continue
            needed.add(index)
            node = nodes[index]
            if node.op_type == "ConstantOfShape" and node.domain in _STANDARD_DOMAINS:
                continue
            stack.extend(node.input)
        self.needed_outputs = seen
        return needed

    def _evaluate(self, node, index: int) -> None:
        where = f"node {node.name!r} ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"
        handler = None
        if node.domain in _STANDARD_DOMAINS:
            handler = _HANDLERS.get(node.op_type)
            if handler is None and node.op_type in _ACTIVATION_OPS:
                handler = GraphReader._activation
        elif node.domain == _MICROSOFT_DOMAIN:
            handler = _MICROSOFT_HANDLERS.get(node.op_type)
        if handler is None:
            op = node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"
            self.unknown_operators.append((op, where, node))
            self._set_outputs(node, [])
            return
        unknown = [a.name for a in node.attribute if a.name not in _ATTRIBUTE_NAMES.get(node.op_type, ())]
        if unknown:  # checked before anything else, so every node's unknown attributes are listed
            self.unsupported.append(f"{where}: attribute(s) {', '.join(repr(u) for u in unknown)} not supported")
            self._set_outputs(node, [])
            return
        low, high = _INPUT_COUNTS.get(node.op_type, (1, 1))
        if len(node.input) < low or (high is not None and len(node.input) > high) or not all(node.input[:low]):
            self.invalid.append(f"{where}: {len(node.input)} inputs ({', '.join(map(repr, node.input))}); "
                                f"expected {low}{f' to {high}' if high != low else ''}, the first {low} present")
            self._set_outputs(node, [])
            return
        # ConstantOfShape's shape is never looked at (see _needed_nodes): only its fill value matters.
        shape_only = node.op_type == "ConstantOfShape"
        inputs = [] if shape_only else [self._lookup(name, where) for name in node.input]
        if any(isinstance(value, Poison) for value in inputs):
            self._set_outputs(node, [])
            return
        try:
            outputs = handler(self, node, inputs, where)
            missing = [name for name in node.output[len(outputs):] if name in self.needed_outputs]
            if missing:  # an output the operator does not have, yet the graph uses it
                raise Malformed(f"output(s) {', '.join(map(repr, missing))} used by the graph, but a {node.op_type} "
                                f"node has {len(outputs)} output(s)")
        except Refused as exc:  # one message per refused feature of the node
            self.unsupported.extend(f"{where}: {message}" for message in exc.args)
            outputs = []
        except Malformed as exc:
            self.invalid.append(f"{where}: {exc}")
            outputs = []
        except UnsupportedModelError as exc:
            self.unsupported.extend(exc.unsupported)
            outputs = []
        except InvalidModelError as exc:
            self.invalid.extend(exc.problems)
            outputs = []
        self._set_outputs(node, outputs)

    def _operators_by_type(self) -> list[str]:
        """One line per unsupported operator type: how many nodes use it, the first few named."""
        by_type: dict[str, list[str]] = {}
        for op, where, _ in self.unknown_operators:
            by_type.setdefault(op, []).append(where.split(" (")[0])
        return [f"operator {op} is not supported ({len(wheres)} node{'s' if len(wheres) > 1 else ''}: "
                f"{', '.join(wheres[:3])}{', ...' if len(wheres) > 3 else ''})" for op, wheres in by_type.items()]

    def _data_inputs(self, node) -> str:
        """``"; it reads a, b"`` naming every input of ``node`` that is not a constant, and where it comes from."""
        described = []
        for name in node.input:
            if not name or name in self.initializers or isinstance(self.values.get(name), (Const, Zeros)):
                continue
            if name in self.graph_inputs:
                described.append(f"graph input {name!r}")
            elif name in self.producers:
                producer = self.graph.node[self.producers[name]]
                label = repr(producer.name) if producer.name else f"#{self.producers[name]}"
                described.append(f"{name!r} from node {label} ({producer.op_type})")
            else:
                described.append(repr(name))
        return f"; it reads {', '.join(described)}" if described else ""

    def _set_outputs(self, node, outputs: list) -> None:
        for n, name in enumerate(node.output):
            if name:
                self.values[name] = outputs[n] if n < len(outputs) else Poison()

    def _lookup(self, name: str, where: str):
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        if name in self.initializers:
            try:
                value = Const(tensor_to_array(self.initializers[name], f"initializer {name!r}", self.external))
            except UnsupportedModelError as exc:
                self.unsupported.extend(exc.unsupported)
                value = Poison()
            except InvalidModelError as exc:
                self.invalid.extend(exc.problems)
                value = Poison()
            self.values[name] = value
            return value
        if name in self.graph_inputs:
            vi = self.graph_inputs[name]
            return GraphInput(name, declared_dims(vi), declared_element_type(vi))
        if name in self.producers:
            raise ModelFormatError(f"{self.source}: {where} reads {name!r} before the node producing it; the "
                                   "graph is not in topological order")
        raise ModelFormatError(f"{self.source}: {where} reads {name!r}, which no node, input or initializer "
                               "defines")

    # ------------------------------------------------------------------------------------ helpers
    def _attributes(self, node, spec: dict[str, tuple[str, object]], where: str) -> dict:
        values: dict[str, object] = {}
        unknown = []
        for attribute in node.attribute:
            if attribute.name not in spec:
                unknown.append(attribute.name)
                continue
            kind, value = attribute_value(attribute, f"{where} attribute {attribute.name!r}")
            expected = spec[attribute.name][0]
            if kind != expected:
                raise Malformed(f"attribute {attribute.name!r} is a {kind}, expected a {expected}")
            if attribute.name in values:
                raise Malformed(f"attribute {attribute.name!r} is given twice")
            values[attribute.name] = value
        if unknown:
            raise Refused(f"attribute(s) {', '.join(repr(u) for u in unknown)} not supported")
        for name, (_, default) in spec.items():
            values.setdefault(name, default)
        return values

    def _as_flow(self, value, what: str) -> Flow:
        """The Flow a data operand is, registering the graph input it starts from."""
        if isinstance(value, Flow):
            return value
        if isinstance(value, GraphInput):
            if self.data_input is not None and self.data_input != value.name:
                raise Refused(f"{what} reads graph input {value.name!r} as data, but the model's input is "
                              f"{self.data_input!r}; fastlstm models have one input")
            if value.dims is None:
                raise Refused(f"{what}: graph input {value.name!r} declares no shape")
            if value.element_type is not None and value.element_type not in FLOAT_TYPES:
                raise Refused(f"{what}: graph input {value.name!r} is not a floating-point tensor")
            self.data_input = value.name
            axes = tuple(Axis(f"{INPUT_AXIS}{n}", size) for n, size in enumerate(value.dims))
            return Flow(axes, (Part("x"),), part_size=None)
        if isinstance(value, InputRows):
            raise Refused(f"{what} slices graph input {value.name!r} and uses it as data")
        if isinstance(value, quantized.QuantizedEmbedding):
            raise Refused(f"{what} reads the 8-bit rows of the embedding table before DequantizeLinear")
        if isinstance(value, quantized.QUANTIZED_VALUES):
            raise Refused(f"{what} reads a part of a dynamically quantized MatMul ({type(value).__name__}) outside "
                          "the chain fastlstm follows (DynamicQuantizeLinear, MatMulInteger, Cast, Mul)")
        if value is None:
            raise Malformed(f"{what}: a required input is missing")
        raise Refused(f"{what} applies to a constant where fastlstm expects data computed from the input")

    def _ints(self, value, what: str, scalar_ok: bool = True) -> list[int] | int:
        """A constant integer operand (axes, starts, indices, ...) as a list (or an int for a scalar)."""
        if not isinstance(value, Const) or value.array.dtype.kind not in "iu":
            raise Refused(f"{what} must be a constant integer tensor")
        array = value.array
        if array.ndim == 0 and scalar_ok:
            return int(array)
        if array.ndim != 1:
            raise Malformed(f"{what} must be 1-D, got shape {array.shape}")
        self._check_rank(array.size, what)
        return [int(a) for a in array]

    def _check_rank(self, count: int, what: str) -> None:
        """Refuse a list of per-dimension values (axes, indices, shape entries) longer than any tensor's rank."""
        if count > _MAX_RANK:
            raise Malformed(f"{what} holds {count} entries; no tensor has more than {_MAX_RANK} dimensions")

    def _float_const(self, value, what: str) -> np.ndarray:
        if not isinstance(value, Const):
            raise Refused(f"{what} must be a constant (an initializer or Constant node)")
        array = value.array
        if array.dtype.kind != "f":
            raise Malformed(f"{what} must hold floating-point values, got {array.dtype}")
        return array.astype(np.float32) if array.dtype == np.float16 else array

    def _check_fold_size(self, size: int, what: str) -> None:
        if size > _MAX_FOLDED_ELEMENTS:
            raise Refused(f"{what} would make a {size}-element constant")

    def _axes_operand(self, node, inputs, attributes, position: int, what: str) -> list[int] | None:
        """Squeeze/Unsqueeze/ReduceX axes: an attribute before opset 13, an input from 13 on."""
        if self.opset < 13:
            return attributes.get("axes")
        if len(inputs) > position and inputs[position] is not None:
            axes = self._ints(inputs[position], f"{what} axes")
            return [axes] if isinstance(axes, int) else axes
        return None

    # ------------------------------------------------------------------------------------ constants
    def _constant(self, node, inputs, where):
        if len(node.attribute) != 1:
            raise Malformed("a Constant node needs exactly one value attribute")
        attribute = node.attribute[0]
        name = attribute.name
        if name == "value_floats" and attribute.type == _FLOATS and not attribute.ref_attr_name:
            return [Const(attribute_array(attribute, np.dtype(np.float32)))]
        if name == "value_ints" and attribute.type == _INTS and not attribute.ref_attr_name:
            return [Const(attribute_array(attribute, np.dtype(np.int64)))]
        kind, value = attribute_value(attribute, f"{where} attribute {attribute.name!r}")
        if name == "value" and kind == "tensor":
            return [Const(tensor_to_array(value, f"{where} value", self.external))]
        if name == "value_float" and kind == "float":
            return [Const(np.array(value, dtype=np.float32))]
        if name == "value_int" and kind == "int":
            return [Const(np.array(value, dtype=np.int64))]
        raise Refused(f"constant attribute {name!r} ({kind}) not supported")

    def _constant_of_shape(self, node, inputs, where):
        attributes = self._attributes(node, {"value": ("tensor", None)}, where)
        if attributes["value"] is not None:
            fill = tensor_to_array(attributes["value"], f"{where} value", self.external)
            if fill.size != 1:
                raise Malformed(f"value must hold one element, got shape {fill.shape}")
            if fill.reshape(-1)[0] != 0:
                raise Refused(f"fills a tensor with {fill.reshape(-1)[0]!r}; fastlstm follows zero-filled "
                              "tensors only (a zero initial state)")
        return [Zeros()]

    def _expand(self, node, inputs, where):
        data = inputs[0]
        if isinstance(data, Zeros) or (isinstance(data, Const) and not np.any(data.array)):
            return [Zeros()]
        raise Refused("expands a tensor; fastlstm follows Expand only of zeros (a zero initial state)")

    def _arithmetic(self, node, inputs, where):
        """``Mul``/``Div``/``Sub``/``Mod`` of constants (folded) and ``Mul``/``Div`` of sizes read with ``Shape``
        (kept symbolic, e.g. time * batch for a reshape that merges them); on data they are refused."""
        name = node.op_type
        fmod = self._attributes(node, {"fmod": ("int", 0)} if name == "Mod" else {}, where).get("fmod", 0)
        first, second = inputs
        if name == "Mul" and (isinstance(first, quantized.QUANTIZED_VALUES)
                              or isinstance(second, quantized.QUANTIZED_VALUES)):
            product = quantized.multiply(first, second, name)
            if isinstance(product, tuple):  # the chain is complete: a dense layer on the data
                flow, dense = product
                v.features_last(flow, "MatMulInteger")
                return [self._with_dense(flow, dense)]
            return [product]
        if isinstance(first, Const) and isinstance(second, Const):
            return [self._fold_arithmetic(name, first.array, second.array, fmod)]
        if (isinstance(first, Dims) or isinstance(second, Dims)) and name in ("Mul", "Div"):
            operands = [self._size_entries(value, name) for value in (first, second)]
            (a, a_scalar), (b, b_scalar) = operands
            if len(a) != len(b) and 1 not in (len(a), len(b)):
                raise Malformed(f"shape tensors of {len(a)} and {len(b)} entries do not broadcast")
            count = max(len(a), len(b))
            a, b = (entries * count if len(entries) == 1 else entries for entries in (a, b))
            combine = v.multiply_sizes if name == "Mul" else (lambda x, y: v.divide_sizes(x, y, name))
            return [Dims(tuple(combine(x, y) for x, y in zip(a, b)), scalar=a_scalar and b_scalar)]
        if isinstance(first, Dims) or isinstance(second, Dims):
            raise Refused(f"{name} on a shape computed at run time")
        raise Refused(f"{name} on data computed from the input; fastlstm follows {name} only in the shape "
                      "arithmetic around reshapes and between constants")

    def _fold_arithmetic(self, name: str, a: np.ndarray, b: np.ndarray, fmod: int = 0) -> Const:
        """``a <name> b`` of two constants, as ONNX defines it (integers exactly, or refused)."""
        if a.dtype != b.dtype or a.dtype.kind not in "iuf":
            raise Malformed(f"operands of element types {a.dtype} and {b.dtype}; {name} needs one numeric type")
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise Malformed(f"operand shapes {a.shape} and {b.shape} do not broadcast") from None
        self._check_fold_size(math.prod(shape), name)
        if a.dtype.kind == "f":
            if name == "Mod":
                raise Refused("Mod of floating-point constants")
            with np.errstate(all="ignore"):
                return Const({"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                              "Div": np.divide}[name](a, b))
        if math.prod(shape) > _MAX_EXACT_INTEGER_FOLD:
            raise Refused(f"{name} of integer constants with {math.prod(shape)} elements")
        # Python integers: the exact result, checked to fit the type (NumPy's would wrap around silently).
        exact_a, exact_b = np.broadcast_arrays(a.astype(object), b.astype(object))
        if name in ("Div", "Mod") and np.any(exact_b == 0):
            raise Malformed(f"{name} of integer constants by zero")
        if name == "Div":  # ONNX integer division truncates toward zero
            result = [abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)
                      for x, y in zip(exact_a.reshape(-1), exact_b.reshape(-1))]
        elif name == "Mod":  # fmod=0: the sign of the divisor (Python's %); fmod=1: the sign of the dividend
            result = [x % y if not fmod else abs(x) % abs(y) * (1 if x >= 0 else -1)
                      for x, y in zip(exact_a.reshape(-1), exact_b.reshape(-1))]
        else:
            combine = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y}[name]
            result = [combine(x, y) for x, y in zip(exact_a.reshape(-1), exact_b.reshape(-1))]
        limits = np.iinfo(a.dtype)
        if result and (min(result) < limits.min or max(result) > limits.max):
            raise Malformed(f"{name} of integer constants overflows {a.dtype}")
        return Const(np.array(result, dtype=a.dtype).reshape(shape))

    def _size_entries(self, value, what: str) -> tuple[tuple, bool]:
        """The entries of a shape operand of Mul/Div (a Dims or a constant integer) and whether it is a scalar."""
        if isinstance(value, Dims):
            return value.entries, value.scalar
        if isinstance(value, Const) and value.array.dtype.kind in "iu" and value.array.ndim <= 1:
            self._check_rank(value.array.size, f"{what} operand")
            return tuple(int(e) for e in value.array.reshape(-1)), value.array.ndim == 0
        raise Refused(f"{what} combines a shape with a tensor that is not a constant integer")

    # ------------------------------------------------------------------------------------ layout ops
    def _identity(self, node, inputs, where):
        return [inputs[0]]

    def _dropout(self, node, inputs, where):
        spec = {"seed": ("int", None)}
        if self.opset < 12:
            spec.update(ratio=("float", None), is_test=("int", None))
        if self.opset < 6:
            spec.update(consumed_inputs=("ints", None))
        self._attributes(node, spec, where)
        if len(inputs) > 2 and inputs[2] is not None:
            training = inputs[2]
            if not isinstance(training, Const) or np.any(training.array):
                raise Refused("runs in training mode (training_mode is not a constant false)")
        if len(node.output) > 1 and node.output[1] in self.needed_outputs:
            raise Refused("its mask output is used")
        return [inputs[0]]

    def _cast(self, node, inputs, where):
        attributes = self._attributes(node, {"to": ("int", None), "saturate": ("int", 1),
                                             "round_mode": ("string", None)}, where)
        to = attributes["to"]
        data = inputs[0]
        if isinstance(data, quantized.IntegerProduct):
            return [quantized.cast(data, to, "Cast")]
        if isinstance(data, Const):
            if to not in NUMPY_TYPES:
                raise Refused(f"casts a constant to element type {to}")
            return [Const(data.array.astype(NUMPY_TYPES[to]))]
        if isinstance(data, (Zeros, Dims)):
            return [data]
        if isinstance(data, GraphInput) and data.element_type in INTEGER_TYPES and to in INTEGER_TYPES:
            return [data]  # token ids between int32 and int64 (an id outside the table is refused either way)
        flow = self._as_flow(data, "Cast")
        if to not in FLOAT_TYPES:
            raise Refused(f"casts data to element type {to}; fastlstm computes in floating point")
        if FLOAT_TYPES[to] == "float16":
            raise Refused("rounds the data to float16; fastlstm computes in float32 (or float64) throughout and "
                          "cannot reproduce that rounding")
        return [flow]

    def _transpose(self, node, inputs, where):
        perm = self._attributes(node, {"perm": ("ints", None)}, where)["perm"]
        data = inputs[0]
        if isinstance(data, quantized.QuantizedEmbedding):  # the quantizer moves 8-bit rows before dequantizing
            return [quantized.QuantizedEmbedding(v.transpose(data.flow, perm, "Transpose"), data.table)]
        if isinstance(data, Const):
            return [_fold(lambda: np.transpose(data.array, perm), "Transpose")]
        if isinstance(data, Zeros):
            return [data]
        return [v.transpose(self._as_flow(data, "Transpose"), perm, "Transpose")]

    def _squeeze(self, node, inputs, where):
        attributes = self._attributes(node, {"axes": ("ints", None)} if self.opset < 13 else {}, where)
        axes = self._axes_operand(node, inputs, attributes, 1, "Squeeze")
        data = inputs[0]
        if isinstance(data, Const):
            return [_fold(lambda: np.squeeze(data.array, axis=None if axes is None else tuple(axes)), "Squeeze")]
        if isinstance(data, Zeros):
            return [data]
        if isinstance(data, Dims):
            if not data.scalar and len(data.entries) == 1 and axes in (None, [0], [-1]):
                return [Dims(data.entries, scalar=True)]
            raise Refused("squeezes a shape tensor")
        return [v.squeeze(self._as_flow(data, "Squeeze"), axes, "Squeeze")]

    def _unsqueeze(self, node, inputs, where):
        attributes = self._attributes(node, {"axes": ("ints", None)} if self.opset < 13 else {}, where)
        axes = self._axes_operand(node, inputs, attributes, 1, "Unsqueeze")
        if not axes:
            raise Malformed("Unsqueeze needs axes")
        data = inputs[0]
        if isinstance(data, Const):
            return [_fold(lambda: np.expand_dims(data.array, tuple(axes)), "Unsqueeze")]
        if isinstance(data, Zeros):
            return [data]
        if isinstance(data, Dims):
            if data.scalar and axes in ([0], [-1]):
                return [Dims(data.entries)]
            raise Refused("unsqueezes a shape tensor")
        return [v.unsqueeze(self._as_flow(data, "Unsqueeze"), axes, "Unsqueeze")]

    def _reshape(self, node, inputs, where):
        attributes = self._attributes(node, {"allowzero": ("int", 0)}, where)
        if self.opset < 5:
            raise Refused("Reshape before opset 5 (shape as an attribute)")
        data, shape = inputs[0], inputs[1] if len(inputs) > 1 else None
        if attributes["allowzero"] not in (0, 1):
            raise Malformed(f"allowzero={attributes['allowzero']}, expected 0 or 1")
        allowzero = bool(attributes["allowzero"])
        if isinstance(shape, Dims) and not shape.scalar:
            target = [self._bound(e) for e in shape.entries]
        else:
            target = self._ints(shape, "Reshape shape", scalar_ok=False)
        if isinstance(data, Const):
            if any(isinstance(t, Axis) for t in target):
                raise Refused("reshapes a constant to a shape computed at run time")
            dims = [data.array.shape[n] if t == 0 and not allowzero and n < data.array.ndim else t
                    for n, t in enumerate(target)]
            try:
                return [Const(data.array.reshape(dims))]
            except ValueError as exc:
                raise Malformed(f"cannot reshape a constant of shape {data.array.shape} to {target}: {exc}")
        if isinstance(data, Zeros):
            return [data]
        if isinstance(data, Dims):
            if any(isinstance(t, Axis) for t in target) or target not in ([], [-1], [len(data.entries)]):
                raise Refused(f"reshapes a shape tensor to {target}")
            if not target and len(data.entries) != 1:
                raise Malformed(f"cannot reshape a shape tensor of {len(data.entries)} entries to a scalar")
            return [Dims(data.entries, scalar=not target)]
        return [v.reshape(self._as_flow(data, "Reshape"), target, allowzero,
                          f"Reshape to [{', '.join(str(t) for t in target)}]")]

    def _bound(self, entry):
        """A shape entry read from the model input before a layer named its axes, with the names they got."""
        if isinstance(entry, Axis):
            if entry.merged:
                return replace(entry, merged=tuple(self._bound(a) for a in entry.merged))
            return replace(entry, role=self.binding.get(entry.role, entry.role))
        if isinstance(entry, Product):
            return replace(entry, factors=tuple(self._bound(a) for a in entry.factors))
        return entry

    def _flatten(self, node, inputs, where):
        axis = self._attributes(node, {"axis": ("int", 1)}, where)["axis"]
        data = inputs[0]
        if isinstance(data, Const):
            array = data.array
            axis = v.normalize_axis(axis, array.ndim + 1, "Flatten")
            return [_fold(lambda: array.reshape(math.prod(array.shape[:axis]), -1), "Flatten")]
        if isinstance(data, Zeros):
            return [data]
        return [v.flatten(self._as_flow(data, "Flatten"), axis, f"Flatten(axis={axis})")]

    def _shape(self, node, inputs, where):
        attributes = self._attributes(node, {"start": ("int", 0), "end": ("int", None)}, where)
        data = inputs[0]
        if isinstance(data, Const):
            entries: tuple = tuple(int(d) for d in data.array.shape)
        elif isinstance(data, GraphInput):
            if data.dims is None:
                raise Refused(f"takes the shape of graph input {data.name!r}, which declares none")
            entries = tuple(Axis(f"{INPUT_AXIS}{n}", size) for n, size in enumerate(data.dims))
        elif isinstance(data, Flow):
            entries = data.axes
        else:
            raise Refused("takes the shape of a tensor fastlstm does not follow")
        start, end = attributes["start"], attributes["end"]
        return [Dims(tuple(entries[start:end]))]

    def _gather(self, node, inputs, where):
        axis = self._attributes(node, {"axis": ("int", 0)}, where)["axis"]
        data = inputs[0]
        if isinstance(data, Const) and isinstance(inputs[1], GraphInput):
            return [self._embedding(data.array, axis, inputs[1])]
        if not isinstance(inputs[1], Const) or inputs[1].array.dtype.kind not in "iu":
            raise Refused("gathers with indices that are not a constant")
        indices = inputs[1].array
        if isinstance(data, Const):
            array = data.array
            axis = v.normalize_axis(axis, array.ndim, "Gather")
            self._check_fold_size(array.size // max(array.shape[axis], 1) * indices.size, "Gather")
            if indices.size and (indices.min() < -array.shape[axis] or indices.max() >= array.shape[axis]):
                raise Malformed(f"index out of range for axis {axis} of size {array.shape[axis]}")
            return [Const(np.take(array, indices, axis=axis))]
        if isinstance(data, Zeros):
            return [data]
        self._check_rank(indices.size, "Gather indices")
        if isinstance(data, Dims):
            if axis not in (0, -1) or data.scalar or indices.ndim > 1:
                raise Refused("gathers from a shape tensor in a way fastlstm does not follow")
            count = len(data.entries)
            values = [int(i) for i in indices.reshape(-1)]
            if any(not -count <= i < count for i in values):
                raise Malformed(f"index {values} out of range for a shape of {count} entries")
            return [Dims(tuple(data.entries[i] for i in values), scalar=indices.ndim == 0)]
        flow = self._as_flow(data, "Gather")
        axis = v.normalize_axis(axis, len(flow.axes), "Gather")
        return [v.gather(flow, axis, indices, f"Gather(axis={axis}, indices={indices.tolist()})")]

    def _embedding(self, table: np.ndarray, axis: int, ids: GraphInput) -> Flow:
        """``Gather(table, ids)``: the rows of a constant ``(vocab, E)`` table picked by the model's integer input,
        an embedding. Its Flow is the ids' two axes, then the embedding's features."""
        if axis not in (0, -2) or table.ndim != 2:
            raise Refused(f"gathers along axis {axis} of a constant of shape {table.shape} by graph input "
                          f"{ids.name!r}; fastlstm follows an embedding: rows (axis 0) of a 2-D table")
        if table.dtype.kind != "f" and table.dtype not in (np.int8, np.uint8):
            raise Refused(f"gathers from a table of {table.dtype} values; an embedding table holds floats (or "
                          "8-bit integers dequantized after the lookup)")
        if ids.element_type not in INTEGER_TYPES:
            raise Refused(f"gathers by graph input {ids.name!r}, which is not declared an int64 or int32 tensor")
        if ids.dims is None or len(ids.dims) != 2:
            raise Refused(f"gathers by graph input {ids.name!r} of shape {ids.dims}; fastlstm takes token ids "
                          "as (batch, time) or (time, batch)")
        if self.data_input is not None and self.data_input != ids.name:
            raise Refused(f"embeds graph input {ids.name!r}, but the model's input is {self.data_input!r}; "
                          "fastlstm models have one input")
        if self.embedding is not None:
            raise Refused("a second embedding lookup; fastlstm runs one embedding in front of the first layer")
        if 0 in table.shape:
            raise Malformed(f"the embedding table has shape {table.shape}")
        self.data_input = ids.name
        axes = tuple(Axis(f"{INPUT_AXIS}{n}", size) for n, size in enumerate(ids.dims))
        flow = Flow(axes + (Axis(FEATURES, table.shape[1]),), (Part("x"),), part_size=None)
        if table.dtype.kind != "f":  # 8-bit rows: the embedding is their DequantizeLinear (_dequantize_linear)
            if self.quantized_table is not None:
                raise Refused("a second embedding lookup; fastlstm runs one embedding in front of the first layer")
            self.quantized_table = table
            return quantized.QuantizedEmbedding(flow, table)
        self.embedding = table.astype(np.float32) if table.dtype == np.float16 else table
        return flow

    def _dequantize_linear(self, node, inputs, where):
        """``DequantizeLinear`` of embedding rows looked up in an 8-bit table: the float table is the embedding."""
        attributes = self._attributes(node, {"axis": ("int", 1), "block_size": ("int", 0)}, where)
        data, scale, zero = (list(inputs) + [None] * 3)[:3]
        if not isinstance(data, quantized.QuantizedEmbedding):
            raise Refused("dequantizes something other than the rows of an embedding table stored as 8-bit integers")
        if attributes["block_size"]:
            raise Refused(f"block_size={attributes['block_size']} (blocked quantization)")
        table = quantized.dequantized_table(data, scale, zero, "DequantizeLinear")
        if self.embedding is not None and not np.array_equal(self.embedding, table):
            raise Refused("dequantizes the embedding table in two different ways")
        self.embedding = table
        return [data.flow]

    def _slice_bounds(self, node, inputs, where) -> tuple[list[int], list[int], list[int] | None, list[int] | None]:
        if self.opset < 10:
            attributes = self._attributes(node, {"starts": ("ints", None), "ends": ("ints", None),
                                                 "axes": ("ints", None)}, where)
            if attributes["starts"] is None or attributes["ends"] is None:
                raise Malformed("Slice needs starts and ends")
            return attributes["starts"], attributes["ends"], attributes["axes"], None
        self._attributes(node, {}, where)
        operands = list(inputs[1:]) + [None] * (5 - len(inputs))
        starts = self._ints(operands[0], "Slice starts", scalar_ok=False)
        ends = self._ints(operands[1], "Slice ends", scalar_ok=False)
        axes = None if operands[2] is None else self._ints(operands[2], "Slice axes", scalar_ok=False)
        steps = None if operands[3] is None else self._ints(operands[3], "Slice steps", scalar_ok=False)
        return starts, ends, axes, steps

    def _slice(self, node, inputs, where):
        starts, ends, axes, steps = self._slice_bounds(node, inputs, where)
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise Malformed("starts, ends, axes and steps differ in length")
        if 0 in steps:
            raise Malformed("a step of 0")
        data = inputs[0]
        if isinstance(data, Const):
            array = data.array
            index = [slice(None)] * array.ndim
            for start, end, axis, step in zip(starts, ends, axes, steps):
                index[v.normalize_axis(axis, array.ndim, "Slice")] = slice(start, end, step)
            return [_fold(lambda: array[tuple(index)].copy(), "Slice")]
        if isinstance(data, Zeros):
            return [data]
        if isinstance(data, Dims):
            if len(starts) != 1 or axes[0] not in (0, -1) or data.scalar:
                raise Refused("slices a shape tensor in a way fastlstm does not follow")
            return [Dims(data.entries[starts[0]:ends[0]:steps[0]])]
        if isinstance(data, GraphInput) and len(starts) == 1 and steps[0] == 1 and data.dims is not None:
            # Possibly the rows of an initial state for one layer; decided when (and if) a layer reads it.
            axis = v.normalize_axis(axes[0], len(data.dims), "Slice")
            return [InputRows(data.name, axis, starts[0], ends[0], data.dims)]
        flow = self._as_flow(data, "Slice")
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = v.normalize_axis(axis, len(flow.axes), "Slice")
            flow = v.slice_axis(flow, axis, start, end, step, f"Slice(axis={axis})")
        return [flow]

    def _split(self, node, inputs, where):
        spec = {"axis": ("int", 0)}
        if self.opset < 13:
            spec["split"] = ("ints", None)
        if self.opset >= 18:
            spec["num_outputs"] = ("int", None)
        attributes = self._attributes(node, spec, where)
        sizes = attributes.get("split")
        if self.opset >= 13 and len(inputs) > 1 and inputs[1] is not None:
            sizes = self._ints(inputs[1], "Split sizes", scalar_ok=False)
        data = inputs[0]
        if isinstance(data, Zeros):
            return [data] * len(node.output)
        flow = self._as_flow(data, "Split")
        axis = v.normalize_axis(attributes["axis"], len(flow.axes), "Split")
        size = flow.axes[axis].size
        if size is None:
            raise Refused(f"splits the {flow.axes[axis].role} axis, whose size is known only at run time")
        count = len(node.output)
        if sizes is None:
            if attributes.get("num_outputs") is not None:  # opset 18: equal parts, the last one smaller
                if attributes["num_outputs"] != count:
                    raise Malformed(f"num_outputs={attributes['num_outputs']} but the node has {count} outputs")
                chunk = -(-size // count)
                sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
            elif size % count:
                raise Malformed(f"cannot split {size} entries into {count} equal outputs")
            else:
                sizes = [size // count] * count
        if len(sizes) != count or sum(sizes) != size or any(s < 0 for s in sizes):
            raise Malformed(f"split sizes {sizes} do not add up to the axis size {size} over {count} outputs")
        outputs, start = [], 0
        for s in sizes:
            outputs.append(v.slice_axis(flow, axis, start, start + s, 1, f"Split(axis={axis})"))
            start += s
        return outputs

    def _concat(self, node, inputs, where):
        axis = self._attributes(node, {"axis": ("int", None)}, where)["axis"]
        if axis is None:
            raise Malformed("Concat needs an axis")
        if not inputs or any(value is None for value in inputs):
            raise Malformed("Concat with a missing input")
        if all(isinstance(value, Const) for value in inputs):
            self._check_fold_size(sum(value.array.size for value in inputs), "Concat")
            return [_fold(lambda: np.concatenate([value.array for value in inputs], axis=axis), "Concat")]
        if all(isinstance(value, Zeros) or (isinstance(value, Const) and not np.any(value.array))
               for value in inputs):
            return [Zeros()]
        if any(isinstance(value, Dims) for value in inputs):
            entries: list = []
            for value in inputs:
                if isinstance(value, Dims) and not value.scalar:
                    entries.extend(value.entries)
                elif isinstance(value, Const) and value.array.ndim == 1 and value.array.dtype.kind in "iu":
                    self._check_rank(len(entries) + value.array.size, "Concat of shape entries")
                    entries.extend(int(e) for e in value.array)
                else:
                    raise Refused("concatenates a shape tensor with something else")
            return [Dims(tuple(entries))]
        flows = [self._as_flow(value, "Concat") for value in inputs]
        axis = v.normalize_axis(axis, len(flows[0].axes), "Concat")
        return [v.concat(flows, axis, f"Concat(axis={axis})")]

    # ------------------------------------------------------------------------------------ head
    def _with_dense(self, flow: Flow, dense: DenseLayer) -> Flow:
        size = flow.feature_size
        if size is not None and dense.in_features != size:
            raise Malformed(f"the dense weight expects {dense.in_features} features, the data has {size}")
        if flow.head and flow.head[-1].activation.name == "softmax":
            raise Refused("applies a layer after a softmax; fastlstm supports softmax as the last operation")
        axes = flow.axes[:-1] + (Axis(FEATURES, dense.out_features),)
        return replace(flow, axes=axes, head=flow.head + (dense,))

    def _identity_dense(self, flow: Flow, what: str) -> DenseLayer:
        size = flow.feature_size
        if size is None or size > _MAX_IDENTITY_FEATURES:
            raise Refused(f"{what} applied straight to a wide recurrent output ({size} features)")
        return DenseLayer(weight=np.eye(size, dtype=np.float32))

    def _matmul(self, node, inputs, where):
        self._attributes(node, {}, where)
        data, weight = inputs
        if isinstance(data, Const) and not isinstance(weight, Const):
            raise Refused("multiplies a constant by the data from the left; fastlstm runs x @ W heads")
        flow = self._as_flow(data, "MatMul")
        v.features_last(flow, "MatMul")
        matrix = self._float_const(weight, "MatMul weight")
        if matrix.ndim != 2:
            raise Refused(f"MatMul with a {matrix.ndim}-D weight; fastlstm runs 2-D dense weights")
        return [self._with_dense(flow, DenseLayer(weight=np.ascontiguousarray(matrix.T)))]

    def _dynamic_quantize_linear(self, node, inputs, where):
        """The data rounded to 8 bits at run time, its scale and zero point (``_onnx_quantized``)."""
        self._attributes(node, {}, where)
        flow = self._as_flow(inputs[0], "DynamicQuantizeLinear")
        return quantized.dynamic_quantize_linear(flow)

    def _matmul_integer(self, node, inputs, where):
        self._attributes(node, {}, where)
        return [quantized.matmul_integer(inputs, "MatMulInteger")]

    def _dynamic_quantize_matmul(self, node, inputs, where):
        """``com.microsoft::DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias)``: ``A @ dequantized B + bias``
        with the data quantized at run time; fastlstm runs it as a float32 dense layer."""
        self._attributes(node, {}, where)
        data, weight, scale, zero, bias = (list(inputs) + [None] * 5)[:5]
        flow = self._as_flow(data, "DynamicQuantizeMatMul")
        v.features_last(flow, "DynamicQuantizeMatMul")
        matrix = quantized.dense_weight(weight, quantized.scale_array(scale, "DynamicQuantizeMatMul b_scale"),
                                        zero, "DynamicQuantizeMatMul B")
        dense = DenseLayer(weight=matrix)
        if bias is not None:
            dense = replace(dense, bias=self._bias_vector(bias, matrix.shape[0], 1, "DynamicQuantizeMatMul bias"))
        return [self._with_dense(flow, dense)]

    def _gemm(self, node, inputs, where):
        attributes = self._attributes(node, {"alpha": ("float", 1.0), "beta": ("float", 1.0),
                                             "transA": ("int", 0), "transB": ("int", 0),
                                             "broadcast": ("int", None)}, where)
        problems = [f"{name}={attributes[name]!r}, expected a finite number" for name in ("alpha", "beta")
                    if not math.isfinite(attributes[name])]
        problems += [f"{name}={attributes[name]}, expected 0 or 1" for name in ("transA", "transB", "broadcast")
                     if attributes[name] not in (None, 0, 1)]
        if problems:
            raise Malformed("; ".join(problems))
        if attributes["transA"]:
            raise Refused("transA=1 (the data transposed)")
        flow = self._as_flow(inputs[0], "Gemm")
        if len(flow.axes) != 2:
            raise Refused(f"Gemm on data of layout {flow.describe()}; expected (batch, features) or (time*batch "
                          "rows, features)")
        v.features_last(flow, "Gemm")
        matrix = self._float_const(inputs[1], "Gemm B")
        if matrix.ndim != 2:
            raise Malformed(f"Gemm B must be 2-D, got shape {matrix.shape}")
        weight = matrix if attributes["transB"] else matrix.T
        weight = np.ascontiguousarray(weight * matrix.dtype.type(attributes["alpha"]))
        bias = None
        if len(inputs) > 2 and inputs[2] is not None:
            bias = self._bias_vector(inputs[2], weight.shape[0], 2, "Gemm C") * attributes["beta"]
            bias = bias.astype(weight.dtype)
        return [self._with_dense(flow, DenseLayer(weight=weight, bias=bias))]

    def _bias_vector(self, value, size: int, data_rank: int, what: str) -> np.ndarray:
        """A constant that broadcasts along the last axis only, as a (size,) vector."""
        if isinstance(value, Zeros):
            return np.zeros(size, dtype=np.float32)
        array = self._float_const(value, what)
        if array.ndim > data_rank or any(d != 1 for d in array.shape[:-1]) \
                or (array.ndim and array.shape[-1] not in (1, size)):
            raise Refused(f"{what} of shape {array.shape} does not broadcast along the features only")
        return np.broadcast_to(array.reshape(-1), (size,)).copy()

    def _add(self, node, inputs, where):
        self._attributes(node, {}, where)
        first, second = inputs
        data_like = (Flow, GraphInput)
        if isinstance(first, data_like) and isinstance(second, data_like):
            raise Refused("adds two tensors computed from the input (a residual connection or a sum merge); "
                          f"fastlstm runs recurrent layers in a chain{self._data_inputs(node)}")
        if isinstance(first, data_like):
            data, constant = first, second
        elif isinstance(second, data_like):
            data, constant = second, first
        elif isinstance(first, Const) and isinstance(second, Const):
            return [self._fold_arithmetic("Add", first.array, second.array)]
        elif isinstance(first, (Zeros, Const)) and isinstance(second, (Zeros, Const)):
            raise Refused("adds two constants whose sizes are known only at run time")
        else:
            raise Refused("adds tensors fastlstm does not follow")
        flow = self._as_flow(data, "Add")
        v.features_last(flow, "Add")
        bias = self._bias_vector(constant, flow.feature_size, len(flow.axes), "Add operand")
        if flow.head and flow.head[-1].activation == IDENTITY:
            last = flow.head[-1]
            total = bias.astype(last.weight.dtype) if last.bias is None else last.bias + bias
            return [replace(flow, head=flow.head[:-1] + (replace(last, bias=total),))]
        dense = replace(self._identity_dense(flow, "Add"), bias=bias)
        return [self._with_dense(flow, dense)]

    def _activation(self, node, inputs, where):
        name, defaults = _ACTIVATION_OPS[node.op_type]
        attributes = self._attributes(node, {k: ("float", d) for k, d in defaults.items()}, where)
        activation = checked_activation(name, attributes.get("alpha"), attributes.get("beta"), node.op_type)
        return [self._apply_activation(inputs[0], activation, node.op_type)]

    def _softmax(self, node, inputs, where):
        default = -1 if self.opset >= 13 else 1
        axis = self._attributes(node, {"axis": ("int", default)}, where)["axis"]
        flow = self._as_flow(inputs[0], "Softmax")
        rank = len(flow.axes)
        axis = v.normalize_axis(axis, rank, "Softmax")
        if flow.axes[axis].role != FEATURES or DIRS in flow.roles():
            raise Refused(f"Softmax over the {flow.axes[axis].role} axis of {flow.describe()}; fastlstm "
                          "applies softmax over the features")
        if self.opset < 13 and axis != rank - 1:
            raise Refused("Softmax before opset 13 over more than the last axis")
        return [self._apply_activation(flow, Activation.of("softmax"), "Softmax")]

    def _apply_activation(self, value, activation: Activation, what: str) -> Flow:
        flow = self._as_flow(value, what)
        if FEATURES not in v.canonical_roles(flow) or DIRS in flow.roles():
            raise Refused(f"{what} applied to {flow.describe()} before the directions are concatenated")
        if flow.parts[0].kind == "x":
            raise Refused(f"{what} applied to the model input before any recurrent layer")
        if flow.head and flow.head[-1].activation == IDENTITY:
            last = flow.head[-1]
            return replace(flow, head=flow.head[:-1] + (replace(last, activation=activation),))
        if flow.head and flow.head[-1].activation.name == "softmax":
            raise Refused(f"{what} after a softmax; fastlstm supports softmax as the last operation")
        dense = replace(self._identity_dense(flow, what), activation=activation)
        return replace(flow, head=flow.head + (dense,))

    # ------------------------------------------------------------------------------------ recurrent layers
    def _recurrent(self, node, inputs, where):
        """An ``LSTM``, ``GRU`` or ``RNN`` node (or ``DynamicQuantizeLSTM``, an LSTM with 8-bit weights): its
        layer, its place in the stack and what its optional inputs are bound to; its outputs become Flows of that
        layer's results."""
        op = node.op_type
        is_quantized = op == _QUANTIZED_LSTM
        attribute_spec, default_activations, output_kinds = _RECURRENT_OPERATORS["LSTM" if is_quantized else op]
        attributes = self._attributes(node, _QUANTIZED_LSTM_ATTRIBUTES if is_quantized else attribute_spec, where)
        if len(node.output) > len(output_kinds):
            raise Malformed(f"a{'n' if op in ('LSTM', 'RNN') else ''} {op} node has at most "
                            f"{len(output_kinds)} outputs")
        x, w, r, b, lengths, h0, c0, p = (list(inputs) + [None] * 8)[:8]
        direction, layout = attributes["direction"], attributes.get("layout", 0)
        if direction not in DIRECTIONS:
            raise Malformed(f"direction {direction!r}, expected one of {DIRECTIONS}")
        if layout not in (0, 1):
            raise Malformed(f"layout {layout}, expected 0 or 1")
        for flag in ("input_forget", "linear_before_reset"):
            if attributes.get(flag, 0) not in (0, 1):
                raise Malformed(f"{flag}={attributes[flag]}, expected 0 or 1")
        directions = 2 if direction == "bidirectional" else 1
        optional = {name: None if value is None or isinstance(value, Zeros) else self._float_const(value, name)
                    for name, value in (("B", b), ("P", p))}
        scales = {}
        if is_quantized:  # W, R and their scales and zero points: float32 weights and per-row scales
            w_scale, w_zero, r_scale, r_zero = (list(inputs[8:]) + [None] * 4)[:4]
            dequantized, refused = {}, []
            for name, parts in (("W", (w, w_scale, w_zero)), ("R", (r, r_scale, r_zero))):
                try:
                    dequantized[name], scales[f"{name}_scale"] = quantized.lstm_weight(*parts, name, op, directions)
                except Refused as exc:  # both weights' refusals at once
                    refused.extend(exc.args)
            if refused:
                raise Refused(*refused)
            weights = (dequantized["W"], dequantized["R"], optional["B"])
        else:
            weights = (self._float_const(w, "W"), self._float_const(r, "R"), optional["B"])
        options = dict(direction=direction, hidden_size=attributes["hidden_size"], clip=attributes["clip"],
                       activations=node_activations(attributes["activations"], attributes["activation_alpha"],
                                                    attributes["activation_beta"], default_activations,
                                                    directions, f"{self.source} {where}"))
        if op in ("LSTM", _QUANTIZED_LSTM):
            layer = lstm_layer(*weights, optional["P"], input_forget=bool(attributes["input_forget"]), **scales,
                               **options)
        elif op == "GRU":
            layer = gru_layer(*weights, linear_before_reset=bool(attributes["linear_before_reset"]), **options)
        else:
            layer = rnn_layer(*weights, **options)
        index = self._layer_index(self._as_flow(x, f"{op} input X"), layout, layer.input_size)
        refused, bound = [], {}
        bindings = [("sequence_lens", lambda: self._sequence_lens(lengths)),
                    ("initial_h", lambda: self._initial_state(h0, "initial_h", layout))]
        if op in ("LSTM", _QUANTIZED_LSTM):
            bindings.append(("initial_c", lambda: self._initial_state(c0, "initial_c", layout)))
        for name, bind in bindings:
            try:
                bound[name] = bind()
            except Refused as exc:
                refused.extend(exc.args)
        if refused:
            raise Refused(*refused)
        initial = {"h": bound["initial_h"], "c": bound.get("initial_c")}
        self.layers[index] = LayerRecord(layer, node.name or where, layout, bound["sequence_lens"], initial)

        time, batch = Axis(TIME, self.time_size), Axis(BATCH, self.batch_size)
        dirs, units = Axis(DIRS, directions), Axis(HIDDEN, layer.hidden_size)
        y_axes = (time, dirs, batch, units) if layout == 0 else (batch, time, dirs, units)
        state_axes = (dirs, batch, units) if layout == 0 else (batch, dirs, units)
        return [Flow(axes, tuple(Part(kind, index, d) for d in range(directions)), layer.hidden_size)
                for kind, axes in zip(output_kinds, (y_axes, state_axes, state_axes))]

    def _layer_index(self, flow: Flow, layout: int, input_size: int) -> int:
        """Which layer of the stack a recurrent node is, from what its input X holds (binding the model input)."""
        expected = (TIME, BATCH, FEATURES) if layout == 0 else (BATCH, TIME, FEATURES)
        if flow.head:
            raise Refused("a dense layer or activation between recurrent layers")
        if flow.parts == (Part("x"),):
            index = 0
            roles = flow.roles()
            input_roles = [r for r in roles if r.startswith(INPUT_AXIS)]
            if self.embedding is not None:  # the ids' two axes, then the embedding's features
                follows = len(roles) == 3 and roles[2] == FEATURES and len(set(input_roles)) == 2
            else:
                follows = len(roles) == 3 and len(set(roles)) == 3 and len(input_roles) == 3
            if not follows:
                raise Refused(f"the layer reads the model input rearranged to {flow.describe()}; fastlstm "
                              "follows transposes of a (batch, time, features) or (time, batch, features) input"
                              + (" (of (batch, time) or (time, batch) token ids embedded last)"
                                 if self.embedding is not None else ""))
            binding = dict(zip(roles, expected))
            size = flow.axes[2].size
            if size is not None and size != input_size:
                raise Malformed(f"the input has {size} features but W expects {input_size}")
            if 0 in self.layers:
                raise Refused("several recurrent nodes read the model input; fastlstm runs one stack of layers")
            self.binding = binding
            by_role = {binding[a.role]: a for a in flow.axes}
            self.time_size, self.batch_size = by_role[TIME].size, by_role[BATCH].size
            order = sorted((a for a in flow.axes if a.role.startswith(INPUT_AXIS)),
                           key=lambda a: int(a.role[len(INPUT_AXIS):]))
            self.input_layout = tuple(binding[a.role] for a in order)
            return index
        previous = flow.parts[0].layer
        record = self.layers.get(previous)
        wanted = tuple(Part("Y", previous, d) for d in range(record.layer.num_directions)) if record else None
        if flow.parts != wanted:
            raise Refused(f"the layer reads {', '.join(str(p) for p in flow.parts)}; fastlstm stacks layers on "
                          "the previous layer's full output sequence (all directions, forward first)")
        if v.canonical_roles(flow) != expected:
            raise Refused(f"the layer (layout {layout}) reads the previous layer's output as {flow.describe()}")
        if flow.feature_size != input_size:
            raise Malformed(f"W expects {input_size} input features, the previous layer gives {flow.feature_size}")
        if previous + 1 in self.layers:
            raise Refused(f"several recurrent nodes read layer {previous}'s output; fastlstm runs one stack of "
                          "layers")
        return previous + 1

    def _sequence_lens(self, value) -> str | None:
        if value is None:
            return None
        if isinstance(value, GraphInput):
            return value.name
        if isinstance(value, (Const, Zeros)):
            raise Refused("sequence_lens is a constant; fastlstm takes sequence lengths per call "
                          "(predict(x, lengths=...)): make sequence_lens a graph input")
        raise Refused("sequence_lens is computed in the graph; fastlstm takes it as a graph input only")

    def _initial_state(self, value, name: str, layout: int) -> StateSource | None:
        """Where an initial state comes from: None for zeros, else the graph input rows it reads."""
        rows_axis = 0 if layout == 0 else 1
        if value is None or isinstance(value, Zeros):
            return None
        if isinstance(value, Const):
            if not np.any(value.array):
                return None
            raise Refused(f"{name} is a non-zero constant; fastlstm starts from zeros or from the state "
                          "passed to predict(x, state=(h0, c0)): make it a graph input")
        if isinstance(value, GraphInput):
            if value.dims is not None and len(value.dims) != 3:
                raise Malformed(f"{name} (graph input {value.name!r}) has rank {len(value.dims)}, expected 3")
            return StateSource(value.name, rows_axis, 0, None, value.dims)
        if isinstance(value, InputRows):
            if value.axis != rows_axis:
                raise Refused(f"{name} slices graph input {value.name!r} along axis {value.axis}, not along "
                              f"its layer/direction axis ({rows_axis})")
            return StateSource(value.name, value.axis, value.start, value.stop, value.dims)
        raise Refused(f"{name} is computed in the graph; fastlstm takes initial states as graph inputs "
                      "(the state argument of predict) or zeros")

    # ------------------------------------------------------------------------------------ outputs
    def _finish(self) -> GraphResult:
        if not self.layers:
            raise Refused("the graph's outputs depend on no recurrent node")
        layers = [self.layers[k] for k in range(len(self.layers))]
        data_outputs, state_outputs = [], []
        for output in self.graph.output:
            value = self.values.get(output.name)
            if isinstance(value, Poison):
                continue
            if not isinstance(value, Flow) or value.parts[0].kind == "x":
                raise Refused(f"graph output {output.name!r} is not computed by the recurrent layers")
            if value.head or any(p.kind == "Y" for p in value.parts):
                data_outputs.append((output.name, value))
            else:
                if len({p.kind for p in value.parts}) != 1:
                    raise Refused(f"graph output {output.name!r} mixes hidden and cell states")
                state_outputs.append((output.name, value))
        if len(data_outputs) > 1:
            raise Refused(f"graph outputs {', '.join(repr(n) for n, _ in data_outputs)} are all computed from "
                          "recurrent outputs; a fastlstm model has one output (states come with return_state=True)")
        lengths = {record.sequence_lens for record in layers}
        if len(lengths) > 1:
            raise Refused("sequence_lens is given to some recurrent layers only, or differs between them")
        sequence_lens = lengths.pop()
        if data_outputs:
            main_name, flow = data_outputs[0]
            output = output_mode(main_name, flow, layers, sequence_lens is not None)
            head = flow.head
        else:
            main_name, output, head = None, "final_state", ()
        bound_states = state_inputs(layers)
        return GraphResult(
            layers=layers, head=head, output=output, input_name=self.data_input or "",
            input_layout=self.input_layout, sequence_lens=sequence_lens,
            state_inputs=bound_states, embedding=self.embedding,
            state_outputs=[f"{name!r} = {state_rows(flow, layers)}" for name, flow in state_outputs],
            main_output=main_name)


def _fold(compute, what: str) -> Const:
    """``Const(compute())``, a NumPy error (axes that do not fit the constant) reported as a malformed model."""
    try:
        return Const(np.asarray(compute()))
    except (ValueError, IndexError, TypeError) as exc:  # numpy's AxisError is both a ValueError and an IndexError
        raise Malformed(f"{what} of a constant: {exc}") from None


# Every attribute each operator may carry in any opset fastlstm reads (types and opset checks are in the
# handlers); anything else is refused before the node is looked at.
_ATTRIBUTE_NAMES = {
    "Constant": {"value", "value_float", "value_floats", "value_int", "value_ints", "value_string",
                 "value_strings", "sparse_value"},
    "ConstantOfShape": {"value"}, "Expand": set(), "Identity": set(),
    "Dropout": {"seed", "ratio", "is_test", "consumed_inputs"}, "Cast": {"to", "saturate", "round_mode"},
    "Transpose": {"perm"}, "Squeeze": {"axes"}, "Unsqueeze": {"axes"}, "Reshape": {"allowzero"},
    "Flatten": {"axis"}, "Shape": {"start", "end"}, "Gather": {"axis"}, "Slice": {"starts", "ends", "axes"},
    "Split": {"axis", "split", "num_outputs"}, "Concat": {"axis"}, "MatMul": set(),
    "Gemm": {"alpha", "beta", "transA", "transB", "broadcast"}, "Add": set(), "Softmax": {"axis"},
    "Mul": set(), "Div": set(), "Sub": set(), "Mod": {"fmod"},
    "DynamicQuantizeLinear": set(), "MatMulInteger": set(), "DynamicQuantizeMatMul": set(),
    "DequantizeLinear": {"axis", "block_size"},
    _QUANTIZED_LSTM: set(_QUANTIZED_LSTM_ATTRIBUTES),
    **{op: set(attributes) for op, (attributes, _, _) in _RECURRENT_OPERATORS.items()},
    **{op: set(defaults) for op, (_, defaults) in _ACTIVATION_OPS.items()},
}

# (fewest, most) inputs of each operator (None: any number); the fewest are required.
_INPUT_COUNTS = {
    "Constant": (0, 0), "ConstantOfShape": (1, 1), "Expand": (2, 2), "Dropout": (1, 3), "Squeeze": (1, 2),
    "Unsqueeze": (1, 2), "Reshape": (2, 2), "Gather": (2, 2), "Slice": (1, 5), "Split": (1, 2),
    "Concat": (1, None), "MatMul": (2, 2), "Gemm": (2, 3), "Add": (2, 2), "Mul": (2, 2), "Div": (2, 2), "Sub": (2, 2),
    "Mod": (2, 2),
    "LSTM": (3, 8), "GRU": (3, 6), "RNN": (3, 6),
    "DynamicQuantizeLinear": (1, 1), "MatMulInteger": (2, 4), "DynamicQuantizeMatMul": (3, 5),
    "DequantizeLinear": (2, 3),
    _QUANTIZED_LSTM: (3, 12),  # W_scale .. R_zero_point (inputs 8 to 11) are required too: checked when read
}

_HANDLERS = {
    "Constant": GraphReader._constant, "ConstantOfShape": GraphReader._constant_of_shape,
    "Expand": GraphReader._expand, "Identity": GraphReader._identity, "Dropout": GraphReader._dropout,
    "Cast": GraphReader._cast, "Transpose": GraphReader._transpose, "Squeeze": GraphReader._squeeze,
    "Unsqueeze": GraphReader._unsqueeze, "Reshape": GraphReader._reshape, "Flatten": GraphReader._flatten,
    "Shape": GraphReader._shape, "Gather": GraphReader._gather, "Slice": GraphReader._slice,
    "Split": GraphReader._split, "Concat": GraphReader._concat, "MatMul": GraphReader._matmul,
    "Gemm": GraphReader._gemm, "Add": GraphReader._add, "Softmax": GraphReader._softmax,
    "Mul": GraphReader._arithmetic, "Div": GraphReader._arithmetic, "Sub": GraphReader._arithmetic,
    "Mod": GraphReader._arithmetic, **{op: GraphReader._recurrent for op in _RECURRENT_OPERATORS},
    "DynamicQuantizeLinear": GraphReader._dynamic_quantize_linear, "MatMulInteger": GraphReader._matmul_integer,
    "DequantizeLinear": GraphReader._dequantize_linear,
}

# The contrib operators (domain com.microsoft) ONNX Runtime's dynamic quantization writes.
_MICROSOFT_HANDLERS = {
    _QUANTIZED_LSTM: GraphReader._recurrent, "DynamicQuantizeMatMul": GraphReader._dynamic_quantize_matmul,
}
