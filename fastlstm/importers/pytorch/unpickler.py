"""Read files written by ``torch.save`` and ``torch.jit.save`` without importing torch or running their code.

Two layouts exist:

* **zip** (torch >= 1.6, and every TorchScript archive): one top-level folder holding ``data.pkl`` (the
  object, pickled), ``data/<key>`` (one member of raw bytes per storage), ``byteorder`` (``little`` or
  ``big``; little when absent) and ``version``. TorchScript archives also hold ``code/`` (the module's
  compiled source, which is never run here) and ``constants.pkl``.
* **legacy** (``_use_new_zipfile_serialization=False``): five pickles in a row (torch's magic number, the
  protocol version 1001, a ``sys_info`` dict, the object, the sorted list of storage keys), then for each key
  a little-endian int64 element count and the storage's raw little-endian bytes.

In both, a tensor is pickled as a call to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` whose storage is a *persistent id* ``('storage', <storage type>, key, location, numel[, view])``.

The unpickler here is an allow-list: it rebuilds tensors (as NumPy arrays), quantized tensors (as
``QuantizedTensor``: their integers and quantization parameters), plain containers, the packed weights of
PyTorch's dynamically quantized LSTM and Linear modules (``TorchBindObject``: their pickled state, inert), and,
in zip archives only, the ``__torch__.*`` module objects of TorchScript as inert attribute holders
(``ScriptObject``). Any other global (``os.system``, ``builtins.eval``, a model's own classes, a whole
pickled ``nn.Module``) is refused with ``ModelFormatError`` naming it, before anything is called. It is
Python's pure-Python unpickler, not the C one: the C one sizes its memo from indices read from the file, so
a few crafted bytes could make it allocate gigabytes.

Every size read from a file is checked against the bytes actually present before anything is allocated;
tensors are returned as read-only views of their storage's bytes, and a file may not describe more tensor
bytes than ``_MAX_VIEW_AMPLIFICATION`` times the storage bytes it holds (so overlapping views cannot turn a
small file into a huge allocation when a caller copies them).
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import pickletools
import re
import reprlib
import struct
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ...errors import ModelFormatError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

_MAX_PICKLE_BYTES = 256 << 20       # data.pkl of the largest real models is a few MiB
# What unpickling may build, in estimated bytes: every opcode counts as one Python object (_OBJECT_COST) and
# every string or bytes payload as its length. A pickle may spend _BUILD_BYTES_PER_STORED_BYTE times the bytes
# it occupies in the file (so a small compressed data.pkl cannot build gigabytes), plus _MIN_BUILD_BYTES.
_OBJECT_COST = 64
_BUILD_BYTES_PER_STORED_BYTE = _OBJECT_COST
_MIN_BUILD_BYTES = 64 << 20
_MAX_CODE_FILE_BYTES = 16 << 20
_MAX_TENSOR_DIMS = 32
# Sizes, strides, offsets and element counts above this are refused: their products in bytes must fit int64.
_MAX_INDEX = 1 << 48
_MAX_SCRIPT_CLASSES = 10_000
# A file's tensors may describe at most this many times the bytes its storages hold, plus a small allowance
# (tied weights and views that partition a flat buffer stay far below it).
_MAX_VIEW_AMPLIFICATION = 4
_VIEW_ALLOWANCE_BYTES = 64 << 20

# Storage type names (as pickled: ``torch.FloatStorage`` ...) -> element dtype. bfloat16 has no NumPy dtype:
# it is read as uint16 bit patterns and widened to float32 (exactly) when its tensors are built.
_BFLOAT16 = "bfloat16"
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
    # The integers of quantized tensors (``_rebuild_qtensor``).
    "QInt8Storage": "int8",
    "QUInt8Storage": "uint8",
    "QInt32Storage": "int32",
}
# The quantization schemes a quantized tensor may name (``torch.per_tensor_affine`` ...), read as their names.
QSCHEMES = ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams", "per_tensor_symmetric",
            "per_channel_symmetric")
# The dtypes a quantized Linear records (``<prefix>._packed_params.dtype``), read as their names.
DTYPES = ("qint8", "quint8", "float16", "float32")
# The TorchBind classes (C++ objects with a pickled state) of PyTorch's dynamic quantization: an LSTM's cells
# and a Linear layer's packed weights. Their state is kept as pickled; ``quantized`` reads it.
TORCHBIND_CLASSES = ("__torch__.torch.classes.rnn.CellParamsBase",
                     "__torch__.torch.classes.quantized.LinearPackedParamsBase")

_WHOLE_MODEL_HINT = (
    "fastlstm rebuilds tensors and plain containers only and never runs code from a file. If this file is a "
    "whole model saved with torch.save(model), save its weights instead: torch.save(model.state_dict(), path), "
    "or pass the in-memory model to fastlstm.load."
)


@dataclass(frozen=True)
class TorchFile:
    """What a ``torch.save`` / ``torch.jit.save`` file holds.

    ``root`` is the unpickled object: dicts (``OrderedDict`` for state_dicts), lists, tuples, scalars and
    strings as pickled, every tensor replaced by a read-only ``np.ndarray``, and, in TorchScript archives,
    ``ScriptObject``s for the module objects. ``layout`` is ``"zip"`` or ``"legacy"``; ``is_torchscript``
    says whether the archive holds TorchScript code (``torch.jit.save``).
    """

    root: object
    layout: str
    is_torchscript: bool


class ScriptObject:
    """An inert stand-in for one TorchScript object (a module, usually) rebuilt from ``data.pkl``.

    ``qualified_name`` is the class name the archive gives (``__torch__.torch.nn.modules.rnn.LSTM``,
    possibly with ``___torch_mangle_N`` parts); ``attributes`` holds the pickled attributes in order
    (parameters and buffers as arrays, submodules as ``ScriptObject``s); ``constants`` holds the class's
    ``Final`` constants (``negative_slope``, ``dim`` ...) as declared in the archive's code, read as literals.
    Nothing of the archive's code is executed.
    """

    # Set on the class made for each qualified name (see ``_RestrictedUnpickler._script_class``).
    qualified_name = ""
    declared_constants: dict = {}
    # The lines of the archive's code file declaring the class (read as text, never run); None when the
    # file is absent or larger than the budget.
    code_lines: list[str] | None = None

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _PickleRefused(f"{cls.qualified_name} was constructed with arguments; TorchScript objects take none")
        obj = super().__new__(cls)
        obj.attributes = {}
        return obj

    @property
    def constants(self) -> dict:
        return dict(self.declared_constants)

    @property
    def type_name(self) -> str:
        """The class name without TorchScript's ``__torch__.`` prefix and name-mangling parts."""
        return script_type_name(self.qualified_name)

    def __repr__(self) -> str:
        return f"<ScriptObject {self.qualified_name}>"


