"""``StreamPool``: many live sequences, each under a key, whose ready steps run as one batch.

A service holds thousands of live sequences and gets a new frame for a few of them at a time. Stepping
those few together reads the weights once for all of them instead of once per sequence. The pool owns the
state of every stream in slot arrays (per state row of the flat layout of ``fastlstm.backends.base``, a
``(slots, size)`` array, grown geometrically up to ``capacity``), with a key -> slot dict and a free list.
A batch step gathers the chosen slots' rows into the flat state of an internal ``Stream``, runs that
stream's ``step`` (the same compiled step, mask handling and dense head as any stream) and scatters the
state back. Internal streams exist for batch sizes rounded up to powers of two, at most ``max_batch``
rows: rows past the batch are padding whose results are ignored. Nothing per step is proportional to the
pool's size: the work is the batch's, and idle eviction reads only the oldest streams of an ordered dict.

``submit`` hands one step to a batcher thread that gathers the steps of concurrent callers into batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future

import numpy as np

from ._arrays import as_real_array
from .backends.base import state_views
from .errors import InvalidInputError
from .limits import check_allocation
from .model import _REAL_DTYPES, Model, Stream, _as_token_ids, _stream_bytes

_FIRST_SLOTS = 16
# Bookkeeping per live stream beyond its state, measured with tracemalloc (CPython 3.11, 64-bit): its
# entries in the key -> slot dict and (with max_idle_seconds) the idle-order dict, and its last-step time.
BOOKKEEPING_BYTES_PER_STREAM = 200

_now = time.monotonic
_log = logging.getLogger(__name__)


class _BatchRunner:
    """An internal ``Stream`` of ``size`` rows with the buffers a pool batch goes through: its input, its
    output, and per state row the ``(size, width)`` views of its flat state that slots gather into."""

    __slots__ = ("size", "stream", "x", "out", "state_views")

    def __init__(self, model: Model, size: int, token_ids: bool):
        self.size = size
        self.stream = Stream(model, size)
        self.x = np.zeros(size, np.int64) if token_ids else np.zeros((size, model.input_size), model.dtype)
        self.out = np.zeros((size, model.output_size), model.dtype)
        # Same order as the pool's slot arrays: per state row its h block, then its c block if it has one.
        self.state_views = [view for pair in state_views(model.spec, self.stream._h, self.stream._c, size)
                            for view in pair if view.shape[1]]

    def run(self, slot_arrays: list[np.ndarray], slots: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Step the streams in ``slots`` (at most ``size``) on inputs ``x`` (checked), outputs into ``y``."""
        n = len(slots)
        for slot_array, view in zip(slot_arrays, self.state_views):
            np.take(slot_array, slots, axis=0, out=view[:n], mode="clip")  # indices are valid: clip skips a check
        self.x[:n] = x
        self.stream.step(self.x, out=self.out)
        y[...] = self.out[:n]
        for slot_array, view in zip(slot_arrays, self.state_views):
            slot_array[slots] = view[:n]


