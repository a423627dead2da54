"""ONNX importer: ``.onnx`` files and in-memory ``onnx.ModelProto`` -> ``ModelSpec``.

The file is parsed with the ``onnx`` package's protobuf classes (imported lazily; ONNX Runtime is not
needed) and nothing in it is run. The graph is read structurally (see ``_onnx_graph``): starting from the
graph outputs, every node they depend on must be

* an ``LSTM``, ``GRU`` or ``RNN`` node (every attribute and input of the operators; one node per layer, stacked
  in a chain of any kinds and sizes),
* a ``Gather`` (axis 0) of a constant ``(vocab, E)`` table by an integer graph input, feeding the first layer:
  the embedding (the model then takes token ids),
* a layout operator that only rearranges what the canonical model computes (``Transpose``, ``Squeeze``,
  ``Unsqueeze``, ``Reshape``, ``Flatten``, ``Slice``, ``Gather``, ``Split``, ``Concat``, ``Identity``,
  ``Dropout`` at inference, ``Cast`` to a float type, and the ``Shape``/``Constant``/``ConstantOfShape``/
  ``Expand`` arithmetic exporters use to build zero initial states and reshape targets), each checked for
  what it does (a permutation, which axis a squeeze removes, which time step a slice keeps, ...),
  with ``Mul``, ``Div``, ``Add``, ``Sub`` and ``Mod`` on constants and on sizes read with ``Shape``,
* or a dense head: ``Gemm``, or ``MatMul`` then ``Add``, and the activations ``Relu``, ``Tanh``, ``Sigmoid``,
  ``LeakyRelu``, ``Elu``, ``HardSigmoid``, ``Softsign``, ``Softplus``, ``ThresholdedRelu`` and ``Softmax``
  (last, over the features), also applied to every step through a reshape that merges time and batch
  into rows and one that splits them back (``fc(y.view(T * B, H)).view(T, B, -1)``),
* or what ONNX Runtime's dynamic quantization writes (``_onnx_quantized``): ``com.microsoft::
  DynamicQuantizeLSTM`` (an LSTM with 8-bit weights, kept as 8-bit values times per-row scales) and, for a
  dense layer, ``DynamicQuantizeLinear``/``MatMulInteger``/``Cast``/``Mul`` or ``com.microsoft::
  DynamicQuantizeMatMul`` (dequantized: the head runs in float32).

Everything else is refused with ``UnsupportedModelError``, listing every unsupported operator and attribute
found, not only the first.

How an ONNX graph maps to a fastlstm model:

* **Input.** fastlstm models take ``x`` batch first, ``(batch, time, features)``, whatever the graph's
  layout: for a time-major graph input ``(time, batch, features)`` (PyTorch's default, or a layer with
  ``layout=0`` and no Transpose), pass ``x.transpose(1, 0, 2)`` to ``predict``. With an embedding the input
  is int64 or int32 token ids, ``(batch, time)``; an id outside the table raises ``InvalidInputError`` where
  ONNX's ``Gather`` would wrap a negative one around.
* **Output.** The graph's output may be every step's output (``Y``, however transposed or squeezed), the
  last step (``Y[-1]``, PyTorch's ``out[:, -1]``) or the final state (``Y_h``; Keras' ``return_sequences=False``,
  also when built from ``Y[-1]`` forward and ``Y[0]`` backward), optionally followed by a dense head. fastlstm
  returns it batch first with the directions concatenated on the last axis, like PyTorch: for ONNX ``Y``
  ``(time, directions, batch, hidden)`` fastlstm's ``y`` is ``Y.transpose(2, 0, 1, 3).reshape(batch, time, -1)``;
  size-1 axes the graph keeps (a direction axis of one, a sliced time step) are not returned.
  Graph outputs that are states (``Y_h``, ``Y_c``, PyTorch's ``h_n``/``c_n``) come from
  ``predict(x, return_state=True)``, in PyTorch's ``(layers * directions, batch, hidden)`` layout.
* **sequence_lens** as a graph input becomes ``predict(x, lengths=...)`` (same semantics: outputs past a
  sequence's end are zero, states are those of its last valid step). A constant ``sequence_lens`` is
  refused, as is a last-step output combined with ``sequence_lens`` (ONNX gives zeros there for short
  sequences).
* **initial_h / initial_c** as graph inputs (whole, or sliced into layers as PyTorch does) become
  ``predict(x, state=(h0, c0))`` (``state=h0`` for a stack of GRU or of RNN layers) in PyTorch's layout:
  for ``layout=1`` graphs transpose them to ``(directions, batch, hidden)``; pass zeros for one the graph
  leaves out. A stack whose layers differ in kind or size has one state entry per layer
  (``ModelSpec.state_form``); each layer's initial state must then be a whole graph input of its own. Zero constants and
  ``ConstantOfShape(0)`` states are zeros; a non-zero constant initial state is refused (the canonical
  model has no stored initial state).
* **Recurrent attributes.** ``layout=1`` (batch first, which ONNX Runtime refuses) runs like ``layout=0``.
  LSTM gates are permuted from ONNX's (i, o, f, c) to (i, f, g, o), peepholes from (i, o, f) to (i, f, o),
  ``B``'s two halves summed; GRU gates from (z, r, h) to (r, z, n), the halves summed except the candidate's
  recurrent bias, kept apart (``candidate_bias``) so both ``linear_before_reset`` variants run exactly.
  Activations must be the same for both directions of a bidirectional layer (a layer holds one set). For Affine,
  ThresholdedRelu and ScaledTanh without ``activation_alpha``/``beta`` the ONNX operator defaults are used
  (ONNX Runtime uses 0; a warning says so).
* Initializers are constants, also when an old exporter lists them among the graph inputs. Nodes whose
  results do not reach a graph output are ignored. Float types other than float16/32/64, sparse tensors
  and model-local functions in the standard domain are refused (nodes calling functions of other domains
  are refused as unknown operators). float16 weights are read exactly and computed in float32; a ``Cast``
  of the data to float16 is refused (fastlstm does not round to float16). Sizes declared
  in the file are checked against the data present before anything is allocated.
* **External data** (tensors in a file beside the model, ``torch.onnx.export``'s default ``m.onnx.data``)
  is read when the model is loaded from its path, only from regular files in the ``.onnx`` file's own
  directory and only the bytes of the tensors the graph uses (see ``_onnx_proto.ExternalData``). A
  ``ModelProto`` in memory whose tensors still point to external data is refused: it has no directory to
  read from (``onnx.load(path)`` reads the data in).

The importer takes no options. What it bound (input layout, lengths, states) is logged at INFO level on
the ``fastlstm.importers.onnx`` logger.
"""

