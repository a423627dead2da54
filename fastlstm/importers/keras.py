"""Keras importer: ``.keras`` archives, legacy ``.h5`` model files and in-memory ``keras.Model`` -> ``ModelSpec``.

Every source is reduced to the same two things and handed to one translator, ``spec_from_keras_config``:
the model config (``config.json``, the ``model_config`` attribute, or ``model.get_config()``) and a function
declaring each layer's weights in ``layer.get_weights()`` order. Files are read with ``zipfile`` and ``json``
here and ``h5py`` in a child process (``_keras_files``, ``_keras_hdf5``); Keras is imported only for
in-memory models. Translation runs in two passes: the config alone decides what each layer becomes and
collects everything fastlstm cannot run, raised together as one ``UnsupportedModelError``; then each
declared weight's shape is checked against the one the config implies, all mismatches raised together, and
only then are the weights read (the ones the model needs, nothing else) and the spec assembled.

What the layers become:

* ``LSTM`` (kind ``"lstm"``; Keras' gate order i, f, c, o is fastlstm's i, f, g, o: no permutation):
  ``w_ih = kernel.T``, ``w_hh = recurrent_kernel.T``, ``bias`` (zeros with ``use_bias=False``);
  ``recurrent_activation`` drives the gates, ``activation`` both the cell input and the cell output.
* ``GRU`` (kind ``"gru"``): Keras' gates z, r, h are permuted to fastlstm's r, z, n in the rows of both
  kernels (transposed) and of the biases; ``recurrent_activation`` drives r and z, ``activation`` the
  candidate. ``reset_after=True`` (the default) is ``linear_before_reset``: of its two bias rows (input,
  recurrent) the recurrent r and z parts are added to the input ones and the recurrent n part is
  ``candidate_bias``. ``reset_after=False`` applies the reset before the recurrent product and has one bias
  row (the input bias): ``candidate_bias`` is zeros. A config without ``reset_after`` was written by a Keras
  older than the option (2.1), whose GRU reset before the product: ``False`` (a file with two bias rows
  then fails the shape check).
* ``SimpleRNN`` (kind ``"rnn"``): ``h = activation(W x + R h' + b)``, kernels transposed.
* All three: ``go_backwards=True`` is a ``"reverse"`` layer. ``return_sequences`` must be true on all but the
  last recurrent layer; the last one's ``False`` is ``output="final_state"`` (each direction's final state,
  as Keras returns it). ``stateful`` is accepted: ``predict`` starts from zero state like a freshly reset
  stateful Keras model, and ``Model.stream()`` carries state across calls as ``stateful=True`` does.
  ``unroll``, ``use_cudnn``, ``implementation``, ``dropout``, ``recurrent_dropout``, ``seed``,
  initializers, regularizers and constraints do not change inference. Layers may differ in kind and
  ``units``: the state then keeps one entry per layer (``ModelSpec.state_form`` ``"per_layer"``).
* ``RNN(LSTMCell | GRUCell | SimpleRNNCell)`` is the same layer (the ``RNN`` holds the sequence options, the
  cell the maths). ``RNN([cell, ...])`` (``StackedRNNCells``, cells of any of these kinds and sizes) feeds
  each cell's output to the next at every step: one fastlstm layer per cell, all but the last returning
  sequences; with ``go_backwards=True`` every cell reads the reversed sequence, a stack of ``"reverse"``
  layers.
* ``Bidirectional`` of any of these (not of stacked cells): a ``"bidirectional"`` layer, both directions of
  one kind and options. ``merge_mode="concat"`` is native; ``"sum"`` and ``"ave"`` are linear, so they are
  folded into whatever reads the merged output: the next recurrent layer's ``w_ih`` or the first dense
  layer's weight is duplicated (and halved for ``"ave"``) across the two directions, or, when nothing
  linear follows, a dense layer ``[I I]`` (``[I/2 I/2]``) is added to the head.
* ``Dense`` and ``TimeDistributed(Dense)`` after the last recurrent layer form the head
  (``weight = kernel.T``); Keras applies a ``Dense`` to a sequence per time step, as ``TimeDistributed``
  does. ``Activation`` and ``Softmax`` (last axis) layers join the dense layer before them, or become an
  identity-weight dense layer (all such added matrices together may hold no more values than the model's
  weights, plus 2^20).
* ``Embedding`` as the model's first layer is ``ModelSpec.embedding`` (``input_dim`` x ``output_dim``): the
  model then takes integer token ids ``(batch, time)``; ``mask_zero=True`` makes id 0 padding
  (``mask_value=0``). Its initializer, regularizers and constraint act in training only; ``sparse=True``,
  LoRA (``lora_rank``) and quantization are refused. In a functional Keras 3 model the mask is written as
  operations of its own (``_keras_graph`` recognises exactly those).
* ``Masking`` as the model's first layer sets ``mask_value``; ``Dropout``, ``SpatialDropout1D``,
  ``GaussianDropout``, ``GaussianNoise`` and ``AlphaDropout`` are identities at inference (every option of
  theirs acts in training only).

Activations are those of the Keras version that wrote the model: ``hard_sigmoid`` is ``clip(0.2x + 0.5)``
in Keras 2 / tf.keras and ``clip(x/6 + 0.5)`` in Keras 3. ``leaky_relu`` has Keras' slope 0.2.

Refused, each named, all at once (``UnsupportedModelError``): any other layer; a layer outside the
order (Masking or Embedding) -> recurrent layers -> head; ``go_backwards=True`` with
``return_sequences=True`` outside ``Bidirectional`` (Keras returns that sequence in reversed time order,
which the canonical model cannot express); ``merge_mode="mul"`` or ``None``; a ``Bidirectional`` whose
directions differ in kind or options; a model whose outputs include the states of ``return_state=True``
(``return_state`` is accepted when only the main output is used, in a functional model); activations
outside fastlstm's catalogue (softmax inside a recurrent cell); LoRA or quantized dense layers and
embeddings; a sparse embedding; integer inputs without an ``Embedding``; functional models that are not a
single chain, or that pass a layer any tensor but its input and its Embedding's or Masking's own mask;
``RNN`` of other cells, ``Bidirectional`` over stacked cells; a user's class registered under a Keras class
name (at any depth: layer, wrapped layer, cell); ``time_major``; ragged or sparse inputs; dtype policies
computing in another precision than float32/float64; options this importer does not know, unless ``None``
(e.g. ``recurrent_activation`` on a ``SimpleRNN``). A boolean option that is not a boolean, or a
``keras_version`` that is not a version number, is a ``ModelFormatError``.

Masked time steps: ``predict`` turns a mask into per-sequence lengths, so the mask must pad the end of each
sequence there; ``Model.stream()`` skips a masked step anywhere, as Keras does. The outputs at the padded
steps of a sequence output of ``predict`` differ from Keras' (Keras repeats the last valid output there
unless ``zero_output_for_mask=True``; fastlstm writes zeros before the head); every valid step, and every
final-state output, matches.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace

import numpy as np

from ..activations import IDENTITY, SIGMOID, TANH, Activation
from ..errors import FastLSTMError, InvalidModelError, ModelFormatError, UnsupportedModelError
from ..spec import GATE_COUNTS, CellWeights, DenseLayer, ModelSpec, RecurrentLayer
from ._keras_files import ReadWeights, WeightsOf, open_keras_file, parse_config_json
from ._keras_graph import FUNCTIONAL_CLASS_NAMES, SEQUENTIAL, KerasGraph, KerasLayer, custom_class, model_graph

NO_OPS_AT_INFERENCE = ("Dropout", "SpatialDropout1D", "GaussianDropout", "GaussianNoise", "AlphaDropout")
# The recurrent layers and the cells of an RNN layer, and the kind of fastlstm layer each becomes.
RECURRENT_LAYERS = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "rnn"}
RECURRENT_CELLS = {"LSTMCell": "lstm", "GRUCell": "gru", "SimpleRNNCell": "rnn"}
SUPPORTED_LAYERS = ("InputLayer", "Embedding", "Masking", "LSTM", "GRU", "SimpleRNN",
                    "RNN(LSTMCell | GRUCell | SimpleRNNCell)", "RNN([cell, ...])", "Bidirectional(LSTM | GRU | "
                    "SimpleRNN | RNN(cell))", "Dense", "TimeDistributed(Dense)", "Activation",
                    "Softmax") + NO_OPS_AT_INFERENCE

# Keras activation names and what they are in fastlstm's catalogue ("hard_sigmoid" depends on the version).
_ACTIVATIONS = {
    "linear": IDENTITY,
    "sigmoid": SIGMOID,
    "tanh": Activation.of("tanh"),
    "relu": Activation.of("relu"),
    "elu": Activation.of("elu", alpha=1.0),
    "leaky_relu": Activation.of("leaky_relu", alpha=0.2),
    "softsign": Activation.of("softsign"),
    "softplus": Activation.of("softplus"),
    "softmax": Activation.of("softmax"),
}
_KERAS2_HARD_SIGMOID = Activation.of("hard_sigmoid", alpha=0.2, beta=0.5)
_KERAS3_HARD_SIGMOID = Activation.of("hard_sigmoid", alpha=1 / 6, beta=0.5)
_SUPPORTED_ACTIVATIONS = ", ".join(sorted([*_ACTIVATIONS, "hard_sigmoid"]))

# Config keys every layer may carry without changing inference.
_COMMON_KEYS = {"name", "trainable", "dtype", "batch_input_shape", "batch_shape", "batch_size", "input_shape",
                "input_dim", "input_length"}
_TRAINING_ONLY_KEYS = {"kernel_initializer", "recurrent_initializer", "bias_initializer", "unit_forget_bias",
                       "kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "activity_regularizer",
                       "kernel_constraint", "recurrent_constraint", "bias_constraint", "dropout",
                       "recurrent_dropout", "seed"}

_DENSE_KEYS = _COMMON_KEYS | _TRAINING_ONLY_KEYS | {"units", "activation", "use_bias", "lora_rank", "lora_alpha",
                                                    "quantization_config"}
_SEQUENCE_KEYS = {"return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask",
                  "time_major"}
_LSTM_CELL_KEYS = _COMMON_KEYS | _TRAINING_ONLY_KEYS | {"units", "activation", "recurrent_activation", "use_bias",
                                                        "implementation"}
# The options of each kind's cell; a layer (LSTM, GRU, SimpleRNN) adds the sequence options and use_cudnn.
_CELL_KEYS = {"lstm": _LSTM_CELL_KEYS, "gru": _LSTM_CELL_KEYS | {"reset_after"},
              "rnn": _COMMON_KEYS | _TRAINING_ONLY_KEYS | {"units", "activation", "use_bias"}}
_LAYER_KEYS = _SEQUENCE_KEYS | {"use_cudnn"}
_RNN_KEYS = _COMMON_KEYS | _SEQUENCE_KEYS | {"cell"}
_EMBEDDING_KEYS = _COMMON_KEYS | {"input_dim", "output_dim", "embeddings_initializer", "embeddings_regularizer",
                                  "activity_regularizer", "embeddings_constraint", "mask_zero", "sparse", "lora_rank",
                                  "lora_alpha", "quantization_config"}
_TIME_DISTRIBUTED_KEYS = _COMMON_KEYS | {"layer"}
_BIDIRECTIONAL_KEYS = _TIME_DISTRIBUTED_KEYS | {"backward_layer", "merge_mode"}
_INPUT_KEYS = _COMMON_KEYS | {"sparse", "ragged", "optional", "shape"}
_FLOAT_POLICIES = (None, "float32", "float64")
# An input of token ids (for an Embedding) is declared with an integer dtype.
_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
# Values the importer may add (identity and merge matrices) beyond as many as the model's weights hold.
_SYNTHESIS_ALLOWANCE = 1 << 20


# ----------------------------------------------------------------------------------------- entry points
def spec_from_file(path, **options) -> ModelSpec:
    """The ``ModelSpec`` of a ``.keras`` archive or a legacy Keras ``.h5`` model file (no Keras needed)."""
    _no_options(options)
    with open_keras_file(os.fspath(path)) as saved:
        return spec_from_keras_config(saved.model_config, saved.weights_of, read=saved.read,
                                      keras_version=saved.keras_version, source=saved.description)


def spec_from_keras_model(model, **options) -> ModelSpec:
    """The ``ModelSpec`` of an in-memory Keras ``Sequential`` or functional model, read through the Keras API."""
    _no_options(options)
    try:
        import keras
    except ImportError:  # pragma: no cover - only reachable when handed a keras object without keras
        raise ImportError("loading an in-memory Keras model needs keras; saved .keras/.h5 files load with "
                          "h5py only (pip install fastlstm[keras])") from None
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__module__}.{type(model).__qualname__}")
    class_name = type(model).__name__
    if class_name != SEQUENTIAL and class_name not in FUNCTIONAL_CLASS_NAMES:
        raise UnsupportedModelError([f"model class {class_name!r}: fastlstm reads Sequential and functional Keras "
                                     "models; a subclassed model's computation lives in its call() method"])
    source = f"Keras model {model.name!r} (in memory)"
    try:
        # Through JSON, as Keras writes config.json: tuples become lists, and the config reads like a file's.
        text = json.dumps(model.get_config(), default=lambda value: f"<{type(value).__name__}>")
    except Exception as exc:
        raise ModelFormatError(f"{source}: get_config() failed: {exc}") from None
    config = parse_config_json(text, source, "get_config()")

    def weights_of(layer: KerasLayer) -> list[np.ndarray]:
        return model.get_layer(layer.name).get_weights()

    return spec_from_keras_config({"class_name": class_name, "config": config}, weights_of,
                                  keras_version=getattr(keras, "__version__", None), source=source)


def spec_from_keras_config(model_config: dict, weights_of: WeightsOf, *, read: ReadWeights | None = None,
                           keras_version: str | None, source: str) -> ModelSpec:
    """Translate a Keras model config and its weights into a validated ``ModelSpec``.

    ``model_config`` is ``{"class_name": "Sequential" | "Functional", "config": {...}}``; ``weights_of(layer)``
    declares a layer's weights in ``get_weights()`` order (arrays, or anything with ``shape`` and ``dtype``),
    each checked against the shape the config implies before ``read`` (default: ``np.asarray`` of each) turns
    the ones the model needs into arrays; ``keras_version`` is the version that wrote the model (it decides
    what ``hard_sigmoid`` means). Raises ``UnsupportedModelError`` listing everything fastlstm cannot run,
    ``ModelFormatError`` for a malformed config and ``InvalidModelError`` (a ``ModelFormatError``) listing
    every missing or mis-shaped weight.
    """
    graph = model_graph(model_config, source)
    major = _major_version(keras_version, source)
    if major is not None and major < 2:
        raise UnsupportedModelError([f"{source} was written by Keras {keras_version}; fastlstm reads models "
                                     "written by Keras 2 (tf.keras) and Keras 3"])
    plan = _Planner(graph, major, source).plan()
    return _build(plan, weights_of, read or (lambda weights: [np.asarray(w) for w in weights]), source).validate()


# ----------------------------------------------------------------------------------------- pass 1: the config
@dataclass
class _Recurrent:
    layer: KerasLayer
    kind: str  # "lstm", "gru" or "rnn"
    units: int
    direction: str
    use_bias: bool
    return_sequences: bool
    gate_activation: Activation  # SIGMOID, unused, for a simple RNN
    activation: Activation
    reset_after: bool  # GRU only (True elsewhere): Keras' reset_after, fastlstm's linear_before_reset
    # Bidirectional "sum" (1.0) and "ave" (0.5): the scale of the directions' sum; None for concatenation.
    merge_scale: float | None = None

    @property
    def bias_shape(self) -> tuple[int, ...]:
        """Keras' bias: a GRU with ``reset_after`` keeps its input and recurrent biases as two rows."""
        size = GATE_COUNTS[self.kind] * self.units
        return (2, size) if self.kind == "gru" and self.reset_after else (size,)


