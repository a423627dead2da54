"""PyTorch importer: ``torch.save`` state_dicts, TorchScript archives and in-memory modules -> ``ModelSpec``.

Every source is reduced to one thing, a flat state_dict (``{"lstm.weight_ih_l0": array, ...}``), and one
function, ``spec_from_state_dict``, translates it:

* **The LSTM** is found by its parameter names anywhere in the dict (``weight_ih_l{k}``, ``weight_hh_l{k}``,
  ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, each optionally ``_reverse``, under any prefix).
  Layers, direction, hidden and projection sizes come from the names and shapes; ``bias = b_ih + b_hh``
  (zeros for ``bias=False``). PyTorch's gate order is fastlstm's, so no permutation.
* **The head** is the chain of ``nn.Linear`` layers (``<prefix>.weight`` 2-D, optional ``<prefix>.bias``) that
  come after the LSTM in the dict's order (its modules' registration order), when their shapes chain from the
  LSTM's output size. A state_dict records no activations: they are identity unless ``head_activations`` is
  given (a module's structure supplies them when it can, see below).
* **Everything else** in the dict is refused (``UnsupportedModelError``, listing it): an embedding, a
  LayerNorm, a GRU would otherwise be silently dropped. ``ignore=`` names what is genuinely not on the path
  from input to output (an optimizer state, an unused branch).

For modules (in memory, or TorchScript archives read without torch) the module tree is looked at first:
``Linear`` and activation modules registered after the LSTM, in order (an ``nn.Sequential`` is in execution
order by definition), give the head and its activations; modules fastlstm cannot run (``nn.GRU``,
``nn.LayerNorm``, a custom module, ...) are listed and refused. What ``forward()`` does with functional calls
(``F.relu``, ``out[:, -1]``) is invisible: say it with the options.

Options (keywords of ``fastlstm.load``), all optional:

* ``lstm``: the prefix of the LSTM's parameters (``"encoder.rnn"``; ``""`` for a bare ``nn.LSTM``), needed
  when the dict holds several LSTMs.
* ``head``: the prefixes of the Linear layers in the order they run (``["fc1", "fc2"]``), or ``[]`` for none.
* ``head_activations``: one activation per head layer: a name from ``fastlstm.activations``
  (``"relu"``, ``"tanh"``, ``"softmax"``, ...), an ``Activation``, or ``None`` for identity.
* ``output``: ``"sequence"`` (default), ``"last_step"`` (a ``fc(out[:, -1])`` model) or ``"final_state"``.
* ``ignore``: prefixes (or full names) of tensors that are not part of the network to run.

torch itself is imported only for in-memory objects.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from ..activations import ACTIVATION_PARAMS, ELEMENTWISE, IDENTITY, Activation
from ..errors import InvalidModelError, ModelFormatError, UnsupportedModelError
from ..spec import OUTPUT_MODES, DenseLayer, LSTMCellWeights, LSTMLayer, ModelSpec
from . import torch_pickle

OPTION_NAMES = ("lstm", "head", "head_activations", "head_input_activation", "output", "ignore", "state_dict_key")

_RECURRENT_NAME = re.compile(
    r"^(?:(?P<prefix>.+)\.)?"
    r"(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(?P<layer>\d+)(?P<reverse>_reverse)?)?$"
)
_MAX_FLATTENED_ENTRIES = 1_000_000
_MAX_NESTING = 64
def _ignore_hint(prefixes: list[str]) -> str:
    """What to do about refused parts: skip what is not on the path from input to output, or state the head."""
    skip = (f"If something listed is not on the path from the model's input to its output (an optimizer state, "
            f"an unused branch), skip it with ignore={prefixes!r}; ") if prefixes else ""
    return (f"fastlstm runs one nn.LSTM followed by Linear layers and activations. {skip}the head's layers and "
            "activations can be stated with head=[...], head_activations=[...] and head_input_activation=...")


# ----------------------------------------------------------------------------------------- entry points
def spec_from_file(path, **options) -> ModelSpec:
    """The ``ModelSpec`` of a ``torch.save`` file (zip or legacy) or a ``torch.jit.save`` archive.

    Never imports torch; nothing from the file is executed (see ``torch_pickle``).
    """
    opts = _Options.parse(options)
    path = os.fspath(path)
    name = os.path.basename(path)
    contents = torch_pickle.read_torch_file(path)
    if contents.is_torchscript:
        tree, state = _tree_from_script_object(contents.root, name)
        return _spec_from_tree(tree, state, f"TorchScript {name}", opts)
    if not isinstance(contents.root, dict):
        raise ModelFormatError(f"{name}: expected a state_dict (a dict of tensors), found a "
                               f"{type(contents.root).__name__}")
    state_dict, entry = _checkpoint_state_dict(contents.root, opts.state_dict_key, name)
    state = _flatten_state(state_dict, name)
    if entry:  # ignore= may name the checkpoint's other entries ("optimizer"): they are left out already
        kept = tuple(p for p in opts.ignore if not _is_entry(contents.root, p) or _under(p, entry))
        opts = replace(opts, ignore=kept)
    return _translate(state, opts, f"PyTorch state_dict {name}" + (f" (checkpoint entry {entry!r})" if entry else ""))


def spec_from_module(module, **options) -> ModelSpec:
    """The ``ModelSpec`` of an in-memory ``nn.Module`` holding an ``nn.LSTM`` (scripted modules included),
    or of an in-memory state_dict of tensors."""
    opts = _Options.parse(options)
    try:
        import torch
    except ImportError:  # pragma: no cover - only reachable when handed a torch object without torch
        raise ImportError("loading an in-memory PyTorch object needs torch (pip install 'fastlstm[torch]'); "
                          "files saved with torch.save or torch.jit.save load without it") from None
    if isinstance(module, Mapping):
        state, unusable = _numpy_state(module.items(), torch)
        return _spec_from_tree(None, state, "PyTorch state_dict (in memory)", opts, unusable)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a state_dict, got {type(module).__module__}."
                        f"{type(module).__qualname__}")
    tree = _tree_from_torch_module(module, torch)
    state, unusable = _numpy_state(module.state_dict().items(), torch)
    return _spec_from_tree(tree, state, f"torch module {type(module).__name__}", opts, unusable)


def spec_from_state_dict(state_dict: dict[str, np.ndarray], *, source: str, **options) -> ModelSpec:
    """Translate a flat state_dict of NumPy arrays (names as ``nn.Module.state_dict()`` gives them).

    ``source`` names the model in messages and in ``ModelSpec.source``; ``options`` are described in the
    module docstring. Raises ``TypeError`` for unknown options (``ValueError`` for bad values),
    ``ModelFormatError`` when the dict is ambiguous (several LSTMs, Linear layers that do not chain),
    ``InvalidModelError`` (a ``ModelFormatError``) naming every missing or mis-shaped tensor, and
    ``UnsupportedModelError`` listing every tensor that is neither the LSTM nor its head.
    """
    return _translate(dict(state_dict), _Options.parse(options), source)


# ----------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class _Options:
    lstm: str | None = None
    head: tuple[str, ...] | None = None
    head_activations: tuple[Activation, ...] | None = None
    head_input_activation: Activation | None = None
    output: str = "sequence"
    ignore: tuple[str, ...] = ()
    state_dict_key: str | None = None

    @classmethod
    def parse(cls, options: dict) -> "_Options":
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)} for a PyTorch model; accepted: "
                            f"{', '.join(OPTION_NAMES)}")
        lstm = options.get("lstm")
        if lstm is not None and not isinstance(lstm, str):
            raise TypeError(f"lstm: expected the prefix of the LSTM's parameters as a str, got {lstm!r}")
        head = _str_sequence(options.get("head"), "head")
        activations = options.get("head_activations")
        if activations is not None:
            if isinstance(activations, (str, Activation)) or not isinstance(activations, (list, tuple)):
                raise TypeError(f"head_activations: expected a list with one activation per head layer, "
                                f"got {activations!r}")
            activations = tuple(_activation_option(a, f"head_activations[{n}]") for n, a in enumerate(activations))
        head_input = options.get("head_input_activation")
        if head_input is not None:
            head_input = _activation_option(head_input, "head_input_activation")
            if head_input.name not in ELEMENTWISE:
                raise ValueError(f"head_input_activation: {head_input.name} is not elementwise; softmax runs in the "
                                 "head's last layer only")
        output = options.get("output", "sequence")
        if output not in OUTPUT_MODES:
            raise ValueError(f"output: expected one of {OUTPUT_MODES}, got {output!r}")
        ignore = _str_sequence(options.get("ignore"), "ignore") or ()
        if "" in ignore:
            raise ValueError("ignore: an empty name would ignore everything")
        state_dict_key = options.get("state_dict_key")
        if state_dict_key is not None and not isinstance(state_dict_key, str):
            raise TypeError(f"state_dict_key: expected the checkpoint entry holding the state_dict as a str "
                            f"(nested keys joined by '.'), got {state_dict_key!r}")
        return cls(lstm=None if lstm is None else lstm.strip("."), head=head, head_activations=activations,
                   head_input_activation=head_input, output=output, ignore=ignore, state_dict_key=state_dict_key)

    def with_inferred(self, head, head_activations, head_input_activation) -> "_Options":
        return replace(self, head=head, head_activations=head_activations,
                       head_input_activation=head_input_activation)


def _str_sequence(value, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{option}: expected a list of names (str), got {value!r}")
    return tuple(v.strip(".") for v in value)


def _activation_option(value, where: str) -> Activation:
    if value is None:
        return IDENTITY
    if isinstance(value, Activation):
        if value.name not in ACTIVATION_PARAMS:
            raise ValueError(f"{where}: unknown activation {value.name!r}")
        return value
    if isinstance(value, str):
        if value not in ACTIVATION_PARAMS:
            raise ValueError(f"{where}: unknown activation {value!r}; known: {', '.join(ACTIVATION_PARAMS)}")
        return Activation.of(value)
    raise TypeError(f"{where}: expected an activation name, an Activation or None, got {value!r}")


# ----------------------------------------------------------------------------------------- state_dict -> spec
@dataclass
class _Recurrent:
    """The recurrent parameters under one prefix: ``names[(kind, layer, reverse)] = full name``."""

    prefix: str
    names: dict[tuple[str, int, bool], str] = field(default_factory=dict)
    kind: str = "LSTM"  # or "GRU" / "RNN", told apart by weight_hh's shape
    # nn.LSTMCell (GRUCell, RNNCell) names its tensors without the layer suffix: weight_ih, not weight_ih_l0.
    cell_names: bool = False
    layer_names: bool = False

    @property
    def module(self) -> str:
        return f"nn.{self.kind}{'Cell' if self.cell_names and not self.layer_names else ''}"

    def display(self) -> str:
        return repr(self.prefix) if self.prefix else f"'' (a bare {self.module}'s state_dict)"

    def full_name(self, kind: str, layer: int, reverse: bool) -> str:
        prefix = f"{self.prefix}." if self.prefix else ""
        if self.cell_names and not self.layer_names:
            return f"{prefix}{kind}"
        return f"{prefix}{kind}_l{layer}{'_reverse' if reverse else ''}"


def _translate(state: dict, opts: _Options, source: str, module_paths: frozenset[str] = frozenset()) -> ModelSpec:
    state = _apply_ignore(state, opts.ignore, source, module_paths)
    recurrent = _recurrent_groups(state)
    group = _choose_lstm(recurrent, opts, state, source)
    layers = _lstm_layers(group, state, source)
    lstm_output = layers[-1].num_directions * layers[-1].output_size
    head_names = opts.head if opts.head is not None else _infer_head(state, group, lstm_output, source)
    head = _head_layers(head_names, state, lstm_output, source)
    activations = _head_activations(opts, head_names, source)

    used = set(group.names.values())
    for prefix in head_names:
        used.update(n for n in (f"{prefix}.weight", f"{prefix}.bias") if n in state)
    _refuse_leftovers(state, used, recurrent, source)

    dense = tuple(DenseLayer(weight, bias, act) for (weight, bias), act in zip(head, activations))
    return ModelSpec(layers=layers, head=dense, output=opts.output,
                     head_input_activation=opts.head_input_activation or IDENTITY, source=source).validate()


def _apply_ignore(state: dict, ignore: tuple[str, ...], source: str,
                  module_paths: frozenset[str] = frozenset()) -> dict:
    """``state`` without the tensors under the ``ignore`` prefixes; each prefix must name something (a typo
    would otherwise ignore nothing, silently). ``module_paths`` are further names a prefix may match."""
    if not ignore:
        return state
    unmatched = [p for p in ignore
                 if not any(_under(name, p) for name in state) and not any(_under(path, p) for path in module_paths)]
    if unmatched:
        known = sorted(module_paths | {p for name in state for p in _prefixes(name)})
        suggestions = "".join(_did_you_mean(p, known) for p in unmatched)
        raise ModelFormatError(f"{source}: ignore={list(unmatched)} match(es) no tensor or module; names look like "
                               f"{_some(state)}{suggestions}")
    return {name: value for name, value in state.items() if not any(_under(name, p) for p in ignore)}


def _prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _did_you_mean(wanted: str, known) -> str:
    """``"; did you mean 'model.fc'?"`` for the known name closest to ``wanted`` (one that ends with it, as
    when a wrapper adds a prefix, else a close spelling), or ``""``."""
    known = [k for k in known if k != wanted]
    suffixed = sorted((k for k in known if k.endswith("." + wanted)), key=len)
    close = suffixed[:1] or difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _some(names, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _recurrent_groups(state: dict) -> dict[str, _Recurrent]:
    groups: dict[str, _Recurrent] = {}
    for name in state:
        match = _RECURRENT_NAME.match(name)
        if match:
            prefix = match.group("prefix") or ""
            group = groups.setdefault(prefix, _Recurrent(prefix))
            layer = match.group("layer")
            key = (match.group("kind"), int(layer or 0), bool(match.group("reverse")))
            group.names[key] = name
            if layer is None:
                group.cell_names = True
            else:
                group.layer_names = True
    for group in groups.values():
        # nn.GRU and nn.RNN name their parameters like nn.LSTM; weight_hh has 3H or H rows instead of 4H.
        w_hh = state.get(group.names.get(("weight_hh", 0, False), ""))
        has_projection = any(kind == "weight_hr" for kind, _, _ in group.names)
        if not has_projection and isinstance(w_hh, np.ndarray) and w_hh.ndim == 2:
            rows, columns = w_hh.shape
            if rows == 3 * columns:
                group.kind = "GRU"
            elif rows == columns:
                group.kind = "RNN"
    return groups


def _choose_lstm(groups: dict[str, _Recurrent], opts: _Options, state: dict, source: str) -> _Recurrent:
    lstms = [g for g in groups.values() if g.kind == "LSTM"]
    if opts.lstm is not None:
        group = groups.get(opts.lstm)
        if group is None:
            found = ", ".join(g.display() for g in lstms) or "none"
            expected = f"{opts.lstm}.weight_ih_l0" if opts.lstm else "weight_ih_l0"
            raise ModelFormatError(f"{source}: lstm={opts.lstm!r}: no LSTM parameters under that prefix "
                                   f"(names like {expected!r}); LSTMs found: {found}"
                                   + _did_you_mean(opts.lstm, [g.prefix for g in lstms]))
        if group.kind != "LSTM":
            raise UnsupportedModelError([f"{group.display()}: {group.module} parameters (judging by weight_hh's "
                                         "shape); fastlstm runs LSTMs only"])
        return group
    if len(lstms) == 1:
        return lstms[0]
    if not lstms:
        others = [f"{g.display()}: {g.module} parameters; fastlstm runs LSTMs only" for g in groups.values()]
        if others:
            raise UnsupportedModelError(others)
        raise ModelFormatError(f"{source}: no nn.LSTM parameters found (names like 'weight_ih_l0' or "
                               f"'lstm.weight_ih_l0'); the state_dict holds {_some(state) or 'nothing'}")
    choices = ", ".join(g.display() for g in lstms)
    example = next(g.prefix for g in lstms)
    raise ModelFormatError(f"{source}: the state_dict holds {len(lstms)} LSTMs ({choices}); say which one to run "
                           f"with the lstm option, e.g. fastlstm.load(path, lstm={example!r}), and skip the others "
                           "with ignore=[...]")


def _lstm_layers(group: _Recurrent, state: dict, source: str) -> tuple[LSTMLayer, ...]:
    """Build the LSTM layers of ``group``, collecting every missing or mis-shaped tensor before refusing."""
    names = group.names
    prefix = f"{group.prefix}." if group.prefix else ""
    layer_numbers = {layer for _, layer, _ in names}
    num_layers = max(layer_numbers) + 1
    problems: list[str] = []
    if group.cell_names and group.layer_names:
        problems.append(f"{prefix}weight_ih...: both nn.LSTMCell names (weight_ih) and nn.LSTM names "
                        "(weight_ih_l0) under one prefix")
        raise InvalidModelError(problems, source)
    if len(layer_numbers) != num_layers:
        problems.append(f"{prefix}*_l<k>: layer numbers {sorted(layer_numbers)[:10]} are not "
                        f"0..{len(layer_numbers) - 1}")
        raise InvalidModelError(problems, source)
    bidirectional = any(reverse for _, _, reverse in names)
    has_bias = any(kind.startswith("bias") for kind, _, _ in names)
    has_projection = any(kind == "weight_hr" for kind, _, _ in names)
    directions = (False, True) if bidirectional else (False,)
    kinds = ["weight_ih", "weight_hh"]
    kinds += ["bias_ih", "bias_hh"] if has_bias else []
    kinds += ["weight_hr"] if has_projection else []

    full_name = group.full_name

    arrays: dict[tuple[str, int, bool], np.ndarray] = {}
    for layer in range(num_layers):
        for reverse in directions:
            for kind in kinds:
                key = (kind, layer, reverse)
                if key not in names:
                    problems.append(f"{full_name(*key)}: missing (the other layers/directions have it)")
                    continue
                array = _float_array(state[names[key]], names[key], problems)
                if array is not None:
                    arrays[key] = array
    if problems:
        raise InvalidModelError(problems, source)

    w_hh0 = arrays[("weight_hh", 0, False)]
    w_ih0 = arrays[("weight_ih", 0, False)]
    for key in (("weight_hh", 0, False), ("weight_ih", 0, False)):
        if arrays[key].ndim != 2:
            problems.append(f"{full_name(*key)}: expected a 2-D tensor, got shape {arrays[key].shape}")
    if not problems and (w_hh0.shape[0] % 4 or w_hh0.shape[0] == 0):
        problems.append(f"{full_name('weight_hh', 0, False)}: expected 4 * hidden_size rows (gates i, f, g, o), "
                        f"got shape {w_hh0.shape}")
    if problems:
        raise InvalidModelError(problems, source)
    hidden = w_hh0.shape[0] // 4
    proj = 0
    if has_projection:
        w_hr0 = arrays[("weight_hr", 0, False)]
        proj = w_hr0.shape[0] if w_hr0.ndim == 2 else 0
        if not proj:
            problems.append(f"{full_name('weight_hr', 0, False)}: expected shape (proj_size, {hidden}), "
                            f"got {w_hr0.shape}")
            raise InvalidModelError(problems, source)
    recurrent = proj or hidden
    num_directions = len(directions)

    layers = []
    for layer in range(num_layers):
        input_size = w_ih0.shape[1] if layer == 0 else num_directions * recurrent
        expected = {"weight_ih": (4 * hidden, input_size), "weight_hh": (4 * hidden, recurrent),
                    "bias_ih": (4 * hidden,), "bias_hh": (4 * hidden,), "weight_hr": (proj, hidden)}
        for reverse in directions:
            for kind in kinds:
                shape = arrays[(kind, layer, reverse)].shape
                if shape != expected[kind]:
                    problems.append(f"{full_name(kind, layer, reverse)}: expected shape {expected[kind]}, got {shape}")
        if problems:
            continue
        cells = []
        for reverse in directions:
            w_ih = arrays[("weight_ih", layer, reverse)]
            if has_bias:
                b_ih, b_hh = arrays[("bias_ih", layer, reverse)], arrays[("bias_hh", layer, reverse)]
                bias = (b_ih.astype(np.float64) + b_hh.astype(np.float64)).astype(np.result_type(b_ih, b_hh))
            else:
                bias = np.zeros(4 * hidden, dtype=w_ih.dtype)
            cells.append(LSTMCellWeights(w_ih=w_ih, w_hh=arrays[("weight_hh", layer, reverse)], bias=bias,
                                         w_hr=arrays.get(("weight_hr", layer, reverse))))
        layers.append(LSTMLayer(input_size=int(input_size), hidden_size=int(hidden), proj_size=int(proj),
                                direction="bidirectional" if bidirectional else "forward", cells=tuple(cells)))
    if problems:
        raise InvalidModelError(problems, source)
    return tuple(layers)


def _lstm_output_size(group: _Recurrent, state: dict) -> int | None:
    """The LSTM's output feature size read off its last layer's shapes (None if they are malformed)."""
    last = max(layer for _, layer, _ in group.names)
    directions = 2 if ("weight_hh", last, True) in group.names else 1
    source = group.names.get(("weight_hr", last, False)) or group.names.get(("weight_hh", last, False))
    array = state.get(source or "")
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        return None
    size = array.shape[0] if source.rpartition(".")[2].startswith("weight_hr") else array.shape[0] // 4
    return directions * size


def _float_array(value, name: str, problems: list[str]) -> np.ndarray | None:
    """A fresh C-contiguous float32 copy of ``value`` (float64 stays float64), or None with a problem noted."""
    if not isinstance(value, np.ndarray):
        problems.append(f"{name}: expected a tensor, got a {type(value).__name__}")
        return None
    if value.dtype.kind != "f":
        problems.append(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
        return None
    return np.array(value, dtype=np.float64 if value.dtype == np.float64 else np.float32, order="C", copy=True)


def _linear_candidates(state: dict, exclude: set[str]) -> list[str]:
    """Prefixes that look like an ``nn.Linear``: a 2-D ``weight``, an optional matching 1-D ``bias``, nothing else."""
    children: dict[str, set[str]] = {}
    for name in state:
        if name not in exclude and "." in name:
            prefix, _, leaf = name.rpartition(".")
            children.setdefault(prefix, set()).add(leaf)
    candidates = []
    for prefix, leaves in children.items():
        weight = state.get(f"{prefix}.weight")
        if not (leaves <= {"weight", "bias"} and isinstance(weight, np.ndarray) and weight.ndim == 2):
            continue
        bias = state.get(f"{prefix}.bias")
        if bias is None or (isinstance(bias, np.ndarray) and bias.shape == (weight.shape[0],)):
            candidates.append(prefix)
    return candidates


def _describe_linears(prefixes, state: dict) -> str:
    described = []
    for prefix in prefixes:
        shape = state[f"{prefix}.weight"].shape
        described.append(f"{prefix} ({shape[1]}->{shape[0]})")
    return ", ".join(described)


def _infer_head(state: dict, group: _Recurrent, lstm_output: int, source: str) -> tuple[str, ...]:
    """The Linear layers after the LSTM in the dict's order, if their shapes chain from the LSTM's output."""
    order = {name: n for n, name in enumerate(state)}
    lstm_end = max(order[name] for name in group.names.values())
    after = [p for p in _linear_candidates(state, set(group.names.values())) if order[f"{p}.weight"] > lstm_end]
    after.sort(key=lambda p: order[f"{p}.weight"])
    size = lstm_output
    for prefix in after:
        if state[f"{prefix}.weight"].shape[1] != size:
            raise ModelFormatError(
                f"{source}: cannot tell which Linear layers form the head: after the LSTM (output size {lstm_output}) "
                f"come {_describe_linears(after, state)}, whose shapes do not chain. Name them in the order they run "
                "with head=[...] (head=[] for none) and skip the others with ignore=[...]")
        size = state[f"{prefix}.weight"].shape[0]
    return tuple(after)


def _head_layers(head: tuple[str, ...], state: dict, lstm_output: int, source: str):
    problems: list[str] = []
    layers = []
    size = lstm_output
    for n, prefix in enumerate(head):
        weight_name, bias_name = f"{prefix}.weight", f"{prefix}.bias"
        if weight_name not in state:
            if prefix.endswith(".weight"):
                hint = f" (name the module, {prefix[:-len('.weight')]!r}, not its weight)"
            else:
                hint = _did_you_mean(prefix, _linear_candidates(state, set()))
            problems.append(f"{weight_name}: missing (head[{n}] = {prefix!r}){hint}")
            continue
        weight = _float_array(state[weight_name], weight_name, problems)
        bias = _float_array(state[bias_name], bias_name, problems) if bias_name in state else None
        if weight is None:
            continue
        if weight.ndim != 2:
            problems.append(f"{weight_name}: expected a 2-D Linear weight (out, in), got shape {weight.shape}")
            continue
        if weight.shape[1] != size:
            previous = "the LSTM's output size" if n == 0 else f"{head[n - 1]}'s output size"
            problems.append(f"{weight_name}: expected shape (?, {size}) ({previous}), got {weight.shape}")
        if bias is not None and bias.shape != (weight.shape[0],):
            problems.append(f"{bias_name}: expected shape ({weight.shape[0]},), got {bias.shape}")
        size = weight.shape[0]
        layers.append((weight, bias))
    if problems:
        raise InvalidModelError(problems, source)
    return layers


def _head_activations(opts: _Options, head: tuple[str, ...], source: str) -> tuple[Activation, ...]:
    if opts.head_activations is not None:
        if len(opts.head_activations) != len(head):
            raise ValueError(f"head_activations: {len(opts.head_activations)} given for a head of {len(head)} "
                             f"layer(s) ({', '.join(head) or 'none'})")
        return opts.head_activations
    if len(head) > 1:
        warnings.warn(f"{source}: no activations are known for the head {list(head)} (a state_dict records none), so "
                      "none runs between its Linear layers. Pass head_activations=[...] to say which.", stacklevel=2)
    return (IDENTITY,) * len(head)


def _refuse_leftovers(state: dict, used: set[str], recurrent: dict[str, _Recurrent], source: str) -> None:
    leftovers = [name for name in state if name not in used]
    if not leftovers:
        return
    kinds = {name: group.module for group in recurrent.values() for name in group.names.values()}
    entries = []
    for name in leftovers:
        value = state[name]
        what = f"shape {tuple(value.shape)}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
        if name in kinds:
            what += f", an {kinds[name]} parameter"
        entries.append(f"{name} ({what})")
    hint = _ignore_hint(_covering_prefixes(leftovers, used))
    raise UnsupportedModelError(entries, f"{source}: {hint}")


def _covering_prefixes(leftovers: list[str], used: set[str]) -> list[str]:
    """The shortest dotted prefixes that cover the leftovers and nothing used, for the ``ignore`` hint."""
    prefixes: list[str] = []
    for name in leftovers:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            prefix = ".".join(parts[:n])
            if not any(_under(u, prefix) for u in used):
                break
        if prefix not in prefixes and not any(_under(prefix, p) for p in prefixes):
            prefixes.append(prefix)
    return prefixes


def _checkpoint_state_dict(root: dict, key: str | None, name: str) -> tuple[dict, str]:
    """The state_dict to translate in what a file holds, and its checkpoint entry ("" for the whole object).

    A checkpoint (``{"epoch": 3, "model_state": state_dict, "optimizer_state": {...}}``) holds one state_dict
    beside things that are not the model: the dict of tensors holding recurrent parameter names is the one
    to load, found without options when there is one; ``state_dict_key`` chooses among several. A file with
    none is translated whole (every tensor in it must then be accounted for).
    """
    found = _state_dicts_in(root, name)
    if key is not None:
        if key in found:
            return found[key], key
        raise ModelFormatError(
            f"{name}: state_dict_key={key!r}: no state_dict with LSTM parameters under that checkpoint entry; "
            f"found {_describe_state_dicts(found) or 'none'}; the file holds {_describe_entries(root)}"
            + _did_you_mean(key, found))
    if "" in found or not found:
        return root, ""
    if len(found) == 1:
        (entry, state_dict), = found.items()
        return state_dict, entry
    raise ModelFormatError(
        f"{name}: the checkpoint holds {len(found)} state_dicts with LSTM parameters ({_describe_state_dicts(found)}); "
        f"choose one with state_dict_key, e.g. fastlstm.load(path, state_dict_key={next(iter(found))!r}); "
        f"the file holds {_describe_entries(root)}")


def _is_entry(root: dict, path: str) -> bool:
    """Whether ``path`` (keys joined by '.') names something in the checkpoint ``root``."""
    obj = root
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return False
        obj = obj[key]
    return True


def _state_dicts_in(root, name: str) -> dict[str, dict]:
    """Every dict of tensors (str keys, array values) reachable from ``root`` that holds a recurrent parameter
    name, by its checkpoint entry (keys joined by '.'; "" for ``root`` itself)."""
    found: dict[str, dict] = {}
    budget = [_MAX_FLATTENED_ENTRIES]

    def walk(obj, path: str, depth: int, path_ids: frozenset):
        budget[0] -= 1
        if budget[0] < 0 or depth > _MAX_NESTING:
            raise ModelFormatError(f"{name}: the saved object is too large or too deeply nested to be a checkpoint")
        if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                                 for k, v in obj.items()):
            if any(_RECURRENT_NAME.match(k) for k in obj):
                found[path] = obj
            return
        if isinstance(obj, (dict, list, tuple)) and id(obj) not in path_ids:
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for key, value in items:
                if isinstance(key, (str, int)) and not isinstance(key, bool):
                    walk(value, f"{path}.{key}" if path else str(key), depth + 1, path_ids | {id(obj)})

    walk(root, "", 0, frozenset())
    return found


def _describe_state_dicts(found: dict[str, dict]) -> str:
    return ", ".join(f"{key!r} ({len(value)} tensors)" for key, value in found.items())


def _describe_entries(root: dict, limit: int = 8) -> str:
    """``"epoch (int), model_state (dict of 12), optimizer_state (dict of 2)"``: what a checkpoint's top level holds."""
    entries = []
    for key, value in list(root.items())[:limit]:
        what = type(value).__name__
        if isinstance(value, np.ndarray):
            what = f"tensor {tuple(value.shape)}"
        elif isinstance(value, (dict, list, tuple)):
            what += f" of {len(value)}"
        entries.append(f"{reprlib.repr(key)} ({what})")
    return ", ".join(entries) + (f", ... ({len(root)} entries)" if len(root) > limit else "")


