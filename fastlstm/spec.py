"""The canonical model description: what every importer produces and every backend runs.

A model is an optional embedding, a stack of recurrent layers, and an optional head of dense layers.
Importers translate a framework's file or object *into* this description and know nothing of kernels;
backends run it and know nothing of file formats.

Each layer is of a kind — ``lstm``, ``gru`` or ``rnn`` (simple RNN) — with its own input, hidden and
projection sizes and its own direction. Conventions, written down once here (``G`` is the kind's gate count:
4, 3, 1; ``H`` the hidden size; ``R`` the size of the state fed back: the projection size ``P`` when there is
one, else ``H``):

* ``w_ih`` is ``(G*H, I)`` and ``w_hh`` is ``(G*H, R)``; they multiply column vectors (``w_ih @ x``), gates
  stacked in the kind's order: ``LSTM_GATE_ORDER = (i, f, g, o)`` (PyTorch's and Keras'; ONNX's i, o, f, c
  is permuted by its importer), ``GRU_GATE_ORDER = (r, z, n)`` (PyTorch's; Keras' and ONNX's z, r, h are
  permuted by their importers).
* ``bias`` ``(G*H,)`` is the sum of the input and recurrent biases, folded once by the importer — except the
  GRU candidate's recurrent bias, which sits inside the reset product in the *linear before reset* variant
  and cannot be folded there: a GRU's ``bias`` is ``[b_ir + b_hr, b_iz + b_hz, b_in]`` and its
  ``candidate_bias`` ``(H,)`` is ``b_hn``, kept apart in both variants.
* LSTM only: ``peephole`` ``(3, H)`` in the order ``PEEPHOLE_ORDER = (i, f, o)``; ``w_hr`` is PyTorch's
  ``(P, H)`` projection: ``h_t = w_hr @ (o * h(c_t))``; ``input_forget`` couples the input and forget gates.

The LSTM recurrence for one direction, with activations ``f`` (gates), ``g`` (cell input), ``h`` (output)::

    i = f(clip(W_i x + R_i h' + b_i + p_i * c'))     # p_* only with peepholes; clip only when set
    f = f(clip(W_f x + R_f h' + b_f + p_f * c'))     # f = 1 - i when input_forget (coupled gates)
    g = g(clip(W_g x + R_g h' + b_g))
    c = f * c' + i * g
    o = f(clip(W_o x + R_o h' + b_o + p_o * c))
    h = o * h(c)                                     # then h = w_hr @ h with a projection

The GRU recurrence, with activations ``f`` (gates: the layer's ``gate_activation``) and ``g`` (candidate:
its ``cell_activation``)::

    r = f(clip(W_r x + R_r h' + b_r))
    z = f(clip(W_z x + R_z h' + b_z))
    n = g(clip(W_n x + b_n + r * (R_n h' + b_hn)))    # linear_before_reset (PyTorch; Keras reset_after=True;
                                                      #   ONNX linear_before_reset=1)
    n = g(clip(W_n x + b_n + R_n (r * h') + b_hn))    # reset before linear (Keras reset_after=False; ONNX 0)
    h = (1 - z) * n + z * h'

The simple RNN, with its one activation ``g`` (the layer's ``cell_activation``)::

    h = g(clip(W x + R h' + b))

Activation fields a kind does not use must keep their defaults (``UNUSED_ACTIVATIONS``): a value there would
be a model fastlstm cannot run, so ``validate`` refuses it rather than ignore it.

``clip`` follows ONNX as ONNX Runtime computes it: the gate pre-activations are bounded to
``[-clip, clip]``; the cell state and the argument of ``h`` are not (ONNX Runtime's ``h`` ignores the clipped
copy of the cell it prepares, and parity with it is what users check).

The model's output is the last layer's output at every step, at the last step, or each direction's final
state (``ModelSpec.output``), then ``head_input_activation`` (elementwise), then the dense head.

Direction ``reverse`` reads the sequence from its end; ``bidirectional`` runs a forward and a reverse cell
(in that order in ``RecurrentLayer.cells``) and concatenates their outputs on the feature axis, forward first.

With an ``embedding`` ``(vocab, E)``, the model's input is integer token ids and row ``id`` of the table is
the first layer's input (``E`` its input size).

State (``ModelSpec.state_form``), one rule: a stack of LSTM layers of one size keeps PyTorch's ``(h, c)``,
each ``(layers * directions, batch, size)``; a stack of GRU or of RNN layers of one size keeps PyTorch's
``h`` alone; any other stack (kinds or sizes differ) keeps one entry per layer, each in that layer's
PyTorch form (``(h, c)`` for an LSTM, ``h`` for a GRU or RNN, each ``(directions, batch, size)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from .activations import ELEMENTWISE, IDENTITY, SIGMOID, TANH, Activation
from .errors import InvalidModelError

CELL_KINDS = ("lstm", "gru", "rnn")
GATE_COUNTS = {"lstm": 4, "gru": 3, "rnn": 1}
LSTM_GATE_ORDER = GATE_ORDER = ("i", "f", "g", "o")
GRU_GATE_ORDER = ("r", "z", "n")
PEEPHOLE_ORDER = ("i", "f", "o")
# The activation fields each kind leaves unused, which must keep their defaults.
UNUSED_ACTIVATIONS = {"lstm": (), "gru": ("output_activation",), "rnn": ("gate_activation", "output_activation")}
# How a model's recurrent state is given and returned (see the module docstring).
STATE_FORMS = ("h_c", "h", "per_layer")
DIRECTIONS = ("forward", "reverse", "bidirectional")
# What the model returns: every step's output, the output at the last time step (``y[:, -1]``, as a
# PyTorch ``out[:, -1]`` head does), or each direction's final hidden state concatenated (Keras'
# ``return_sequences=False``; differs from "last_step" only for reverse and bidirectional layers).
OUTPUT_MODES = ("sequence", "last_step", "final_state")

CellKind = Literal["lstm", "gru", "rnn"]
Direction = Literal["forward", "reverse", "bidirectional"]
OutputMode = Literal["sequence", "last_step", "final_state"]


@dataclass(frozen=True, eq=False)
class CellWeights:
    """The weights of one direction of one layer (layouts in the module docstring)."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    bias: np.ndarray
    w_hr: np.ndarray | None = None             # LSTM only
    peephole: np.ndarray | None = None         # LSTM only
    candidate_bias: np.ndarray | None = None   # GRU only (required there): b_hn
    # Set only for weights imported from an already-quantized model (8-bit integers times one scale per gate
    # row): ``w_ih == w_ih_scale[:, None] * q`` in float32 for integers ``q`` in -128..127 (``w_hh`` likewise).
    # The float weights are those products, so every backend can run them as they are; ``weights="int8"``
    # recovers ``q`` exactly from them instead of quantizing afresh.
    w_ih_scale: np.ndarray | None = None       # (G*H,) float32, > 0
    w_hh_scale: np.ndarray | None = None       # (G*H,) float32, > 0