@dataclass
class _Embedding:
    layer: KerasLayer
    input_dim: int
    output_dim: int


@dataclass
class _Dense:
    layer: KerasLayer
    units: int
    use_bias: bool
    activation: Activation


@dataclass
class _ActivationOnly:
    layer: KerasLayer
    activation: Activation


@dataclass
class _Plan:
    embedding: _Embedding | None
    recurrent: list[_Recurrent]
    head: list[_Dense | _ActivationOnly]
    mask_value: float | None
    input_features: int | None  # declared by the InputLayer, when it says


class _Planner:
    """Decides from the config alone what each layer becomes, collecting every unsupported feature."""

    def __init__(self, graph: KerasGraph, keras_major: int | None, source: str):
        self.graph = graph
        self.keras_major = keras_major
        self.source = source
        self.problems: list[str] = list(graph.problems)

    def plan(self) -> _Plan:
        recurrent: list[_Recurrent] = []
        head: list[_Dense | _ActivationOnly] = []
        embedding: _Embedding | None = None
        masking: KerasLayer | None = None
        started: KerasLayer | None = None  # the first layer after the input (and the identities at inference)
        mask_value = None
        input_layer = None
        saw_recurrent = False  # even one this importer refuses: "no recurrent layer" would then be wrong
        for layer in self.graph.layers:
            kind = layer.class_name
            where = layer.describe()
            if layer.custom:
                self.problems.append(f"{where} is {layer.custom}")
                saw_recurrent = saw_recurrent or _is_recurrent(kind)
                continue
            if kind in NO_OPS_AT_INFERENCE:
                continue
            if kind == "InputLayer":
                input_layer = layer
            elif kind == "Masking":
                if masking is not None:
                    self.problems.append(f"{where} is a second Masking layer")
                elif started is not None:
                    self.problems.append(f"{where} comes after {started.describe()}; fastlstm masks the model's "
                                         "input only")
                else:
                    masking, mask_value = layer, self._mask_value(layer)
            elif kind == "Embedding":
                if started is not None:
                    self.problems.append(f"{where} comes after {started.describe()}; fastlstm looks token ids up "
                                         "in one embedding, the model's first layer")
                else:
                    embedding = self._embedding(layer)
                    if embedding is not None and self._flag(layer.config, "mask_zero", False, where):
                        mask_value = 0.0
            elif _is_recurrent(kind):
                saw_recurrent = True
                steps = self._recurrent(layer)
                if head:
                    self.problems.append(f"{where} comes after {head[0].layer.describe()}; fastlstm runs the "
                                         "recurrent layers first, then dense layers")
                elif recurrent and not recurrent[-1].return_sequences:
                    self.problems.append(f"{where} follows {recurrent[-1].layer.describe()}, which returns its final "
                                         "state only (return_sequences=False)")
                recurrent += steps
            elif kind in ("Dense", "TimeDistributed", "Activation", "Softmax"):
                step = self._dense(layer) if kind in ("Dense", "TimeDistributed") else self._activation_layer(layer)
                if step is None:
                    continue
                if not recurrent:
                    self.problems.append(f"{where} comes before the first recurrent layer; fastlstm models start "
                                         "with their recurrent layers")
                elif head and head[-1].activation.name == "softmax":
                    self.problems.append(f"{where} follows the softmax of {head[-1].layer.describe()}; fastlstm "
                                         "applies softmax as the model's last operation only")
                head.append(step)
            else:
                self.problems.append(_not_supported(layer))
            if kind != "InputLayer":
                started = started or layer
        if not saw_recurrent:
            self.problems.append("the model has no recurrent layer (LSTM, GRU, SimpleRNN or RNN)")
        input_features = None if input_layer is None else self._input_features(input_layer, embedding is not None)
        if self.problems:
            raise UnsupportedModelError(self.problems, hint=f"({self.source})")
        return _Plan(embedding, recurrent, head, mask_value, input_features)

    # -------------------------------------------------------------------- layers
    def _input_features(self, layer: KerasLayer, token_ids: bool) -> int | None:
        """The feature count the input layer declares (None: not declared, or token ids), after checking its
        shape and dtype: ``(batch, time, features)`` floats, or ``(batch, time)`` ids for an ``Embedding``."""
        config = layer.config
        where = layer.describe()
        self._unknown_options(layer, config, _INPUT_KEYS, policies=_FLOAT_POLICIES + _INTEGER_DTYPES)
        expected = "(batch, time) token ids" if token_ids else "(batch, time, features)"
        for option in ("ragged", "sparse"):
            if self._flag(config, option, False, where):
                self.problems.append(f"{where}: {option}=True; fastlstm reads dense, padded {expected} arrays")
        dtype = _policy_name(config.get("dtype"))
        if not token_ids and dtype in _INTEGER_DTYPES:
            self.problems.append(f"{where}: dtype {dtype!r} without an Embedding; fastlstm reads floating-point "
                                 "features, or integer token ids through an Embedding")
        shape = config.get("batch_shape", config.get("batch_input_shape"))
        if shape is None:
            return None
        if not isinstance(shape, (list, tuple)) or len(shape) != (2 if token_ids else 3):
            self.problems.append(f"{where}: input shape {shape}; fastlstm reads {expected} sequences")
            return None
        features = shape[-1]
        if token_ids:
            return None
        return features if isinstance(features, int) and not isinstance(features, bool) else None

    def _embedding(self, layer: KerasLayer) -> _Embedding | None:
        """An ``Embedding``'s table size; options that change what it computes are refused."""
        config = layer.config
        where = layer.describe()
        self._unknown_options(layer, config, _EMBEDDING_KEYS)
        self._refuse_adapted(config, where, "the embeddings")
        if self._flag(config, "sparse", False, where):
            self.problems.append(f"{where}: sparse=True returns sparse tensors; fastlstm's embedding is dense")
        return _Embedding(layer, self._positive_int(config, "input_dim", where),
                          self._positive_int(config, "output_dim", where))

    def _positive_int(self, config: dict, key: str, where: str) -> int:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFormatError(f"{self.source}: {where}: {key}={value!r}, expected a positive integer")
        return value

    def _refuse_adapted(self, config: dict, where: str, weights: str) -> None:
        """LoRA adapters and quantization change what a layer computes from its stored weights: refused."""
        if config.get("lora_rank"):
            self.problems.append(f"{where}: LoRA-adapted (lora_rank={config['lora_rank']!r}); merge the adapter "
                                 f"into {weights} before exporting")
        if config.get("quantization_config"):
            self.problems.append(f"{where}: quantized (quantization_config set); fastlstm runs float weights")

    def _mask_value(self, layer: KerasLayer) -> float | None:
        self._unknown_options(layer, layer.config, _COMMON_KEYS | {"mask_value"})
        value = layer.config.get("mask_value", 0.0)
        finite = isinstance(value, float) and math.isfinite(value) or isinstance(value, int) and abs(value) < 2 ** 64
        if isinstance(value, bool) or not finite:
            self.problems.append(f"{layer.describe()}: mask_value={value!r}; fastlstm masks with a finite number")
            return None
        return float(value)

    def _recurrent(self, layer: KerasLayer) -> list[_Recurrent]:
        """The fastlstm layer(s) of an LSTM, GRU, SimpleRNN, RNN(cell), RNN([cell, ...]) or Bidirectional layer."""
        if layer.class_name in RECURRENT_LAYERS or layer.class_name == "RNN":
            steps = self._recurrent_layer(layer, {"class_name": layer.class_name, "config": layer.config})
            if steps and steps[-1].direction == "reverse" and steps[-1].return_sequences:
                self.problems.append(
                    f"{layer.describe()}: go_backwards=True with return_sequences=True returns the outputs in "
                    "reversed time order, which fastlstm cannot express (wrap the layer in Bidirectional, or "
                    "return only the final state)")
            return steps
        # Bidirectional
        config = layer.config
        self._unknown_options(layer, config, _BIDIRECTIONAL_KEYS)
        forward_config = self._wrapped(config, "layer", layer)
        if forward_config is None or not _is_recurrent(forward_config.get("class_name"), wrapped=True):
            self.problems.append(_not_supported(layer))
            return []
        forward = self._recurrent_layer(layer, forward_config, inner="forward layer")
        backward_config = self._wrapped(config, "backward_layer", layer)
        if backward_config is None:  # Keras 2 leaves it out when it is the forward layer run backwards
            backward = [replace(step, direction="reverse") for step in forward]
        elif not _is_recurrent(backward_config.get("class_name"), wrapped=True):
            self.problems.append(f"{layer.describe()}: backward layer {backward_config.get('class_name')!r} is not "
                                 "a recurrent layer")
            backward = []
        else:
            backward = self._recurrent_layer(layer, backward_config, inner="backward layer")
        if len(forward) > 1 or len(backward) > 1:
            self.problems.append(f"{layer.describe()}: Bidirectional over stacked cells runs each direction's "
                                 "whole stack before merging, which fastlstm's bidirectional layers cannot express")
            return []
        if not forward or not backward:
            return []
        forward, backward = forward[0], backward[0]
        if forward.direction != "forward" or backward.direction != "reverse":
            self.problems.append(f"{layer.describe()}: the forward layer has go_backwards=True; fastlstm's "
                                 "bidirectional layers read forward first, then backward")
        for attribute in ("kind", "units", "use_bias", "return_sequences", "gate_activation", "activation",
                          "reset_after"):
            if getattr(forward, attribute) != getattr(backward, attribute):
                self.problems.append(f"{layer.describe()}: the forward and backward layers differ in {attribute} "
                                     f"({getattr(forward, attribute)} vs {getattr(backward, attribute)})")
        merge_mode = config.get("merge_mode", "concat")
        merge_scale = {"concat": None, "sum": 1.0, "ave": 0.5}.get(merge_mode, "refused") \
            if isinstance(merge_mode, (str, type(None))) else "refused"
        if merge_scale == "refused":
            reason = ("multiplies the directions' outputs, which no linear layer can express" if merge_mode == "mul"
                      else "returns the two directions as separate outputs" if merge_mode is None
                      else "is not a Keras merge mode")
            self.problems.append(f"{layer.describe()}: merge_mode={merge_mode!r} {reason}; fastlstm supports "
                                 "'concat', 'sum' and 'ave'")
            merge_scale = None
        return [replace(forward, layer=layer, direction="bidirectional", merge_scale=merge_scale)]

    def _recurrent_layer(self, layer: KerasLayer, serialised: dict, inner: str = "") -> list[_Recurrent]:
        """An ``LSTM``, ``GRU``, ``SimpleRNN`` or ``RNN`` config (``layer`` itself, or wrapped in it): one step per
        cell."""
        where = layer.describe() + (f" ({inner})" if inner else "")
        config = serialised["config"]
        kind = RECURRENT_LAYERS.get(serialised["class_name"])
        if kind is not None:
            self._unknown_options(layer, config, _CELL_KEYS[kind] | _LAYER_KEYS, where)
            cells = [(kind, config, where)]
        else:  # RNN: the sequence options here, the maths in its cell (or each cell of a StackedRNNCells)
            self._unknown_options(layer, config, _RNN_KEYS, where)
            cells = self._rnn_cells(layer, config, where)
        if self._flag(config, "time_major", False, where):
            self.problems.append(f"{where}: time_major=True; fastlstm reads batch-major (batch, time, features) input")
        if self._flag(config, "return_state", False, where) and self.graph.kind == SEQUENTIAL:
            self.problems.append(f"{where}: return_state=True in a Sequential model passes the states on as outputs; "
                                 "fastlstm returns states with predict(..., return_state=True)")
        direction = "reverse" if self._flag(config, "go_backwards", False, where) else "forward"
        steps = []
        for n, (kind, cell_config, cell_where) in enumerate(cells):
            # Inside a stack, each cell's output sequence feeds the next cell.
            return_sequences = self._flag(config, "return_sequences", False, where) if n == len(cells) - 1 else True
            step = self._cell(layer, kind, cell_config, cell_where, direction, return_sequences)
            if step is not None:
                steps.append(step)
        return steps if len(steps) == len(cells) else []

    def _rnn_cells(self, layer: KerasLayer, config: dict, where: str) -> list[tuple[str, dict, str]]:
        """The kind and config of each cell of an RNN layer, with where each is described in messages."""
        cell = cell_of_rnn = self._wrapped(config, "cell", layer)
        if cell is None:
            raise ModelFormatError(f"{self.source}: {where}: an RNN layer without a cell")
        if cell.get("class_name") == "StackedRNNCells":
            self._unknown_options(layer, cell["config"], _COMMON_KEYS | {"cells"}, f"{where} StackedRNNCells")
            cells = cell["config"].get("cells")
            if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("config"), dict)
                                                      for c in cells):
                raise ModelFormatError(f"{self.source}: {where}: StackedRNNCells cells is not a list of cells")
            if not cells:
                raise ModelFormatError(f"{self.source}: {where}: StackedRNNCells has no cells")
        else:
            cells = [cell]
        found = []
        for n, cell in enumerate(cells):
            cell_where = f"{where} cell {n} ({cell.get('class_name')!r})"
            if len(cells) > 1 or cells[0] is not cell_of_rnn:  # the RNN's own cell was checked by _wrapped
                custom = custom_class(cell)
                if custom:
                    self.problems.append(f"{cell_where} is {custom}")
            kind = RECURRENT_CELLS.get(cell.get("class_name")) if isinstance(cell.get("class_name"), str) else None
            if kind is None:
                self.problems.append(f"{cell_where}: fastlstm runs RNN layers of {', '.join(RECURRENT_CELLS)} "
                                     "cells only")
                continue
            self._unknown_options(layer, cell["config"], _CELL_KEYS[kind], cell_where)
            found.append((kind, cell["config"], cell_where))
        return found if len(found) == len(cells) else []

    def _cell(self, layer: KerasLayer, kind: str, config: dict, where: str, direction: str,
              return_sequences: bool) -> _Recurrent | None:
        """What one recurrent layer or cell of ``kind`` computes: its size, bias, activations and GRU variant.
        A simple RNN has no ``recurrent_activation`` (an unknown option there is refused)."""
        units = self._positive_int(config, "units", where)
        gate = SIGMOID if kind == "rnn" else self._activation(config.get("recurrent_activation", "sigmoid"),
                                                              f"{where} recurrent_activation")
        cell = self._activation(config.get("activation", "tanh"), f"{where} activation")
        for name, act in (("recurrent_activation", gate), ("activation", cell)):
            if act is not None and act.name == "softmax":
                self.problems.append(f"{where}: {name}='softmax' is not elementwise; fastlstm's recurrent cells "
                                     "take elementwise activations")
        use_bias = self._flag(config, "use_bias", True, where)
        # Absent only from configs older than the option, whose GRU reset before the product (module docstring).
        reset_after = self._flag(config, "reset_after", False, where) if kind == "gru" else True
        if gate is None or cell is None:
            return None
        return _Recurrent(layer, kind, units, direction, use_bias, return_sequences, gate, cell, reset_after)

    def _dense(self, layer: KerasLayer) -> _Dense | None:
        config = layer.config
        where = layer.describe()
        if layer.class_name == "TimeDistributed":
            self._unknown_options(layer, config, _TIME_DISTRIBUTED_KEYS)
            inner = self._wrapped(config, "layer", layer)
            if inner is None or inner.get("class_name") != "Dense":
                self.problems.append(_not_supported(layer))
                return None
            config, where = inner["config"], f"{where} (inner Dense)"
        self._unknown_options(layer, config, _DENSE_KEYS, where)
        self._refuse_adapted(config, where, "the kernel")
        units = self._positive_int(config, "units", where)
        activation = self._activation(config.get("activation", "linear"), f"{where} activation")
        if activation is None:
            return None
        return _Dense(layer, units, self._flag(config, "use_bias", True, where), activation)

    def _activation_layer(self, layer: KerasLayer) -> _ActivationOnly | None:
        config = layer.config
        if layer.class_name == "Softmax":
            self._unknown_options(layer, config, _COMMON_KEYS | {"axis"})
            if config.get("axis", -1) not in (-1, [-1]):
                self.problems.append(f"{layer.describe()}: softmax over axis {config.get('axis')!r}; fastlstm "
                                     "applies softmax over the last (feature) axis")
                return None
            activation = _ACTIVATIONS["softmax"]
        else:
            self._unknown_options(layer, config, _COMMON_KEYS | {"activation"})
            activation = self._activation(config.get("activation"), f"{layer.describe()} activation")
        if activation is None or activation == IDENTITY:
            return None
        return _ActivationOnly(layer, activation)

    # -------------------------------------------------------------------- options
    def _wrapped(self, config: dict, key: str, layer: KerasLayer) -> dict | None:
        """The serialised layer or cell under ``key`` (None if absent); a custom class in it is refused."""
        inner = _wrapped_layer(config, key, self.source, layer)
        custom = None if inner is None else custom_class(inner)
        if custom:
            self.problems.append(f"{layer.describe()}: {key} is {custom}")
        return inner

    def _activation(self, value, where: str) -> Activation | None:
        """The catalogue entry for a Keras activation name, as the version that wrote the model defines it."""
        name = value
        if isinstance(value, dict) and str(value.get("module", "")).startswith("keras"):
            name = value.get("config")  # Keras 3's serialised form of a built-in activation function
        if name is None:
            return IDENTITY
        if name == "hard_sigmoid":
            if self.keras_major is None:
                self.problems.append(f"{where}: hard_sigmoid, but the file does not record which Keras version "
                                     "wrote it, and Keras 2 (0.2x + 0.5) and Keras 3 (x/6 + 0.5) define it differently")
                return None
            return _KERAS3_HARD_SIGMOID if self.keras_major >= 3 else _KERAS2_HARD_SIGMOID
        if isinstance(name, str) and name in _ACTIVATIONS:
            return _ACTIVATIONS[name]
        described = repr(name) if isinstance(name, str) else "(a custom function)"
        self.problems.append(f"{where}: activation {described} is not supported; supported: {_SUPPORTED_ACTIVATIONS}")
        return None

    def _unknown_options(self, layer: KerasLayer, config: dict, known: set, where: str = "",
                         policies: tuple = _FLOAT_POLICIES) -> None:
        """Refuse options this importer does not know unless they are unset (None): ignoring one could change
        the maths, and even ``False`` or ``0`` can be a setting. Also refuses a dtype policy not in ``policies``
        (float32 or float64 unless given; mixed precision, quantization), which fastlstm would not match."""
        where = where or layer.describe()
        for key, value in config.items():
            if key not in known and value is not None:
                self.problems.append(f"{where}: option {key}={value!r} is not one fastlstm knows; refusing rather "
                                     "than ignoring it")
        dtype = config.get("dtype")
        policy = _policy_name(dtype)
        if isinstance(dtype, dict) and "Quantized" in str(dtype.get("class_name", "")):
            self.problems.append(f"{where}: quantized dtype policy; fastlstm runs float weights")
        elif policy not in policies:
            self.problems.append(f"{where}: dtype policy {policy!r} computes in another precision than float32 "
                                 "or float64; fastlstm would not reproduce its results")

    def _flag(self, config: dict, key: str, default: bool, where: str) -> bool:
        """A boolean option, which must be a boolean: ``"false"`` is not false."""
        value = config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ModelFormatError(f"{self.source}: {where}: {key}={value!r}, expected true or false")
        return value