def _flatten_state(root: dict, name: str) -> dict:
    """A nested checkpoint (``{"model": state_dict, "optimizer": ..., "epoch": 3}``) -> dotted names -> arrays.

    Scalars, strings and None are dropped (they are not tensors); reference cycles are cut and the walk is
    capped, so a crafted file of shared containers cannot make it run for ever.
    """
    flat: dict[str, np.ndarray] = {}
    budget = [_MAX_FLATTENED_ENTRIES]

    def walk(obj, prefix: str, depth: int, path_ids: frozenset):
        budget[0] -= 1
        if budget[0] < 0 or depth > _MAX_NESTING:
            raise ModelFormatError(f"{name}: the saved object is too large or too deeply nested to be a state_dict")
        if isinstance(obj, np.ndarray):
            flat[prefix] = obj
        elif isinstance(obj, (dict, list, tuple)) and id(obj) not in path_ids:
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            inner = path_ids | {id(obj)}
            for key, value in items:
                if isinstance(key, (str, int)) and not isinstance(key, bool):
                    walk(value, f"{prefix}.{key}" if prefix else str(key), depth + 1, inner)

    walk(root, "", 0, frozenset())
    return flat


# ----------------------------------------------------------------------------------------- module trees
# Module classes by their full name (TorchScript's ``__torch__.`` prefix and mangling removed).
_LSTM = "torch.nn.modules.rnn.LSTM"
_LSTM_CELL = "torch.nn.modules.rnn.LSTMCell"
_LINEAR = "torch.nn.modules.linear.Linear"
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
_OTHER_RECURRENT = {f"torch.nn.modules.rnn.{n}" for n in ("GRU", "RNN", "GRUCell", "RNNCell")}


