"""What an ONNX ``LSTM`` node means in fastlstm's terms: its weights and activations; and, for a stack of
recurrent nodes of any kinds (``_onnx_gru`` translates GRU and RNN nodes), which outputs and initial states
the canonical model can reproduce.

ONNX stacks gates as (i, o, f, c) and peepholes as (i, o, f); fastlstm as (i, f, g, o) and (i, f, o), with
the two bias halves ``Wb + Rb`` summed once. The graph walk (``_onnx_graph``) decides what each LSTM reads and
where its outputs go; the rules here turn that into a layer, an output mode and the state's graph inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..activations import Activation
from ..spec import LSTMCellWeights, LSTMLayer, ModelSpec, RecurrentLayer
from ._onnx_values import BATCH, INPUT_AXIS, TIME, UNIT, Flow, Malformed, Part, Refused

# ONNX stacks the gates (i, o, f, c); the canonical order is (i, f, g, o) with g = c.
_CANONICAL_FROM_ONNX_GATES = [0, 2, 3, 1]
# ONNX peepholes are (i, o, f); the canonical order is (i, f, o).
_CANONICAL_FROM_ONNX_PEEPHOLES = [0, 2, 1]

# ONNX LSTM activation names (case-insensitive) -> fastlstm catalogue name, and whether each consumes an
# entry of activation_alpha / activation_beta (the order ONNX Runtime reads them in).
_LSTM_ACTIVATIONS = {
    "sigmoid": ("sigmoid", False, False), "tanh": ("tanh", False, False), "relu": ("relu", False, False),
    "affine": ("affine", True, True), "leakyrelu": ("leaky_relu", True, False),
    "thresholdedrelu": ("thresholded_relu", True, False), "scaledtanh": ("scaled_tanh", True, True),
    "hardsigmoid": ("hard_sigmoid", True, True), "elu": ("elu", True, False),
    "softsign": ("softsign", False, False), "softplus": ("softplus", False, False),
}
# Where ONNX Runtime's default differs from the ONNX operator's (ORT uses 0 for a missing alpha/beta).
_ORT_DEFAULT_DIFFERS = {"affine", "thresholdedrelu", "scaledtanh"}

# The attributes of the LSTM operator: (kind, default).
LSTM_ATTRIBUTES = {
    "activation_alpha": ("floats", None), "activation_beta": ("floats", None), "activations": ("strings", None),
    "clip": ("float", None), "direction": ("string", "forward"), "hidden_size": ("int", None),
    "input_forget": ("int", 0), "layout": ("int", 0),
}


@dataclass(frozen=True)
class StateSource:
    """A layer's initial_h or initial_c: rows ``[start:stop]`` along ``axis`` of graph input ``name``."""

    name: str
    axis: int
    start: int
    stop: int | None
    dims: tuple[int | None, ...] | None


@dataclass
class LayerRecord:
    """A recurrent node turned into a layer, with what its optional inputs were bound to (None: zeros/absent)."""

    layer: RecurrentLayer
    node: str
    layout: int
    sequence_lens: str | None
    initial: dict[str, StateSource | None]


def checked_activation(catalogue: str, alpha: float | None, beta: float | None, what: str) -> Activation:
    """``Activation.of`` for parameters read from the file, each checked to be a finite number.

    The parametrised ONNX functions (Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu) are
    defined for every real alpha and beta; NaN or an infinity would only turn outputs into NaN or inf.
    """
    bad = [f"{label}={value!r}" for label, value in (("alpha", alpha), ("beta", beta))
           if value is not None and not math.isfinite(value)]
    if bad:
        raise Malformed(f"{what} has {', '.join(bad)}; expected finite numbers")
    return Activation.of(catalogue, alpha, beta)