def _policy_name(dtype):
    """The name of a layer's dtype policy: the ``dtype`` itself, or the ``name`` of Keras 3's serialised policy."""
    if isinstance(dtype, dict) and isinstance(dtype.get("config"), dict):
        return dtype["config"].get("name")
    return dtype


def _is_recurrent(class_name, wrapped: bool = False) -> bool:
    """Whether a layer class is recurrent (``Bidirectional`` included unless it is the layer wrapped)."""
    return isinstance(class_name, str) and (class_name in RECURRENT_LAYERS or class_name == "RNN"
                                            or not wrapped and class_name == "Bidirectional")


def _not_supported(layer: KerasLayer) -> str:
    wrapped = _wrapped_class(layer)
    shown = f"{layer.class_name}({wrapped or '?'})" if "layer" in layer.config else layer.class_name
    return (f"layer {shown} {layer.name!r} at position {layer.position} is not supported; supported: "
            f"{', '.join(SUPPORTED_LAYERS)}")


def _wrapped_layer(config: dict, key: str, source: str, layer: KerasLayer) -> dict | None:
    inner = config.get(key)
    if inner is None:
        return None
    if not isinstance(inner, dict) or not isinstance(inner.get("config"), dict):
        raise ModelFormatError(f"{source}: {layer.describe()}: {key} is not a serialised layer")
    return inner


