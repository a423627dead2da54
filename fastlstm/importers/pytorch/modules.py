"""Module trees (in-memory ``nn.Module``s and TorchScript archives) -> the head read off their structure."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...activations import ELEMENTWISE, IDENTITY, Activation
from ...errors import ModelFormatError, UnsupportedModelError
from ...spec import ModelSpec
from . import quantized, unpickler
from .options import RNN_NONLINEARITIES, Options
from .state_dict import (MAX_NESTING, Recurrent, apply_ignore, choose_stack, describe_linears, flatten_state,
                         ignore_hint, recurrent_groups, recurrent_output_size, translate, under)

# Module classes by their full name (TorchScript's ``__torch__.`` prefix and mangling removed).
# torch.ao.quantization.quantize_dynamic's modules (see ``quantized``): an LSTM or GRU, and a Linear layer.
_QUANTIZED_RECURRENT = {f"torch.ao.nn.quantized.dynamic.modules.rnn.{n}" for n in ("LSTM", "GRU")}
_QUANTIZED_LINEAR = "torch.ao.nn.quantized.dynamic.modules.linear.Linear"
_RECURRENT = {f"torch.nn.modules.rnn.{n}" for n in ("LSTM", "LSTMCell", "GRU", "GRUCell", "RNN", "RNNCell")
              } | _QUANTIZED_RECURRENT
_RNN = {"torch.nn.modules.rnn.RNN", "torch.nn.modules.rnn.RNNCell"}
_EMBEDDING = "torch.nn.modules.sparse.Embedding"
_LINEAR = "torch.nn.modules.linear.Linear"
_LINEARS = {_LINEAR, _QUANTIZED_LINEAR}
_PASSTHROUGH = {f"torch.nn.modules.{n}" for n in (
    "linear.Identity", "dropout.Dropout", "dropout.Dropout1d", "dropout.Dropout2d", "dropout.Dropout3d",
    "dropout.AlphaDropout", "dropout.FeatureAlphaDropout")}
_CONTAINERS = {f"torch.nn.modules.container.{n}" for n in ("Sequential", "ModuleList", "ModuleDict")}
# torch activation module -> the fastlstm activation it computes (parameters read off the module).
_ACTIVATION_NAMES = {"ReLU": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softsign": "softsign",
                     "Hardsigmoid": "hard_sigmoid", "LeakyReLU": "leaky_relu", "ELU": "elu", "Softplus": "softplus",
                     "Softmax": "softmax"}
_ACTIVATIONS = {f"torch.nn.modules.activation.{n}" for n in _ACTIVATION_NAMES}
# The setting each parametrised activation module holds (scripted archives record it, traced ones do not).
_ACTIVATION_SETTINGS = {"LeakyReLU": "negative_slope", "ELU": "alpha", "Softplus": "beta", "Softmax": "dim"}


@dataclass
class _Node:
    """One module of a tree, whatever it came from (an ``nn.Module`` or a TorchScript ``ScriptObject``)."""

    path: str
    type_name: str                      # "torch.nn.modules.linear.Linear", or a user class's name
    settings: object                    # where activation parameters are looked up (getattr or a dict)
    own_tensors: bool
    children: list["_Node"] = field(default_factory=list)
    # Paths of tensors an in-memory module holds as plain attributes (neither parameters nor buffers).
    hidden_tensors: list[str] = field(default_factory=list)

    @property
    def short_type(self) -> str:
        short = self.type_name.rpartition(".")[2]
        return f"nn.{short}" if self.type_name.startswith("torch.nn.") else short

    def setting(self, name: str):
        """A module setting (``negative_slope`` ...), or ``_NOT_RECORDED`` when the source does not hold it."""
        if isinstance(self.settings, dict):
            return self.settings.get(name, _NOT_RECORDED)
        return getattr(self.settings, name, _NOT_RECORDED)


_NOT_RECORDED = object()


def torch_type_name(m, torch) -> str:
    """An in-memory module's class by its full name (``torch.nn.modules.rnn.LSTM``), scripted or traced too."""
    if isinstance(m, torch.jit.ScriptModule):
        try:
            return unpickler.script_type_name(m._c._type().qualified_name())
        except Exception:
            return getattr(m, "original_name", type(m).__name__)
    return f"{type(m).__module__}.{type(m).__qualname__}"