@dataclass(frozen=True, eq=False)
class RecurrentLayer:
    """One recurrent layer: its kind, sizes, direction, options, and one ``CellWeights`` per direction."""

    input_size: int
    hidden_size: int
    cells: tuple[CellWeights, ...]
    direction: Direction = "forward"
    proj_size: int = 0                         # LSTM only
    gate_activation: Activation = SIGMOID      # LSTM i, f, o; GRU r, z
    cell_activation: Activation = TANH         # LSTM g; GRU n; the simple RNN's one activation
    output_activation: Activation = TANH       # LSTM only: applied to c
    clip: float | None = None
    input_forget: bool = False                 # LSTM only
    kind: CellKind = "lstm"
    linear_before_reset: bool = True           # GRU only: the variant (module docstring)

    @property
    def num_gates(self) -> int:
        return GATE_COUNTS.get(self.kind, 0)

    @property
    def num_directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def output_size(self) -> int:
        """Size of one direction's hidden output (the projection size when there is one)."""
        return self.proj_size or self.hidden_size

    @property
    def state_size(self) -> int:
        """Size of the cell state ``c`` of one direction: ``H`` for an LSTM, 0 for kinds without one."""
        return self.hidden_size if self.kind == "lstm" else 0

    @property
    def has_peepholes(self) -> bool:
        return any(cell.peephole is not None for cell in self.cells)

    @property
    def is_standard(self) -> bool:
        """True for the plain cell of its kind: sigmoid gates and tanh elsewhere, without clip, peepholes or
        coupled gates (the kernels' fast path)."""
        used = {"lstm": (self.gate_activation, self.cell_activation, self.output_activation),
                "gru": (self.gate_activation, self.cell_activation),
                "rnn": (self.cell_activation,)}.get(self.kind)
        standard = {"lstm": (SIGMOID, TANH, TANH), "gru": (SIGMOID, TANH), "rnn": (TANH,)}.get(self.kind)
        return (used == standard and self.clip is None and not self.input_forget and not self.has_peepholes)


