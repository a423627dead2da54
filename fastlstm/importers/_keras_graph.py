"""The layer graph of a Keras model config, reduced to the chain of layers fastlstm can run.

A Keras model config (``config.json`` in a ``.keras`` archive, the ``model_config`` attribute of a legacy
``.h5`` file, ``{"class_name": type(model).__name__, "config": model.get_config()}`` for a live model) lists
the layers of a ``Sequential`` model in order, or the layers of a functional model with the tensors each one
is called on. Both Keras 3 and Keras 2 (tf.keras) spellings are read:

* Keras 3 functional: ``"inbound_nodes": [{"args": [<__keras_tensor__ with keras_history [layer, node,
  tensor]>], "kwargs": {...}}]``, ``"input_layers": ["input", 0, 0]`` (or a list of such triples);
* Keras 2 functional: ``"inbound_nodes": [[["layer", node, tensor, {kwargs}], ...]]``,
  ``"input_layers": [["input", 0, 0]]``.

``model_graph`` returns the layers in execution order. A structure that is not a chain (two inputs, a branch,
a layer called twice, a consumer of an LSTM's returned states, a tensor passed as a keyword such as
``initial_state``) is listed in ``KerasGraph.problems`` for the importer to refuse together with everything
else it cannot run. A config that is not a model config at all raises ``ModelFormatError``.

One exception to "a chain": Keras 3 records the mask an ``Embedding(mask_zero=True)`` or a ``Masking`` layer
passes on as operations of their own, ``not_equal(ids, 0)`` or ``any(not_equal(x, mask_value), axis=-1)`` on the
same tensor the layer reads, handed to the layers after it as ``mask=``. Exactly these operations are
recognised, left out of the chain, and their tensor accepted as a ``mask`` argument: it is the mask Keras
would propagate anyway, which the importer takes from the layer itself. Any other operation is a layer the
importer refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ModelFormatError, UnsupportedModelError

SEQUENTIAL = "Sequential"
FUNCTIONAL_CLASS_NAMES = ("Functional", "Model")  # "Model": functional models written by Keras < 2.4
_KERAS_TENSOR = "__keras_tensor__"
# More layers than an LSTM model plausibly has; every step below is linear in the count, this bounds it.
MAX_LAYERS = 4096
# Keyword arguments a layer call may carry without changing what it computes at inference.
_HARMLESS_CALL_KWARGS = {"training": (None, False), "mask": (None,)}


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the model, as its config describes it."""

    position: int  # index in ``model.layers`` (what messages call the layer's position)
    name: str
    class_name: str
    config: dict
    # The group Keras 3 stores the layer's variables under in ``model.weights.h5`` ("lstm", "lstm_1", ...):
    # the snake-cased class name, numbered in ``model.layers`` order (keras.saving's naming rule).
    saved_name: str
    # Set when the entry names a class registered outside Keras (see ``custom_class``): what it says.
    custom: str | None = None

    def describe(self) -> str:
        where = f" at position {self.position}" if self.position >= 0 else ""  # a Sequential's InputLayer: -1
        return f"{self.class_name} {self.name!r}{where}"


@dataclass
class KerasGraph:
    kind: str  # "Sequential" or "Functional"
    layers: list[KerasLayer]  # in execution order, InputLayer included
    problems: list[str] = field(default_factory=list)  # reasons the graph is not a chain fastlstm runs