@dataclass
class _Node:
    """One module of a tree, whatever it came from (an ``nn.Module`` or a TorchScript ``ScriptObject``)."""

    path: str
    type_name: str                      # "torch.nn.modules.linear.Linear", or a user class's name
    settings: object                    # where activation parameters are looked up (getattr or a dict)
    own_tensors: bool
    children: list["_Node"] = field(default_factory=list)

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


def _tree_from_torch_module(module, torch) -> _Node:
    def type_name(m) -> str:
        if isinstance(m, torch.jit.ScriptModule):
            try:
                return torch_pickle.script_type_name(m._c._type().qualified_name())
            except Exception:
                return getattr(m, "original_name", type(m).__name__)
        return f"{type(m).__module__}.{type(m).__qualname__}"

    def build(m, path: str, seen: set[int]) -> _Node:
        own = any(True for _ in m.named_parameters(recurse=False)) or any(True for _ in m.named_buffers(recurse=False))
        node = _Node(path, type_name(m), m, own)
        seen = seen | {id(m)}
        for child_name, child in m.named_children():
            if id(child) not in seen:
                node.children.append(build(child, f"{path}.{child_name}" if path else child_name, seen))
        return node

    return build(module, "", set())


def _numpy_state(items, torch) -> tuple[dict, list[tuple[str, str]]]:
    """In-memory tensors -> NumPy arrays (bfloat16 widened to float32); the rest as ``(name, why unusable)``."""
    state, unusable = {}, []
    for name, value in items:
        if isinstance(value, np.ndarray):
            state[name] = value
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