class StreamPool:
    """Up to ``capacity`` live sequences of one model, each under a hashable key, stepped together.

    Build one with ``Model.stream_pool``. ``step(keys, x)`` steps exactly the streams of ``keys`` as one batch
    (an unknown key starts from zero state); ``submit(key, x_t)`` queues one step for the batcher thread and
    returns a ``Future`` of its output. All methods may be called from any thread.
    """

    def __init__(self, model: Model, capacity: int = 10_000, max_idle_seconds: float | None = None,
                 on_evict=None, *, max_batch: int = 64, max_delay_us: float = 200.0):
        if not model.spec.is_unidirectional_forward:
            Stream(model, 1)  # raises the error that names the layers a stream cannot run
        self.capacity = _positive_int(capacity, "capacity")
        self.max_batch = _positive_int(max_batch, "max_batch")
        self.max_idle_seconds = _non_negative_number(max_idle_seconds, "max_idle_seconds", optional=True)
        self.max_delay_us = _non_negative_number(max_delay_us, "max_delay_us")
        if on_evict is not None and not callable(on_evict):
            raise InvalidInputError(f"on_evict: expected a callable on_evict(key, snapshot), got {type(on_evict).__name__}")
        self.on_evict = on_evict
        self.model = model
        spec = model.spec
        self._codec = model._state
        self._widths = [width for row in spec.state_rows() for width in (row.h_size, row.c_size) if width]
        self._in_c = [in_c for row in spec.state_rows() for in_c, width in ((False, row.h_size), (True, row.c_size))
                      if width]
        self._dtype = model.dtype
        self._token_ids = model.takes_token_ids
        self._vocab_size = spec.vocab_size
        self._row_shape = () if self._token_ids else (spec.input_size,)
        check_allocation(self.capacity * self.bytes_per_stream + self._runner_bytes(),
                         f"stream_pool(capacity={self.capacity}, max_batch={self.max_batch})")
        self._slot_arrays = [np.zeros((0, width), self._dtype) for width in self._widths]
        self._slot_of: OrderedDict = OrderedDict()  # key -> slot; with max_idle_seconds, least recently stepped first
        self._free: list[int] = []
        self._last_step = np.zeros(0)                # per slot: when it last stepped (monotonic seconds)
        self._runners: dict[int, _BatchRunner] = {}
        self._lock = threading.RLock()
        self._in_on_evict = False
        self._closed = False
        # The batcher: pending (key, x_t, future) in submission order, guarded by _pending_ready's lock.
        self._pending: deque = deque()
        self._pending_ready = threading.Condition(threading.Lock())
        self._batcher: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ sizes
    @property
    def bytes_per_stream(self) -> int:
        """The state bytes one live stream occupies in the pool's slot arrays."""
        return sum(self._widths) * self._dtype.itemsize

    def _runner_bytes(self) -> int:
        """An upper estimate of the internal streams' buffers: batch sizes 1, 2, 4 ... up to ``max_batch``."""
        total, size = 0, 1
        while True:
            total += _stream_bytes(self.model, size) + size * (self.model.input_size + self.model.output_size) * 8
            if size >= self.max_batch:
                return total
            size = min(2 * size, self.max_batch)

    # ------------------------------------------------------------------ the dict-like view
    def __len__(self) -> int:
        with self._lock:
            self._evict_idle()
            return len(self._slot_of)

    def __contains__(self, key) -> bool:
        with self._lock:
            self._evict_idle()
            try:
                return key in self._slot_of
            except TypeError:  # an unhashable key is in no pool
                return False

    def keys(self) -> list:
        """The keys of the live streams (least recently stepped first when ``max_idle_seconds`` is set)."""
        with self._lock:
            self._evict_idle()
            return list(self._slot_of)

    def __repr__(self) -> str:
        return (f"<fastlstm.StreamPool {len(self._slot_of)}/{self.capacity} streams, max_batch={self.max_batch}"
                f"{', closed' if self._closed else ''}>")

    # ------------------------------------------------------------------ stepping
    def step(self, keys, x) -> np.ndarray:
        """Step the streams of ``keys`` (B distinct hashable ids) one time step on ``x`` ``(B, F)`` (token ids
        ``(B,)`` for a model that takes them); return the outputs ``(B, O)``, row ``i`` for ``keys[i]``.

        An unknown key starts a stream from zero state. Keys and ``x`` are checked, and room for new keys,
        before any state changes: a refused call leaves every stream as it was. More than ``max_batch`` keys
        run as several batches.
        """
        with self._lock:
            self._check_usable()
            keys = self._checked_keys(keys)
            x = self._checked_input(x, len(keys))
            self._evict_idle()
            slots = self._slots_for(keys)
            return self._run(keys, slots, x)

    def _run(self, keys: list, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Step the (existing) ``slots`` on checked ``x``, in batches of at most ``max_batch`` rows."""
        count = len(slots)
        y = np.empty((count, self.model.output_size), self._dtype)
        for start in range(0, count, self.max_batch):
            stop = min(start + self.max_batch, count)
            self._runner(stop - start).run(self._slot_arrays, slots[start:stop], x[start:stop], y[start:stop])
        if self.max_idle_seconds is not None:
            self._last_step[slots] = _now()
            move = self._slot_of.move_to_end
            for key in keys:
                move(key)
        return y

    def _runner(self, rows: int) -> _BatchRunner:
        size = min(1 << (rows - 1).bit_length(), self.max_batch)
        runner = self._runners.get(size)
        if runner is None:
            runner = self._runners[size] = _BatchRunner(self.model, size, self._token_ids)
        return runner

    def _checked_keys(self, keys) -> list:
        if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__"):
            raise InvalidInputError(f"keys: expected a sequence of hashable keys (one per row of x), got "
                                    f"{type(keys).__name__}")
        keys = list(keys)
        try:
            distinct = len(set(keys))
        except TypeError as exc:
            raise InvalidInputError(f"keys: every key must be hashable ({exc})") from None
        if distinct != len(keys):
            seen, repeated = set(), []
            for key in keys:
                if key in seen:
                    repeated.append(key)
                seen.add(key)
            raise InvalidInputError(f"keys: a key may appear once per step (one stream takes one time step); "
                                    f"repeated: {repeated[:5]!r}")
        if not keys:
            raise InvalidInputError("keys: expected at least one key")
        return keys

    def _checked_input(self, x, rows: int) -> np.ndarray:
        """``x`` checked: ``(rows, F)`` of a real dtype, or ``(rows,)`` token ids in range."""
        if self._token_ids:
            x = _as_token_ids(x, "x", self._vocab_size)
        elif type(x) is not np.ndarray or x.dtype not in _REAL_DTYPES:
            x = as_real_array(x, "x")
        expected = (rows,) + self._row_shape
        if x.shape != expected:
            raise InvalidInputError(f"x: expected shape {expected} (one row per key"
                                    + (", token ids" if self._token_ids else "") + f"), got {x.shape}")
        return x

    def _slots_for(self, keys: list) -> np.ndarray:
        """The slot of each key, taking zeroed free slots for new keys; refused (nothing changed) if the new
        keys do not fit in ``capacity``."""
        slot_of = self._slot_of
        new_keys = [key for key in keys if key not in slot_of]
        if new_keys:
            self._check_room(len(new_keys), new_keys)
            for key in new_keys:
                slot_of[key] = self._take_slot()
        return np.fromiter((slot_of[key] for key in keys), np.intp, len(keys))

    def _check_room(self, count: int, new_keys: list) -> None:
        live = len(self._slot_of)
        if live + count > self.capacity:
            raise InvalidInputError(
                f"the pool holds {live} streams of its capacity {self.capacity}; {count} new key(s) "
                f"({new_keys[:3]!r}{' ...' if count > 3 else ''}) do not fit. Close streams (pool.close(key)) or "
                "build the pool with a larger capacity; no existing stream is dropped to make room")

    def _take_slot(self) -> int:
        """A free slot with zero state, growing the slot arrays (geometrically, up to ``capacity``) if none is free."""
        if not self._free:
            used = len(self._last_step)
            grown = min(self.capacity, max(_FIRST_SLOTS, 2 * used))
            check_allocation((grown - used) * self.bytes_per_stream, f"growing the stream pool to {grown} streams")
            self._slot_arrays = [np.concatenate([array, np.zeros((grown - used, array.shape[1]), self._dtype)])
                                 for array in self._slot_arrays]
            self._last_step = np.concatenate([self._last_step, np.zeros(grown - used)])
            self._free.extend(range(grown - 1, used - 1, -1))  # pop() hands out the lowest first
        slot = self._free.pop()
        for array in self._slot_arrays:
            array[slot] = 0
        self._last_step[slot] = _now()
        return slot

    # ------------------------------------------------------------------ one stream
    def reset(self, key) -> None:
        """Zero the state of ``key``'s stream (a key not in the pool is at zero state already: nothing to do)."""
        with self._lock:
            self._check_usable()
            self._evict_idle()
            slot = self._slot_of.get(key)
            if slot is not None:
                for array in self._slot_arrays:
                    array[slot] = 0

    def snapshot(self, key) -> bytes:
        """The state of ``key``'s stream as bytes (versioned, tied to the model, checksummed) for ``restore``
        here or in another process that loaded the same model; ``Stream.restore`` reads it too."""
        with self._lock:
            self._check_usable()
            self._evict_idle()
            slot = self._slot_of.get(key)
            if slot is None:
                raise InvalidInputError(f"snapshot(): no live stream has key {key!r}")
            return self._snapshot_slot(slot)

    def _snapshot_slot(self, slot: int) -> bytes:
        h = np.concatenate([array[slot] for array, in_c in zip(self._slot_arrays, self._in_c) if not in_c])
        c = np.concatenate([array[slot] for array, in_c in zip(self._slot_arrays, self._in_c) if in_c] or
                           [np.zeros(0, self._dtype)])
        return self._codec.to_blob(h, c, 1)

    def restore(self, key, blob) -> None:
        """Set ``key``'s stream (a new one if the key is not in the pool) to the state of a snapshot of this
        model: ``snapshot``, ``on_evict``'s, or ``Stream.snapshot`` of batch size 1. A blob of another model,
        a corrupt, truncated or other-version one, or no room for a new key raises ``InvalidInputError`` and
        leaves the pool as it was."""
        with self._lock:
            self._check_usable()
            h, c = self._codec.from_blob(blob, 1, "restore()")
            try:
                hash(key)
            except TypeError as exc:
                raise InvalidInputError(f"key: must be hashable ({exc})") from None
            self._evict_idle()
            slot = self._slots_for([key])[0]
            h_at = c_at = 0
            for array, in_c in zip(self._slot_arrays, self._in_c):
                width = array.shape[1]
                if in_c:
                    array[slot], c_at = c[c_at:c_at + width], c_at + width
                else:
                    array[slot], h_at = h[h_at:h_at + width], h_at + width
            if self.max_idle_seconds is not None:
                self._last_step[slot] = _now()
                self._slot_of.move_to_end(key)

    def close(self, *key) -> None:
        """``close(key)``: end that stream and free its slot (a key not in the pool: nothing to do).
        ``close()``: stop the batcher after it has run every submitted step, then drop every stream; the pool
        refuses further calls. ``with model.stream_pool(...) as pool:`` calls it on leaving."""
        if len(key) > 1:
            raise TypeError(f"close() takes at most one key, got {len(key)}")
        if key:
            with self._lock:
                self._check_usable()
                slot = self._slot_of.pop(key[0], None)
                if slot is not None:
                    self._free.append(slot)
            return
        with self._pending_ready:
            self._stopping = True
            self._pending_ready.notify_all()
            batcher = self._batcher
        if batcher is not None and batcher is not threading.current_thread():
            batcher.join()
        with self._lock:
            self._closed = True
            self._slot_of.clear()
            self._free.clear()
            self._slot_arrays = [array[:0] for array in self._slot_arrays]
            self._last_step = self._last_step[:0]
            self._runners.clear()

    def __enter__(self) -> "StreamPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise InvalidInputError("the stream pool is closed")
        if self._in_on_evict:
            raise InvalidInputError("on_evict may not call the pool that is evicting (park the snapshot elsewhere)")

    # ------------------------------------------------------------------ idle eviction
    def _evict_idle(self) -> None:
        """Evict the streams idle for ``max_idle_seconds`` or more, oldest first, handing each to ``on_evict``
        first: a callback that raises keeps its stream and the exception propagates to the caller."""
        if self.max_idle_seconds is None or not self._slot_of:
            return
        cutoff = _now() - self.max_idle_seconds
        slot_of, last_step = self._slot_of, self._last_step
        while slot_of:
            key, slot = next(iter(slot_of.items()))
            if last_step[slot] > cutoff:
                return
            if self.on_evict is not None:
                blob = self._snapshot_slot(slot)
                self._in_on_evict = True
                try:
                    self.on_evict(key, blob)
                finally:
                    self._in_on_evict = False
            del slot_of[key]
            self._free.append(slot)

    # ------------------------------------------------------------------ submit and the batcher
    def submit(self, key, x_t) -> Future:
        """Queue one time step ``x_t`` (``(F,)``, or one token id) of ``key``'s stream; returns a
        ``concurrent.futures.Future`` of its output ``(O,)``.

        A batcher thread runs the queued steps as batches: once ``max_batch`` wait or the oldest has waited
        ``max_delay_us``. The steps of one key run in the order submitted, never two in one batch. An error
        (a bad ``x_t``, no room for a new key) is set on that step's future only.
        """
        future: Future = Future()
        try:
            hash(key)
            if self._token_ids:
                x_t = _as_token_ids(x_t, "x_t", self._vocab_size)
            else:
                x_t = as_real_array(x_t, "x_t")
            if x_t.shape != self._row_shape:
                raise InvalidInputError(f"x_t: expected shape {self._row_shape}"
                                        + (" (one token id)" if self._token_ids else "") + f", got {x_t.shape}")
            x_t = np.array(x_t, np.int64 if self._token_ids else self._dtype)  # a copy: the caller may reuse its array
        except TypeError as exc:
            future.set_exception(InvalidInputError(f"key: must be hashable ({exc})"))
            return future
        except InvalidInputError as exc:
            future.set_exception(exc)
            return future
        with self._pending_ready:
            if self._stopping or self._closed:
                future.set_exception(InvalidInputError("submit(): the stream pool is closed"))
                return future
            self._pending.append((key, x_t, future, time.perf_counter()))
            if self._batcher is None:
                self._batcher = threading.Thread(target=self._batch_loop, name="fastlstm-pool-batcher", daemon=True)
                self._batcher.start()
            if len(self._pending) == 1 or len(self._pending) >= self.max_batch:
                self._pending_ready.notify()
        return future

    def _batch_loop(self) -> None:
        """The batcher thread: wait for a batch to be due, take it, run it; after ``close()``, run what is
        left without waiting, then end."""
        delay = self.max_delay_us * 1e-6
        ready = self._pending_ready
        while True:
            with ready:
                while not self._pending and not self._stopping:
                    ready.wait()
                if not self._pending:
                    return
                while not self._stopping and len(self._pending) < self.max_batch:
                    remaining = self._pending[0][3] + delay - time.perf_counter()
                    if remaining <= 0:
                        break
                    ready.wait(remaining)
                batch = self._take_batch()
            self._run_batch(batch)

    def _take_batch(self) -> list:
        """Up to ``max_batch`` pending steps of distinct keys, earliest first; a later step of a key already in
        the batch stays pending (ahead of the steps submitted after it)."""
        batch, taken, held = [], set(), deque()
        pending = self._pending
        while pending and len(batch) < self.max_batch:
            item = pending.popleft()
            if item[0] in taken:
                held.append(item)
            else:
                taken.add(item[0])
                batch.append(item)
        held.extend(pending)
        self._pending = held
        return batch

    def _run_batch(self, batch: list) -> None:
        """Run one batch of submitted steps, each result (or error) to its own future."""
        batch = [item for item in batch if item[2].set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            with self._lock:
                try:
                    self._evict_idle()
                except Exception:  # the callback's failure is not the submitters': their steps still run
                    _log.exception("on_evict raised; the stream it was given stays in the pool")
                runnable = []
                free = self.capacity - len(self._slot_of)
                for item in batch:
                    if item[0] in self._slot_of:
                        runnable.append(item)
                    elif free > 0:
                        free -= 1
                        runnable.append(item)
                    else:
                        try:
                            self._check_room(1, [item[0]])
                        except InvalidInputError as exc:
                            item[2].set_exception(exc)
                if not runnable:
                    return
                keys = [item[0] for item in runnable]
                x = np.stack([item[1] for item in runnable])
                y = self._run(keys, self._slots_for(keys), x)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            for item in batch:
                if not item[2].done():
                    item[2].set_exception(exc)
            return
        for item, row in zip(runnable, y):
            item[2].set_result(row)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _non_negative_number(value, name: str, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0 \
            or not np.isfinite(value):
        raise InvalidInputError(f"{name}: expected a finite number >= 0{' or None' if optional else ''}, got {value!r}")
    return float(value)

