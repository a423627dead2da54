"""A flat state_dict (``{"lstm.weight_ih_l0": array, ...}``) -> ``ModelSpec``; checkpoints -> their state_dict."""

from __future__ import annotations

import difflib
import itertools
import logging
import re
import reprlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from ...activations import IDENTITY, TANH, Activation
from ...errors import InvalidInputError, InvalidModelError, ModelFormatError, UnsupportedModelError
from ...spec import GATE_COUNTS, CellWeights, DenseLayer, ModelSpec, RecurrentLayer
from .options import Options
from .quantized import QuantizedWeight

_RECURRENT_NAME = re.compile(
    r"^(?:(?P<prefix>.+)\.)?"
    r"(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(?P<layer>\d+)(?P<reverse>_reverse)?)?$"
)
_MAX_FLATTENED_ENTRIES = 1_000_000
MAX_NESTING = 64
_log = logging.getLogger(__name__)
def ignore_hint(prefixes: list[str]) -> str:
    """What to do about refused parts: skip what is not on the path from input to output, or state the head."""
    skip = (f"If something listed is not on the path from the model's input to its output (an optimizer state, "
            f"an unused branch), skip it with ignore={prefixes!r}; ") if prefixes else ""
    return (f"fastlstm runs an optional nn.Embedding, recurrent modules (nn.LSTM, nn.GRU, nn.RNN and their cells) "
            f"one after the other, then Linear layers and activations. {skip}the head's layers and activations can "
            "be stated with head=[...], head_activations=[...] and head_input_activation=...")


@dataclass
class Recurrent:
    """The recurrent parameters under one prefix: ``names[(kind, layer, reverse)] = full name``."""

    prefix: str
    names: dict[tuple[str, int, bool], str] = field(default_factory=dict)
    kind: str = "LSTM"  # or "GRU" / "RNN", told apart by weight_hh's shape
    # nn.LSTMCell (GRUCell, RNNCell) names its tensors without the layer suffix: weight_ih, not weight_ih_l0.
    cell_names: bool = False
    layer_names: bool = False

    @property
    def spec_kind(self) -> str:
        return self.kind.lower()

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


def translate(state: dict, opts: Options, source: str, module_paths: frozenset[str] = frozenset(),
              ordered: bool = True) -> ModelSpec:
    """``state`` -> ``ModelSpec``. ``ordered`` says whether the dict's order is its modules' registration order
    (a safetensors file sorts its tensors, so the head is then inferred only when a single Linear layer fits)."""
    state = apply_ignore(state, opts.ignore, source, module_paths)
    recurrent = recurrent_groups(state)
    groups = choose_stack(recurrent, opts, state, source, ordered)
    layers = stack_layers(groups, state, opts, source)
    embedding_name = _embedding_name(state, groups, layers[0].input_size, opts, source, ordered)
    embedding = _embedding(state, embedding_name, layers[0].input_size, source)
    lstm_output = layers[-1].num_directions * layers[-1].output_size
    last = groups[-1]
    head_names = opts.head if opts.head is not None else _infer_head(state, last, lstm_output, source, ordered)
    head = _head_layers(head_names, state, lstm_output, source)
    activations = _head_activations(opts, head_names, source)
    if opts.head is None:
        _log_inferred_head(head_names, state, last, lstm_output, opts, source, ordered)

    used = {name for group in groups for name in group.names.values()}
    if embedding_name:
        used.add(f"{embedding_name}.weight")
    for prefix in head_names:
        used.update(n for n in (f"{prefix}.weight", f"{prefix}.bias") if n in state)
    _refuse_leftovers(state, used, recurrent, source)

    dense = tuple(DenseLayer(weight, bias, act) for (weight, bias), act in zip(head, activations))
    return ModelSpec(layers=layers, head=dense, output=opts.output, embedding=embedding,
                     head_input_activation=opts.head_input_activation or IDENTITY, source=source).validate()


