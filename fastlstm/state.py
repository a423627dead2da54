"""The recurrent state as users give and receive it, and as backends hold it.

Users see the state in the form of ``ModelSpec.state_form`` (the rule is in ``fastlstm.spec``'s docstring):

* ``"h_c"`` — ``(h, c)``, each ``(rows, B, size)``: a stack of equal-sized LSTM layers, as PyTorch's ``nn.LSTM``;
* ``"h"`` — ``h`` ``(rows, B, size)``: a stack of equal-sized GRU or RNN layers, as ``nn.GRU`` / ``nn.RNN``;
* ``"per_layer"`` — a tuple with one entry per layer, ``(h, c)`` for an LSTM layer and ``h`` for a GRU or
  RNN layer, each ``(directions, B, size)``.

(``rows = layers * directions``; without the batch axis for one unbatched sequence.) Backends hold it as two
flat arrays (layout in ``fastlstm.backends.base``); ``StateCodec`` converts between the two, checking every
part before anything is written.

A snapshot (``to_blob``/``from_blob``, behind ``Stream.snapshot`` and ``StreamPool.snapshot``) is the flat
state as bytes: versioned, tied to the model by a fingerprint of its weights and structure, checksummed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ._arrays import as_real_array
from .backends.base import flat_state_sizes, state_views
from .errors import InvalidInputError
from .spec import ModelSpec

# A state snapshot (``StateCodec.to_blob``): this header, then the flat h and c of its sequences as
# little-endian floats, then the SHA-256 of everything before it.
SNAPSHOT_MAGIC = b"FLSTMST\n"
SNAPSHOT_VERSION = 1
# magic, version, bytes per item (4 or 8), sequences, the model's fingerprint
_SNAPSHOT_HEADER = struct.Struct("<8sHBI32s")
_CHECKSUM_BYTES = 32


@dataclass(frozen=True)
class _Slot:
    """One array of the user's form: which flat array it lives in, where, and its per-sequence shape."""

    path: tuple[int, ...]    # where it sits in the user's structure: () the whole state, (n,) or (n, k)
    label: str               # "h", "c", "h[1]", "c[1]" ... for messages
    in_c: bool
    rows: int                # directions (or all rows) it covers
    size: int                # its last axis
    start_per_batch: int     # its offset in the flat array, in items per batch row


