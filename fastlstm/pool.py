"""``StreamPool``: many live sequences, each under a key, whose ready steps run as one batch.

A service holds thousands of live sequences and gets a new frame for a few of them at a time. Stepping
those few together reads the weights once for all of them instead of once per sequence. The pool owns the
state of every stream in slot arrays (per state row of the flat layout of ``fastlstm.backends.base``, a
``(slots, size)`` array, grown geometrically up to ``capacity``), with a key -> slot dict and a free list.
A batch step gathers the chosen slots' rows into the flat state of an internal ``Stream``, runs that
stream's ``step`` (the same compiled step, mask handling and dense head as any stream) and scatters the
state back. Internal streams exist for batch sizes rounded up to powers of two, at most ``max_batch``
rows: rows past the batch are padding whose results are ignored. Nothing per step is proportional to the
pool's size: the work is the batch's, and idle eviction reads only the oldest streams of an ordered dict
that holds the streams no one holds (``hold``), least recently active first.

``submit`` hands one step to a batcher thread that gathers the steps of concurrent callers into batches;
``submit_async`` does the same for a coroutine on an asyncio event loop, and its outputs reach the loop once
per batch (one wake-up of the loop for the whole batch, not one per step).
``on_batch(size, seconds)`` hears of every batch run, for a service's metrics.

What the pool needs of ``Model`` and ``Stream`` beyond their public methods goes through
``fastlstm.model.StreamInternals``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future

import numpy as np

from .backends.base import state_views
from .errors import InvalidInputError
from .limits import check_allocation
from .model import Model, Stream, StreamInternals

_FIRST_SLOTS = 16
# The batcher thread ends after this long without a step to run (the next submit starts another), so a pool
# dropped without close() leaves no thread behind, and no thread keeps it alive.
_BATCHER_IDLE_SECONDS = 1.0

_now = time.monotonic  # idle time; a test replaces it with a fake clock
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
        h, c = StreamInternals.flat_state(self.stream)
        self.state_views = [view for pair in state_views(model.spec, h, c, size) for view in pair if view.shape[1]]

    def run(self, slot_arrays: list[np.ndarray], slots: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Step the streams in ``slots`` (at most ``size``) on inputs ``x`` (checked), outputs into ``y``."""
        n = len(slots)
        views = self.state_views if n == self.size else [view[:n] for view in self.state_views]
        for slot_array, view in zip(slot_arrays, views):
            slot_array.take(slots, axis=0, out=view, mode="clip")  # the indices are valid: clip skips a check
        self.x[:n] = x
        self.stream.step(self.x, out=self.out)
        y[...] = self.out[:n]
        for slot_array, view in zip(slot_arrays, views):
            slot_array[slots] = view