def _wrapped_class(layer: KerasLayer) -> str | None:
    inner = layer.config.get("layer")
    return inner.get("class_name") if isinstance(inner, dict) and isinstance(inner.get("class_name"), str) else None


def _major_version(version, source: str) -> int | None:
    """The major version of a ``keras_version`` such as ``"3.4.1"`` or ``"2.13.1-tf"``; None if not recorded."""
    if version is None:
        return None
    match = re.fullmatch(r"(\d{1,6})(\.[0-9A-Za-z.+_-]{0,64})?", version, re.ASCII) if isinstance(version, str) \
        else None
    if match is None:
        shown = repr(version[:80]) if isinstance(version, str) else f"a {type(version).__name__}"
        raise ModelFormatError(f"{source}: keras_version is {shown}, not a version number such as '3.4.1'; "
                               "fastlstm needs it to know which Keras wrote the model")
    return int(match.group(1))


# ----------------------------------------------------------------------------------------- pass 2: the weights
def _build(plan: _Plan, weights_of: WeightsOf, read: ReadWeights, source: str) -> ModelSpec:
    """Check every layer's declared weights against the shapes the plan implies, then read them (all at once,
    nothing else) and assemble the spec. Nothing is read or allocated before every shape has been checked."""
    steps = [*([plan.embedding] if plan.embedding else []), *plan.recurrent, *plan.head]
    shapes = _expected_shapes(plan)
    reader = _WeightReader(weights_of, source)
    by_layer: dict[int, tuple[KerasLayer, list[tuple]]] = {}  # the fastlstm layers of a stack share one Keras layer
    for step, step_shapes in zip(steps, shapes):
        if step_shapes:
            by_layer.setdefault(step.layer.position, (step.layer, []))[1].extend(step_shapes)
    declared = [reader.check(layer, layer_shapes) for layer, layer_shapes in by_layer.values()]
    if reader.problems:
        reader.fail()
    stored = [weight for layer_weights in declared for weight in layer_weights]
    arrays = iter(reader.read(read, stored))
    budget = _SynthesisBudget(sum(int(np.prod(weight.shape)) for weight in stored), source)

    embedding = next(arrays) if plan.embedding else None
    layers: list[RecurrentLayer] = []
    merge_scale = None  # a pending Bidirectional sum/ave, folded into the next linear map
    for step in plan.recurrent:
        directions = 2 if step.direction == "bidirectional" else 1
        cells = []
        for _ in range(directions):
            kernel, recurrent = next(arrays), next(arrays)
            cells.append(_cell_weights(step, kernel, recurrent, next(arrays) if step.use_bias else None, merge_scale))
        layers.append(RecurrentLayer(
            input_size=cells[0].w_ih.shape[1], hidden_size=step.units, cells=tuple(cells), direction=step.direction,
            kind=step.kind, gate_activation=step.gate_activation, cell_activation=step.activation,
            output_activation=step.activation if step.kind == "lstm" else TANH, linear_before_reset=step.reset_after))
        merge_scale = step.merge_scale
    width = plan.recurrent[-1].units * (1 if plan.recurrent[-1].direction != "bidirectional" or merge_scale is not None
                                        else 2)

    head: list[DenseLayer] = []
    for step in plan.head:
        if isinstance(step, _Dense):
            weight = _fold_merge(np.ascontiguousarray(next(arrays).T), merge_scale)
            head.append(DenseLayer(weight, next(arrays) if step.use_bias else None, step.activation))
            merge_scale, width = None, step.units
        elif merge_scale is not None:
            head.append(DenseLayer(budget.merge_matrix(width, merge_scale), None, step.activation))
            merge_scale = None
        elif head and head[-1].activation == IDENTITY:
            head[-1] = replace(head[-1], activation=step.activation)  # Dense(linear) then Activation(f) = Dense(f)
        else:
            head.append(DenseLayer(budget.identity(width), None, step.activation))
    if merge_scale is not None:
        head.append(DenseLayer(budget.merge_matrix(width, merge_scale), None, IDENTITY))
    output = "sequence" if plan.recurrent[-1].return_sequences else "final_state"
    return ModelSpec(layers=tuple(layers), head=tuple(head), output=output, mask_value=plan.mask_value,
                     embedding=embedding, source=source)