class StateCodec:
    """Converts one model's state between the user's form and the backends' flat arrays."""

    def __init__(self, spec: ModelSpec, dtype: np.dtype):
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.form = spec.state_form
        self.slots = self._slots()

    def _slots(self) -> list[_Slot]:
        spec = self.spec
        if self.form in ("h_c", "h"):
            rows = spec.num_state_rows
            h_size, c_size = spec.state_sizes()
            if self.form == "h":
                return [_Slot((), "h", False, rows, h_size, 0)]
            return [_Slot((0,), "h", False, rows, h_size, 0), _Slot((1,), "c", True, rows, c_size, 0)]
        slots, h_start, c_start = [], 0, 0
        for n, layer in enumerate(spec.layers):
            d = layer.num_directions
            if layer.kind == "lstm":
                slots.append(_Slot((n, 0), f"h[{n}]", False, d, layer.output_size, h_start))
                slots.append(_Slot((n, 1), f"c[{n}]", True, d, layer.hidden_size, c_start))
            else:
                slots.append(_Slot((n,), f"h[{n}]", False, d, layer.hidden_size, h_start))
            h_start += d * layer.output_size
            c_start += d * layer.state_size
        return slots

    def zeros(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat ``(h, c)`` of zeros for ``batch`` sequences."""
        h_items, c_items = flat_state_sizes(self.spec, batch)
        return np.zeros(h_items, self.dtype), np.zeros(c_items, self.dtype)

    def describe(self, batch: int | None) -> str:
        """The form of this model's state in words, for messages (``batch`` None: one unbatched sequence)."""
        shapes = {slot.path: str(self._shape(slot, batch)) for slot in self.slots}
        if self.form == "h":
            return f"an array h of shape {shapes[()]}"
        if self.form == "h_c":
            return f"a pair (h, c) of shapes {shapes[(0,)]} and {shapes[(1,)]}"
        entries = []
        for n, layer in enumerate(self.spec.layers):
            entries.append(f"({shapes[(n, 0)]}, {shapes[(n, 1)]})" if layer.kind == "lstm" else shapes[(n,)])
        return "one entry per layer: (" + ", ".join(entries) + ")"

    @staticmethod
    def _shape(slot: _Slot, batch: int | None) -> tuple[int, ...]:
        return (slot.rows, slot.size) if batch is None else (slot.rows, batch, slot.size)

    # ------------------------------------------------------------------ user form -> flat
    def to_flat(self, state, batch: int, unbatched: bool, prefix: str = "state") -> tuple[np.ndarray, np.ndarray]:
        """Checked flat copies of the user's ``state`` (whose arrays are never written)."""
        values = [self._pick(state, slot, batch, unbatched, prefix) for slot in self.slots]
        h, c = self.zeros(batch)
        for slot, value in zip(self.slots, values):
            target = c if slot.in_c else h
            start = batch * slot.start_per_batch
            target[start:start + value.size] = value.reshape(-1)  # unbatched: batch 1, the same layout
        return h, c

    def _pick(self, state, slot: _Slot, batch: int, unbatched: bool, prefix: str) -> np.ndarray:
        """The slot's array out of the user's structure, its type and shape checked."""
        value, where = state, prefix
        for depth, index in enumerate(slot.path):
            count = 2 if (self.form == "h_c" or depth == 1) else len(self.spec.layers)
            if not isinstance(value, (tuple, list)) or len(value) != count:
                raise InvalidInputError(
                    f"{where}: expected {self.describe(None if unbatched else batch)}, got "
                    + (f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list))
                       else type(value).__name__))
            value, where = value[index], f"{where}[{index}]"
        if self.form == "h" and isinstance(value, (tuple, list)) and len(value) == 2 and np.ndim(value[0]) >= 2:
            raise InvalidInputError(f"{prefix}: this model's layers have no cell state; expected "
                                    f"{self.describe(None if unbatched else batch)}, got a pair")
        name = f"{prefix} {slot.label}"
        array = as_real_array(value, name)
        expected = self._shape(slot, None if unbatched else batch)
        if array.shape != expected:
            raise InvalidInputError(f"{name}: expected shape {expected} ({'directions' if self.form == 'per_layer' else 'layers * directions'}, "
                                    f"{'' if unbatched else 'batch, '}size), got {array.shape}")
        return array

    # ------------------------------------------------------------------ flat -> user form
    def from_flat(self, h: np.ndarray, c: np.ndarray, batch: int, unbatched: bool, copy: bool = True):
        """The user's form of the flat state: copies (``copy=False``: views into ``h`` and ``c``)."""
        arrays = {}
        for slot in self.slots:
            source = c if slot.in_c else h
            start = batch * slot.start_per_batch
            array = source[start:start + batch * slot.rows * slot.size].reshape(slot.rows, batch, slot.size)
            if unbatched:
                array = array[:, 0]
            arrays[slot.path] = array.copy() if copy else array
        if self.form == "h":
            return arrays[()]
        if self.form == "h_c":
            return arrays[(0,)], arrays[(1,)]
        return tuple((arrays[(n, 0)], arrays[(n, 1)]) if layer.kind == "lstm" else arrays[(n,)]
                     for n, layer in enumerate(self.spec.layers))

    # ------------------------------------------------------------------ rows of a batch
    def take_rows(self, h: np.ndarray, c: np.ndarray, batch: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat state of the batch rows ``rows`` only (a new, smaller batch)."""
        h_sub, c_sub = self.zeros(len(rows))
        for whole, part in zip(state_views(self.spec, h, c, batch), state_views(self.spec, h_sub, c_sub, len(rows))):
            for source, target in zip(whole, part):
                target[...] = source[rows]
        return h_sub, c_sub

    def put_rows(self, h: np.ndarray, c: np.ndarray, batch: int, rows: np.ndarray,
                 h_sub: np.ndarray, c_sub: np.ndarray) -> None:
        """Write the state of ``take_rows``' smaller batch back into rows ``rows`` of ``h`` and ``c``."""
        for whole, part in zip(state_views(self.spec, h, c, batch), state_views(self.spec, h_sub, c_sub, len(rows))):
            for target, source in zip(whole, part):
                target[rows] = source

    # ------------------------------------------------------------------ snapshots
    @cached_property
    def fingerprint(self) -> bytes:
        """The model's identity in a snapshot: computed once, from every weight and structural field of the spec."""
        return spec_fingerprint(self.spec)

    def row_items(self) -> tuple[int, int]:
        """Items of ``h`` and ``c`` one sequence holds."""
        return flat_state_sizes(self.spec, 1)

    def to_blob(self, h: np.ndarray, c: np.ndarray, batch: int) -> bytes:
        """A snapshot of the flat state of ``batch`` sequences (layout in the module docstring)."""
        header = _SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, self.dtype.itemsize, batch, self.fingerprint)
        little_endian = self.dtype.newbyteorder("<")
        body = header + np.ascontiguousarray(h, little_endian).tobytes() + np.ascontiguousarray(c, little_endian).tobytes()
        return body + hashlib.sha256(body).digest()

    def from_blob(self, blob, batch: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Checked flat ``(h, c)`` copies of ``batch`` sequences, in this model's dtype, from a ``to_blob``
        snapshot made by a model with the same weights and structure (on any backend, in either dtype).
        Anything else raises ``InvalidInputError`` naming ``what`` and the problem; nothing is written."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"{what}: expected the bytes of a state snapshot, got {type(blob).__name__}")
        data = memoryview(blob).cast("B")
        minimum = _SNAPSHOT_HEADER.size + _CHECKSUM_BYTES
        if len(data) < minimum or bytes(data[:len(SNAPSHOT_MAGIC)]) != SNAPSHOT_MAGIC:
            raise InvalidInputError(f"{what}: not a fastlstm state snapshot ({len(data)} bytes, expected at least "
                                    f"{minimum} starting with {SNAPSHOT_MAGIC!r})")
        _, version, itemsize, rows, fingerprint = _SNAPSHOT_HEADER.unpack_from(data)
        if version != SNAPSHOT_VERSION:
            raise InvalidInputError(f"{what}: a state snapshot of version {version}; this fastlstm reads version "
                                    f"{SNAPSHOT_VERSION} only")
        if hashlib.sha256(data[:-_CHECKSUM_BYTES]).digest() != bytes(data[-_CHECKSUM_BYTES:]):
            raise InvalidInputError(f"{what}: the state snapshot is corrupt or truncated (its checksum does not match "
                                    f"its {len(data)} bytes)")
        if fingerprint != self.fingerprint:
            raise InvalidInputError(f"{what}: the state snapshot was made by another model (its weights or structure "
                                    "differ from this model's)")
        if rows != batch:
            raise InvalidInputError(f"{what}: the state snapshot holds {rows} sequence(s); expected {batch}")
        h_items, c_items = flat_state_sizes(self.spec, batch)
        if itemsize not in (4, 8) or len(data) != minimum + (h_items + c_items) * itemsize:
            raise InvalidInputError(f"{what}: the state snapshot's size ({len(data)} bytes) does not match its header "
                                    f"({rows} sequence(s) of {h_items + c_items} items of {itemsize} bytes)")
        state = np.frombuffer(data, f"<f{itemsize}", h_items + c_items, _SNAPSHOT_HEADER.size)
        return state[:h_items].astype(self.dtype), state[h_items:].astype(self.dtype)


def spec_fingerprint(spec: ModelSpec) -> bytes:
    """A SHA-256 of every compared field of ``spec``, arrays by dtype, shape and bytes (the ``source`` note,
    which does not take part in comparisons, is left out): equal for two loads of the same model."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            digest.update(f"array {array.dtype.str} {array.shape}:".encode())
            digest.update(array.data.cast("B") if array.size else b"")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            digest.update(f"{type(value).__name__}(".encode())
            for item in dataclasses.fields(value):
                if item.compare:
                    digest.update(f"{item.name}=".encode())
                    feed(getattr(value, item.name))
            digest.update(b")")
        elif isinstance(value, (tuple, list)):
            digest.update(f"[{len(value)}:".encode())
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(spec)
    return digest.digest()