class TorchBindObject:
    """An inert stand-in for a TorchBind object of a ``TORCHBIND_CLASSES`` class: its ``qualified_name`` and the
    ``state`` its ``__getstate__`` returned (tuples, lists, arrays, ``QuantizedTensor``s and further
    ``TorchBindObject``s), never given to any code of that class."""

    qualified_name = ""

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _PickleRefused("a TorchBind object was constructed with arguments; they take none")
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __repr__(self) -> str:
        return f"<TorchBindObject {self.qualified_name or '(no class yet)'}>"


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized tensor (``torch.quantize_per_tensor`` ...): its integers ``values`` (int8, uint8 or int32),
    its ``qscheme`` (one of ``QSCHEMES``), and its ``scale``/``zero_point`` (numbers for a per-tensor scheme,
    arrays along ``axis`` for a per-channel one)."""

    values: np.ndarray
    qscheme: str
    scale: object
    zero_point: object
    axis: int | None = None


@dataclass(frozen=True)
class TorchName:
    """A torch constant named in a pickle that is a plain name here: a qscheme or a dtype (``kind``)."""

    kind: str
    name: str


def script_type_name(qualified_name: str) -> str:
    """``__torch__.torch.nn.modules.linear.___torch_mangle_3.Linear`` -> ``torch.nn.modules.linear.Linear``."""
    parts = [p for p in qualified_name.split(".") if not re.fullmatch(r"___torch_mangle_\d+", p)]
    if parts and parts[0] == "__torch__":
        parts = parts[1:]
    return ".".join(parts)


def read_torch_file(path: str) -> TorchFile:
    """Read a ``torch.save`` (zip or legacy) or ``torch.jit.save`` file; ``ModelFormatError`` if it is none."""
    with open(path, "rb") as f:
        head = f.read(4)
    with file_errors(os.path.basename(path)):
        if head == b"PK\x03\x04":
            return _read_zip(path)
        return _read_legacy(path)


# What a malformed file could still raise from the standard library or NumPy despite the checks made.
_UNEXPECTED_ERRORS = (RecursionError, OverflowError, IndexError, KeyError, TypeError, MemoryError,
                      NotImplementedError, struct.error, EOFError, UnicodeDecodeError)


@contextmanager
def file_errors(name: str):
    """A backstop: an exception type no malformed file should raise (each cause found is checked where it
    arises) still becomes a ``ModelFormatError`` naming the file, the original chained for a bug report."""
    try:
        yield
    except _UNEXPECTED_ERRORS as exc:
        raise ModelFormatError(f"{name}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc

# ----------------------------------------------------------------------------------------- the unpickler
class _PickleRefused(Exception):
    """Raised inside the unpickler; turned into ``ModelFormatError`` with the file's name."""


@dataclass(frozen=True)
class _StorageType:
    """A ``torch.<X>Storage`` named in a pickle: a marker, deliberately not callable."""

    name: str
    dtype: str


