"""The user-facing objects: ``Model`` (immutable, shared) and ``Stream`` (one per live sequence).

``Model`` pairs a validated ``ModelSpec`` with its backend-prepared recurrent stack and dense head. It holds
no mutable state, so one model serves any number of threads. ``Stream`` owns the recurrent state and every
buffer a step needs, allocated and validated once at creation, so ``step`` only copies the input in,
runs the kernel (the recurrent step and the head, one call) and copies the output out.

The state reaches the backends as two flat arrays (``fastlstm.backends.base``); ``fastlstm.state`` turns the
user's form into them and back. A model with an embedding takes integer token ids: the table lookup runs
here, before the backend, so backends only ever see feature vectors.

A model pickles as its native file's bytes and its load options, never code or compiled kernels, so it
can be sent to worker processes (Dask, Ray, ``multiprocessing``); unpickling prepares it once per process
(``restore_model``).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections import OrderedDict
from functools import cached_property

import numpy as np

from ._arrays import as_real_array
from .backends import prepare
from .backends.base import state_blocks
from .errors import InvalidInputError, ModelFormatError
from .head import has_head, head_buffer_sizes
from .limits import check_allocation
from .native import native_bytes, save_native, spec_from_native_bytes
from .quantize import weight_format
from .spec import ModelSpec
from .state import StateCodec

SUPPORTED_DTYPES = ("float32", "float64")
# Input dtypes a stream step accepts without conversion (a set lookup is the cheapest check per step).
_REAL_DTYPES = frozenset(np.dtype(t) for t in "?bBhHiIlLqQefdg")
_INTEGER_DTYPES = frozenset(np.dtype(t) for t in "bBhHiIlLqQ")


class Model:
    """A recurrent network ready to run. Build one with ``fastlstm.load``."""

    def __init__(self, spec: ModelSpec, *, backend: str = "auto", dtype="float32", num_threads: int | None = None,
                 weights: str | None = None):
        self.dtype = _run_dtype(dtype)
        self.spec = spec.validate()
        self._lstm = prepare(spec, backend, self.dtype, num_threads, weight_format(weights, spec, self.dtype))
        self._has_head = has_head(spec)
        self._state = StateCodec(spec, self.dtype)
        self._embedding = None if spec.embedding is None else np.ascontiguousarray(spec.embedding, dtype=self.dtype)
        # The keyword arguments that prepare this model again from its spec, sent with it when it is pickled:
        # the backend and weight format as chosen (every process runs the same kernels), the threads as given
        # (None: the cores each receiving process may run on).
        self._options = {"backend": self._lstm.backend, "dtype": self.dtype.name, "num_threads": num_threads,
                         "weights": self._lstm.weights}
        self._native: bytes | None = None  # the native file's bytes, made on first pickling

    @property
    def backend(self) -> str:
        """The backend that runs this model (what ``backend="auto"`` chose)."""
        return self._lstm.backend

    @property
    def weights(self) -> str:
        """How the recurrent gate weights are stored: ``"float32"`` (the run dtype's own), ``"bfloat16"`` or
        ``"int8"`` (``fastlstm.quantize``)."""
        return self._lstm.weights

    @property
    def num_threads(self) -> int:
        """The most threads one call may use (the cores available unless ``num_threads`` was given)."""
        return self._lstm.num_threads

    @property
    def input_size(self) -> int:
        """Features per time step (for a model that takes token ids: the embedding width)."""
        return self.spec.input_size

    @property
    def output_size(self) -> int:
        return self.spec.output_size

    @property
    def takes_token_ids(self) -> bool:
        """True when the model starts with an embedding: inputs are integer token ids, not features."""
        return self.spec.takes_token_ids

    @property
    def state_form(self) -> str:
        """``"h_c"``, ``"h"`` or ``"per_layer"``: how states are given and returned (see the README)."""
        return self.spec.state_form

    def __repr__(self) -> str:
        desc = ", ".join(
            f"{l.direction} {l.kind} {l.input_size}->{l.hidden_size}" + (f" proj {l.proj_size}" if l.proj_size else "")
            for l in self.spec.layers
        )
        embedding = f"embedding {self.spec.embedding.shape}, " if self.takes_token_ids else ""
        head = f", head {[d.out_features for d in self.spec.head]}" if self.spec.head else ""
        return (f"<fastlstm.Model {embedding}{len(self.spec.layers)} layer(s) [{desc}]{head}, "
                f"output={self.spec.output!r}, backend={self.backend!r}, dtype={self.dtype}"
                + ("" if self.weights == "float32" else f", weights={self.weights!r}") + ">")

    # ------------------------------------------------------------------ whole sequences
    def predict(self, x, state=None, *, lengths=None, return_state: bool = False):
        """Run whole sequences.

        ``x`` is ``(B, T, F)`` (batch first) or one sequence ``(T, F)``; any real dtype and memory layout. A
        model that takes token ids (``takes_token_ids``) takes integer ids ``(B, T)`` or ``(T,)`` instead.
        ``state`` is an optional initial state in the model's form (``state_form``; PyTorch's shapes, e.g.
        ``(h0, c0)`` each ``(layers * directions, B, size)`` for an LSTM stack, without ``B`` for one unbatched
        sequence); zeros when left out.
        ``lengths`` (``(B,)`` integers in ``0..T``) gives each sequence of a padded batch its own length, with
        ONNX ``sequence_lens`` semantics: outputs past a sequence's end are zero, the returned state and a
        last-step output are those of its last valid step, and a reverse direction starts from its own end;
        a sequence of length 0 outputs zeros and returns its initial state.
        Returns ``y`` — ``(B, T, O)`` when the model outputs every step, ``(B, O)`` when it outputs the last
        step only (without the batch axis for an unbatched ``x``) — and, with ``return_state=True``,
        ``(y, final_state)`` in the model's state form.
        """
        x, unbatched = self._sequence_input(x)
        batch, steps = x.shape[0], x.shape[1]
        check_allocation(self._predict_bytes(batch, steps), f"predict() on x of shape {_shape(x, unbatched)}")
        lengths = self._lengths(x, lengths, unbatched)
        if state is None:
            h, c = self._state.zeros(batch)
        else:
            h, c = self._state.to_flat(state, batch, unbatched)
        if self._embedding is not None:
            x = self._embedding[x]  # (B, T, E): the lookup of every id, a new contiguous array
        else:
            x = np.ascontiguousarray(x, dtype=self.dtype)

        y = self._run_rows_with_steps(x, h, c, lengths)
        if self.spec.output == "last_step":
            # A row of length 0 has no last step: its output is zeros, like every output past a row's end.
            y = y[:, -1] if lengths is None else y[np.arange(batch), np.maximum(lengths - 1, 0)]
        elif self.spec.output == "final_state":
            y = self._final_hidden(h, batch)
        if self._has_head:
            rows = y.shape[:-1]  # (B, T) for every step, (B,) for the last step or the final state
            y = self._lstm.run_head(np.ascontiguousarray(y.reshape(-1, y.shape[-1])))
            y = y.reshape(*rows, y.shape[-1])
        if unbatched:
            y = y[0]
        return (y, self._state.from_flat(h, c, batch, unbatched)) if return_state else y

    def _sequence_input(self, x) -> tuple[np.ndarray, bool]:
        """``x`` as a checked ``(B, T, F)`` array (``(B, T)`` of int64 ids for a token model), and whether it
        came without the batch axis."""
        if self._embedding is not None:
            ids = _as_token_ids(x, "x", self.spec.vocab_size)
            if ids.ndim not in (1, 2):
                raise InvalidInputError(f"x: this model takes token ids, shape (batch, time) or (time,); got {ids.shape}")
            unbatched = ids.ndim == 1
            ids = ids[None] if unbatched else ids
            if ids.size == 0:
                raise InvalidInputError(f"x: expected at least one sequence of at least one step, got shape {_shape(ids, unbatched)}")
            return ids, unbatched
        x = as_real_array(x, "x")
        if x.ndim not in (2, 3):
            raise InvalidInputError(f"x: expected shape (batch, time, {self.input_size}) or (time, {self.input_size}), got {x.shape}")
        unbatched = x.ndim == 2
        if unbatched:
            x = x[None]
        if x.shape[2] != self.input_size:
            raise InvalidInputError(f"x: expected {self.input_size} features on the last axis, got shape {_shape(x, unbatched)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InvalidInputError(f"x: expected at least one sequence of at least one step, got shape {_shape(x, unbatched)}")
        return x, unbatched

    def _final_hidden(self, h: np.ndarray, batch: int) -> np.ndarray:
        """Each direction of the last layer's final ``h``, concatenated: ``(B, D * R)``."""
        last = self.spec.layers[-1]
        blocks = state_blocks(self.spec, batch)[-last.num_directions:]
        return np.concatenate([h[hs:hs + batch * hn].reshape(batch, hn) for hs, hn, _, _ in blocks], axis=-1)

    def _run_rows_with_steps(self, x: np.ndarray, h: np.ndarray, c: np.ndarray, lengths) -> np.ndarray:
        """The recurrent stack over ``x``, leaving rows of length 0 out of the backend call.

        A row of length 0 (ONNX Runtime's semantics) outputs zeros at every step and keeps its initial
        state; backends only ever see lengths in ``1..T``.
        """
        if lengths is None or np.all(lengths > 0):
            return self._lstm.run_sequence(x, h, c, lengths)
        batch, steps, _ = x.shape
        y = np.zeros((batch, steps, self.spec.recurrent_output_size), self.dtype)
        rows = np.flatnonzero(lengths)
        if rows.size:
            h_rows, c_rows = self._state.take_rows(h, c, batch, rows)
            row_lengths = lengths[rows]
            y[rows] = self._lstm.run_sequence(np.ascontiguousarray(x[rows]), h_rows, c_rows,
                                              None if np.all(row_lengths == steps) else row_lengths)
            self._state.put_rows(h, c, batch, rows, h_rows, c_rows)
        return y

    def _predict_bytes(self, batch: int, steps: int) -> int:
        """An upper estimate of what ``predict`` allocates for ``(batch, steps)``: the input in the run dtype,
        every layer's output and gate pre-activations, and the head's outputs."""
        spec = self.spec
        per_step = spec.input_size + sum(head_buffer_sizes(spec)) + spec.output_size
        for layer in spec.layers:
            per_step += layer.num_directions * (layer.output_size + layer.num_gates * layer.hidden_size)
        return int(batch) * int(steps) * per_step * self.dtype.itemsize

    def _lengths(self, x: np.ndarray, lengths, unbatched: bool) -> np.ndarray | None:
        """Checked per-sequence lengths (int64), from ``lengths`` or the model's mask; None when all are T."""
        batch, steps = x.shape[0], x.shape[1]
        if lengths is not None:
            given = as_real_array(lengths, "lengths")
            expected = () if unbatched else (batch,)
            if given.shape != expected and not (unbatched and given.shape == (1,)):
                raise InvalidInputError(f"lengths: expected shape {expected} (one length per sequence), got {given.shape}")
            if given.dtype.kind == "f" and not np.all(given == np.round(given)):
                raise InvalidInputError(f"lengths: expected whole numbers, got {given}")
            lengths = given.reshape(batch).astype(np.int64)
            if np.any(lengths < 0) or np.any(lengths > steps):
                raise InvalidInputError(f"lengths: expected values in 0..{steps} (the time axis), got {lengths.tolist()}")
        if self.spec.mask_value is not None:
            masked = _masked_steps(x, self.spec.mask_value, self._embedding is not None)  # (B, T)
            unmasked_count = steps - np.argmin(masked[:, ::-1], axis=1)
            unmasked_count[np.all(masked, axis=1)] = 0
            trailing = np.arange(steps)[None, :] >= unmasked_count[:, None]
            if np.any(masked & ~trailing):
                what = "token id ==" if self._embedding is not None else "all features =="
                raise InvalidInputError(
                    f"x: masked time steps ({what} {self.spec.mask_value}) occur before the end of a "
                    "sequence; predict() supports masks that pad the end of sequences only (a stream skips "
                    "masked steps anywhere)")
            lengths = unmasked_count if lengths is None else np.minimum(lengths, unmasked_count)
        if lengths is not None and np.all(lengths == steps):
            return None
        return lengths

    # ------------------------------------------------------------------ streaming
    def stream(self, batch_size: int = 1) -> "Stream":
        """A ``Stream`` that steps ``batch_size`` sequences together, one time step per call, from zero state."""
        return Stream(self, batch_size)

    def stream_pool(self, capacity: int = 10_000, max_idle_seconds: float | None = None, on_evict=None, *,
                    max_batch: int = 64, max_delay_us: float = 200.0, on_batch=None) -> "StreamPool":
        """A ``StreamPool``: up to ``capacity`` live sequences, each under a key, stepped together as one batch.

        ``max_idle_seconds`` evicts a stream that has not stepped for that long, first handing
        ``on_evict(key, snapshot)`` its state; ``max_batch`` is the most rows one kernel call runs, and
        ``submit`` runs a batch once ``max_batch`` steps wait or the oldest has waited ``max_delay_us``.
        ``on_batch(size, seconds)`` is called after every batch run (for metrics).
        """
        from .pool import StreamPool

        return StreamPool(self, capacity, max_idle_seconds, on_evict, max_batch=max_batch, max_delay_us=max_delay_us,
                          on_batch=on_batch)

    @cached_property
    def fingerprint(self) -> str:
        """A hex digest of this model's weights and structure: equal for every load of the same model, on any
        backend and dtype (a state snapshot carries it and restores only into a model with the same one)."""
        return self._state.fingerprint.hex()

    def save(self, path) -> None:
        """Write the model to ``path`` in fastlstm's native format (read back by ``fastlstm.load``, NumPy only)."""
        save_native(self.spec, path)

    def __reduce__(self):
        """Pickle as the native file's bytes and the load options (never code, never compiled kernels)."""
        return restore_model, self.native_bytes_and_options()

    def native_bytes_and_options(self) -> tuple[bytes, dict]:
        """What a pickle of this model holds: its native file's bytes and the load options that prepare it
        again, ``restore_model``'s arguments. For engines whose coordinator must not prepare models (Dask's
        scheduler unpickles task graphs): they ship these as plain data and workers call ``restore_model``."""
        if self._native is None:
            self._native = native_bytes(self.spec)
        return self._native, dict(self._options)

    def warmup(self) -> "Model":
        """Do the first call's work now rather than in the first real call: load or compile the backend's
        kernels and run a tiny ``predict`` (with and without ``lengths``) and, for a forward model, one stream
        step. Returns the model itself."""
        spec = self.spec
        if self._embedding is not None:
            token = 0 if spec.mask_value != 0 else min(1, spec.vocab_size - 1)
            x = np.full((2, 2), token, np.int64)
        else:
            x = np.full((2, 2, spec.input_size), 0.25 if spec.mask_value == 0.5 else 0.5, self.dtype)
        self.predict(x)
        self.predict(x, lengths=[2, 1])
        if spec.is_unidirectional_forward:
            self.stream(1).step(x[0, 0])
        return self