def _tree_from_script_object(root, name: str) -> tuple[_Node, dict]:
    """A TorchScript archive's module objects -> a module tree and the flat state_dict of their tensors."""
    state: dict[str, np.ndarray] = {}
    seen: set[int] = set()

    def build(obj, path: str, depth: int) -> _Node:
        if depth > _MAX_NESTING:
            raise ModelFormatError(f"{name}: TorchScript modules nested too deeply")
        seen.add(id(obj))
        node = _Node(path, obj.type_name, obj.constants, own_tensors=False)
        for attr, value in obj.attributes.items():
            full = f"{path}.{attr}" if path else attr
            if isinstance(value, np.ndarray):
                state[full] = value
                node.own_tensors = True
            elif isinstance(value, torch_pickle.ScriptObject) and id(value) not in seen:
                node.children.append(build(value, full, depth + 1))
        return node

    return build(root, "", 0), state


def _spec_from_tree(tree: _Node | None, state: dict, source: str, opts: _Options,
                    unusable: list[tuple[str, str]] = ()) -> ModelSpec:
    """Fill in the head and its activations from the module structure (if any), then translate the state_dict.

    ``unusable`` lists ``(name, why)`` for state_dict entries that are not plain tensors. Every activation
    module the tree holds must be accounted for by an activation the model runs, whether read off the tree
    or stated with options: a module nobody accounts for would be silently dropped.
    """
    problems = [(n, f"{n}: {why}") for n, why in unusable if not any(_under(n, p) for p in opts.ignore)]
    module_paths = frozenset(_module_paths(tree)) if tree is not None else frozenset()
    kept = _apply_ignore(state, opts.ignore, source, module_paths)
    try:
        group, lstm_error = _choose_lstm(_recurrent_groups(kept), opts, kept, source), None
    except (ModelFormatError, UnsupportedModelError) as exc:  # reported after what the structure shows
        group, lstm_error = None, exc
    analysis = _StructureAnalysis(tree, group.prefix if group else None, opts) if tree is not None else None
    if analysis is not None:
        problems += analysis.problems
    if problems:
        lstm_path = group.prefix if group else None
        # Never propose ignoring the LSTM itself, nor a module that holds it.
        skippable = [n for n, _ in problems if n and (lstm_path is None or not _under(lstm_path, n))]
        raise UnsupportedModelError([message for _, message in problems],
                                    f"{source}: " + _ignore_hint(skippable))
    if lstm_error is not None:
        raise lstm_error
    if analysis is None:
        return _translate(state, opts, source)
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
    return _translate(state, opts.with_inferred(head, activations, head_input), source, module_paths)