def apply_ignore(state: dict, ignore: tuple[str, ...], source: str,
                  module_paths: frozenset[str] = frozenset()) -> dict:
    """``state`` without the tensors under the ``ignore`` prefixes; each prefix must name something (a typo
    would otherwise ignore nothing, silently). ``module_paths`` are further names a prefix may match."""
    if not ignore:
        return state
    unmatched = [p for p in ignore
                 if not any(under(name, p) for name in state) and not any(under(path, p) for path in module_paths)]
    if unmatched:
        known = sorted(module_paths | {p for name in state for p in _prefixes(name)})
        suggestions = "".join(_did_you_mean(p, known) for p in unmatched)
        raise ModelFormatError(f"{source}: ignore={list(unmatched)} match(es) no tensor or module; names look like "
                               f"{_some(state)}{suggestions}")
    return {name: value for name, value in state.items() if not any(under(name, p) for p in ignore)}


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


def under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _some(names, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def recurrent_groups(state: dict) -> dict[str, Recurrent]:
    groups: dict[str, Recurrent] = {}
    for name in state:
        match = _RECURRENT_NAME.match(name)
        if match:
            prefix = match.group("prefix") or ""
            group = groups.setdefault(prefix, Recurrent(prefix))
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
        if isinstance(w_hh, QuantizedWeight):
            w_hh = w_hh.values
        has_projection = any(kind == "weight_hr" for kind, _, _ in group.names)
        if not has_projection and isinstance(w_hh, np.ndarray) and w_hh.ndim == 2:
            rows, columns = w_hh.shape
            if rows == 3 * columns:
                group.kind = "GRU"
            elif rows == columns:
                group.kind = "RNN"
    return groups


def choose_stack(groups: dict[str, Recurrent], opts: Options, state: dict, source: str,
                 ordered: bool = True) -> list[Recurrent]:
    """The recurrent modules to run, in order: those the ``lstm`` option names, or every one found, in
    registration order, when their shapes chain (each one's input size is the previous one's output size)."""
    if opts.lstm is not None:
        chosen, problems = [], []
        for prefix in opts.lstm:
            group = groups.get(prefix)
            if group is None:
                expected = f"{prefix}.weight_ih_l0" if prefix else "weight_ih_l0"
                found = ", ".join(g.display() for g in groups.values()) or "none"
                problems.append(f"lstm={prefix!r}: no recurrent parameters under that prefix (names like "
                                f"{expected!r}); recurrent modules found: {found}"
                                + _did_you_mean(prefix, [g.prefix for g in groups.values()]))
            else:
                chosen.append(group)
        if problems:
            raise ModelFormatError(f"{source}: " + "; ".join(problems))
        _check_chain(chosen, state, source, named=True)
        return chosen
    if not groups:
        raise ModelFormatError(f"{source}: no recurrent parameters found (names like 'weight_ih_l0' or "
                               f"'lstm.weight_ih_l0'); the state_dict holds {_some(state) or 'nothing'}")
    order = {name: n for n, name in enumerate(state)}
    found = sorted(groups.values(), key=lambda g: min(order[name] for name in g.names.values()))
    if len(found) > 1 and not ordered:
        return _the_one_chaining_order(found, state, source)
    _check_chain(found, state, source, named=False)
    return found


_MAX_MODULES_TO_ORDER = 6  # 720 orders at most


def _the_one_chaining_order(groups: list[Recurrent], state: dict, source: str) -> list[Recurrent]:
    """The order of recurrent modules a file does not record (safetensors sorts its tensors), when exactly one
    order chains by shape; otherwise the ``lstm`` option must give it."""
    listed = ", ".join(g.display() for g in groups)
    advice = "name them in the order they run with lstm=[...] and skip any other with ignore=[...]"
    if len(groups) > _MAX_MODULES_TO_ORDER:
        raise ModelFormatError(f"{source}: the file holds {len(groups)} recurrent modules ({listed}) and does not "
                               f"record the order they run in; {advice}")
    chaining = []
    for candidate in itertools.permutations(groups):
        try:
            _check_chain(list(candidate), state, source, named=False)
        except ModelFormatError:
            continue
        chaining.append(list(candidate))
    if len(chaining) != 1:
        how = "no order of them chains by shape" if not chaining else f"{len(chaining)} orders chain by shape"
        raise ModelFormatError(f"{source}: the file holds {len(groups)} recurrent modules ({listed}) and does not "
                               f"record the order they run in, and {how}; {advice}")
    return chaining[0]


def _check_chain(groups: list[Recurrent], state: dict, source: str, named: bool) -> None:
    """Each module's input size must be the previous one's output size."""
    for previous, group in zip(groups, groups[1:]):
        out = recurrent_output_size(previous, state)
        w_ih = state.get(group.names.get(("weight_ih", 0, False), ""))
        size = w_ih.shape[1] if isinstance(w_ih, np.ndarray) and w_ih.ndim == 2 else None
        if out is not None and size is not None and size != out:
            listed = ", ".join(f"{g.display()} ({g.module})" for g in groups)
            how = ("in the order given by lstm=" if named else "in registration order") + f" ({listed})"
            raise ModelFormatError(
                f"{source}: the recurrent modules do not chain {how}: {group.display()} takes {size} features but "
                f"{previous.display()} outputs {out}. fastlstm runs recurrent modules one after the other; name the "
                "ones that do, in the order they run, with lstm=[...] and skip the others with ignore=[...]")


def stack_layers(groups: list[Recurrent], state: dict, opts: Options, source: str) -> tuple[RecurrentLayer, ...]:
    """The layers of every chosen recurrent module, in order."""
    nonlinearities = dict(opts.rnn_nonlinearities)
    rnn_groups = [g for g in groups if g.kind == "RNN"]
    unrecorded = [g.display() for g in rnn_groups if g.prefix not in nonlinearities]
    if unrecorded and opts.rnn_nonlinearity is None:
        warnings.warn(f"{source}: nn.RNN {', '.join(unrecorded)}: a state_dict does not record its nonlinearity; "
                      "running tanh (nn.RNN's default). Pass rnn_nonlinearity='relu' if it was built with "
                      "nonlinearity='relu'.", stacklevel=3)
    for group in rnn_groups:
        recorded = nonlinearities.get(group.prefix)
        if recorded is not None and opts.rnn_nonlinearity is not None and recorded != opts.rnn_nonlinearity:
            raise InvalidInputError(f"rnn_nonlinearity={opts.rnn_nonlinearity!r}, but the module {group.display()} "
                                    f"computes {recorded!r}")
    layers: list[RecurrentLayer] = []
    for group in groups:
        nonlinearity = nonlinearities.get(group.prefix) or opts.rnn_nonlinearity or "tanh"
        layers += _recurrent_layers(group, state, source, Activation.of(nonlinearity))
    return tuple(layers)


def _recurrent_layers(group: Recurrent, state: dict, source: str,
                      rnn_activation: Activation) -> list[RecurrentLayer]:
    """Build the layers of one recurrent module (any kind), collecting every missing or mis-shaped tensor
    before refusing."""
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
    row_scales: dict[tuple[str, int, bool], np.ndarray] = {}
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
                if isinstance(state[names[key]], QuantizedWeight):  # read from 8-bit integers: keep the scales
                    row_scales[key] = state[names[key]].scale
    if problems:
        raise InvalidModelError(problems, source)

    w_hh0 = arrays[("weight_hh", 0, False)]
    w_ih0 = arrays[("weight_ih", 0, False)]
    for key in (("weight_hh", 0, False), ("weight_ih", 0, False)):
        if arrays[key].ndim != 2:
            problems.append(f"{full_name(*key)}: expected a 2-D tensor, got shape {arrays[key].shape}")
    cell_kind = group.spec_kind
    gates = GATE_COUNTS[cell_kind]
    if not problems and (w_hh0.shape[0] % gates or w_hh0.shape[0] == 0):
        problems.append(f"{full_name('weight_hh', 0, False)}: expected {gates} * hidden_size rows, "
                        f"got shape {w_hh0.shape}")
    if problems:
        raise InvalidModelError(problems, source)
    hidden = w_hh0.shape[0] // gates
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
        G = gates * hidden
        expected = {"weight_ih": (G, input_size), "weight_hh": (G, recurrent),
                    "bias_ih": (G,), "bias_hh": (G,), "weight_hr": (proj, hidden)}
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
            else:
                b_ih = b_hh = np.zeros(G, dtype=w_ih.dtype)
            candidate_bias = None
            if cell_kind == "gru":  # b_hn sits inside the reset product: kept apart (see fastlstm.spec)
                candidate_bias = b_hh[2 * hidden:].copy()
                b_hh = np.concatenate([b_hh[:2 * hidden], np.zeros_like(candidate_bias)])
            bias = (b_ih.astype(np.float64) + b_hh.astype(np.float64)).astype(np.result_type(b_ih, b_hh))
            cells.append(CellWeights(w_ih=w_ih, w_hh=arrays[("weight_hh", layer, reverse)], bias=bias,
                                     w_hr=arrays.get(("weight_hr", layer, reverse)), candidate_bias=candidate_bias,
                                     w_ih_scale=row_scales.get(("weight_ih", layer, reverse)),
                                     w_hh_scale=row_scales.get(("weight_hh", layer, reverse))))
        layers.append(RecurrentLayer(
            input_size=int(input_size), hidden_size=int(hidden), proj_size=int(proj), kind=cell_kind,
            direction="bidirectional" if bidirectional else "forward", cells=tuple(cells),
            cell_activation=rnn_activation if cell_kind == "rnn" else TANH))
    if problems:
        raise InvalidModelError(problems, source)
    return layers


def recurrent_output_size(group: Recurrent, state: dict) -> int | None:
    """A recurrent module's output feature size read off its last layer's shapes (None if they are malformed)."""
    last = max(layer for _, layer, _ in group.names)
    directions = 2 if ("weight_hh", last, True) in group.names else 1
    source = group.names.get(("weight_hr", last, False)) or group.names.get(("weight_hh", last, False))
    array = state.get(source or "")
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        return None
    size = array.shape[0] if source.rpartition(".")[2].startswith("weight_hr") else array.shape[0] // GATE_COUNTS[group.spec_kind]
    return directions * size


def _embedding_name(state: dict, groups: list[Recurrent], input_size: int, opts: Options, source: str,
                    ordered: bool) -> str:
    """The prefix of the ``nn.Embedding`` in front of the first recurrent module, or "" for none.

    Named by the ``embedding`` option (or a module's structure); else inferred from a state_dict: a prefix
    holding only a 2-D ``weight`` of shape ``(vocab, input_size)`` registered before the recurrent modules (a
    file that does not record the order, safetensors, needs the option). A square table is refused as
    ambiguous: a bias-free ``nn.Linear`` in front would hold the same shape.
    """
    if opts.embedding is not None:
        if opts.embedding and f"{opts.embedding}.weight" not in state:
            raise ModelFormatError(f"{source}: embedding={opts.embedding!r}: no tensor {opts.embedding + '.weight'!r}"
                                   + _did_you_mean(opts.embedding, _weight_only_prefixes(state)))
        return opts.embedding
    if not ordered:  # nothing says the table comes first: an unused tensor of that shape must not become one
        return ""
    order = {name: n for n, name in enumerate(state)}
    start = min(order[name] for group in groups for name in group.names.values())
    candidates = [p for p in _weight_only_prefixes(state) if order[f"{p}.weight"] < start
                  and state[f"{p}.weight"].ndim == 2 and state[f"{p}.weight"].shape[1] == input_size]
    if len(candidates) != 1:
        return ""  # none, or several: left for the leftover check to name
    (prefix,) = candidates
    if state[f"{prefix}.weight"].shape[0] == input_size:
        raise ModelFormatError(
            f"{source}: {prefix}.weight {state[prefix + '.weight'].shape} before the recurrent modules may be an "
            f"nn.Embedding or a bias-free nn.Linear; say embedding={prefix!r} if it is an embedding of token ids")
    return prefix


def _weight_only_prefixes(state: dict) -> list[str]:
    children: dict[str, set[str]] = {}
    for name in state:
        prefix, _, leaf = name.rpartition(".")
        children.setdefault(prefix, set()).add(leaf)
    return [p for p, leaves in children.items() if leaves == {"weight"} and isinstance(state.get(f"{p}.weight"), np.ndarray)]


def _embedding(state: dict, prefix: str, input_size: int, source: str) -> np.ndarray | None:
    if not prefix:
        return None
    problems: list[str] = []
    table = _float_array(state[f"{prefix}.weight"], f"{prefix}.weight", problems)
    if table is not None and (table.ndim != 2 or table.shape[1] != input_size):
        problems.append(f"{prefix}.weight: expected an embedding table (vocab, {input_size}) (the first recurrent "
                        f"layer's input size), got shape {table.shape}")
    if problems:
        raise InvalidModelError(problems, source)
    return table


def _float_array(value, name: str, problems: list[str]) -> np.ndarray | None:
    """A fresh C-contiguous float32 copy of ``value`` (float64 stays float64), or None with a problem noted."""
    if isinstance(value, QuantizedWeight):
        value = value.values
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


def describe_linears(prefixes, state: dict) -> str:
    described = []
    for prefix in prefixes:
        shape = state[f"{prefix}.weight"].shape
        described.append(f"{prefix} ({shape[1]}->{shape[0]})")
    return ", ".join(described)


def _infer_head(state: dict, group: Recurrent, lstm_output: int, source: str, ordered: bool) -> tuple[str, ...]:
    """The Linear layers after the LSTM in the dict's order, if their shapes chain from the LSTM's output."""
    if not ordered:  # only a single Linear layer taking the LSTM's output, which nothing else could follow
        candidates = _linear_candidates(state, set(group.names.values()))
        fits = [p for p in candidates if state[f"{p}.weight"].shape[1] == lstm_output]
        if not fits:
            return ()
        follows = [p for p in candidates if p not in fits and state[f"{p}.weight"].shape[1] in
                   {state[f"{f}.weight"].shape[0] for f in fits}]
        if len(fits) > 1 or follows:
            raise ModelFormatError(
                f"{source}: the file does not record the order its layers run in, and several Linear layers "
                f"could form the head ({describe_linears(fits + follows, state)}); name the head in the order they "
                "run with head=[...] (head=[] for none) and skip the others with ignore=[...]")
        return tuple(fits)
    order = {name: n for n, name in enumerate(state)}
    lstm_end = max(order[name] for name in group.names.values())
    after = [p for p in _linear_candidates(state, set(group.names.values())) if order[f"{p}.weight"] > lstm_end]
    after.sort(key=lambda p: order[f"{p}.weight"])
    size = lstm_output
    for prefix in after:
        if state[f"{prefix}.weight"].shape[1] != size:
            raise ModelFormatError(
                f"{source}: cannot tell which Linear layers form the head: after the LSTM (output size {lstm_output}) "
                f"come {describe_linears(after, state)}, whose shapes do not chain. Name them in the order they run "
                "with head=[...] (head=[] for none) and skip the others with ignore=[...]")
        size = state[f"{prefix}.weight"].shape[0]
    return tuple(after)


def _log_inferred_head(head: tuple[str, ...], state: dict, group: Recurrent, lstm_output: int, opts: Options,
                       source: str, ordered: bool) -> None:
    """Say at INFO which layers were taken as the head by shape (names and shapes) and what that assumed, so
    that ``fastlstm info`` and a user's logs show what a state_dict left unsaid. The record carries the names
    as ``inferred_head`` for a reader that shows them beside the head."""
    after = f"the recurrent module {group.display()}"
    if not head:
        how = (f"no Linear layer after {after} in the file's order takes its output size {lstm_output}" if ordered
               else f"no Linear layer takes the output size {lstm_output} of {after}")
        _log.info("%s: no head: %s, so the model outputs the recurrent output (head=[...] names a head)", source, how,
                  extra={"inferred_head": ()})
        return
    if ordered:
        how = (f"the Linear layers after {after} in the file's order (its modules' registration order), whose "
               f"shapes chain from its output size {lstm_output}")
    else:
        how = f"the one Linear layer that takes the output size {lstm_output} of {after} (the file records no order)"
    if opts.head_activations is None:
        activations = (f"no activation between or after them ({', '.join(['identity'] * len(head))}; a state_dict "
                       "records none: head_activations=[...] says otherwise)")
    else:
        activations = f"the activations given ({', '.join(str(a) for a in opts.head_activations)})"
    before = ("nothing" if opts.head_input_activation is None else str(opts.head_input_activation))
    _log.info("%s: head found by shape: %s, %s; assumed: they run in that order on the recurrent output, with %s, "
              "and %s between the recurrent output and the head (head=[...] names the head, head=[] for none)",
              source, describe_linears(head, state), how, activations, before, extra={"inferred_head": tuple(head)})


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


def _head_activations(opts: Options, head: tuple[str, ...], source: str) -> tuple[Activation, ...]:
    if opts.head_activations is not None:
        if len(opts.head_activations) != len(head):
            raise InvalidInputError(f"head_activations: {len(opts.head_activations)} given for a head of {len(head)} "
                             f"layer(s) ({', '.join(head) or 'none'})")
        return opts.head_activations
    if len(head) > 1:
        warnings.warn(f"{source}: no activations are known for the head {list(head)} (a state_dict records none), so "
                      "none runs between its Linear layers. Pass head_activations=[...] to say which.", stacklevel=2)
    return (IDENTITY,) * len(head)


def _refuse_leftovers(state: dict, used: set[str], recurrent: dict[str, Recurrent], source: str) -> None:
    leftovers = [name for name in state if name not in used]
    if not leftovers:
        return
    kinds = {name: group.module for group in recurrent.values() for name in group.names.values()}
    entries = []
    for name in leftovers:
        value = state[name]
        what = _describe_value(value)
        if name in kinds:
            what += f", an {kinds[name]} parameter"
        entries.append(f"{name} ({what})")
    hint = ignore_hint(_covering_prefixes(leftovers, used))
    raise UnsupportedModelError(entries, f"{source}: {hint}")


def _describe_value(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"


def _covering_prefixes(leftovers: list[str], used: set[str]) -> list[str]:
    """The shortest dotted prefixes that cover the leftovers and nothing used, for the ``ignore`` hint."""
    prefixes: list[str] = []
    for name in leftovers:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            prefix = ".".join(parts[:n])
            if not any(under(u, prefix) for u in used):
                break
        if prefix not in prefixes and not any(under(prefix, p) for p in prefixes):
            prefixes.append(prefix)
    return prefixes


def checkpoint_state_dict(root: dict, key: str | None, ignore: tuple[str, ...], name: str) -> tuple[dict, str]:
    """The state_dict to translate in what a file holds, and its checkpoint entry ("" for the whole object).

    A checkpoint (``{"epoch": 3, "model_state": state_dict, "optimizer_state": {...}}``) holds one state_dict
    beside things that are not the model: the dict of tensors holding recurrent parameter names is the one
    to load, found without options when there is one; ``state_dict_key`` chooses among several. A file with
    none is translated whole (every tensor in it must then be accounted for). Parameters elsewhere in the
    checkpoint (``<entry>.weight`` / ``.bias`` tensors outside an optimizer's state) may be model parts saved
    apart: they are refused unless ``ignore`` names them.
    """
    found = _state_dicts_in(root, name)
    if key is not None:
        if key not in found:
            raise ModelFormatError(
                f"{name}: state_dict_key={key!r}: no state_dict with LSTM parameters under that checkpoint entry; "
                f"found {_describe_state_dicts(found) or 'none'}; the file holds {_describe_entries(root)}"
                + _did_you_mean(key, found))
        entry = key
    elif "" in found or not found:
        return root, ""
    elif len(found) == 1:
        (entry,) = found
    else:
        raise ModelFormatError(
            f"{name}: the checkpoint holds {len(found)} state_dicts with LSTM parameters "
            f"({_describe_state_dicts(found)}); choose one with state_dict_key, e.g. fastlstm.load(path, "
            f"state_dict_key={next(iter(found))!r}); the file holds {_describe_entries(root)}")
    # Other state_dicts with LSTM parameters are alternatives the user chose against (an EMA copy ...).
    outside = _parameters_outside(root, set(found), name)
    others = {n: v for n, v in outside.items() if not any(under(n, p) for p in ignore)}
    if others:
        hint = (f"{name}: the state_dict loaded is the checkpoint entry {entry!r}; these parameters lie outside it. "
                "If they are not part of the model, skip them with "
                f"ignore={_covering_prefixes(others, {entry})!r}")
        raise UnsupportedModelError([f"{n} ({_describe_value(v)})" for n, v in others.items()], hint)
    return found[entry], entry


def is_entry(root: dict, path: str) -> bool:
    """Whether ``path`` (keys joined by '.') names something in the checkpoint ``root``."""
    obj = root
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return False
        obj = obj[key]
    return True


def _walk(root, name: str, visit) -> None:
    """Call ``visit(path, obj)`` on ``root`` and what it holds (keys joined by '.'), descending into dicts,
    lists and tuples when ``visit`` returns True. Reference cycles are cut and the walk is capped, so a
    crafted file of shared containers cannot make it run for ever."""
    budget = [_MAX_FLATTENED_ENTRIES]

    def walk(obj, path: str, depth: int, path_ids: frozenset):
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_NESTING:
            raise ModelFormatError(f"{name}: the saved object is too large or too deeply nested to be a state_dict")
        if not visit(path, obj) or not isinstance(obj, (dict, list, tuple)) or id(obj) in path_ids:
            return
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        inner = path_ids | {id(obj)}
        for key, value in items:
            key = str(key) if isinstance(key, (str, int)) and not isinstance(key, bool) else reprlib.repr(key)
            walk(value, f"{path}.{key}" if path else key, depth + 1, inner)

    walk(root, "", 0, frozenset())


def _state_dicts_in(root, name: str) -> dict[str, dict]:
    """Every dict of tensors (str keys, array values) reachable from ``root`` that holds a recurrent parameter
    name, by its checkpoint entry (keys joined by '.'; "" for ``root`` itself)."""
    found: dict[str, dict] = {}

    def visit(path: str, obj) -> bool:
        if _is_tensor_dict(obj):
            if any(_RECURRENT_NAME.match(k) for k in obj):
                found[path] = obj
            return False
        return True

    _walk(root, name, visit)
    return found


def _is_tensor_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, (np.ndarray, QuantizedWeight)) for k, v in obj.items()))