class StreamPool:
    """Up to ``capacity`` live sequences of one model, each under a hashable key, stepped together.

    Build one with ``Model.stream_pool``. ``step(keys, x)`` steps exactly the streams of ``keys`` as one batch
    (an unknown key starts from zero state); ``submit(key, x_t)`` queues one step for the batcher thread and
    returns a ``Future`` of its output; ``submit_async(key, x_t)``, called on an event loop, returns an
    ``asyncio.Future`` of it. ``hold(key)`` keeps a stream from idle eviction until ``release(key)``.
    All methods may be called from any thread.

    ``on_batch(size, seconds)``, when given, is called after every batch the pool runs (from ``step`` or the
    batcher, without the pool's lock held): ``size`` streams stepped in ``seconds`` (gather, kernels, head and
    scatter). It is for metrics: it should be quick, and if it raises the exception is logged (the batch has
    run; its results are returned).
    """

    def __init__(self, model: Model, capacity: int = 10_000, max_idle_seconds: float | None = None,
                 on_evict=None, *, max_batch: int = 64, max_delay_us: float = 200.0, on_batch=None):
        if not model.spec.is_unidirectional_forward:
            Stream(model, 1)  # raises the error that names the layers a stream cannot run
        self.capacity = _positive_int(capacity, "capacity")
        self.max_batch = _positive_int(max_batch, "max_batch")
        self.max_idle_seconds = _non_negative_number(max_idle_seconds, "max_idle_seconds", optional=True)
        self.max_delay_us = _non_negative_number(max_delay_us, "max_delay_us")
        if on_evict is not None and not callable(on_evict):
            raise InvalidInputError(
                f"on_evict: expected a callable on_evict(key, snapshot), got {type(on_evict).__name__}")
        if on_batch is not None and not callable(on_batch):
            raise InvalidInputError(
                f"on_batch: expected a callable on_batch(size, seconds), got {type(on_batch).__name__}")
        self.on_evict = on_evict
        self.on_batch = on_batch
        self.model = model
        spec = model.spec
        self._internals = StreamInternals(model)
        self._codec = self._internals.state_codec
        self._widths = [width for row in spec.state_rows() for width in (row.h_size, row.c_size) if width]
        self._in_c = [in_c for row in spec.state_rows() for in_c, width in ((False, row.h_size), (True, row.c_size))
                      if width]
        self._dtype = model.dtype
        self._token_ids = model.takes_token_ids
        self._vocab_size = spec.vocab_size
        self._row_shape = () if self._token_ids else (spec.input_size,)
        self._output_size = spec.output_size
        check_allocation(self.capacity * self.bytes_per_stream + self._runner_bytes(),
                         f"stream_pool(capacity={self.capacity}, max_batch={self.max_batch})")
        self._slot_arrays = [np.zeros((0, width), self._dtype) for width in self._widths]
        self._slots = 0                              # rows of each slot array
        self._slot_of: dict = {}                     # key -> slot, for every live stream, in the order they started
        self._free: list[int] = []
        # With max_idle_seconds: key -> when it was last active (stepped, restored or released; monotonic seconds)
        # for every stream not held, least recently active first. Eviction reads its front only.
        self._idle: OrderedDict = OrderedDict()
        self._holds: dict = {}                       # key -> how many holds it has (at least 1)
        self._runners: dict[int, _BatchRunner] = {}  # rows -> the runner of their power-of-two size
        self._lock = threading.RLock()
        self._in_on_evict = False
        self._closed = False
        # The batcher's queue, guarded by _pending_ready: per key its pending steps in submission order, each
        # (sequence number, x_t, future, submitted at); a heap of (sequence number of its first step, key) over
        # the keys with pending steps, so a batch takes the earliest step of each of the earliest keys without
        # reading the steps of keys it cannot take (one client's many steps do not make each batch slower).
        self._queued: dict = {}
        self._due: list = []
        self._waiting = 0                            # steps pending
        self._sequence = itertools.count()
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
            total += self._internals.stream_bytes(size) + size * (self.model.input_size + self.model.output_size) * 8
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
        """The keys of the live streams, in the order they started."""
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
        batches = [] if self.on_batch is not None else None
        with self._lock:
            self._check_usable()
            keys = self._checked_keys(keys)
            x = self._checked_input(x, len(keys))
            self._evict_idle()
            y = self._run(keys, x, batches)
        if batches:
            self._report_batches(batches)
        return y

    def _run(self, keys: list, x: np.ndarray, batches: list | None) -> np.ndarray:
        """Step the streams of checked ``keys`` (new ones from zero state) on checked ``x``, in batches of at
        most ``max_batch`` rows; with ``batches`` a list, append ``(size, seconds)`` of each to it.

        Everything that may be refused (a new key without room, memory for an internal stream or for more
        slots) is settled before the first batch runs: a refused call changes nothing."""
        count = len(keys)
        step = self.max_batch
        runners = [self._runner(min(step, count - start)) for start in range(0, count, step)]
        slots = self._slots_for(keys)
        y = np.empty((count, self._output_size), self._dtype)
        if count <= step:
            started = time.perf_counter() if batches is not None else 0.0
            runners[0].run(self._slot_arrays, slots, x, y)
            if batches is not None:
                batches.append((count, time.perf_counter() - started))
        else:
            for runner, start in zip(runners, range(0, count, step)):
                started = time.perf_counter() if batches is not None else 0.0
                stop = min(start + step, count)
                runner.run(self._slot_arrays, slots[start:stop], x[start:stop], y[start:stop])
                if batches is not None:
                    batches.append((stop - start, time.perf_counter() - started))
        if self.max_idle_seconds is not None:
            self._mark_active(keys)
        return y

    def _mark_active(self, keys) -> None:
        """Restart the idle time of the streams of ``keys`` that are not held (they go to the back)."""
        now, idle, holds = _now(), self._idle, self._holds
        for key in keys:
            if key not in holds:
                idle[key] = now
                idle.move_to_end(key)

    def _report_batches(self, batches: list) -> None:
        """Hand each ``(size, seconds)`` to ``on_batch``, logging what it raises (the batches have run)."""
        on_batch = self.on_batch
        if on_batch is None:
            return
        for size, seconds in batches:
            try:
                on_batch(size, seconds)
            except Exception:  # noqa: BLE001 - a metrics callback's failure is not the step's
                _log.exception("on_batch raised; the batch of %d step(s) has run and its results are returned", size)

    def _runner(self, rows: int) -> _BatchRunner:
        """The internal stream for ``rows`` (at most ``max_batch``): the next power of two, or ``max_batch``."""
        runner = self._runners.get(rows)
        if runner is None:
            size = min(1 << (rows - 1).bit_length(), self.max_batch)
            runner = self._runners.get(size)
            if runner is None:
                runner = self._runners[size] = _BatchRunner(self.model, size, self._token_ids)
            self._runners[rows] = runner
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
            x = self._internals.checked_token_ids(x, "x")
        else:
            x = self._internals.checked_features(x, "x")
        expected = (rows,) + self._row_shape
        if x.shape != expected:
            raise InvalidInputError(f"x: expected shape {expected} (one row per key"
                                    + (", token ids" if self._token_ids else "") + f"), got {x.shape}")
        return x

    def _slots_for(self, keys: list) -> np.ndarray:
        """The slot of each key, taking zeroed free slots for new keys; refused (nothing changed) if the new
        keys do not fit in ``capacity`` or the slot arrays cannot grow to hold them."""
        slot_of = self._slot_of
        get = slot_of.get
        slots = [get(key) for key in keys]
        if None in slots:
            new_keys = [key for key, slot in zip(keys, slots) if slot is None]
            self._check_room(len(new_keys), new_keys)
            self._reserve(len(new_keys))
            for key in new_keys:
                slot_of[key] = self._take_slot()
            slots = [slot_of[key] for key in keys]
        return np.array(slots, np.intp)

    def _check_room(self, count: int, new_keys: list) -> None:
        live = len(self._slot_of)
        if live + count > self.capacity:
            raise self._no_room(live, new_keys)

    def _no_room(self, live: int, new_keys: list) -> InvalidInputError:
        count = len(new_keys)
        return InvalidInputError(
            f"the pool holds {live} streams of its capacity {self.capacity}; {count} new key(s) "
            f"({new_keys[:3]!r}{' ...' if count > 3 else ''}) do not fit. Close streams (pool.close(key)) or "
            "build the pool with a larger capacity; no existing stream is dropped to make room")

    def _reserve(self, count: int) -> None:
        """At least ``count`` free slots (``count`` fits in ``capacity``), growing the slot arrays once,
        geometrically; refused before anything changes if the growth would exceed the allocation limit."""
        if len(self._free) >= count:
            return
        used = self._slots
        grown = min(self.capacity, max(_FIRST_SLOTS, 2 * used, used + count - len(self._free)))
        check_allocation((grown - used) * self.bytes_per_stream, f"growing the stream pool to {grown} streams")
        self._slot_arrays = [np.concatenate([array, np.zeros((grown - used, array.shape[1]), self._dtype)])
                             for array in self._slot_arrays]
        self._slots = grown
        self._free[:0] = range(grown - 1, used - 1, -1)  # pop() hands out the lowest free slot first

    def _take_slot(self) -> int:
        """A free slot (``_reserve`` made sure there is one), with zero state."""
        slot = self._free.pop()
        for array in self._slot_arrays:
            array[slot] = 0
        return slot

    # ------------------------------------------------------------------ one stream
    def reset(self, key) -> None:
        """Zero the state of ``key``'s stream (a key not in the pool is at zero state already: nothing to do)."""
        with self._lock:
            self._check_usable()
            key = _checked_key(key, "reset()")
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
            key = _checked_key(key, "snapshot()")
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
        model: ``snapshot``, ``on_evict``'s, or ``Stream.snapshot`` of batch size 1 (one made in float64 is
        rounded to float32 in a float32 model, as a ``state=`` would be). A blob of another model,
        a corrupt, truncated or other-version one, or no room for a new key raises ``InvalidInputError`` and
        leaves the pool as it was."""
        with self._lock:
            self._check_usable()
            h, c = self._codec.from_blob(blob, 1, "restore()")
            key = _checked_key(key, "restore()")
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
                self._mark_active([key])

    def hold(self, key) -> None:
        """Keep ``key``'s stream from idle eviction until a matching ``release(key)`` (holds are counted),
        starting a stream from zero state if the key is new (refused, nothing changed, if there is no room).
        A service holds the stream of each open connection, so that a connected but silent client keeps its
        state; its idle time counts from its last step or its last release, whichever is later."""
        with self._lock:
            self._check_usable()
            key = _checked_key(key, "hold()")
            self._evict_idle()
            self._slots_for([key])
            self._holds[key] = self._holds.get(key, 0) + 1
            self._idle.pop(key, None)

    def release(self, key) -> None:
        """Undo one ``hold(key)``; when none is left, the stream's idle time starts now. A key that is not
        held is refused; after ``close()`` there is nothing to release and nothing is done."""
        with self._lock:
            if self._closed:
                return
            self._check_usable()
            key = _checked_key(key, "release()")
            count = self._holds.get(key)
            if count is None:
                raise InvalidInputError(f"release(): the stream {key!r} is not held (release once per hold)")
            if count > 1:
                self._holds[key] = count - 1
                return
            del self._holds[key]
            if self.max_idle_seconds is not None:
                self._idle[key] = _now()

    def held(self, key) -> int:
        """How many holds ``key``'s stream has (0 for a stream not held or a key not in the pool)."""
        with self._lock:
            try:
                return self._holds.get(key, 0)
            except TypeError:  # an unhashable key is in no pool
                return 0

    def close(self, *key) -> None:
        """``close(key)``: end that stream and free its slot (a key not in the pool: nothing to do; a held
        stream is refused; a step of that key submitted and not yet run starts a new stream from zero state).
        ``close()``: refuse further calls, let the batcher run every step already submitted, then drop every
        stream. ``with model.stream_pool(...) as pool:`` calls it on leaving."""
        if len(key) > 1:
            raise TypeError(f"close() takes at most one key, got {len(key)}")
        if key:
            with self._lock:
                self._check_usable()
                key = _checked_key(key[0], "close()")
                if key in self._holds:
                    raise InvalidInputError(f"close(): the stream {key!r} is held ({self._holds[key]} hold(s)); "
                                            "release it first")
                slot = self._slot_of.pop(key, None)
                if slot is not None:
                    self._idle.pop(key, None)
                    self._free.append(slot)
            return
        with self._lock:
            if self._in_on_evict:
                self._check_usable()  # raises: on_evict may not call the pool
            self._closed = True  # new calls are refused from now on; the batcher still runs what was submitted
        with self._pending_ready:
            self._stopping = True
            self._pending_ready.notify_all()
            batcher = self._batcher
        if batcher is threading.current_thread():
            return  # called from a future's callback on the batcher: it drops the streams once the queue is run
        if batcher is not None:
            batcher.join()
        self._drop_streams()

    def _drop_streams(self) -> None:
        """Free every stream's state and the internal streams (the last step of ``close()``)."""
        with self._lock:
            self._slot_of.clear()
            self._idle.clear()
            self._holds.clear()
            self._free.clear()
            self._slot_arrays = [array[:0] for array in self._slot_arrays]
            self._slots = 0
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
        """Evict the streams not held that have been idle for ``max_idle_seconds`` or more, oldest first, handing
        each to ``on_evict`` first: a callback that raises keeps its stream and the exception propagates."""
        idle = self._idle
        if not idle or self._in_on_evict:  # on_evict asking len(pool) or key in pool: the pool as it is
            return
        cutoff = _now() - self.max_idle_seconds
        slot_of = self._slot_of
        while idle:
            key, since = next(iter(idle.items()))
            if since > cutoff:
                return
            slot = slot_of[key]
            if self.on_evict is not None:
                blob = self._snapshot_slot(slot)
                self._in_on_evict = True
                try:
                    self.on_evict(key, blob)
                finally:
                    self._in_on_evict = False
            del idle[key]
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
        self._submit(key, x_t, future, "submit()")
        return future

    def submit_async(self, key, x_t) -> asyncio.Future:
        """``submit`` for code on an asyncio event loop: call it on the loop's thread and ``await`` what it
        returns, an ``asyncio.Future`` of the step's output ``(O,)`` (or of its error, as ``submit``).

        The steps join the same queue and batches as ``submit``'s, with the same guarantees. The batcher hands
        a batch's outputs to each loop with one ``call_soon_threadsafe`` (one wake-up per batch, not per
        step), which is what lets one event loop serve thousands of streams. Cancelling the future before its
        batch starts withdraws the step; once the batch has started the step runs and its output is dropped.
        """
        future = asyncio.get_running_loop().create_future()
        self._submit(key, x_t, future, "submit_async()")
        return future

    def _submit(self, key, x_t, future, what: str) -> None:
        """Check one step and queue it, or set its error on ``future`` (either kind of future)."""
        try:
            key = _checked_key(key, what)
            if self._token_ids:
                x_t = self._internals.checked_token_ids(x_t, "x_t")
            else:
                x_t = self._internals.checked_features(x_t, "x_t")
            if x_t.shape != self._row_shape:
                raise InvalidInputError(f"x_t: expected shape {self._row_shape}"
                                        + (" (one token id)" if self._token_ids else "") + f", got {x_t.shape}")
            x_t = np.array(x_t, np.int64 if self._token_ids else self._dtype)  # a copy: the caller may reuse its array
        except InvalidInputError as exc:
            future.set_exception(exc)
            return
        with self._pending_ready:
            if self._stopping or self._closed:
                future.set_exception(InvalidInputError(f"{what}: the stream pool is closed"))
                return
            self._enqueue(key, x_t, future)
            if self._batcher is None:
                self._batcher = threading.Thread(target=self._batch_loop, name="fastlstm-pool-batcher", daemon=True)
                self._batcher.start()
            # The batcher waits for a first step, or for a batch to fill: wake it as either happens (steps come
            # one at a time, so a queue that fills passes max_batch exactly; past it the batcher does not wait).
            if self._waiting == 1 or self._waiting == self.max_batch:
                self._pending_ready.notify()

    def _enqueue(self, key, x_t, future) -> None:
        """Queue one checked step (``_pending_ready`` held)."""
        step = (next(self._sequence), x_t, future, time.perf_counter())
        steps = self._queued.get(key)
        if steps is None:
            self._queued[key] = deque((step,))
            heapq.heappush(self._due, (step[0], key))
        else:
            steps.append(step)
        self._waiting += 1

    def _batch_loop(self) -> None:
        """The batcher thread: wait for a batch to be due, take it, run it; after ``close()``, run what is
        left without waiting, then end. Idle for ``_BATCHER_IDLE_SECONDS``, it ends (the next submit starts
        another)."""
        delay = self.max_delay_us * 1e-6
        ready = self._pending_ready
        while True:
            with ready:
                while not self._waiting and not self._stopping:
                    if not ready.wait(_BATCHER_IDLE_SECONDS) and not self._waiting and not self._stopping:
                        self._batcher = None
                        return
                if not self._waiting:
                    break
                while not self._stopping and self._waiting < self.max_batch:
                    oldest = self._queued[self._due[0][1]][0]  # the first step of the key due first
                    remaining = oldest[3] + delay - time.perf_counter()
                    if remaining <= 0:
                        break
                    ready.wait(remaining)
                batch = self._take_batch()
            self._run_batch(batch)
        self._drop_streams()  # the loop ends only after close(), which may have been called from this thread

    def _take_batch(self) -> list:
        """Up to ``max_batch`` pending steps ``(key, x_t, future, submitted at)`` of distinct keys, earliest
        first; a later step of a key in the batch stays pending, due by its own submission order. The work is
        the batch's (a heap pop and push per step), whatever else waits."""
        batch = []
        due, queued = self._due, self._queued
        while due and len(batch) < self.max_batch:
            key = heapq.heappop(due)[1]
            _, x_t, future, submitted_at = queued[key].popleft()
            batch.append((key, x_t, future, submitted_at))
        for item in batch:
            steps = queued[item[0]]
            if steps:
                heapq.heappush(due, (steps[0][0], item[0]))
            else:
                del queued[item[0]]
        self._waiting -= len(batch)
        return batch

    def _run_batch(self, batch: list) -> None:
        """Run one batch of submitted steps, each result (or error) to its own future: a ``submit`` future at
        once, the ``submit_async`` futures of each event loop in one call on that loop."""
        batch = [item for item in batch if _start(item[2])]
        if not batch:
            return
        outcomes = []  # (future, output, error) of the steps that ran or were refused
        batches = [] if self.on_batch is not None else None
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
                        outcomes.append((item[2], None, self._no_room(self.capacity, [item[0]])))
                if runnable:
                    keys = [item[0] for item in runnable]
                    x = np.stack([item[1] for item in runnable])
                    y = self._run(keys, x, batches)
                    outcomes.extend((item[2], row, None) for item, row in zip(runnable, y))
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            answered = {id(outcome[0]) for outcome in outcomes}
            outcomes.extend((item[2], None, exc) for item in batch if id(item[2]) not in answered)
            _settle(outcomes)
            return
        if batches:
            self._report_batches(batches)
        _settle(outcomes)