def _module_paths(tree: _Node):
    yield tree.path
    for child in tree.children:
        yield from _module_paths(child)


class _StructureAnalysis:
    """Walk a module tree in registration order and read the head off what follows the LSTM.

    ``input_activation``: an activation module registered after the LSTM and before its first Linear layer
    (applied to the LSTM's output); ``head``/``activations``: the Linear layers after the LSTM and the
    activation module following each (or identity); ``activation_modules``: every activation module seen, with
    the activation it computes (``_NOT_RECORDED`` when the source does not hold its settings), to check that
    each is accounted for; ``problems``: modules fastlstm cannot run; ``misplaced_activations``: activation
    modules whose place in ``forward()`` cannot be told (registered before the LSTM).

    When the options state the head's activations, activation modules are not placed, only accounted for.
    """

    def __init__(self, tree: _Node, lstm_path: str | None, opts: _Options):
        self.opts = opts
        self.head: list[str] = []
        self.activations_list: list[Activation | None] = []
        self.input_activation: Activation | None = None
        self.activation_modules: list[tuple[_Node, object]] = []
        self.misplaced_activations: list[str] = []
        self.problems: list[tuple[str, str]] = []  # (module path, message)
        self.unaccounted_paths: list[str] = []
        self._after_lstm = False
        self._lstm_path = lstm_path
        self._visit(tree)

    @property
    def activations(self) -> tuple[Activation, ...]:
        return tuple(a or IDENTITY for a in self.activations_list)

    def chain(self, state: dict, group: _Recurrent, source: str) -> tuple[str, ...]:
        """``head``, checked to chain by shape from the LSTM's output."""
        size = _lstm_output_size(group, state)
        if size is None:
            return tuple(self.head)  # the LSTM's own tensors are malformed; translating it says how
        for prefix in self.head:
            weight = state.get(f"{prefix}.weight")
            if not isinstance(weight, np.ndarray) or weight.ndim != 2 or weight.shape[1] != size:
                present = [p for p in self.head if isinstance(state.get(f"{p}.weight"), np.ndarray)]
                raise ModelFormatError(
                    f"{source}: the Linear layers registered after the LSTM (output size {size}), "
                    f"{_describe_linears(present, state)}, do not chain by shape, so forward() must use them "
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
        return any(_under(path, p) for p in self.opts.ignore)

    def _visit(self, node: _Node) -> None:
        if self._ignored(node.path) and node.path:
            return
        if node.path == self._lstm_path:
            self._after_lstm = True
            return
        if node.children:
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
        if kind in (_LSTM, _LSTM_CELL):
            return  # another LSTM: its parameters make the state_dict ambiguous, reported there
        if kind == _LINEAR:
            if self._after_lstm:
                self.head.append(node.path)
                self.activations_list.append(None)
            return  # a Linear before the LSTM is reported as an unused tensor unless named in head=
        if kind in _ACTIVATIONS:
            self._activation_module(node, where)
        elif kind in _OTHER_RECURRENT:
            self._problem(node, "fastlstm runs nn.LSTM and nn.LSTMCell layers only")
        elif kind.startswith("torch."):
            self._problem(node, "fastlstm runs an LSTM followed by Linear layers and activations "
                                "(ReLU, Sigmoid, Tanh, LeakyReLU, ELU, Softplus, Softsign, Hardsigmoid, Softmax); "
                                f"it cannot run {node.short_type}")
        else:
            self._problem(node, "a custom module; fastlstm cannot see what its forward() does")

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