def model_graph(model_config, name: str) -> KerasGraph:
    """The layers of ``model_config`` (``{"class_name": ..., "config": ...}``) in the order they run.

    ``name`` is used in messages. Raises ``ModelFormatError`` for a malformed config and
    ``UnsupportedModelError`` for a model class that has no layer graph (a subclassed model).
    """
    if not isinstance(model_config, dict) or not isinstance(model_config.get("class_name"), str):
        raise ModelFormatError(f"{name}: the model config is not an object with a 'class_name'")
    class_name = model_config["class_name"]
    config = model_config.get("config")
    if class_name == SEQUENTIAL:
        # Keras <= 2.2 wrote a Sequential's config as the bare list of its layers.
        entries = config if isinstance(config, list) else _field(config, "layers", list, name, "config")
        return _sequential(entries, name)
    if class_name in FUNCTIONAL_CLASS_NAMES:
        return _functional(config, name)
    raise UnsupportedModelError(
        [f"model class {class_name!r}: fastlstm reads Sequential and functional Keras models, whose config "
         "lists their layers; a subclassed model's computation lives in its Python call() method"])


def _check_layer_count(entries: list, name: str) -> None:
    if len(entries) > MAX_LAYERS:
        raise UnsupportedModelError([f"the model has {len(entries)} layers; fastlstm reads models of at most "
                                     f"{MAX_LAYERS} layers"], hint=f"({name})")


def _sequential(entries: list, name: str) -> KerasGraph:
    _check_layer_count(entries, name)
    parsed = [_layer_entry(entry, n, name) for n, entry in enumerate(entries)]
    # model.layers of a Sequential leaves out its InputLayer, so positions start after it.
    offset = 1 if parsed and parsed[0][1] == "InputLayer" else 0
    layer_saved_names = saved_names([class_name for _, class_name, _ in parsed])
    layers = [KerasLayer(n - offset, layer_name, class_name, config, layer_saved_names[n], custom_class(entry))
              for n, ((layer_name, class_name, config), entry) in enumerate(zip(parsed, entries))]
    return KerasGraph(SEQUENTIAL, layers)


def _functional(config, name: str) -> KerasGraph:
    entries = _field(config, "layers", list, name, "config")
    _check_layer_count(entries, name)
    parsed = [_layer_entry(entry, n, name) for n, entry in enumerate(entries)]
    layer_saved_names = saved_names([class_name for _, class_name, _ in parsed])
    layers = {}
    for n, (layer_name, class_name, layer_config) in enumerate(parsed):
        if layer_name in layers:
            raise ModelFormatError(f"{name}: two layers are named {layer_name!r}")
        layers[layer_name] = KerasLayer(n, layer_name, class_name, layer_config, layer_saved_names[n],
                                        custom_class(entries[n]))

    problems: list[str] = []
    mask_operations, mask_tensors = _implicit_masks(layers, entries, name)
    inputs = _tensor_refs(config.get("input_layers"), name, "input_layers", problems)
    outputs = _tensor_refs(config.get("output_layers"), name, "output_layers", problems)
    if len(inputs) != 1 or len(outputs) != 1:
        problems.append(f"the model has {len(inputs)} input(s) and {len(outputs)} output(s); fastlstm runs "
                        "models with one input sequence and one output")
    for ref in inputs + outputs:
        _check_known(ref, layers, name)
    for output_layer, _, tensor_index in outputs:
        if tensor_index != 0:
            problems.append(f"the model outputs tensor {tensor_index} of layer {output_layer!r} (a state returned "
                            "with return_state=True); fastlstm returns states with predict(..., return_state=True)")

    # producer -> consumers: a chain has exactly one consumer per layer, and the output has none.
    consumers: dict[str, list[str]] = {layer_name: [] for layer_name in layers}
    for layer in layers.values():
        if layer.name in mask_operations:
            continue
        nodes = _inbound_nodes(entries[layer.position], name, layer.name)
        if not nodes:
            if layer.class_name != "InputLayer":
                problems.append(f"{layer.describe()} is not called on any input")
            continue
        if len(nodes) > 1:
            problems.append(f"{layer.describe()} is called {len(nodes)} times (a shared layer); fastlstm runs "
                            "a chain of layers each called once")
        refs, kwargs_problems = _node_inputs(nodes[0], name, layer.name, mask_tensors)
        problems += [f"{layer.describe()}: {p}" for p in kwargs_problems]
        if len(refs) != 1:
            problems.append(f"{layer.describe()} takes {len(refs)} inputs; fastlstm runs a chain of layers "
                            "each taking the previous one's output")
        for ref in refs:
            _check_known(ref, layers, name)
            producer, node_index, tensor_index = ref
            if tensor_index != 0:
                problems.append(f"{layer.describe()} uses tensor {tensor_index} of {producer!r} (a state "
                                "returned with return_state=True); fastlstm chains the layers' main outputs only")
            if node_index != 0:
                problems.append(f"{layer.describe()} uses call {node_index} of the shared layer {producer!r}")
            consumers[producer].append(layer.name)

    order: list[KerasLayer] = []
    if len(inputs) == 1 and len(outputs) == 1 and not problems:
        current, last = inputs[0][0], outputs[0][0]
        while True:
            order.append(layers[current])
            following = consumers[current]
            if current == last or len(following) != 1 or len(order) > len(layers):
                break
            current = following[0]
        if order[-1].name != last or consumers[last]:
            problems.append(f"the layers do not form a single chain from the input {inputs[0][0]!r} to the "
                            f"output {last!r}: the output of {order[-1].name!r} goes to "
                            f"{consumers[order[-1].name] or 'no layer'}")
        on_path = {layer.name for layer in order}
        off_path = [layer_name for layer_name in layers if layer_name not in on_path | mask_operations]
        if off_path and not problems:
            problems.append(f"layers {off_path} are not on the chain from the input to the output")
    listed = [layer for layer in layers.values() if layer.name not in mask_operations]
    return KerasGraph("Functional", order if not problems else listed, problems)