# The names of the first release, when every layer was an LSTM; importers and users may keep them.
LSTMCellWeights = CellWeights
LSTMLayer = RecurrentLayer


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """``y = activation(x @ weight.T + bias)`` with ``weight`` of shape ``(out, in)`` (PyTorch ``nn.Linear``)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    activation: Activation = IDENTITY

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True, eq=False)
class StateRow:
    """One row of the recurrent state: one direction of one layer, with the sizes of its ``h`` and ``c``."""

    layer: int
    direction: int
    h_size: int   # R: the layer's output size
    c_size: int   # H for an LSTM, 0 for kinds without a cell state


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A whole network: an optional embedding, recurrent layers, an optional dense head, and which time
    steps it outputs."""

    layers: tuple[RecurrentLayer, ...]
    head: tuple[DenseLayer, ...] = ()
    output: OutputMode = "sequence"
    # Keras ``Masking`` (or an embedding's ``mask_zero``: then the id 0): a time step whose features all equal
    # this value (whose token id equals it) is padding. ``predict`` turns the mask into per-sequence lengths, so
    # masked steps must form a suffix of each sequence there; a stream skips a masked step as Keras does.
    mask_value: float | None = None
    # An elementwise activation applied to what the recurrent stack outputs (after the output mode has chosen
    # the steps), before the head: ``head(act(lstm_out))``, e.g. PyTorch's ``fc(relu(out))``.
    head_input_activation: Activation = IDENTITY
    # A (vocab, E) table in front of the first layer: the model's input is then integer token ids.
    embedding: np.ndarray | None = None
    # Where the model came from, for messages and ``repr`` only (e.g. "pytorch state_dict foo.pt").
    source: str = field(default="", compare=False)

    @property
    def input_size(self) -> int:
        """Features per time step of the first layer's input (the embedding width with an embedding)."""
        return self.layers[0].input_size

    @property
    def takes_token_ids(self) -> bool:
        return self.embedding is not None

    @property
    def vocab_size(self) -> int:
        return 0 if self.embedding is None else int(self.embedding.shape[0])

    @property
    def recurrent_output_size(self) -> int:
        """Feature size of the last recurrent layer's output (directions concatenated)."""
        last = self.layers[-1]
        return last.num_directions * last.output_size

    lstm_output_size = recurrent_output_size  # the first release's name

    @property
    def output_size(self) -> int:
        return self.head[-1].out_features if self.head else self.recurrent_output_size

    @property
    def num_state_rows(self) -> int:
        """Rows of the state: ``num_layers * num_directions`` (PyTorch's state layout)."""
        return sum(layer.num_directions for layer in self.layers)

    def state_rows(self) -> tuple[StateRow, ...]:
        """Every row of the state in order: layer by layer, the forward direction first."""
        return tuple(StateRow(n, d, layer.output_size, layer.state_size)
                     for n, layer in enumerate(self.layers) for d in range(layer.num_directions))

    @property
    def state_form(self) -> str:
        """How the state is given and returned: ``"h_c"``, ``"h"`` or ``"per_layer"`` (module docstring)."""
        kinds = {layer.kind for layer in self.layers}
        sizes = {(layer.output_size, layer.hidden_size) for layer in self.layers}
        if len(kinds) == 1 and len(sizes) == 1:
            return "h_c" if kinds == {"lstm"} else "h"
        return "per_layer"

    @property
    def is_unidirectional_forward(self) -> bool:
        return all(layer.direction == "forward" for layer in self.layers)

    def state_sizes(self) -> tuple[int, int]:
        """(h size, c size) of every row, for the ``"h_c"`` and ``"h"`` state forms (c size 0 without ``c``)."""
        return self.layers[0].output_size, self.layers[0].state_size

    def validate(self) -> "ModelSpec":
        """Check every size, shape and option; raise ``InvalidModelError`` listing all problems at once."""
        problems: list[str] = []
        if not self.layers:
            problems.append("layers: expected at least one recurrent layer, got none")
        if self.mask_value is not None and not np.isfinite(self.mask_value):
            problems.append(f"mask_value: expected a finite number or None, got {self.mask_value!r}")
        problems += _activation_problems("head_input_activation", self.head_input_activation)
        if self.output not in OUTPUT_MODES:
            problems.append(f"output: got {self.output!r}, expected one of {OUTPUT_MODES}")
        expected_in = self.layers[0].input_size if self.layers else 0
        if self.embedding is not None:
            problems += _array_problems("embedding", self.embedding, (None, expected_in))
            if not problems and self.embedding.shape[0] < 1:
                problems.append("embedding: expected at least one row (a vocabulary of one token or more)")
            if self.mask_value is not None and not (
                    float(self.mask_value).is_integer() and 0 <= self.mask_value < len(self.embedding)):
                problems.append(f"mask_value: with an embedding, the padding token id must be a whole number in "
                                f"0..{len(self.embedding) - 1}, got {self.mask_value!r}")
        for n, layer in enumerate(self.layers):
            problems += _layer_problems(f"layers[{n}]", layer, expected_in if n else None)
            expected_in = layer.num_directions * layer.output_size
        for n, dense in enumerate(self.head):
            where = f"head[{n}]"
            problems += _array_problems(f"{where}.weight", dense.weight, (None, expected_in))
            if isinstance(dense.weight, np.ndarray) and dense.weight.ndim == 2:
                if dense.bias is not None:
                    problems += _array_problems(f"{where}.bias", dense.bias, (dense.weight.shape[0],))
                expected_in = dense.weight.shape[0]
            problems += _activation_problems(f"{where}.activation", dense.activation, allow_softmax=True)
            if getattr(dense.activation, "name", None) == "softmax" and n != len(self.head) - 1:
                problems.append(f"{where}.activation: softmax is supported on the last dense layer only")
        if problems:
            raise InvalidModelError(problems)
        return self