def _start(future) -> bool:
    """Whether a queued step's future still wants its step (a ``submit`` future is marked running)."""
    if isinstance(future, Future):
        return future.set_running_or_notify_cancel()
    return not future.done()  # an asyncio future cancelled while it waited: the step is withdrawn


def _settle(outcomes: list) -> None:
    """Hand each ``(future, output, error)`` to its future: ``submit`` futures here, ``submit_async`` futures
    grouped by event loop, one ``call_soon_threadsafe`` per loop."""
    by_loop: dict = {}
    for outcome in outcomes:
        future = outcome[0]
        if isinstance(future, Future):
            if outcome[2] is None:
                future.set_result(outcome[1])
            else:
                future.set_exception(outcome[2])
        else:
            by_loop.setdefault(future.get_loop(), []).append(outcome)
    for loop, loop_outcomes in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, loop_outcomes)
        except RuntimeError:  # the loop has closed: no one is left to await these futures
            _log.debug("an event loop closed before %d step output(s) reached it", len(loop_outcomes))


def _settle_on_loop(outcomes: list) -> None:
    """On the event loop: set each asyncio future that is still waiting (its awaiter may have been cancelled)."""
    for future, output, error in outcomes:
        if not future.done():
            if error is None:
                future.set_result(output)
            else:
                future.set_exception(error)


def _checked_key(key, what: str):
    """``key`` if it is hashable, else an ``InvalidInputError`` naming the call."""
    try:
        hash(key)
    except TypeError as exc:
        raise InvalidInputError(f"{what}: the key must be hashable ({exc})") from None
    return key


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