def node_activations(names: list[str] | None, alphas: list[float] | None, betas: list[float] | None,
                     defaults: tuple[str, ...], directions: int, where: str) -> tuple[Activation, ...]:
    """The activations of a recurrent node (LSTM: f, g, h; GRU: f, g; RNN: f), shared by its directions
    (refused when they differ: a layer holds one set). ``defaults`` are the operator's, per direction.

    ``activation_alpha``/``beta`` values are consumed in order by the activations that take them, as ONNX
    Runtime reads them; missing ones take the ONNX operator's defaults.
    """
    per = len(defaults)
    names = names or list(defaults) * directions
    if len(names) != per * directions:
        raise Malformed(f"activations lists {len(names)} functions, expected {per * directions} "
                        f"({per} per direction)")
    alphas = list(alphas or [])
    betas = list(betas or [])
    unknown = [n for n in names if n.lower() not in _LSTM_ACTIVATIONS]
    if unknown:
        raise Refused(f"activation(s) {', '.join(unknown)}; ONNX recurrent activations are "
                      "Affine, Relu, LeakyRelu, ThresholdedRelu, Tanh, ScaledTanh, Sigmoid, HardSigmoid, "
                      "Elu, Softsign, Softplus")
    activations = []
    for name in names:
        catalogue, needs_alpha, needs_beta = _LSTM_ACTIVATIONS[name.lower()]
        alpha = alphas.pop(0) if needs_alpha and alphas else None
        beta = betas.pop(0) if needs_beta and betas else None
        if name.lower() in _ORT_DEFAULT_DIFFERS and ((needs_alpha and alpha is None)
                                                      or (needs_beta and beta is None)):
            warnings.warn(f"{where}: activation {name} without its activation_alpha/beta; "
                          "fastlstm uses the ONNX operator's defaults, ONNX Runtime uses 0", stacklevel=4)
        activations.append(checked_activation(catalogue, alpha, beta, f"activation {name}"))
    if alphas or betas:
        warnings.warn(f"{where}: activation_alpha/activation_beta hold more values than the "
                      "activations use; the extra values are ignored", stacklevel=4)
    per_direction = [tuple(activations[per * d:per * d + per]) for d in range(directions)]
    if len(set(per_direction)) > 1:
        raise Refused("directions use different activations ("
                      + " vs ".join("/".join(str(a) for a in acts) for acts in per_direction)
                      + "); fastlstm holds one set per layer, shared by its directions")
    return per_direction[0]


def lstm_layer(W: np.ndarray, R: np.ndarray, B: np.ndarray | None, P: np.ndarray | None, *, direction: str,
               hidden_size: int | None, activations: tuple[Activation, ...], clip: float | None,
               input_forget: bool, W_scale: np.ndarray | None = None,
               R_scale: np.ndarray | None = None) -> LSTMLayer:
    """The canonical layer of an LSTM node's constant inputs (shapes checked first, all problems at once).

    ``W_scale``/``R_scale`` ``(directions, 4*hidden)``, in ONNX's gate order, are the per-row scales of weights
    dequantized from 8-bit integers (``DynamicQuantizeLSTM``); they are reordered with the rows.
    """
    directions = 2 if direction == "bidirectional" else 1
    if W.ndim != 3 or W.shape[0] != directions or W.shape[1] % 4 or W.shape[1] == 0 or W.shape[2] == 0:
        raise Malformed(f"W has shape {W.shape}, expected ({directions}, 4*hidden_size, input_size)")
    hidden, input_size = W.shape[1] // 4, W.shape[2]
    problems = []
    if hidden_size is not None and hidden_size != hidden:
        problems.append(f"hidden_size={hidden_size} but W has shape {W.shape}")
    if R.shape != (directions, 4 * hidden, hidden):
        problems.append(f"R has shape {R.shape}, expected {(directions, 4 * hidden, hidden)}")
    if B is not None and B.shape != (directions, 8 * hidden):
        problems.append(f"B has shape {B.shape}, expected {(directions, 8 * hidden)}")
    if P is not None and P.shape != (directions, 3 * hidden):
        problems.append(f"P has shape {P.shape}, expected {(directions, 3 * hidden)}")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        problems.append(f"clip={clip}, expected a finite number > 0")
    if problems:
        raise Malformed("; ".join(problems))
    dtype = np.result_type(W.dtype, R.dtype)
    cells = []
    for d in range(directions):
        bias = np.zeros(4 * hidden, dtype=dtype) if B is None else B[d, :4 * hidden] + B[d, 4 * hidden:]
        peephole = None
        if P is not None and np.any(P):  # all-zero peepholes change nothing: keep the plain cell
            peephole = np.ascontiguousarray(P[d].reshape(3, hidden)[_CANONICAL_FROM_ONNX_PEEPHOLES])
        cells.append(LSTMCellWeights(
            w_ih=canonical_gates(W[d], hidden), w_hh=canonical_gates(R[d], hidden),
            bias=canonical_gates(bias, hidden), peephole=peephole,
            w_ih_scale=None if W_scale is None else canonical_gates(W_scale[d], hidden),
            w_hh_scale=None if R_scale is None else canonical_gates(R_scale[d], hidden)))
    return LSTMLayer(
        input_size=input_size, hidden_size=hidden, cells=tuple(cells), direction=direction,
        gate_activation=activations[0], cell_activation=activations[1], output_activation=activations[2],
        clip=clip, input_forget=input_forget)