@dataclass(frozen=True)
class StorageReference:
    """One storage a tensor reads: ``numel`` elements of ``dtype`` under ``key``, or a slice of them (legacy views)."""

    key: str
    dtype: str
    numel: int
    view_offset: int = 0
    view_numel: int | None = None


@dataclass(eq=False)
class _PendingTensor:
    """A tensor whose storage bytes have not been read yet (legacy files put them after the object)."""

    storage: StorageReference
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _TensorTypeMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` named as the type in ``_rebuild_from_type_v2``."""

    name: str


def _check_int(value, what: str, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= _MAX_INDEX:
        raise _PickleRefused(f"{what}: expected an integer in [{minimum}, 2**48], got {_describe(value)}")
    return value


def _check_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_TENSOR_DIMS:
        raise _PickleRefused(f"{what}: expected a tuple of at most {_MAX_TENSOR_DIMS} integers, "
                             f"got {_describe(value)}")
    return tuple(_check_int(v, what) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _PendingTensor:
    """``torch._utils._rebuild_tensor_v2`` (and the older ``_rebuild_tensor``): record a view of ``storage``."""
    if not isinstance(storage, StorageReference):
        raise _PickleRefused(f"a tensor's storage must be a persistent storage reference, got {type(storage).__name__}")
    size_ = _check_int_tuple(size, "tensor size")
    stride_ = _check_int_tuple(stride, "tensor stride")
    if len(size_) != len(stride_):
        raise _PickleRefused(f"tensor size {size_} and stride {stride_} have different lengths")
    return _PendingTensor(storage, _check_int(storage_offset, "tensor storage offset"), size_, stride_)


@dataclass(eq=False)
class _PendingQuantizedTensor:
    """A quantized tensor whose integers have not been read yet: their view, and the quantizer's parameters."""

    tensor: _PendingTensor
    qscheme: str
    scale: object
    zero_point: object
    axis: int | None


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, *unused) -> _PendingQuantizedTensor:
    """``torch._utils._rebuild_qtensor``: the integers' view and ``(qscheme, scale, zero_point[, axis])``, a
    per-tensor scheme with numbers, a per-channel one with tensors of scales and zero points and an axis."""
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    if tensor.storage.dtype not in ("int8", "uint8", "int32"):
        raise _PickleRefused(f"a quantized tensor stored as {tensor.storage.dtype}; expected 8- or 32-bit integers")
    if not isinstance(quantizer_params, tuple) or not quantizer_params or not (
            isinstance(quantizer_params[0], TorchName) and quantizer_params[0].kind == "qscheme"):
        raise _PickleRefused(f"a quantized tensor's parameters must start with its qscheme, got "
                             f"{_describe(quantizer_params)}")
    qscheme = quantizer_params[0].name
    if qscheme in ("per_tensor_affine", "per_tensor_symmetric"):
        if len(quantizer_params) != 3 or not isinstance(quantizer_params[1], float) \
                or type(quantizer_params[2]) is not int:
            raise _PickleRefused(f"{qscheme} parameters must be (qscheme, scale, zero_point), got "
                                 f"{_describe(quantizer_params)}")
        return _PendingQuantizedTensor(tensor, qscheme, quantizer_params[1], quantizer_params[2], None)
    if len(quantizer_params) != 4 or not all(isinstance(p, _PendingTensor) for p in quantizer_params[1:3]):
        raise _PickleRefused(f"{qscheme} parameters must be (qscheme, scales, zero_points, axis), got "
                             f"{_describe(quantizer_params)}")
    axis = _check_int(quantizer_params[3], "quantized tensor axis")
    return _PendingQuantizedTensor(tensor, qscheme, quantizer_params[1], quantizer_params[2], axis)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is its data here."""
    if not isinstance(data, _PendingTensor):
        raise _PickleRefused(f"a Parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: allowed for plain tensors and Parameters only."""
    if not isinstance(new_type, _TensorTypeMarker) or func not in (_rebuild_tensor, _rebuild_parameter):
        raise _PickleRefused(f"tensor of type {_describe(new_type)} rebuilt by {_describe(func)} is not a plain "
                             "tensor")
    if not isinstance(args, tuple):
        raise _PickleRefused("_rebuild_from_type_v2: expected a tuple of arguments")
    return func(*args)


def _new_ordered_dict(*args):
    if args:
        raise _PickleRefused("collections.OrderedDict was given constructor arguments")
    return OrderedDict()


def _torch_size(values=()):
    return tuple(_check_int_tuple(values, "torch.Size"))


def _restore_type_tag(value, type_str=None):
    """``torch.jit._pickle.restore_type_tag`` and ``build_*list``: the value itself (type tags are dropped)."""
    return value


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode``, which protocol-2 pickles use for ``bytes``: only the latin-1 case is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _PickleRefused(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _new_ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorTypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TensorTypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorTypeMarker("torch.nn.Parameter"),
    ("torch", "Size"): _torch_size,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch", "ScriptObject"): TorchBindObject,  # its class name comes with its state (BUILD)
    **{("torch", name): TorchName("qscheme", name) for name in QSCHEMES},
    **{("torch", name): TorchName("dtype", name) for name in DTYPES},
}
_TORCHSCRIPT_GLOBALS = {
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch.jit._pickle", "build_tensorlist"): _restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): _restore_type_tag,
    ("torch.jit._pickle", "build_doublelist"): _restore_type_tag,
    ("torch.jit._pickle", "build_boollist"): _restore_type_tag,
}


def _load_build_restricted(unpickler: "_RestrictedUnpickler") -> None:
    """BUILD (set an object's state) only on the objects this unpickler itself makes.

    A state_dict's ``OrderedDict`` carries ``_metadata`` (module versions), which is dropped; a TorchScript
    object receives its attribute dict. Anything else is refused: the stock BUILD would call a
    ``__setstate__`` of the object's class.
    """
    state = unpickler.stack.pop()
    target = unpickler.stack[-1]
    if isinstance(target, OrderedDict):
        if state is not None and not isinstance(state, dict):
            raise _PickleRefused("an OrderedDict's pickled state must be a dict")
        return
    if isinstance(target, TorchBindObject):
        _build_torchbind(target, state)
        return
    if isinstance(target, ScriptObject):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _PickleRefused(f"{target.qualified_name}: expected a dict of attributes as its state")
        target.attributes.update(state)
        return
    raise _PickleRefused(f"refusing to set the state of a {type(target).__name__} (pickle BUILD)")


def _build_torchbind(target: TorchBindObject, state) -> None:
    """A TorchBind object's state: in a ``torch.save`` pickle ``(state, qualified class name)`` on a
    ``torch.ScriptObject``; in a TorchScript pickle the state alone, on an object of the named class."""
    if target.state is not None:
        raise _PickleRefused(f"{target.qualified_name or 'a TorchBind object'} is given its state twice")
    if not target.qualified_name:
        if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], str)):
            raise _PickleRefused(f"a torch.ScriptObject's state must be (state, class name), got {_describe(state)}")
        state, target.qualified_name = state
    if target.qualified_name not in TORCHBIND_CLASSES:
        raise _PickleRefused(f"the TorchBind class {target.qualified_name} is not one fastlstm reads (it reads "
                             f"{', '.join(TORCHBIND_CLASSES)}: PyTorch's dynamically quantized LSTM and Linear)")
    if not isinstance(state, tuple):
        raise _PickleRefused(f"{target.qualified_name}: expected a tuple as its state, got {_describe(state)}")
    target.state = state


_OPCODE_NAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}


def _load_extension(unpickler: "_RestrictedUnpickler") -> None:
    """EXT1/EXT2/EXT4 look a class up in copyreg's process-wide extension registry: never from a file."""
    raise _PickleRefused("the pickle uses an extension-registry opcode (EXT1/EXT2/EXT4), which torch never writes")


def _decode_long(unpickler, data: bytes):
    return pickle.decode_long(data)


def _decode_unicode(unpickler, data: bytes) -> str:
    return str(data, "utf-8", "surrogatepass")


def _decode_string(unpickler, data: bytes):
    return unpickler._decode_string(data)


def _bytes(unpickler, data: bytes) -> bytes:
    return data


def _bytearray(unpickler, data: bytes) -> bytearray:
    return bytearray(data)


def _length_prefixed(opcode: bytes, length_format: str, build):
    """A loader for ``opcode``, whose payload follows a ``length_format`` length: the length is checked against
    the bytes the pickle has left before anything is read or allocated (the stock BYTEARRAY8 allocates first)."""
    header_size = struct.calcsize(length_format)
    opname = _OPCODE_NAMES[opcode[0]]

    def load(unpickler: "_RestrictedUnpickler") -> None:
        header = unpickler.read(header_size)
        if len(header) != header_size:
            raise _PickleRefused(f"{opname}: truncated length")
        (length,) = struct.unpack(length_format, header)
        remaining = unpickler.remaining()
        if length < 0 or length > remaining:
            raise _PickleRefused(f"{opname} declares {length} bytes; the pickle has {remaining} left")
        unpickler.spend(length)
        data = unpickler.read(length)
        if len(data) != length:
            raise _PickleRefused(f"{opname}: {length} bytes declared, {len(data)} read")
        unpickler.append(build(unpickler, data))

    return load


def _load_frame(unpickler: "_RestrictedUnpickler") -> None:
    header = unpickler.read(8)
    if len(header) != 8:
        raise _PickleRefused("FRAME: truncated length")
    (size,) = struct.unpack("<Q", header)
    if size > unpickler.remaining():
        raise _PickleRefused(f"FRAME declares {size} bytes; the pickle has {unpickler.remaining()} left")
    unpickler._unframer.load_frame(size)


def _counted(load):
    def counted(unpickler: "_RestrictedUnpickler") -> None:
        unpickler.spend(_OBJECT_COST)
        load(unpickler)

    return counted


def _dispatch_table() -> dict:
    table = dict(pickle._Unpickler.dispatch)
    table[pickle.BUILD[0]] = _load_build_restricted
    for opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        table[opcode[0]] = _load_extension
    for opcode, length_format, build in (
            (pickle.BINBYTES, "<I", _bytes), (pickle.SHORT_BINBYTES, "<B", _bytes), (pickle.BINBYTES8, "<Q", _bytes),
            (pickle.BYTEARRAY8, "<Q", _bytearray),
            (pickle.BINUNICODE, "<I", _decode_unicode), (pickle.SHORT_BINUNICODE, "<B", _decode_unicode),
            (pickle.BINUNICODE8, "<Q", _decode_unicode),
            (pickle.BINSTRING, "<i", _decode_string), (pickle.SHORT_BINSTRING, "<B", _decode_string),
            (pickle.LONG1, "<B", _decode_long), (pickle.LONG4, "<i", _decode_long)):
        table[opcode[0]] = _length_prefixed(opcode, length_format, build)
    table[pickle.FRAME[0]] = _load_frame
    return {key: _counted(load) for key, load in table.items()}


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's pure-Python unpickler with an allow-list ``find_class`` and storage references.

    ``allow_torchscript`` admits ``__torch__.*`` classes (as ``ScriptObject`` subclasses) and TorchScript's
    own list/tag helpers; ``allow_globals=False`` admits no global at all (for torch's header pickles).
    ``file`` is a ``_BoundedReader``: every length the pickle declares is checked against the bytes it has
    left, and ``stored_bytes`` (what the pickle occupies in the file, compressed or not) sets the budget of
    what it may build (see ``_OBJECT_COST``). Copyreg's extension registry (EXT opcodes) is refused.
    """

    dispatch = _dispatch_table()

    def __init__(self, file: "_BoundedReader", *, stored_bytes: int, allow_globals: bool = True,
                 allow_torchscript: bool = False, legacy: bool = False):
        super().__init__(file, encoding="utf-8")
        self.source = file
        self.budget = _MIN_BUILD_BYTES + _BUILD_BYTES_PER_STORED_BYTE * stored_bytes
        self.allow_globals = allow_globals
        self.allow_torchscript = allow_torchscript
        self.legacy = legacy
        self.storages: dict[str, StorageReference] = {}
        self.script_classes: dict[str, type] = {}
        self.torchbind_classes: dict[str, type] = {}

    def remaining(self) -> int:
        """The pickle's bytes not read yet: the rest of the current frame and of the file."""
        frame = self._unframer.current_frame
        in_frame = frame.getbuffer().nbytes - frame.tell() if frame is not None else 0
        return in_frame + self.source.remaining()

    def spend(self, cost: int) -> None:
        self.budget -= cost
        if self.budget < 0:
            raise _PickleRefused("it builds more objects than a pickle of its size can describe (a compressed "
                                 "pickle that expands into a huge structure?)")

    def find_class(self, module, name):
        if self.allow_globals and isinstance(module, str) and isinstance(name, str):
            found = _ALLOWED_GLOBALS.get((module, name))
            if found is not None:
                return found
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(name, STORAGE_DTYPES[name])
            if self.allow_torchscript:
                found = _TORCHSCRIPT_GLOBALS.get((module, name))
                if found is not None:
                    return found
                if f"{module}.{name}" in TORCHBIND_CLASSES:
                    return self._torchbind_class(f"{module}.{name}")
                if module == "__torch__" or module.startswith("__torch__."):
                    return self._script_class(f"{module}.{name}")
        raise _PickleRefused(f"the pickle refers to the global {module}.{name}, which is not allowed. "
                             + _WHOLE_MODEL_HINT)

    def _script_class(self, qualified_name: str) -> type:
        cls = self.script_classes.get(qualified_name)
        if cls is None:
            if len(self.script_classes) >= _MAX_SCRIPT_CLASSES:
                raise _PickleRefused(f"more than {_MAX_SCRIPT_CLASSES} TorchScript classes")
            cls = type("ScriptObject", (ScriptObject,), {"qualified_name": qualified_name, "declared_constants": {}})
            self.script_classes[qualified_name] = cls
        return cls

    def _torchbind_class(self, qualified_name: str) -> type:
        cls = self.torchbind_classes.get(qualified_name)
        if cls is None:
            cls = type("TorchBindObject", (TorchBindObject,), {"qualified_name": qualified_name})
            self.torchbind_classes[qualified_name] = cls
        return cls

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise _PickleRefused(f"unexpected persistent id {_describe(pid)}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            raise _PickleRefused("the file holds a pickled nn.Module class. " + _WHOLE_MODEL_HINT)
        if typename != "storage":
            raise _PickleRefused(f"unexpected persistent id of type {_describe(typename)}")
        if self.legacy:
            if len(pid) != 6:
                raise _PickleRefused(f"a legacy storage reference has 6 fields, got {len(pid)}")
            _, storage_type, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise _PickleRefused(f"a storage reference has 5 fields, got {len(pid)}")
            _, storage_type, key, _location, numel = pid
            view = None
        if not isinstance(storage_type, _StorageType):
            raise _PickleRefused(f"storage of unknown type {_describe(storage_type)}")
        if not isinstance(key, str) or not key or len(key) > 256:
            raise _PickleRefused(f"invalid storage key {_describe(key)}")
        _check_int(numel, f"storage {key!r} size")
        known = self.storages.get(key)
        if known is None:
            self.storages[key] = known = StorageReference(key, storage_type.dtype, numel)
        elif (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise _PickleRefused(f"storage {key!r} is referenced as {known.numel} x {known.dtype} and as "
                                 f"{numel} x {storage_type.dtype}")
        if view is None:
            return known
        if not isinstance(view, tuple) or len(view) != 3:
            raise _PickleRefused(f"invalid storage view {_describe(view)}")
        _view_key, view_offset, view_numel = view
        _check_int(view_offset, "storage view offset")
        _check_int(view_numel, "storage view size")
        if view_offset + view_numel > numel:
            raise _PickleRefused(f"storage view [{view_offset}, {view_offset + view_numel}) exceeds storage {key!r} "
                                 f"of {numel} elements")
        return StorageReference(key, known.dtype, numel, view_offset, view_numel)


def _unpickle(file: "_BoundedReader", what: str, name: str, **kwargs):
    """Run one restricted unpickling; every failure becomes ``ModelFormatError`` naming ``name`` and ``what``."""
    unpickler = _RestrictedUnpickler(file, **kwargs)
    try:
        return unpickler.load(), unpickler
    except _PickleRefused as exc:
        raise ModelFormatError(f"{name}: {what}: {exc}") from None
    except RecursionError:
        raise ModelFormatError(f"{name}: {what} is nested too deeply") from None
    except Exception as exc:  # any malformed byte sequence: EOFError, UnpicklingError, struct.error, TypeError ...
        raise ModelFormatError(f"{name}: {what} is not a valid pickle ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------- zip layout
def _read_zip(path: str) -> TorchFile:
    name = os.path.basename(path)
    file_size = os.path.getsize(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
        raise ModelFormatError(f"{name}: cannot open the zip archive: {exc}") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in members if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            raise ModelFormatError(f"{name}: expected one data.pkl at the top of the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        is_torchscript = any(n.startswith(prefix + "code/") for n in members)
        data_pkl = _read_member(archive, members[pickles[0]], name, _MAX_PICKLE_BYTES)
        root, unpickler = _unpickle(_BoundedReader(io.BytesIO(data_pkl), len(data_pkl)), "data.pkl", name,
                                    stored_bytes=members[pickles[0]].compress_size, allow_torchscript=is_torchscript)

        byteorder = "little"
        if prefix + "byteorder" in members:
            byteorder = _read_member(archive, members[prefix + "byteorder"], name, 16).decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise ModelFormatError(f"{name}: byteorder is {byteorder!r}; expected 'little' or 'big'")

        storages: dict[str, bytes] = {}
        for key, ref in unpickler.storages.items():
            member = members.get(f"{prefix}data/{key}")
            if member is None:
                raise ModelFormatError(f"{name}: storage {key!r} is referenced but data/{key} is missing")
            nbytes = ref.numel * _itemsize(ref.dtype)
            if member.file_size != nbytes or nbytes > file_size:
                raise ModelFormatError(f"{name}: storage data/{key} holds {member.file_size} bytes; its tensors "
                                       f"expect {ref.numel} x {ref.dtype} = {nbytes} bytes")
            if member.compress_type != zipfile.ZIP_STORED:
                raise ModelFormatError(f"{name}: storage data/{key} is compressed; torch.save stores storages "
                                       "uncompressed, so the archive was rewritten by another tool")
            storages[key] = _read_member(archive, member, name, nbytes)

        if is_torchscript:
            _attach_script_constants(archive, members, prefix, unpickler.script_classes.values(), name)
    root = _materialize(root, storages, "<" if byteorder == "little" else ">", name)
    if is_torchscript and not isinstance(root, ScriptObject):
        raise ModelFormatError(f"{name}: a TorchScript archive whose data.pkl holds a "
                               f"{type(root).__name__}, not a module")
    return TorchFile(root=root, layout="zip", is_torchscript=is_torchscript)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limit: int) -> bytes:
    if info.file_size > limit:
        raise ModelFormatError(f"{name}: {info.filename} is {info.file_size} bytes, more than the {limit} expected")
    try:
        with archive.open(info) as f:
            data = f.read(limit + 1)
    except Exception as exc:  # truncated, bad CRC, bad compression data ...
        raise ModelFormatError(f"{name}: {info.filename} is unreadable: {exc}") from None
    if len(data) != info.file_size:
        raise ModelFormatError(f"{name}: {info.filename} holds {len(data)} bytes, its header says {info.file_size}")
    return data


_FINAL_CONSTANT = re.compile(r"^  (\w+) : Final\[(?:int|float|bool|str)\] = (.+)$")


def _attach_script_constants(archive, members, prefix: str, classes, name: str) -> None:
    """Give each TorchScript class its ``Final`` constants (``negative_slope : Final[float] = 0.3``) as literals,
    and the lines of the code file declaring it (``code_lines``, for ``verify`` to read).

    Scripted modules declare their ``__constants__`` this way in ``code/<module path>.py``; the lines are
    parsed with ``ast.literal_eval`` (numbers, booleans, strings only) and nothing else of the code is read.
    Traced modules inline their constants into their code instead, so they have none here.
    """
    sources: dict[str, list[str] | None] = {}
    for cls in classes:
        module, _, class_name = cls.qualified_name.rpartition(".")
        member = f"{prefix}code/{module.replace('.', '/')}.py"
        if member not in sources:
            info = members.get(member)
            if info is None or info.file_size > _MAX_CODE_FILE_BYTES:
                sources[member] = None
            else:
                sources[member] = _read_member(archive, info, name, _MAX_CODE_FILE_BYTES).decode(
                    "utf-8", "replace").splitlines()
        lines = sources[member]
        cls.code_lines = lines
        if not lines:
            continue
        try:
            start = lines.index(f"class {class_name}(Module):") + 1
        except ValueError:
            continue
        constants = {}
        for line in lines[start:]:
            if line and not line.startswith(" "):
                break
            match = _FINAL_CONSTANT.match(line)
            if match:
                try:
                    constants[match.group(1)] = ast.literal_eval(match.group(2))
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # e.g. {[]: 1}
                    pass
        cls.declared_constants = constants


# ----------------------------------------------------------------------------------------- legacy layout
class _BoundedReader:
    """A file reader that never asks for more bytes than remain (sizes in a pickle are untrusted)."""

    def __init__(self, f, size: int):
        self.f = f
        self.size = size

    def remaining(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int = -1) -> bytes:
        remaining = self.remaining()
        return self.f.read(remaining if n is None or n < 0 else min(n, remaining))

    def readline(self) -> bytes:
        return self.f.readline(max(self.remaining(), 0))


def _read_legacy(path: str) -> TorchFile:
    name = os.path.basename(path)
    with open(path, "rb") as raw:
        f = _BoundedReader(raw, os.fstat(raw.fileno()).st_size)
        magic, _ = _unpickle(f, "the header", name, stored_bytes=f.remaining(), allow_globals=False)
        if magic != LEGACY_MAGIC_NUMBER:
            raise ModelFormatError(f"{name}: not a torch.save file (it starts with a pickle of "
                                   f"{_describe(magic)}, not torch's magic number)")
        protocol, _ = _unpickle(f, "the header", name, stored_bytes=f.remaining(), allow_globals=False)
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise ModelFormatError(f"{name}: torch.save protocol version {_describe(protocol)}; "
                                   f"fastlstm reads version {LEGACY_PROTOCOL_VERSION}")
        sys_info, _ = _unpickle(f, "the header", name, stored_bytes=f.remaining(), allow_globals=False)
        if not isinstance(sys_info, dict):
            raise ModelFormatError(f"{name}: malformed header (sys_info is a {type(sys_info).__name__})")
        root, unpickler = _unpickle(f, "the pickled object", name, stored_bytes=f.remaining(), legacy=True)
        keys, _ = _unpickle(f, "the storage key list", name, stored_bytes=f.remaining(), allow_globals=False)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise ModelFormatError(f"{name}: malformed storage key list")
        unknown = [k for k in keys if k not in unpickler.storages]
        missing = [k for k in unpickler.storages if k not in set(keys)]
        if unknown or missing:
            raise ModelFormatError(f"{name}: the storage key list does not match the storages the tensors use "
                                   f"(unreferenced: {unknown[:5]}, absent: {missing[:5]})")
        storages: dict[str, bytes] = {}
        for key in keys:
            ref = unpickler.storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise ModelFormatError(f"{name}: truncated before storage {key!r}")
            (numel,) = struct.unpack("<q", header)
            if numel != ref.numel:
                raise ModelFormatError(f"{name}: storage {key!r} records {numel} elements; its tensors expect "
                                       f"{ref.numel}")
            nbytes = numel * _itemsize(ref.dtype)
            if nbytes > f.remaining():
                raise ModelFormatError(f"{name}: truncated: storage {key!r} needs {nbytes} bytes, "
                                       f"{f.remaining()} remain")
            storages[key] = f.read(nbytes)
    # Legacy storages are always written little-endian, whatever machine wrote them.
    root = _materialize(root, storages, "<", name)
    return TorchFile(root=root, layout="legacy", is_torchscript=False)


def _describe(value) -> str:
    """A short repr of a value read from a file: bounded in length and in nesting (a plain repr of a deeply
    nested list recurses)."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60


# ----------------------------------------------------------------------------------------- tensors
def _itemsize(dtype: str) -> int:
    return 2 if dtype == _BFLOAT16 else np.dtype(dtype).itemsize


def _materialize(root, storages: dict[str, bytes], byteorder: str, name: str):
    """Replace every ``_PendingTensor`` reachable from ``root`` by a read-only array over its storage's bytes.

    Containers are updated in place (tuples rebuilt), each visited once, so shared and cyclic references
    cost nothing extra.
    """
    storage_bytes = sum(len(b) for b in storages.values())
    budget = {"bytes": _MAX_VIEW_AMPLIFICATION * storage_bytes + _VIEW_ALLOWANCE_BYTES}
    tensors: dict[int, np.ndarray] = {}
    done: dict[int, object] = {}

    def tensor(pending: _PendingTensor) -> np.ndarray:
        array = tensors.get(id(pending))
        if array is None:
            array = tensors[id(pending)] = _tensor_view(pending, storages, byteorder, name, budget)
        return array

    def visit(obj):
        if isinstance(obj, _PendingTensor):
            return tensor(obj)
        if isinstance(obj, _PendingQuantizedTensor):
            if id(obj) not in done:
                done[id(obj)] = QuantizedTensor(tensor(obj.tensor), obj.qscheme, visit(obj.scale),
                                                visit(obj.zero_point), obj.axis)
            return done[id(obj)]
        if isinstance(obj, TorchBindObject):
            if id(obj) not in done:
                done[id(obj)] = obj
                obj.state = visit(obj.state)
            return obj
        if not isinstance(obj, (dict, list, tuple, ScriptObject)):
            return obj
        if id(obj) in done:
            return done[id(obj)]
        if isinstance(obj, tuple):
            done[id(obj)] = obj  # a tuple cannot contain itself except through a mutable container
            result = tuple(visit(v) for v in obj)
            done[id(obj)] = result
            return result
        done[id(obj)] = obj
        if isinstance(obj, dict):
            for key in list(obj):
                obj[key] = visit(obj[key])
        elif isinstance(obj, list):
            obj[:] = [visit(v) for v in obj]
        else:
            for key in list(obj.attributes):
                obj.attributes[key] = visit(obj.attributes[key])
        return obj

    try:
        return visit(root)
    except RecursionError:  # the unpickler itself is iterative; a crafted file may nest containers deeply
        raise ModelFormatError(f"{name}: the pickled object is nested too deeply") from None


def _tensor_view(pending: _PendingTensor, storages: dict[str, bytes], byteorder: str, name: str,
                 budget: dict) -> np.ndarray:
    ref = pending.storage
    available = ref.view_numel if ref.view_numel is not None else ref.numel
    base = ref.view_offset
    numel = 1
    for s in pending.size:
        numel *= s
    where = f"{name}: tensor of shape {pending.size} in storage {ref.key!r}"
    if numel:
        last = pending.offset + sum((n - 1) * s for n, s in zip(pending.size, pending.stride))
        if last >= available:
            raise ModelFormatError(f"{where}: reaches element {last}, beyond the storage's {available}")
        if numel > available:
            raise ModelFormatError(f"{where}: has {numel} elements, more than its storage's {available} "
                                   "(an expanded or overlapping view); save a contiguous copy instead")
    elif np.prod([s for s in pending.size if s], dtype=object) > _MAX_INDEX:
        raise ModelFormatError(f"{where}: an empty tensor whose other dimensions multiply to more than 2**48")
    itemsize = _itemsize(ref.dtype)
    budget["bytes"] -= numel * itemsize
    if budget["bytes"] < 0:
        raise ModelFormatError(f"{name}: its tensors describe far more bytes than its storages hold")
    raw = storages[ref.key]
    dtype = np.dtype("uint16" if ref.dtype == _BFLOAT16 else ref.dtype).newbyteorder(byteorder)
    flat = np.frombuffer(raw, dtype=dtype, count=ref.numel)
    if numel:
        array = np.lib.stride_tricks.as_strided(
            flat[base + pending.offset:], shape=pending.size,
            strides=tuple(s * itemsize for s in pending.stride), writeable=False)
    else:
        array = np.zeros(pending.size, dtype=dtype)
    if ref.dtype == _BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.flags.writeable:
        array.flags.writeable = False
    return array