def is_recurrent_type(type_name: str) -> bool:
    """Whether a module class (by full name) is one of torch's recurrent modules or cells."""
    return type_name in _RECURRENT


def tree_from_torch_module(module, torch) -> _Node:
    registered = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}

    def hidden_tensors(m, path: str) -> list[str]:
        """Tensors in ``m``'s own attributes (lists and dicts included) that are not parameters or buffers."""
        if isinstance(m, torch.jit.ScriptModule):
            return []  # its attributes are in its state_dict or its code
        attributes = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
        found = []
        stack = [(f"{path}.{k}" if path else k, v, 0) for k, v in attributes.items()]
        while stack:
            where, value, depth = stack.pop()
            if isinstance(value, torch.Tensor) and id(value) not in registered:
                found.append(where)
            elif isinstance(value, (list, tuple, dict)) and depth < MAX_NESTING:
                items = value.items() if isinstance(value, dict) else enumerate(value)
                stack += [(f"{where}.{k}", v, depth + 1) for k, v in items]
        return sorted(found)

    def build(m, path: str, seen: set[int]) -> _Node:
        own = any(True for _ in m.named_parameters(recurse=False)) or any(True for _ in m.named_buffers(recurse=False))
        node = _Node(path, torch_type_name(m, torch), m, own, hidden_tensors=hidden_tensors(m, path))
        seen = seen | {id(m)}
        for child_name, child in m.named_children():
            if id(child) not in seen:
                node.children.append(build(child, f"{path}.{child_name}" if path else child_name, seen))
        return node

    return build(module, "", set())


def numpy_state(items, torch) -> tuple[dict, list[tuple[str, str]]]:
    """In-memory tensors -> NumPy arrays (bfloat16 widened to float32); the rest as ``(name, why unusable)``."""
    state, unusable = {}, []
    for name, value in items:
        if isinstance(value, np.ndarray):
            state[name] = value
            continue
        read = quantized.from_torch(value, torch)  # a dynamically quantized module's packed weights
        if read is not None:
            state[name] = read
            continue
        if not isinstance(value, torch.Tensor):
            unusable.append((name, f"a {type(value).__name__}, not a tensor (a quantized or packed parameter?)"))
            continue
        if value.is_quantized or value.layout != torch.strided:
            unusable.append((name, f"a {'quantized' if value.is_quantized else str(value.layout)} tensor"))
            continue
        value = value.detach().to("cpu")
        if value.dtype == torch.bfloat16:
            value = value.float()
        try:
            state[name] = value.numpy()
        except (TypeError, RuntimeError) as exc:
            unusable.append((name, f"a {value.dtype} tensor NumPy cannot hold ({exc})"))
    return state, unusable


def tree_from_script_object(root, name: str) -> tuple[_Node, dict]:
    """A TorchScript archive's module objects -> a module tree and the flat state_dict of their tensors.

    Attributes holding containers (``nn.LSTM``'s ``_flat_weights``, a ``List[Tensor]`` of the model's own)
    add the tensors in them that are not named elsewhere, so that translating refuses them by name.
    """
    state: dict[str, object] = {}
    seen: set[int] = set()
    containers: list[tuple[str, object]] = []

    def build(obj, path: str, depth: int) -> _Node:
        if depth > MAX_NESTING:
            raise ModelFormatError(f"{name}: TorchScript modules nested too deeply")
        seen.add(id(obj))
        settings = obj.constants
        if obj.type_name in _QUANTIZED_RECURRENT:  # its settings (bidirectional ...) are plain attributes
            settings = {**{k: v for k, v in obj.attributes.items() if isinstance(v, (bool, int, float, str))},
                        **settings}
        node = _Node(path, obj.type_name, settings, own_tensors=False)
        for attr, value in obj.attributes.items():
            full = f"{path}.{attr}" if path else attr
            if isinstance(value, (np.ndarray, unpickler.TorchBindObject)):
                state[full] = value
                node.own_tensors = True
            elif isinstance(value, unpickler.ScriptObject) and id(value) not in seen:
                node.children.append(build(value, full, depth + 1))
            elif isinstance(value, (list, tuple, dict)):
                containers.append((full, value))
        return node

    tree = build(root, "", 0)
    named = {id(value) for value in state.values()}
    for full, value in containers:
        for item_name, item in flatten_state({full: value}, name).items():
            if id(item) not in named:
                state[item_name] = item
    return tree, state