from __future__ import annotations

import importlib
import logging
import os

from ..errors import FastLSTMError, ModelFormatError, UnsupportedModelError
from ..spec import ModelSpec
from ._onnx_graph import GraphReader, GraphResult
from ._onnx_proto import ExternalData
from ._onnx_values import BATCH, FEATURES, TIME

logger = logging.getLogger(__name__)

# Protobuf cannot parse messages over 2 GiB; ONNX files that large keep their tensors as external data.
_MAX_FILE_BYTES = 2**31 - 1
_STANDARD_DOMAINS = ("", "ai.onnx")
# Python errors a malformed file must never surface as (see _spec_from_model).
_UNEXPECTED = (ValueError, TypeError, IndexError, KeyError, OverflowError, ZeroDivisionError, RecursionError,
               MemoryError, UnicodeDecodeError)


def spec_from_file(path, **options) -> ModelSpec:
    """The ``ModelSpec`` of an ``.onnx`` file (read in full, parsed, never run)."""
    _no_options(options)
    path = os.fspath(path)
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size > _MAX_FILE_BYTES:
        raise ModelFormatError(f"{name}: {size} bytes is over the 2 GiB a protobuf ONNX file can hold")
    with open(path, "rb") as f:
        data = f.read()
    return spec_from_bytes(data, name=f"file {name}", directory=os.path.dirname(os.path.abspath(path)))