def _implicit_masks(layers: dict[str, KerasLayer], entries: list, name: str) -> tuple[set[str], set[str]]:
    """The operations that compute an ``Embedding``'s or a ``Masking`` layer's mask (module docstring), and the
    names of the layers whose output is such a mask. Linear in the number of layers."""
    def call(layer: KerasLayer) -> tuple[list, dict] | None:
        """(positional arguments, keyword arguments) of a layer's only Keras 3 call, or None."""
        nodes = _inbound_nodes(entries[layer.position], name, layer.name)
        if len(nodes) != 1 or not isinstance(nodes[0], dict) or not isinstance(nodes[0].get("args", []), list):
            return None
        kwargs = nodes[0].get("kwargs", {})
        return nodes[0].get("args", []), kwargs if isinstance(kwargs, dict) else {"": kwargs}

    def operation_call(layer: KerasLayer, class_name: str) -> tuple[list, dict] | None:
        """The call of a built-in Keras operation of ``class_name`` without keyword arguments, or None."""
        module = entries[layer.position].get("module")  # legacy .h5 configs record no module
        if layer.class_name != class_name or layer.custom is not None or not (
                module is None or isinstance(module, str) and module.startswith("keras.src.ops.")):
            return None
        called = call(layer)
        return called if called is not None and not called[1] else None

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    # What the Embedding (mask_zero) and Masking layers read: (tensor, the value their mask compares with).
    masked_sources: dict[tuple, str] = {}
    for layer in layers.values():
        called = call(layer) if layer.custom is None else None
        refs = _keras3_tensors(called[0], name, layer.name) if called is not None and len(called[0]) == 1 else []
        if len(refs) != 1:
            continue
        if layer.class_name == "Embedding" and layer.config.get("mask_zero") is True:
            masked_sources[(refs[0], 0)] = "Embedding"
        elif layer.class_name == "Masking" and number(layer.config.get("mask_value", 0.0)):
            masked_sources[(refs[0], layer.config.get("mask_value", 0.0))] = "Masking"
    # not_equal(tensor, value) operations comparing what such a layer reads with its value.
    not_equal_of: dict[str, str] = {}  # operation name -> the kind of layer whose mask it computes
    for layer in layers.values():
        called = operation_call(layer, "NotEqual")
        if called is None or len(called[0]) != 2 or not number(called[0][1]):
            continue
        refs = _keras3_tensors(called[0][:1], name, layer.name)
        source = masked_sources.get((refs[0], called[0][1])) if len(refs) == 1 else None
        if source is not None:
            not_equal_of[layer.name] = source
    operations = {n for n, source in not_equal_of.items() if source == "Embedding"}
    masks = set(operations)
    for layer in layers.values():  # any(not_equal(x, mask_value), axis=-1): a Masking layer's mask
        called = operation_call(layer, "Any")
        if called is None or len(called[0]) != 1 or layer.config.get("axis") != -1 or layer.config.get("keepdims"):
            continue
        refs = _keras3_tensors(called[0], name, layer.name)
        if len(refs) == 1 and refs[0][1:] == (0, 0) and not_equal_of.get(refs[0][0]) == "Masking":
            operations |= {refs[0][0], layer.name}
            masks.add(layer.name)
    return operations, masks