def spec_from_tree(tree: _Node | None, state: dict, source: str, opts: Options,
                    unusable: list[tuple[str, str]] = ()) -> ModelSpec:
    """Fill in the head and its activations from the module structure (if any), then translate the state_dict.

    ``unusable`` lists ``(name, why)`` for state_dict entries that are not plain tensors. Every activation
    module the tree holds must be accounted for by an activation the model runs, whether read off the tree
    or stated with options: a module nobody accounts for would be silently dropped.
    """
    problems = [(n, f"{n}: {why}") for n, why in unusable if not any(under(n, p) for p in opts.ignore)]
    if tree is not None:  # what the quantized modules' state_dict does not record, their tree does
        directions = {node.path: 2 if node.setting("bidirectional") else 1 for node in _nodes(tree)
                      if node.type_name in _QUANTIZED_RECURRENT and isinstance(node.setting("bidirectional"), bool)}
        dynamic = frozenset(node.path for node in _nodes(tree) if node.type_name == _QUANTIZED_LINEAR)
        state = quantized.dequantized(state, source, directions, dynamic)
    else:
        state = quantized.dequantized(state, source)
    module_paths = frozenset(_module_paths(tree)) if tree is not None else frozenset()
    kept = apply_ignore(state, opts.ignore, source, module_paths)
    try:
        groups, lstm_error = choose_stack(recurrent_groups(kept), opts, kept, source), None
    except (ModelFormatError, UnsupportedModelError) as exc:  # reported after what the structure shows
        groups, lstm_error = None, exc
    recurrent_paths = [g.prefix for g in groups] if groups else None
    analysis = _StructureAnalysis(tree, recurrent_paths, opts) if tree is not None else None
    if analysis is not None:
        problems += analysis.problems
    if problems:
        # Never propose ignoring a recurrent module itself, nor a module that holds one.
        skippable = [n for n, _ in problems
                     if n and not any(under(path, n) for path in (recurrent_paths or ()))]
        raise UnsupportedModelError([message for _, message in problems],
                                    f"{source}: " + ignore_hint(skippable))
    if lstm_error is not None:
        raise lstm_error
    if analysis is None:
        return translate(state, opts, source)
    group = groups[-1]
    head, activations, head_input = opts.head, opts.head_activations, opts.head_input_activation
    if activations is None:
        if analysis.misplaced_activations:
            raise ModelFormatError(
                f"{source}: cannot tell where forward() applies {', '.join(analysis.misplaced_activations)} "
                "(registered before the LSTM); say it with head_input_activation=... (applied to the LSTM's "
                "output) or head=[...] and head_activations=[...], or skip it with ignore=[...] if forward() "
                "never calls it")
        if head is None:
            head = analysis.chain(kept, group, source)
            activations = analysis.activations
        elif head == tuple(analysis.head):
            activations = analysis.activations
        elif analysis.activation_modules:
            raise ModelFormatError(
                f"{source}: head={list(head)} differs from the Linear layers the module registers after the LSTM "
                f"({list(analysis.head)}), so the activation modules "
                f"{[node.path for node, _ in analysis.activation_modules]} cannot be placed; "
                "pass head_activations=[...] (and head_input_activation=... for one applied to the LSTM's output) "
                "as well")
        if head_input is None:
            head_input = analysis.input_activation
    unaccounted = analysis.unaccounted(list(activations or ()) + [head_input or IDENTITY])
    if unaccounted:
        stated = (f"head_input_activation={str(head_input or IDENTITY)!r}, head_activations="
                  f"{[str(a) for a in activations] if activations is not None else 'identity'}")
        raise UnsupportedModelError(
            unaccounted,
            f"{source}: the activations the model would run ({stated}) leave these activation modules out, so "
            "loading would drop them. Say where forward() applies each: head_input_activation=... for one applied "
            "to the LSTM's output before the first Linear layer, head_activations=[...] for one after each Linear "
            f"layer; skip a module forward() never calls with ignore={[path for path in analysis.unaccounted_paths]}")
    inferred = opts.with_inferred(head, activations, head_input, embedding=analysis.embedding,
                                  rnn_nonlinearities=analysis.rnn_nonlinearities)
    return translate(state, inferred, source, module_paths)