def output_mode(name: str, flow: Flow, layers: list[LayerRecord], has_lengths: bool) -> str:
    """The output mode ("sequence", "last_step", "final_state") of the graph output ``name``, refused unless it
    is exactly one of them for the last layer (all directions, forward first)."""
    last = len(layers) - 1
    record = layers[last]
    expected = [(last, d) for d in range(record.layer.num_directions)]
    if [(p.layer, p.direction) for p in flow.parts] != expected:
        raise Refused(f"graph output {name!r} holds {', '.join(str(p) for p in flow.parts)}; fastlstm "
                      "outputs the last layer's directions together, forward first")
    roles = set(flow.roles()) - {UNIT}
    if any(axis.merged for axis in flow.axes):
        raise Refused(f"graph output {name!r} has layout {flow.describe()}: time and batch stay merged into one "
                      "axis; fastlstm returns them apart (reshape the output back to time and batch)")
    if any(role.startswith(INPUT_AXIS) for role in roles) or BATCH not in roles:
        raise Refused(f"graph output {name!r} has layout {flow.describe()}")
    if any(p.kind == "Y_c" for p in flow.parts):
        raise Refused(f"graph output {name!r} is computed from the cell state")
    reverse = record.layer.direction == "reverse"
    if all(p.kind == "Y" and p.time == "all" for p in flow.parts):
        return "sequence"
    if TIME in roles:
        raise Refused(f"graph output {name!r} keeps a time axis after selecting a step")
    if all(p.kind == "Y" and p.time == "last" for p in flow.parts):
        if has_lengths:
            raise Refused(f"graph output {name!r} takes the last time step with sequence_lens: ONNX gives "
                          "zeros there for shorter sequences, fastlstm each sequence's last valid step; "
                          "output Y_h instead")
        return "last_step"

    def is_final(part: Part, direction: int) -> bool:
        backwards = reverse or direction == 1
        if part.kind == "Y_h":
            return True
        if part.kind != "Y":
            return False
        return part.time == "first" if backwards else (part.time == "last" and not has_lengths)

    if all(is_final(p, p.direction) for p in flow.parts):
        return "final_state"
    raise Refused(f"graph output {name!r} combines {', '.join(str(p) for p in flow.parts)}, which is "
                  "neither every step, the last step nor the final state")


def _state_form(layers: list[LayerRecord]) -> str:
    """The state form (``ModelSpec.state_form``) of the model these layers make."""
    return ModelSpec(layers=tuple(record.layer for record in layers)).state_form