def _layer_problems(where: str, layer: RecurrentLayer, expected_input: int | None) -> list[str]:
    problems: list[str] = []
    if layer.kind not in CELL_KINDS:
        return [f"{where}.kind: got {layer.kind!r}, expected one of {CELL_KINDS}"]
    for name in ("input_size", "hidden_size"):
        value = getattr(layer, name)
        if not isinstance(value, (int, np.integer)) or value < 1:
            problems.append(f"{where}.{name}: expected a positive integer, got {value!r}")
    if not isinstance(layer.proj_size, (int, np.integer)) or layer.proj_size < 0:
        problems.append(f"{where}.proj_size: expected an integer >= 0, got {layer.proj_size!r}")
    elif layer.proj_size and isinstance(layer.hidden_size, int) and layer.proj_size >= layer.hidden_size:
        problems.append(
            f"{where}.proj_size: expected less than hidden_size={layer.hidden_size}, got {layer.proj_size}"
        )
    if expected_input is not None and layer.input_size != expected_input:
        problems.append(
            f"{where}.input_size: expected {expected_input} (the previous layer's output size), got {layer.input_size}"
        )
    if layer.direction not in DIRECTIONS:
        problems.append(f"{where}.direction: got {layer.direction!r}, expected one of {DIRECTIONS}")
    for name in ("gate_activation", "cell_activation", "output_activation"):
        problems += _activation_problems(f"{where}.{name}", getattr(layer, name))
    defaults = {"gate_activation": SIGMOID, "output_activation": TANH}
    for name in UNUSED_ACTIVATIONS[layer.kind]:
        if getattr(layer, name) != defaults[name]:
            problems.append(f"{where}.{name}: a {layer.kind} layer has no such activation; got "
                            f"{getattr(layer, name)}, expected the default {defaults[name]}")
    if layer.clip is not None and not (np.isfinite(layer.clip) and layer.clip > 0):
        problems.append(f"{where}.clip: expected a finite number > 0 or None, got {layer.clip!r}")
    if layer.kind != "lstm":
        for name, default in (("proj_size", 0), ("input_forget", False)):
            if getattr(layer, name) != default:
                problems.append(f"{where}.{name}: LSTM only; a {layer.kind} layer must leave it at {default!r}")
    if layer.kind != "gru" and layer.linear_before_reset is not True:
        problems.append(f"{where}.linear_before_reset: GRU only; a {layer.kind} layer must leave it at True")
    if problems:  # sizes are unusable: shape checks would only repeat them
        return problems
    if len(layer.cells) != layer.num_directions:
        problems.append(
            f"{where}.cells: direction {layer.direction!r} needs {layer.num_directions} cell(s), got {len(layer.cells)}"
        )
    G, H, P, I = layer.num_gates, layer.hidden_size, layer.proj_size, layer.input_size
    R = P or H
    peepholes = [cell.peephole is not None for cell in layer.cells]
    if any(peepholes) and not all(peepholes):
        problems.append(f"{where}.cells: peepholes present in some directions only")
    for d, cell in enumerate(layer.cells):
        cw = f"{where}.cells[{d}]"
        problems += _array_problems(f"{cw}.w_ih", cell.w_ih, (G * H, I))
        problems += _array_problems(f"{cw}.w_hh", cell.w_hh, (G * H, R))
        problems += _array_problems(f"{cw}.bias", cell.bias, (G * H,))
        if P:
            if cell.w_hr is None:
                problems.append(f"{cw}.w_hr: missing; proj_size={P} needs a ({P}, {H}) projection")
            else:
                problems += _array_problems(f"{cw}.w_hr", cell.w_hr, (P, H))
        elif cell.w_hr is not None:
            problems.append(f"{cw}.w_hr: present but proj_size is 0")
        if cell.peephole is not None:
            if layer.kind != "lstm":
                problems.append(f"{cw}.peephole: LSTM only; a {layer.kind} layer has no peepholes")
            else:
                problems += _array_problems(f"{cw}.peephole", cell.peephole, (3, H))
        if layer.kind == "gru":
            if cell.candidate_bias is None:
                problems.append(f"{cw}.candidate_bias: missing; a GRU needs the ({H},) recurrent bias of its "
                                "candidate (zeros when the source has none)")
            else:
                problems += _array_problems(f"{cw}.candidate_bias", cell.candidate_bias, (H,))
        elif cell.candidate_bias is not None:
            problems.append(f"{cw}.candidate_bias: GRU only; a {layer.kind} layer has none")
        for name in ("w_ih", "w_hh"):
            scale = getattr(cell, f"{name}_scale")
            if scale is not None:
                problems += _int8_problems(f"{cw}.{name}", getattr(cell, name), scale)
    return problems