def restore_model(data: bytes, options: dict) -> Model:
    """The model in ``data`` (a native file's bytes) prepared with ``options`` (``Model``'s keyword arguments):
    what unpickling a ``Model`` calls.

    Each process prepares a given model once: models are cached by a fingerprint of the bytes and options,
    so the same model sent with many tasks is read, validated and prepared on the first only. The cache
    holds the ``_PREPARED_CAPACITY`` most recently used models. Corrupt bytes raise ``ModelFormatError``.
    """
    global _preparations
    name = "pickled fastlstm model"
    if not isinstance(options, dict) or not set(options) <= _MODEL_OPTIONS:
        raise ModelFormatError(f"{name}: load options {options!r} are not a dict of {sorted(_MODEL_OPTIONS)} "
                               "(pickled by another version of fastlstm?)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ModelFormatError(f"{name}: expected the bytes of a fastlstm native file, got {type(data).__name__}")
    data = bytes(data)
    key = hashlib.sha256(data).hexdigest() + repr(sorted(options.items()))
    with _prepared_lock:
        model = _prepared.get(key)
        if model is None:
            spec = spec_from_native_bytes(data, name)
            try:
                model = Model(spec, **options)
            except TypeError as exc:  # an option of the wrong type, e.g. a backend that is not a name
                raise ModelFormatError(f"{name}: load options {options!r}: {exc}") from None
            model._native = data
            _prepared[key] = model
            _preparations += 1
            while len(_prepared) > _PREPARED_CAPACITY:
                _prepared.popitem(last=False)
        else:
            _prepared.move_to_end(key)
    return model


def preparation_count() -> int:
    """How many models ``restore_model`` has read and prepared in this process (each model once while cached):
    the number to watch when checking that workers do not prepare a model per task."""
    return _preparations


_MODEL_OPTIONS = frozenset(p for p in inspect.signature(Model.__init__).parameters if p not in ("self", "spec"))
_PREPARED_CAPACITY = 8
_prepared: OrderedDict[str, Model] = OrderedDict()
_prepared_lock = threading.Lock()  # held while preparing, so threads unpickling one model prepare it once
_preparations = 0


class Stream:
    """The recurrent state of ``batch_size`` sequences advanced one time step per ``step`` call.

    Only forward (unidirectional) models stream: a reverse direction needs the future of the sequence.
    A stream is not thread-safe; give each thread (or each live sequence) its own.
    """

    def __init__(self, model: Model, batch_size: int = 1):
        spec = model.spec
        if not spec.is_unidirectional_forward:
            directions = sorted({layer.direction for layer in spec.layers} - {"forward"})
            raise InvalidInputError(
                f"stream(): this model has {' and '.join(directions)} layers, which need the whole sequence; "
                "use predict() on complete sequences instead"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidInputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        check_allocation(_stream_bytes(model, int(batch_size)), f"stream(batch_size={batch_size})")
        self.model = model
        self.batch_size = batch = int(batch_size)
        self._codec = model._state
        self._h, self._c = self._codec.zeros(batch)
        self._x = np.zeros((batch, spec.input_size), model.dtype)
        self._x_row = self._x[0]
        top_start, top_size, _, _ = state_blocks(spec, batch)[-1]
        self._top = self._h[top_start:top_start + batch * top_size].reshape(batch, top_size)
        self._workspace = model._lstm.new_workspace(batch)
        # The step leaves its output (the head's, or the top layer's h) in the workspace's buffer.
        self._output = self._workspace.output
        self._output_row = self._output[0]
        self._step = model._lstm.step
        self._run_head = model._lstm.run_head
        self._embedding = model._embedding
        self._vocab_size = spec.vocab_size
        if self._embedding is not None:
            self._batched_shape = (batch,)
            self._unbatched_shape = () if batch == 1 else None
        else:
            self._batched_shape = (batch, spec.input_size)
            self._unbatched_shape = (spec.input_size,) if batch == 1 else None
        self._batched_out_shape = (batch, spec.output_size)
        self._unbatched_out_shape = (spec.output_size,)
        self._dtype = model.dtype
        self._mask_value = spec.mask_value

    def step(self, x_t, out: np.ndarray | None = None) -> np.ndarray:
        """Feed one time step ``x_t`` ``(B, F)`` (or ``(F,)`` when ``batch_size`` is 1); return its output.

        A model that takes token ids takes ``(B,)`` integer ids (or one int when ``batch_size`` is 1). The
        output is ``(B, O)`` (``(O,)`` for an unbatched ``x_t``), a new array unless ``out`` is given, in
        which case it is written there and ``out`` is returned.
        """
        # The hot path: an ndarray of a real dtype and the expected shape is copied (and cast) straight into
        # the stream's input buffer; everything else goes through the general conversion and its errors.
        # Every argument is checked before the state is touched: a refused call leaves the stream as it was.
        if self._embedding is None:
            if type(x_t) is not np.ndarray or x_t.dtype not in _REAL_DTYPES:
                x_t = as_real_array(x_t, "x_t")
        elif type(x_t) is int and self._unbatched_shape is not None and 0 <= x_t < self._vocab_size:
            x_t = np.intp(x_t)  # the hot path of a one-sequence text stream: one valid id
        elif not (type(x_t) is np.ndarray and x_t.dtype in _INTEGER_DTYPES and x_t.shape == self._batched_shape
                  and _ids_in_range(x_t, self._vocab_size)):
            x_t = _as_token_ids(x_t, "x_t", self._vocab_size)
        shape = x_t.shape
        if shape == self._unbatched_shape:
            unbatched = True
        elif shape == self._batched_shape:
            unbatched = False
        else:
            raise InvalidInputError(
                f"x_t: expected shape {self._batched_shape}"
                + (f" or {self._unbatched_shape}" if self._unbatched_shape is not None else "")
                + f", got {shape}"
            )
        if out is not None:
            expected = self._unbatched_out_shape if unbatched else self._batched_out_shape
            if (type(out) is not np.ndarray or out.shape != expected or out.dtype is not self._dtype
                    or not out.flags.writeable):
                self._check_out(out, expected)
        if self._embedding is not None:
            if unbatched:
                self._x_row[...] = self._embedding[x_t]
            else:
                np.take(self._embedding, x_t, axis=0, out=self._x)
        elif unbatched:
            self._x_row[...] = x_t
        else:
            self._x[...] = x_t
        # The backend updates h in place and runs the head into the output buffer (views made once, above).
        if self._mask_value is None:
            self._step(self._x, self._h, self._c, self._workspace)
        else:
            self._step_with_mask(x_t)
        y = self._output_row if unbatched else self._output
        if out is None:
            return y.copy()
        out[...] = y
        return out

    def _step_with_mask(self, x_t: np.ndarray) -> None:
        """A step of a model with a Keras ``Masking`` layer (or ``mask_zero`` embedding): a row whose features
        all equal the mask value (whose id equals it) is skipped, as Keras skips it: its state is carried
        and its output is the previous step's. ``x_t`` is the step's checked input, batched or not."""
        rows = x_t.reshape(self.batch_size) if self._embedding is not None else x_t.reshape(self.batch_size, -1)
        masked = np.flatnonzero(_masked_steps(rows, self._mask_value, self._embedding is not None))
        if masked.size == 0:
            self._step(self._x, self._h, self._c, self._workspace)
            return
        carried = self._codec.take_rows(self._h, self._c, self.batch_size, masked)
        self._step(self._x, self._h, self._c, self._workspace)
        self._codec.put_rows(self._h, self._c, self.batch_size, masked, *carried)
        # The step ran the head on every row; a skipped row's output is the head of its carried state.
        self._output[masked] = self._run_head(np.ascontiguousarray(self._top[masked]))

    def _check_out(self, out, shape: tuple[int, ...]) -> None:
        """The full check of an ``out=`` the fast one in ``step`` did not pass (it compares dtypes by identity):
        raise what is wrong with it, or return if it is fine after all."""
        if type(out) is not np.ndarray or out.shape != shape or out.dtype != self._dtype:
            raise InvalidInputError(
                f"out: expected a NumPy array of shape {shape} and dtype {self._dtype}, got "
                + (f"{type(out).__name__} of shape {out.shape} dtype {out.dtype}" if isinstance(out, np.ndarray)
                   else type(out).__name__))
        if not out.flags.writeable:
            raise InvalidInputError("out: the array is read-only")

    def reset(self) -> None:
        """Zero the state, as at creation."""
        self._h[...] = 0
        self._c[...] = 0

    def snapshot(self) -> bytes:
        """The state of every row as bytes: versioned, tied to this model's weights and structure, checksummed.
        ``restore`` reads it back, here or in another process that loaded the same model (any backend or dtype),
        and so does ``StreamPool.restore`` for a stream of batch size 1."""
        return self._codec.to_blob(self._h, self._c, self.batch_size)

    def restore(self, blob) -> None:
        """Set the state from a ``snapshot`` of this model (a ``StreamPool`` snapshot for batch size 1); one made
        in the other dtype is cast, as a ``state=`` would be.
        A blob of another model or batch size, a corrupt, truncated or other-version one raises
        ``InvalidInputError`` and leaves the stream as it was."""
        h, c = self._codec.from_blob(blob, self.batch_size, "restore()")
        self._h[...], self._c[...] = h, c

    @property
    def state(self):
        """A copy of the state in the model's form (``Model.state_form``), each array ``(rows, batch_size, size)``
        as PyTorch lays them out."""
        return self._codec.from_flat(self._h, self._c, self.batch_size, unbatched=False)

    @state.setter
    def state(self, value) -> None:
        try:
            h, c = self._codec.to_flat(value, self.batch_size, unbatched=False)
        except InvalidInputError:
            if self.batch_size != 1:
                raise
            try:  # one sequence may also be given without its batch axis
                h, c = self._codec.to_flat(value, 1, unbatched=True)
            except InvalidInputError:
                pass
            else:
                self._h[...], self._c[...] = h, c
                return
            raise
        # Every part checked before any is written: a rejected state leaves the stream untouched.
        self._h[...], self._c[...] = h, c


class StreamInternals:
    """Internal, not public API: what ``fastlstm.pool`` needs of a ``Model`` and its ``Stream``s beyond their
    public methods, in one named place, so that coupling is visible here and changes with this module.

    The pool keeps many streams' state in arrays of its own and runs batches through internal ``Stream``s: it
    needs the model's state codec (snapshots), what a stream of a given batch size allocates (to check its
    memory up front), the input checks ``Stream.step`` applies, and a stream's flat state arrays to gather rows
    into and scatter them from.
    """

    __slots__ = ("model", "state_codec")

    def __init__(self, model: Model):
        self.model = model
        self.state_codec: StateCodec = model._state

    @staticmethod
    def flat_state(stream: "Stream") -> tuple[np.ndarray, np.ndarray]:
        """The stream's flat ``(h, c)`` state (``fastlstm.backends.base``'s layout), the arrays it steps in place."""
        return stream._h, stream._c

    def stream_bytes(self, batch_size: int) -> int:
        """An upper estimate of what a ``Stream`` of ``batch_size`` rows allocates."""
        return _stream_bytes(self.model, batch_size)

    @staticmethod
    def checked_features(x, name: str) -> np.ndarray:
        """``x`` as an array of a real dtype, without a copy when it is one already (``Stream.step``'s check)."""
        return x if type(x) is np.ndarray and x.dtype in _REAL_DTYPES else as_real_array(x, name)

    def checked_token_ids(self, x, name: str) -> np.ndarray:
        """``x`` as int64 token ids, each checked to lie in the model's vocabulary."""
        return _as_token_ids(x, name, self.model.spec.vocab_size)


def _run_dtype(value) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or str(dtype) not in SUPPORTED_DTYPES:
        raise InvalidInputError(f"dtype: expected one of {SUPPORTED_DTYPES}, got {value!r}")
    return dtype


def _stream_bytes(model: Model, batch_size: int) -> int:
    """An upper estimate of what a stream of ``batch_size`` rows allocates: state, input, the backend's
    scratch (at most the gate pre-activations and outputs of every layer) and the head's buffers."""
    spec = model.spec
    per_row = sum(row.h_size + row.c_size for row in spec.state_rows()) + spec.input_size
    per_row += sum(head_buffer_sizes(spec))
    per_row += sum(layer.num_gates * layer.hidden_size + 2 * layer.output_size for layer in spec.layers)
    return batch_size * per_row * model.dtype.itemsize


def _masked_steps(x: np.ndarray, mask_value: float, token_ids: bool) -> np.ndarray:
    """Which steps are padding (an id equal to the mask value, or every feature equal to it): ``(B, T)`` for
    a sequence batch, ``(B,)`` for one step of a stream."""
    return x == mask_value if token_ids else np.all(x == mask_value, axis=-1)


def _ids_in_range(ids: np.ndarray, vocab_size: int) -> bool:
    """Whether every id of an integer array lies in ``0..vocab_size-1``: one pass, negatives read as huge
    unsigned numbers."""
    if ids.dtype.kind == "i":
        ids = ids.view(ids.dtype.str.replace("i", "u"))
    return ids.size == 0 or int(ids.max()) < vocab_size


def _as_token_ids(value, name: str, vocab_size: int) -> np.ndarray:
    """``value`` as int64 token ids, each checked to lie in ``0..vocab_size-1``."""
    if type(value) is not np.ndarray or value.dtype not in _INTEGER_DTYPES:
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise InvalidInputError(f"{name}: could not be read as token ids ({exc})") from None
        if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and array.size == 0):
            raise InvalidInputError(f"{name}: this model takes integer token ids; got dtype {array.dtype}")
        value = array
    if not _ids_in_range(value, vocab_size):
        bad = value[(value < 0) | (value >= vocab_size)].reshape(-1)[:5].tolist()
        raise InvalidInputError(f"{name}: token ids must lie in 0..{vocab_size - 1} (the vocabulary has "
                                f"{vocab_size} tokens); got {bad}")
    return value.astype(np.int64, copy=False)


def _shape(x: np.ndarray, unbatched: bool) -> tuple[int, ...]:
    return x.shape[1:] if unbatched else x.shape