def state_inputs(layers: list[LayerRecord]) -> dict[str, str]:
    """The graph inputs the layers' initial states read, by where they go in fastlstm's state: ``"h"`` and
    ``"c"`` for a stack of one kind and size (its state is PyTorch's), ``"h[n]"``/``"c[n]"`` per layer
    otherwise (each layer's initial state must then be a whole graph input of its own)."""
    form = _state_form(layers)
    if form != "per_layer":
        bound = {kind: state_input(kind, layers) for kind in ("h", "c") if kind == "h" or form == "h_c"}
        return {kind: name for kind, name in bound.items() if name}
    bound = {}
    for n, record in enumerate(layers):
        for kind in ("h", "c") if record.layer.kind == "lstm" else ("h",):
            source = record.initial[kind]
            if source is None:
                continue
            count = record.layer.num_directions
            rows = source.dims[source.axis] if source.dims is not None else None
            if rows is not None:
                whole = rows == count and range(rows)[source.start:source.stop] == range(count)
            else:
                whole = source.start == 0 and source.stop in (None, count)
            if not whole:
                raise Refused(f"initial_{kind}: {record.node!r} (layer {n}) reads part of graph input "
                              f"{source.name!r}; the layers differ in kind or size, so fastlstm's state holds one "
                              "entry per layer, and each layer's initial state must be a whole graph input")
            bound[f"{kind}[{n}]"] = source.name
    shared = {name for name in bound.values() if list(bound.values()).count(name) > 1}
    if shared:
        raise Refused(f"graph input(s) {', '.join(map(repr, sorted(shared)))} start several layers; the layers "
                      "differ in kind or size, so fastlstm's state holds one entry per layer")
    return bound


def state_input(kind: str, layers: list[LayerRecord]) -> str | None:
    """The graph input every layer's initial state of ``kind`` ("h" or "c") reads, checked to hold the
    layers' rows in fastlstm's order (layer after layer, directions in order); None for zeros."""
    sources = [record.initial[kind] for record in layers]
    if all(s is None for s in sources):
        return None
    label = f"initial_{kind}"
    if any(s is None for s in sources) or len({s.name for s in sources}) != 1:
        raise Refused(f"{label} comes from one graph input for some layers and from elsewhere (or zeros) for "
                      "others; fastlstm takes one state for all layers")
    if len({s.axis for s in sources}) != 1:
        raise Refused(f"{label} is read with different layouts by different layers")
    first = sources[0]
    rows = first.dims[first.axis] if first.dims is not None else None
    total = sum(record.layer.num_directions for record in layers)
    offset = 0
    for record, source in zip(layers, sources):
        count = record.layer.num_directions
        start, stop = source.start, source.stop
        if rows is not None:
            span = range(rows)[start:stop]
            start, stop = span.start, span.stop
        elif stop is None and start == 0 and len(layers) == 1:
            stop = count
        if (start, stop) != (offset, offset + count):
            raise Refused(f"{label}: {record.node!r} reads rows [{start}:{stop}] of graph input "
                          f"{first.name!r}; fastlstm's state holds layer after layer, directions in order, "
                          f"so it expects rows [{offset}:{offset + count}]")
        offset += count
    if rows is not None and rows != total:
        raise Refused(f"{label}: graph input {first.name!r} has {rows} rows, the layers use {total}")
    return first.name


def state_rows(flow: Flow, layers: list[LayerRecord]) -> str:
    """Which rows of fastlstm's returned state (``h`` or ``c``, ``(layers * directions, batch, hidden)``) a
    state graph output holds, and in which layout, e.g. ``"h[2:4] as (directions(2), batch, hidden(5))"``."""
    offsets = [0]
    for record in layers:
        offsets.append(offsets[-1] + record.layer.num_directions)
    rows = [offsets[part.layer] + part.direction for part in flow.parts]
    kind = "h" if flow.parts[0].kind == "Y_h" else "c"
    if _state_form(layers) == "per_layer":
        where = ", ".join(f"{kind}[{part.layer}][{part.direction}]" for part in flow.parts)
        return f"{where} as {flow.describe()}"
    if rows == list(range(rows[0], rows[-1] + 1)):
        where = f"{kind}[{rows[0]}:{rows[-1] + 1}]"
    else:
        where = f"rows {rows} of {kind}"
    return f"{where} as {flow.describe()}"


def canonical_gates(array: np.ndarray, hidden: int, order=_CANONICAL_FROM_ONNX_GATES) -> np.ndarray:
    """Reorder the stacked gate blocks of ``array`` (first axis ``len(order) * hidden``) from ONNX's to
    fastlstm's: block ``n`` of the result is ONNX's block ``order[n]`` (the LSTM's order by default)."""
    blocks = array.reshape(len(order), hidden, *array.shape[1:])
    return np.ascontiguousarray(blocks[order].reshape(array.shape))
