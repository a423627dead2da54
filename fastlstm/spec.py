"""The canonical model description: what every importer produces and every backend runs.

A model is a stack of LSTM layers, optionally followed by a head of dense layers. Importers translate a
framework's file or object *into* this description and know nothing of kernels; backends run it and know
nothing of file formats.

Conventions, written down once here:

* **Gate order** of every stacked weight and bias is ``GATE_ORDER = (i, f, g, o)``: input gate, forget gate,
  cell candidate, output gate (PyTorch's and Keras' order). Importers from ONNX (i, o, f, c) permute.
* ``w_ih`` is ``(4H, I)`` and ``w_hh`` is ``(4H, R)`` with ``R = P`` (projection size) when there is a
  projection, else ``H``; they multiply column vectors: ``z = w_ih @ x + w_hh @ h + bias``.
* ``bias`` is the sum of the input and recurrent biases (``b_ih + b_hh``), folded once by the importer.
* ``peephole`` is ``(3, H)`` in the order ``PEEPHOLE_ORDER = (i, f, o)``.
* ``w_hr`` is PyTorch's ``(P, H)`` projection: ``h_t = w_hr @ (o * h(c_t))``.

The recurrence for one direction, with activations ``f`` (gates), ``g`` (cell input), ``h`` (cell output)::

    i = f(clip(W_i x + R_i h' + b_i + p_i * c'))     # p_* only with peepholes; clip only when set
    f = f(clip(W_f x + R_f h' + b_f + p_f * c'))     # f = 1 - i when input_forget (coupled gates)
    g = g(clip(W_g x + R_g h' + b_g))
    c = f * c' + i * g
    o = f(clip(W_o x + R_o h' + b_o + p_o * c))
    h = o * h(c)                                     # then h = w_hr @ h with a projection

``clip`` follows ONNX as ONNX Runtime computes it: the gate pre-activations are bounded to
``[-clip, clip]``; the cell state and the argument of ``h`` are not (ONNX Runtime's ``h`` ignores the clipped
copy of the cell it prepares, and parity with it is what users check).

The model's output is the last layer's output at every step, at the last step, or each direction's final
state (``ModelSpec.output``), then ``head_input_activation`` (elementwise), then the dense head.

Direction ``reverse`` reads the sequence from its end; ``bidirectional`` runs a forward and a reverse cell
(in that order in ``LSTMLayer.cells``) and concatenates their outputs on the feature axis, forward first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from .activations import ELEMENTWISE, IDENTITY, SIGMOID, TANH, Activation
from .errors import InvalidModelError

GATE_ORDER = ("i", "f", "g", "o")
PEEPHOLE_ORDER = ("i", "f", "o")
DIRECTIONS = ("forward", "reverse", "bidirectional")
# What the model returns: every step's output, the output at the last time step (``y[:, -1]``, as a
# PyTorch ``out[:, -1]`` head does), or each direction's final hidden state concatenated (Keras'
# ``return_sequences=False``; differs from "last_step" only for reverse and bidirectional layers).
OUTPUT_MODES = ("sequence", "last_step", "final_state")

Direction = Literal["forward", "reverse", "bidirectional"]
OutputMode = Literal["sequence", "last_step", "final_state"]


@dataclass(frozen=True, eq=False)
class LSTMCellWeights:
    """The weights of one direction of one layer (layouts in the module docstring)."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    bias: np.ndarray
    w_hr: np.ndarray | None = None
    peephole: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class LSTMLayer:
    """One LSTM layer: sizes, direction, options, and one ``LSTMCellWeights`` per direction."""

    input_size: int
    hidden_size: int
    cells: tuple[LSTMCellWeights, ...]
    direction: Direction = "forward"
    proj_size: int = 0
    gate_activation: Activation = SIGMOID
    cell_activation: Activation = TANH
    output_activation: Activation = TANH
    clip: float | None = None
    input_forget: bool = False

    @property
    def num_directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def output_size(self) -> int:
        """Size of one direction's hidden output (the projection size when there is one)."""
        return self.proj_size or self.hidden_size

    @property
    def has_peepholes(self) -> bool:
        return any(cell.peephole is not None for cell in self.cells)

    @property
    def is_standard(self) -> bool:
        """True for the plain sigmoid/tanh/tanh cell without clip, peepholes or coupled gates."""
        return (
            (self.gate_activation, self.cell_activation, self.output_activation) == (SIGMOID, TANH, TANH)
            and self.clip is None
            and not self.input_forget
            and not self.has_peepholes
        )


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
class ModelSpec:
    """A whole network: LSTM layers, an optional dense head, and which time steps it outputs."""

    layers: tuple[LSTMLayer, ...]
    head: tuple[DenseLayer, ...] = ()
    output: OutputMode = "sequence"
    # Keras ``Masking``: a time step whose features all equal this value is padding. fastlstm turns the mask
    # into per-sequence lengths, so masked steps must form a suffix of each sequence (trailing padding).
    mask_value: float | None = None
    # An elementwise activation applied to what the recurrent stack outputs (after the output mode has chosen
    # the steps), before the head: ``head(act(lstm_out))``, e.g. PyTorch's ``fc(relu(out))``.
    head_input_activation: Activation = IDENTITY
    # Where the model came from, for messages and ``repr`` only (e.g. "pytorch state_dict foo.pt").
    source: str = field(default="", compare=False)

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def lstm_output_size(self) -> int:
        """Feature size of the last LSTM layer's output (directions concatenated)."""
        last = self.layers[-1]
        return last.num_directions * last.output_size

    @property
    def output_size(self) -> int:
        return self.head[-1].out_features if self.head else self.lstm_output_size

    @property
    def num_state_rows(self) -> int:
        """First dimension of h and c: ``num_layers * num_directions`` (PyTorch's state layout)."""
        return sum(layer.num_directions for layer in self.layers)

    @property
    def is_unidirectional_forward(self) -> bool:
        return all(layer.direction == "forward" for layer in self.layers)

    def state_sizes(self) -> tuple[int, int]:
        """(h size, c size) shared by every layer; fastlstm requires them equal across layers, as PyTorch does."""
        return self.layers[0].output_size, self.layers[0].hidden_size

    def validate(self) -> "ModelSpec":
        """Check every size, shape and option; raise ``InvalidModelError`` listing all problems at once."""
        problems: list[str] = []
        if not self.layers:
            problems.append("layers: expected at least one LSTM layer, got none")
        if self.mask_value is not None and not np.isfinite(self.mask_value):
            problems.append(f"mask_value: expected a finite number or None, got {self.mask_value!r}")
        problems += _activation_problems("head_input_activation", self.head_input_activation)
        if self.output not in OUTPUT_MODES:
            problems.append(f"output: got {self.output!r}, expected one of {OUTPUT_MODES}")
        expected_in = self.layers[0].input_size if self.layers else 0
        for n, layer in enumerate(self.layers):
            problems += _layer_problems(f"layers[{n}]", layer, expected_in if n else None)
            expected_in = layer.num_directions * layer.output_size
        if self.layers:
            h_size, c_size = self.state_sizes()
            for n, layer in enumerate(self.layers[1:], start=1):
                if (layer.output_size, layer.hidden_size) != (h_size, c_size):
                    problems.append(
                        f"layers[{n}]: hidden/projection sizes ({layer.hidden_size}, {layer.proj_size}) differ "
                        f"from layer 0's ({self.layers[0].hidden_size}, {self.layers[0].proj_size}); "
                        "stacked layers must share them so the state fits PyTorch's (layers, batch, size) shape"
                    )
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