def _expected_shapes(plan: _Plan) -> list[list[tuple]]:
    """The weight shapes each step of the plan needs, in ``get_weights()`` order (``None``: any size)."""
    shapes = []
    width = plan.input_features  # Keras-side feature width entering the next layer (None: not declared)
    if plan.embedding:
        shapes.append([(plan.embedding.input_dim, plan.embedding.output_dim)])
        width = plan.embedding.output_dim
    for step in plan.recurrent:
        H, directions = step.units, 2 if step.direction == "bidirectional" else 1
        G = GATE_COUNTS[step.kind]
        shapes.append(([(width, G * H), (H, G * H)] + ([step.bias_shape] if step.use_bias else [])) * directions)
        width = H if directions == 1 or step.merge_scale is not None else 2 * H
    for step in plan.head:
        if isinstance(step, _Dense):
            shapes.append([(width, step.units)] + ([(step.units,)] if step.use_bias else []))
            width = step.units
        else:
            shapes.append([])
    return shapes


def _cell_weights(step: _Recurrent, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray | None,
                  merge_scale: float | None) -> CellWeights:
    """One direction's weights in fastlstm's layout (module docstring): kernels transposed, a pending
    Bidirectional merge folded into the input weights; a GRU's gates z, r, h reordered to r, z, n, its
    recurrent bias added to the input bias for r and z and kept apart as ``candidate_bias`` for n (zeros when
    Keras has no recurrent bias: ``reset_after=False`` or ``use_bias=False``)."""
    size = GATE_COUNTS[step.kind] * step.units
    w_ih, w_hh = kernel.T, recurrent.T
    if bias is None:
        bias = np.zeros(step.bias_shape, kernel.dtype)
    if step.kind != "gru":
        return CellWeights(w_ih=_fold_merge(np.ascontiguousarray(w_ih), merge_scale),
                           w_hh=np.ascontiguousarray(w_hh), bias=bias)
    H = step.units
    order = np.r_[H:2 * H, 0:H, 2 * H:3 * H]  # Keras' z, r, h rows as r, z, n
    input_bias, recurrent_bias = (bias[0], bias[1]) if bias.ndim == 2 else (bias, np.zeros(size, bias.dtype))
    folded = input_bias[order] + np.concatenate([recurrent_bias[order][:2 * H], np.zeros(H, bias.dtype)])
    return CellWeights(w_ih=_fold_merge(np.ascontiguousarray(w_ih[order]), merge_scale),
                       w_hh=np.ascontiguousarray(w_hh[order]), bias=folded,
                       candidate_bias=np.ascontiguousarray(recurrent_bias[2 * H:]))