def spec_from_bytes(data: bytes, *, name: str = "bytes", directory: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a serialized ONNX model; ``name`` labels it in messages and ``ModelSpec.source``.

    ``directory`` is where the model's external data files are (the ``.onnx`` file's own directory); without
    it, a model whose tensors are stored outside it is refused.
    """
    onnx_package = _onnx_package()
    model = onnx_package.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except Exception as exc:  # protobuf's DecodeError and its relatives: the bytes are not an ONNX model
        raise ModelFormatError(f"ONNX {name}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return _spec_from_model(model, name, directory)


def spec_from_model_proto(model, *, name: str = "ModelProto", **options) -> ModelSpec:
    """The ``ModelSpec`` of an in-memory ``onnx.ModelProto``."""
    _no_options(options)
    onnx_package = _onnx_package()
    if not isinstance(model, onnx_package.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto, got {type(model).__module__}.{type(model).__qualname__}")
    return _spec_from_model(model, name)


def _spec_from_model(model, name: str, directory: str | None = None) -> ModelSpec:
    source = f"ONNX {name}"
    try:
        if not model.HasField("graph"):
            raise ModelFormatError(f"{source}: holds no graph; not an ONNX model")
        shadowing = [function.name for function in model.functions if function.domain in _STANDARD_DOMAINS]
        if shadowing:
            raise UnsupportedModelError([f"model-local function(s) {', '.join(map(repr, shadowing))} in the "
                                         "standard ONNX domain, which would redefine its operators"])
        opsets = [entry.version for entry in model.opset_import if entry.domain in _STANDARD_DOMAINS]
        if len(opsets) != 1 or opsets[0] < 1:
            raise ModelFormatError(f"{source}: expected one opset version for the standard ONNX domain, "
                                   f"found {opsets}")
        result = GraphReader(model.graph, int(opsets[0]), source, ExternalData(directory, source)).read()
        spec = ModelSpec(
            layers=tuple(record.layer for record in result.layers), head=result.head, output=result.output,
            embedding=result.embedding, source=source,
        ).validate()
    except FastLSTMError:
        raise
    except _UNEXPECTED as exc:
        # The reader checks what it reads and raises its own errors; anything else a malformed file could
        # still provoke is reported as what it is, a model that cannot be read, never as a Python error.
        raise ModelFormatError(f"{source}: unreadable model ({type(exc).__name__}: {str(exc)[:200]})") from None
    _log_bindings(source, result, spec.state_form)
    return spec


def _log_bindings(source: str, result: GraphResult, state_form: str) -> None:
    """Say at INFO level how the graph's inputs and outputs map to ``predict``'s arguments and results."""
    expected = (BATCH, TIME) if result.embedding is not None else (BATCH, TIME, FEATURES)
    if result.input_layout and result.input_layout != expected:
        logger.info("%s: graph input %r is (%s); fastlstm takes %s as (%s)", source, result.input_name,
                    ", ".join(result.input_layout), "token ids" if result.embedding is not None else "x",
                    ", ".join(expected))
    if result.sequence_lens:
        logger.info("%s: graph input %r (sequence_lens) is predict(x, lengths=...)", source, result.sequence_lens)
    if result.state_inputs:
        layouts = {record.layout for record in result.layers}
        note = " (transpose the graph's (batch, directions, hidden) to (directions, batch, hidden))" \
            if 1 in layouts else ""
        call = {"h_c": "state=(h0, c0)", "h": "state=h0",
                "per_layer": "state=(one entry per layer: h, or (h, c) for an LSTM layer)"}[state_form]
        logger.info("%s: graph inputs %s are predict(x, %s)%s; pass zeros for any the graph leaves out", source,
                    ", ".join(f"{kind}={name!r}" for kind, name in result.state_inputs.items()), call, note)
    logger.info("%s: output %s is the model's %r output%s", source,
                repr(result.main_output) if result.main_output else "(none: only states)", result.output,
                f"; state outputs come with return_state=True: {', '.join(result.state_outputs)}"
                if result.state_outputs else "")


def _onnx_package():
    """The ``onnx`` package (this module shares its name, hence the explicit absolute import)."""
    try:
        return importlib.import_module("onnx")
    except ImportError:
        raise ImportError("reading ONNX models needs the onnx package: pip install 'fastlstm[onnx]'") from None


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"option(s) {', '.join(sorted(options))} do not apply to ONNX models; the ONNX importer "
                        "takes none")