# The integers an 8-bit weight may hold (PyTorch's symmetric qint8 uses -128 too).
INT8_RANGE = (-128, 127)


def int8_values(weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The integers ``q`` of weights stored as ``scale[:, None] * q`` (``CellWeights.w_ih_scale``), as int8."""
    return np.rint(np.asarray(weights, np.float64) / np.asarray(scale, np.float64)[:, None]).astype(np.int8)


def _int8_problems(where: str, weights, scale) -> list[str]:
    """Per-row scales that are positive and finite, and weights that are exactly those scales times integers
    in ``INT8_RANGE`` (in float32, the dtype a quantized model's products are formed in)."""
    if not isinstance(weights, np.ndarray) or weights.ndim != 2:
        return []  # the weights' own check has reported it
    problems = _array_problems(f"{where}_scale", scale, (weights.shape[0],))
    if problems:
        return problems
    if not np.all(scale > 0):
        return [f"{where}_scale: expected positive scales"]
    ratio = np.asarray(weights, np.float64) / np.asarray(scale, np.float64)[:, None]
    q = np.rint(ratio)
    low, high = INT8_RANGE
    if np.any(q < low) or np.any(q > high):
        return [f"{where}: weights divided by {where}_scale leave the 8-bit range {low}..{high}"]
    products = (np.asarray(scale, np.float32)[:, None] * q.astype(np.float32))
    if not np.array_equal(products, np.asarray(weights, np.float32)):
        return [f"{where}: weights are not {where}_scale times whole numbers (not 8-bit values)"]
    return []


def _activation_problems(where: str, act, allow_softmax: bool = False) -> list[str]:
    """An ``Activation`` of a known name whose parameters are finite (NaN or inf would make every output NaN)."""
    if not isinstance(act, Activation) or not (act.name in ELEMENTWISE or allow_softmax and act.name == "softmax"):
        kind = "an Activation" if allow_softmax else "an elementwise Activation"
        return [f"{where}: expected {kind}, got {act!r}"]
    bad = [f"{p}={getattr(act, p)!r}" for p in ("alpha", "beta")
           if not isinstance(getattr(act, p), (int, float)) or not np.isfinite(getattr(act, p))]
    return [f"{where}: {act.name} parameters must be finite numbers, got {', '.join(bad)}"] if bad else []


def _array_problems(where: str, array, shape: Sequence[int | None]) -> list[str]:
    if not isinstance(array, np.ndarray):
        return [f"{where}: expected a NumPy array, got {type(array).__name__}"]
    if array.dtype.kind != "f":
        return [f"{where}: expected a floating-point array, got dtype {array.dtype}"]
    wanted = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        return [f"{where}: expected shape {wanted}, got {tuple(array.shape)}"]
    if not np.all(np.isfinite(array)):
        return [f"{where}: contains NaN or infinite values"]
    return []