def _fold_merge(weight: np.ndarray, scale: float | None) -> np.ndarray:
    """A linear map of ``scale * (y_forward + y_backward)`` as a map of ``concat(y_forward, y_backward)``:
    the weight ``(out, H)`` repeated for both halves, ``(out, 2H)``. ``None``: nothing to fold."""
    if scale is None:
        return weight
    return np.ascontiguousarray(np.concatenate([weight, weight], axis=1) * weight.dtype.type(scale))


class _SynthesisBudget:
    """The dense layers the importer adds (identities for activation layers, Bidirectional merges) may hold at
    most as many values as the weights read, plus ``_SYNTHESIS_ALLOWANCE``: a config cannot make the importer
    allocate more than its file holds."""

    def __init__(self, weight_values: int, source: str):
        self.remaining = weight_values + _SYNTHESIS_ALLOWANCE
        self.source = source

    def identity(self, width: int) -> np.ndarray:
        self._spend(width * width)
        return np.eye(width, dtype=np.float32)

    def merge_matrix(self, width: int, scale: float) -> np.ndarray:
        """``[sI sI]`` ``(H, 2H)``: Bidirectional's sum (s = 1) or average (s = 1/2) of the two directions."""
        self._spend(2 * width * width)
        return _fold_merge(np.eye(width, dtype=np.float32), scale)

    def _spend(self, values: int) -> None:
        self.remaining -= values
        if self.remaining < 0:
            raise UnsupportedModelError([
                "the activation and merge layers of the head would need more identity-matrix values than the "
                f"model has weights (+{_SYNTHESIS_ALLOWANCE}); fastlstm adds a dense layer for each activation "
                "layer that does not follow a linear dense layer"], hint=f"({self.source})")