def _layer_problems(where: str, layer: LSTMLayer, expected_input: int | None) -> list[str]:
    problems: list[str] = []
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
    if layer.clip is not None and not (np.isfinite(layer.clip) and layer.clip > 0):
        problems.append(f"{where}.clip: expected a finite number > 0 or None, got {layer.clip!r}")
    if problems:  # sizes are unusable: shape checks would only repeat them
        return problems
    if len(layer.cells) != layer.num_directions:
        problems.append(
            f"{where}.cells: direction {layer.direction!r} needs {layer.num_directions} cell(s), got {len(layer.cells)}"
        )
    H, P, I = layer.hidden_size, layer.proj_size, layer.input_size
    R = P or H
    peepholes = [cell.peephole is not None for cell in layer.cells]
    if any(peepholes) and not all(peepholes):
        problems.append(f"{where}.cells: peepholes present in some directions only")
    for d, cell in enumerate(layer.cells):
        cw = f"{where}.cells[{d}]"
        problems += _array_problems(f"{cw}.w_ih", cell.w_ih, (4 * H, I))
        problems += _array_problems(f"{cw}.w_hh", cell.w_hh, (4 * H, R))
        problems += _array_problems(f"{cw}.bias", cell.bias, (4 * H,))
        if P:
            if cell.w_hr is None:
                problems.append(f"{cw}.w_hr: missing; proj_size={P} needs a ({P}, {H}) projection")
            else:
                problems += _array_problems(f"{cw}.w_hr", cell.w_hr, (P, H))
        elif cell.w_hr is not None:
            problems.append(f"{cw}.w_hr: present but proj_size is 0")
        if cell.peephole is not None:
            problems += _array_problems(f"{cw}.peephole", cell.peephole, (3, H))
    return problems


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