def _layer_entry(entry, index: int, name: str) -> tuple[str, str, dict]:
    """(name, class name, config) of one serialised layer."""
    where = f"layers[{index}]"
    class_name = _field(entry, "class_name", str, name, where)
    config = _field(entry, "config", dict, name, where)
    layer_name = entry.get("name", config.get("name"))
    if not isinstance(layer_name, str):
        raise ModelFormatError(f"{name}: {where}: expected a layer name, got {layer_name!r}")
    return layer_name, class_name, config


def custom_class(serialised: dict) -> str | None:
    """Why a serialised Keras object is not the built-in class its ``class_name`` names, or None.

    Keras 3 writes ``"module": "keras.layers", "registered_name": null`` for its own classes; a class
    registered by user code (``register_keras_serializable``) carries a ``registered_name`` such as
    ``"package>LSTM"`` and its own module, even when it reuses a built-in ``class_name``: its ``call()`` is
    Python code that is not in the file.
    """
    module, registered = serialised.get("module"), serialised.get("registered_name")
    keras_module = module is None or isinstance(module, str) and (module == "keras" or module.startswith(
        ("keras.", "tf_keras.")))
    if registered in (None, serialised.get("class_name")) and keras_module:
        return None
    return (f"a custom class (registered_name={registered!r}, module={module!r}), not Keras' "
            f"{serialised.get('class_name')!r}; its computation is Python code that is not in the file")


def saved_names(class_names: list) -> list[str]:
    """keras.saving's name for each layer's variable group: snake_case(class name), then _1, _2, ..."""
    used: dict[str, int] = {}
    names = []
    for class_name in class_names:
        base = _snake_case(class_name)
        if base in used:
            used[base] += 1
            names.append(f"{base}_{used[base]}")
        else:
            used[base] = 0
            names.append(base)
    return names