class _WeightReader:
    """Checks each layer's declared weights (count, shapes, dtypes) against the config; collects the problems."""

    def __init__(self, weights_of: WeightsOf, source: str):
        self.weights_of = weights_of
        self.source = source
        self.problems: list[str] = []

    def check(self, layer: KerasLayer, shapes: list[tuple]) -> list:
        """The declared weights of ``layer`` (arrays, or datasets not yet read) if they match ``shapes``
        (``None`` matches any size); else the problems are noted and ``[]`` returned."""
        where = layer.describe()
        try:
            weights = list(self.weights_of(layer))
        except FastLSTMError:
            raise
        except Exception as exc:
            raise ModelFormatError(f"{self.source}: cannot get the weights of {where}: {exc}") from None
        if len(weights) != len(shapes):
            hint = " (was the model built? call it once or give it an Input)" if not weights else ""
            self.problems.append(f"{where}: expected {len(shapes)} weight arrays, found {len(weights)}{hint}")
            return []
        problems = []
        for n, (weight, expected) in enumerate(zip(weights, shapes)):
            shape = tuple(getattr(weight, "shape", None) or ())
            if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
                wanted = tuple("?" if e is None else e for e in expected)
                problems.append(f"{where}: weight {n} has shape {shape}, expected {wanted}")
            elif getattr(getattr(weight, "dtype", None), "kind", None) != "f":
                problems.append(f"{where}: weight {n} has dtype {getattr(weight, 'dtype', None)}, expected floats")
        self.problems += problems
        return [] if problems else weights

    def read(self, read: ReadWeights, stored: list) -> list[np.ndarray]:
        """The arrays of the checked weights: float64 kept, anything else as float32."""
        try:
            arrays = [np.asarray(array) for array in read(stored)]
        except FastLSTMError:
            raise
        except Exception as exc:
            raise ModelFormatError(f"{self.source}: cannot read the weights: {exc}") from None
        if [a.shape for a in arrays] != [tuple(w.shape) for w in stored]:
            raise ModelFormatError(f"{self.source}: the weights read differ in shape from the ones declared")
        return [np.array(a, dtype=np.float64 if a.dtype == np.float64 else np.float32) for a in arrays]

    def fail(self):
        raise InvalidModelError(self.problems, context=f"Keras model ({self.source})")


def _no_options(options: dict) -> None:
    if options:
        raise TypeError(f"options {sorted(options)} do not apply to Keras models (the file or model says it all)")