def _parameters_outside(root: dict, entries: set[str], name: str) -> dict[str, np.ndarray]:
    """Tensors named like module parameters (``weight*``, ``bias*``) outside the state_dicts at ``entries``
    and outside any optimizer state (a dict with ``state`` and ``param_groups``)."""
    found: dict[str, np.ndarray] = {}

    def visit(path: str, obj) -> bool:
        if path in entries or (isinstance(obj, dict) and {"state", "param_groups"} <= set(obj)):
            return False
        if isinstance(obj, np.ndarray) and path.rpartition(".")[2].startswith(("weight", "bias")):
            found[path] = obj
        return True

    _walk(root, name, visit)
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


def flatten_state(root: dict, name: str) -> dict:
    """A nested checkpoint (``{"model": state_dict, "optimizer": ..., "epoch": 3}``) -> dotted names -> values.

    Tensors are kept as arrays; numbers, strings, None and sets are dropped (they are not model parts); any
    other object (a bare storage, a type) is kept so that translating it refuses it by name.
    """
    flat: dict[str, object] = {}

    def visit(path: str, obj) -> bool:
        if isinstance(obj, (dict, list, tuple)):
            return True
        if not isinstance(obj, _NOT_MODEL_PARTS):
            flat[path] = obj
        return False

    _walk(root, name, visit)
    return flat


_NOT_MODEL_PARTS = (str, bytes, bytearray, int, float, complex, bool, type(None), set, frozenset)