def _snake_case(class_name: str) -> str:
    """The same conversion as keras.src.utils.naming.to_snake_case ("TimeDistributed" -> "time_distributed")."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _inbound_nodes(entry: dict, name: str, layer_name: str) -> list:
    nodes = entry.get("inbound_nodes", [])
    if not isinstance(nodes, list):
        raise ModelFormatError(f"{name}: layer {layer_name!r}: inbound_nodes is not a list")
    return nodes


def _node_inputs(node, name: str, layer_name: str,
                 mask_tensors: set[str] = frozenset()) -> tuple[list[tuple[str, int, int]], list[str]]:
    """The tensors one call of a layer takes as inputs, and problems with its keyword arguments (a ``mask``
    argument is accepted when it is the output of one of ``mask_tensors``)."""
    problems: list[str] = []
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        refs = _keras3_tensors(node.get("args", []), name, layer_name)
        kwargs = node.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ModelFormatError(f"{name}: layer {layer_name!r}: call kwargs are not an object")
        for key, value in kwargs.items():
            tensors = _keras3_tensors(value, name, layer_name)
            if key == "mask" and len(tensors) == 1 and tensors[0][0] in mask_tensors and tensors[0][1:] == (0, 0):
                continue
            if tensors:
                problems.append(f"is called with a tensor as {key!r}; fastlstm runs layers on their "
                                "main input only (no initial_state, no explicit mask)")
            elif value not in _HARMLESS_CALL_KWARGS.get(key, (None,)):
                problems.append(f"is called with {key}={value!r}, which changes what it computes at inference")
        return refs, problems
    if isinstance(node, list):  # Keras 2: [[layer, node_index, tensor_index, kwargs], ...]
        refs = []
        for item in node:
            if (not isinstance(item, list) or len(item) < 3 or not isinstance(item[0], str)
                    or not all(isinstance(i, int) for i in item[1:3])):
                raise ModelFormatError(f"{name}: layer {layer_name!r}: malformed inbound node {item!r}")
            refs.append((item[0], item[1], item[2]))
            kwargs = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
            for key, value in kwargs.items():
                if value not in _HARMLESS_CALL_KWARGS.get(key, (None,)):
                    problems.append(f"is called with {key}={value!r}, which fastlstm does not run")
        return refs, problems
    raise ModelFormatError(f"{name}: layer {layer_name!r}: malformed inbound node {node!r}")


def _keras3_tensors(value, name: str, layer_name: str, depth: int = 0) -> list[tuple[str, int, int]]:
    """Every ``__keras_tensor__`` reference inside a Keras 3 call argument, as (layer, node, tensor)."""
    if depth > 32:
        raise ModelFormatError(f"{name}: layer {layer_name!r}: call arguments nested too deeply")
    if isinstance(value, dict):
        if value.get("class_name") == _KERAS_TENSOR:
            history = value.get("config", {}).get("keras_history") if isinstance(value.get("config"), dict) else None
            if (not isinstance(history, list) or len(history) != 3 or not isinstance(history[0], str)
                    or not all(isinstance(i, int) for i in history[1:])):
                raise ModelFormatError(f"{name}: layer {layer_name!r}: malformed keras_history {history!r}")
            return [(history[0], history[1], history[2])]
        return [ref for item in value.values() for ref in _keras3_tensors(item, name, layer_name, depth + 1)]
    if isinstance(value, list):
        return [ref for item in value for ref in _keras3_tensors(item, name, layer_name, depth + 1)]
    return []


def _tensor_refs(value, name: str, key: str, problems: list[str]) -> list[tuple[str, int, int]]:
    """``input_layers``/``output_layers``: one ``[layer, node, tensor]`` triple or a list of them."""
    if isinstance(value, dict):  # Keras 3 named inputs or outputs
        problems.append(f"{key}: the model has named (dict) {key.split('_')[0]}s; fastlstm runs one input "
                        "and one output")
        return []
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        value = [value]
    if not isinstance(value, list):
        raise ModelFormatError(f"{name}: config.{key}: expected a list of [layer, node, tensor], got {value!r}")
    refs = []
    for ref in value:
        if (not isinstance(ref, list) or len(ref) != 3 or not isinstance(ref[0], str)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ref[1:])):
            raise ModelFormatError(f"{name}: config.{key}: expected [layer, node, tensor], got {ref!r}")
        refs.append((ref[0], ref[1], ref[2]))
    return refs


def _check_known(ref: tuple[str, int, int], layers: dict, name: str) -> None:
    if ref[0] not in layers:
        raise ModelFormatError(f"{name}: the config refers to a layer {ref[0]!r} it does not define")


def _field(obj, key: str, kind: type, name: str, where: str):
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        found = obj.get(key) if isinstance(obj, dict) else obj
        raise ModelFormatError(f"{name}: {where}.{key}: expected {kind.__name__}, got {type(found).__name__}")
    return obj[key]