def activation_module_names(tree: _Node, opts: Options) -> list[str]:
    """The fastlstm activation each activation module of ``tree`` computes (by name), outside ``ignore``."""
    return [_ACTIVATION_NAMES[node.type_name.rpartition(".")[2]] for node in _nodes(tree)
            if node.type_name in _ACTIVATIONS and not any(under(node.path, p) for p in opts.ignore)]


def has_cell(tree: _Node) -> bool:
    """Whether ``tree`` holds a recurrent cell (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``)."""
    return any(node.type_name in _RECURRENT and node.type_name.endswith("Cell") for node in _nodes(tree))


def _nodes(tree: _Node):
    yield tree
    for child in tree.children:
        yield from _nodes(child)


def _module_paths(tree: _Node):
    yield tree.path
    yield from tree.hidden_tensors
    for child in tree.children:
        yield from _module_paths(child)


class _StructureAnalysis:
    """Walk a module tree in registration order and read the head off what follows the recurrent modules.

    ``embedding``: the path of an ``nn.Embedding`` registered before the first recurrent module ("" for none);
    ``rnn_nonlinearities``: ``(path, "tanh" | "relu")`` of every ``nn.RNN`` / ``nn.RNNCell``. Anything
    registered between two recurrent modules (a Linear, an activation, a LayerNorm) is refused: fastlstm
    runs recurrent modules back to back.

    ``input_activation``: an activation module registered after the LSTM and before its first Linear layer
    (applied to the LSTM's output); ``head``/``activations``: the Linear layers after the LSTM and the
    activation module following each (or identity); ``activation_modules``: every activation module seen, with
    the activation it computes (``_NOT_RECORDED`` when the source does not hold its settings), to check that
    each is accounted for; ``problems``: modules fastlstm cannot run; ``misplaced_activations``: activation
    modules whose place in ``forward()`` cannot be told (registered before the LSTM).

    When the options state the head's activations, activation modules are not placed, only accounted for.
    """

    def __init__(self, tree: _Node, recurrent_paths: list[str] | None, opts: Options):
        self.opts = opts
        self.embedding = ""
        self.rnn_nonlinearities: list[tuple[str, str]] = []
        self.head: list[str] = []
        self.activations_list: list[Activation | None] = []
        self.input_activation: Activation | None = None
        self.activation_modules: list[tuple[_Node, object]] = []
        self.misplaced_activations: list[str] = []
        self.problems: list[tuple[str, str]] = []  # (module path, message)
        self.unaccounted_paths: list[str] = []
        self._after_lstm = False
        self._recurrent_paths = list(recurrent_paths or ())
        self._recurrent_seen = 0  # how many of the chosen recurrent modules the walk has passed
        self._visit(tree)

    @property
    def activations(self) -> tuple[Activation, ...]:
        return tuple(a or IDENTITY for a in self.activations_list)

    def chain(self, state: dict, group: Recurrent, source: str) -> tuple[str, ...]:
        """``head``, checked to chain by shape from the last recurrent module's output."""
        size = recurrent_output_size(group, state)
        if size is None:
            return tuple(self.head)  # the LSTM's own tensors are malformed; translating it says how
        for prefix in self.head:
            weight = state.get(f"{prefix}.weight")
            if not isinstance(weight, np.ndarray) or weight.ndim != 2 or weight.shape[1] != size:
                present = [p for p in self.head if isinstance(state.get(f"{p}.weight"), np.ndarray)]
                raise ModelFormatError(
                    f"{source}: the Linear layers registered after the LSTM (output size {size}), "
                    f"{describe_linears(present, state)}, do not chain by shape, so forward() must use them "
                    "another way; name the head with head=[...] (head=[] for none) and skip the others with "
                    "ignore=[...]")
            size = weight.shape[0]
        return tuple(self.head)

    def unaccounted(self, run: list[Activation]) -> list[str]:
        """The activation modules that none of the activations ``run`` by the model accounts for, described.

        Each module consumes one activation computing the same function (by name alone when its settings
        are not recorded); a module forward() calls twice needs only one. Identity accounts for nothing.
        """
        remaining = [a for a in run if a.name != "identity"]
        described = []
        for node, reading in self.activation_modules:
            name = _ACTIVATION_NAMES[node.type_name.rpartition(".")[2]]
            match = next((a for a in remaining
                          if (a.name == name if reading is _NOT_RECORDED else a == reading)), None)
            if match is not None:
                remaining.remove(match)
                continue
            what = name if reading is _NOT_RECORDED else str(reading)
            described.append(f"{node.path!r} ({node.short_type}, computing {what}): not among the activations run")
            self.unaccounted_paths.append(node.path)
        return described

    def _problem(self, node: _Node, why: str) -> None:
        where = repr(node.path) if node.path else "the module itself"
        self.problems.append((node.path, f"{where} ({node.short_type}): {why}"))

    def _ignored(self, path: str) -> bool:
        return any(under(path, p) for p in self.opts.ignore)

    def _visit(self, node: _Node) -> None:
        if self._ignored(node.path) and node.path:
            return
        if node.path in self._recurrent_paths:
            self._recurrent_module(node)
            return
        for path in node.hidden_tensors:
            if not self._ignored(path):
                self.problems.append((path, f"{path!r}: a tensor attribute of {node.short_type}, neither a parameter "
                                            "nor a buffer; fastlstm cannot see what forward() does with it"))
        if node.children and node.type_name != _QUANTIZED_LINEAR:  # its packed weights are a child module
            if node.own_tensors and node.type_name not in _CONTAINERS:
                self._problem(node, "a custom module with its own parameters; fastlstm cannot see what its "
                                    "forward() does with them")
            for child in node.children:
                self._visit(child)
            return
        self._leaf(node)

    def _leaf(self, node: _Node) -> None:
        kind = node.type_name
        where = f"{node.path!r} ({node.short_type})"
        if kind in _PASSTHROUGH or (kind in _CONTAINERS and not node.own_tensors):
            return
        if kind in _RECURRENT:
            return  # a recurrent module not chosen: its parameters are reported by the state_dict translation
        if self._between_recurrent_modules():
            if kind in _ACTIVATIONS or kind in _LINEARS or kind == _EMBEDDING or kind.startswith("torch."):
                self._problem(node, "registered between two recurrent modules; fastlstm runs recurrent modules "
                                    "back to back, with nothing between them")
                return
        if kind == _EMBEDDING:
            self._embedding_module(node)
            return
        if kind in _LINEARS:
            if self._after_lstm:
                self.head.append(node.path)
                self.activations_list.append(None)
            return  # a Linear before the recurrent modules is reported as an unused tensor unless named in head=
        if kind in _ACTIVATIONS:
            self._activation_module(node, where)
        elif kind.startswith("torch."):
            self._problem(node, "fastlstm runs an optional Embedding, recurrent modules, then Linear layers and "
                                "activations (ReLU, Sigmoid, Tanh, LeakyReLU, ELU, Softplus, Softsign, Hardsigmoid, "
                                f"Softmax); it cannot run {node.short_type}")
        else:
            self._problem(node, "a custom module; fastlstm cannot see what its forward() does")

    def _between_recurrent_modules(self) -> bool:
        return 0 < self._recurrent_seen < len(self._recurrent_paths)

    def _recurrent_module(self, node: _Node) -> None:
        self._recurrent_seen += 1
        self._after_lstm = self._recurrent_seen == len(self._recurrent_paths)
        if node.type_name not in _RECURRENT:  # a user's cell, or a subclass overriding forward()
            self._problem(node, "holds parameters named like a recurrent module's (weight_ih, weight_hh, ...) but is "
                                "not nn.LSTM, nn.GRU, nn.RNN or their cells; fastlstm cannot see what its forward() does")
            return
        if node.type_name in _RNN:
            nonlinearity = node.setting("nonlinearity")
            if nonlinearity is _NOT_RECORDED:  # a scripted archive records nn.RNN's mode instead
                mode = node.setting("mode")
                nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}.get(mode, _NOT_RECORDED) if isinstance(mode, str) else _NOT_RECORDED
            if nonlinearity is _NOT_RECORDED:
                return  # not recorded (a traced archive): the translation warns, rnn_nonlinearity says it
            if nonlinearity not in RNN_NONLINEARITIES:
                self._problem(node, f"nonlinearity={nonlinearity!r}; nn.RNN computes tanh or relu")
                return
            self.rnn_nonlinearities.append((node.path, nonlinearity))

    def _embedding_module(self, node: _Node) -> None:
        if self._recurrent_seen:
            self._problem(node, "an embedding after a recurrent module; fastlstm runs one in front of the first")
            return
        if self.embedding:
            self._problem(node, f"a second embedding (after {self.embedding!r}); fastlstm runs one")
            return
        max_norm = node.setting("max_norm")
        # A scripted archive records the settings but leaves out a max_norm of None; a traced one records none.
        settings_recorded = node.setting("num_embeddings") is not _NOT_RECORDED
        if max_norm is _NOT_RECORDED and settings_recorded:
            max_norm = None
        if max_norm is _NOT_RECORDED and self.opts.embedding != node.path:
            self._problem(node, "its max_norm is not recorded where fastlstm can read it (a traced TorchScript module "
                                "inlines it into code), and max_norm renormalises the rows it looks up; if it has "
                                f"none, say so with embedding={node.path!r}")
            return
        if max_norm is not _NOT_RECORDED and max_norm is not None:
            self._problem(node, f"max_norm={max_norm!r} renormalises the rows it looks up; fastlstm looks rows up as "
                                "they are stored")
            return
        self.embedding = node.path

    def _activation_module(self, node: _Node, where: str) -> None:
        reading = self._activation(node)
        if reading is None:
            return  # fastlstm cannot compute it: a problem is noted
        self.activation_modules.append((node, reading))
        if self.opts.head_activations is not None:
            return  # the options place the activations; this module is only accounted for
        if not self._after_lstm:
            self.misplaced_activations.append(where)
            return
        if reading is _NOT_RECORDED:
            parameter = _ACTIVATION_SETTINGS[node.type_name.rpartition(".")[2]]
            self._problem(node, f"its {parameter} is not recorded where fastlstm can read it (a traced TorchScript "
                                "module inlines it into code); pass head=[...] and head_activations=[...]")
            return
        if not self.head:
            if reading.name not in ELEMENTWISE:
                self._problem(node, f"{reading.name} applied to the LSTM's output before any Linear layer; "
                                    "fastlstm runs softmax as the head's last activation only")
            elif self.input_activation is not None:
                self._problem(node, "a second activation applied to the LSTM's output; fastlstm applies one")
            else:
                self.input_activation = reading
            return
        if self.activations_list[-1] is not None:
            self._problem(node, f"a second activation after '{self.head[-1]}'; fastlstm applies one "
                                "activation per Linear layer")
            return
        self.activations_list[-1] = reading

    def _activation(self, node: _Node):
        """The fastlstm ``Activation`` an activation module computes; ``_NOT_RECORDED`` when its settings are
        not in the source; None with a problem noted when fastlstm cannot compute it."""
        short = node.type_name.rpartition(".")[2]
        name = _ACTIVATION_NAMES[short]
        if short in ("ReLU", "Sigmoid", "Tanh", "Softsign"):
            return Activation.of(name)
        if short == "Hardsigmoid":  # relu6(x + 3) / 6
            return Activation.of(name, alpha=1 / 6, beta=0.5)
        parameter = _ACTIVATION_SETTINGS[short]
        value = node.setting(parameter)
        if value is _NOT_RECORDED:
            return _NOT_RECORDED
        if short != "Softmax" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            self._problem(node, f"{parameter}={value!r} is not a number")
            return None
        if short in ("LeakyReLU", "ELU"):
            return Activation.of(name, alpha=float(value))
        if short == "Softplus":
            threshold = node.setting("threshold")
            if value != 1 or not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 20:
                # torch's softplus is linear above threshold/beta; at 20 that differs from log(1 + e^x) by 2e-9
                self._problem(node, f"beta={value}, threshold={threshold}; fastlstm's softplus is "
                                    "log(1 + exp(x)) (beta=1, threshold >= 20)")
                return None
            return Activation.of(name)
        last_axis = 2 if self.opts.output == "sequence" else 1
        if type(value) is not int or value not in (-1, last_axis):
            self._problem(node, f"dim={value}; fastlstm's softmax runs over the last axis (dim=-1)")
            return None
        return Activation.of(name)
