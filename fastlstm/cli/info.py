"""Say what a model file holds and how fastlstm reads it.

The layers (kind, sizes, direction), the head, the output mode, the input (features or token ids), the
parameter count, the state's form, whether it streams, and what loading inferred or warned about: every
warning and log record of the load is shown, and what a file of this format cannot say is named with the
flag that says it.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ..backends import kernel_info

NAME = "info"
HELP = "what a model file holds and how it loads"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the model file (PyTorch, TorchScript, safetensors, Keras, ONNX, fastlstm)")


def run(args) -> None:
    model, notes, inferred_head = load_with_notes(args)
    print(describe(model, args, notes, inferred_head))


def load_with_notes(args):
    """The model, what its loading said (``(level, message)`` of every warning and ``fastlstm`` log record),
    and the names of the layers an importer took as the head by shape (None when nothing was inferred)."""
    from . import load_model

    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    logger = logging.getLogger("fastlstm")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_model(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    notes = [("warning", str(w.message)) for w in caught]
    notes += [(record.levelname.lower(), record.getMessage()) for record in records]
    inferred_head = next((record.inferred_head for record in records if hasattr(record, "inferred_head")), None)
    return model, notes, inferred_head


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record):
        self.records.append(record)


def describe(model, args, notes, inferred_head=None) -> str:
    spec = model.spec
    lines = [f"file: {args.model}", f"read as: {spec.source or 'a fastlstm model'}"]
    if spec.takes_token_ids:
        lines.append(f"input: integer token ids in 0..{spec.vocab_size - 1}, shape (batch, time), through an "
                     f"embedding {spec.vocab_size} x {spec.input_size}")
    else:
        lines.append(f"input: {spec.input_size} features per step, shape (batch, time, {spec.input_size})")
    if spec.mask_value is not None:
        what = "a token id equal to" if spec.takes_token_ids else "a step whose features all equal"
        lines.append(f"mask: {what} {spec.mask_value} is padding")
    lines.append(f"recurrent layers: {len(spec.layers)}")
    for n, layer in enumerate(spec.layers):
        lines.append(f"  {n}: {_layer_text(layer)}")
    if spec.head_input_activation.name != "identity":
        lines.append(f"before the head: {spec.head_input_activation}")
    found = ", found by shape" if inferred_head is not None else ""
    if spec.head:
        lines.append(f"head: {len(spec.head)} dense layer(s){found}")
        names = inferred_head if inferred_head is not None and len(inferred_head) == len(spec.head) else None
        for n, dense in enumerate(spec.head):
            bias = "" if dense.bias is not None else ", no bias"
            name = f"{names[n]}: " if names else ""
            lines.append(f"  {n}: {name}{dense.in_features} -> {dense.out_features}, activation {dense.activation}{bias}")
    else:
        lines.append(f"head: none{found}")
    per = {"sequence": "every step: (batch, time, {0})", "last_step": "the last step: (batch, {0})",
           "final_state": "the final hidden state of each direction: (batch, {0})"}[spec.output]
    lines.append(f"output: {spec.output}, {per.format(spec.output_size)}")
    lines.append(f"state: form {spec.state_form!r}, {_state_text(spec)}")
    streams = "yes" if spec.is_unidirectional_forward else "no (a reverse direction needs the whole sequence)"
    lines.append(f"streams one step at a time: {streams}")
    lines.append(f"parameters: {parameter_count(spec):,}")
    kernels = kernel_info()
    level = f"the {kernels['level']} build of the Cython kernels" + (" (forced)" if kernels["forced"] else "")
    lines.append(f"runs on: backend {model.backend}, {model.dtype}, {model.weights} gate weights, up to "
                 f"{model.num_threads} thread(s); this CPU runs {level}")
    said = _what_the_format_cannot_say(spec, args, inferred_head)
    if said:
        lines.append("not recorded in the file (say it with a flag if it differs):")
        lines += [f"  - {text}" for text in said]
    if notes:
        lines.append("loading said:")
        lines += [f"  - {level}: {message}" for level, message in notes]
    return "\n".join(lines)


def parameter_count(spec) -> int:
    """Every weight the model holds: recurrent cells, head and embedding."""
    count = 0 if spec.embedding is None else spec.embedding.size
    for layer in spec.layers:
        for cell in layer.cells:
            count += sum(np.size(a) for a in (cell.w_ih, cell.w_hh, cell.bias, cell.w_hr, cell.peephole,
                                               cell.candidate_bias) if a is not None)
    for dense in spec.head:
        count += dense.weight.size + (0 if dense.bias is None else dense.bias.size)
    return int(count)


def _layer_text(layer) -> str:
    text = f"{layer.kind.upper()} {layer.direction}, input {layer.input_size}, hidden {layer.hidden_size}"
    if layer.proj_size:
        text += f", projection {layer.proj_size}"
    if layer.kind == "gru":
        text += ", linear before reset" if layer.linear_before_reset else ", reset before linear"
    defaults = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh", "tanh"), "rnn": ("sigmoid", "tanh", "tanh")}
    names = (layer.gate_activation.name, layer.cell_activation.name, layer.output_activation.name)
    if names != defaults[layer.kind]:
        text += f", activations {layer.gate_activation}/{layer.cell_activation}/{layer.output_activation}"
    if layer.has_peepholes:
        text += ", peepholes"
    if layer.input_forget:
        text += ", coupled input and forget gates"
    if layer.clip is not None:
        text += f", clip {layer.clip}"
    if any(cell.w_ih_scale is not None for cell in layer.cells):
        text += ", int8 weights"
    return text


def _state_text(spec) -> str:
    rows = spec.num_state_rows
    if spec.state_form == "h_c":
        h, c = spec.state_sizes()
        return f"(h, c) of shapes ({rows}, batch, {h}) and ({rows}, batch, {c})"
    if spec.state_form == "h":
        return f"h of shape ({rows}, batch, {spec.state_sizes()[0]})"
    return "one entry per layer: " + ", ".join(
        f"{'(h, c)' if layer.kind == 'lstm' else 'h'} ({layer.num_directions}, batch, {layer.output_size})"
        for layer in spec.layers)


def _what_the_format_cannot_say(spec, args, inferred_head=None) -> list[str]:
    """What a state_dict-like file leaves to the user, unless the command line said it."""
    source = spec.source
    if not (source.startswith("PyTorch state_dict") or source.startswith("safetensors")):
        return []
    said = []
    if spec.head and args.head is None:
        named = f": {', '.join(inferred_head)}" if inferred_head else ""
        said.append(f"the head ({len(spec.head)} Linear layer(s){named}) was found by shape: the Linear layers after "
                    "the recurrent modules whose shapes chain from their output (--head names them, --head '' for none)")
    if spec.head and args.head_activations is None:
        said.append("no head activation is recorded, so none runs (e.g. --head-activations softmax)")
    if args.head_input_activation is None:
        said.append("no activation between the recurrent output and the head is recorded, so none runs "
                    "(e.g. --head-input-activation relu)")
    if args.output is None:
        said.append("the output is every step's (--output last_step for out[:, -1])")
    if any(layer.kind == "rnn" for layer in spec.layers) and args.rnn_nonlinearity is None:
        said.append("nn.RNN's nonlinearity is taken as tanh (--rnn-nonlinearity relu)")
    if spec.takes_token_ids and args.embedding is None:
        said.append("the embedding was found by shape in front of the first recurrent module (--embedding names it)")
    return said
