"""Read ``.safetensors`` files (tensors by name) without the ``safetensors`` package.

The format: an 8-byte little-endian header size ``N``, ``N`` bytes of JSON
(``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the byte buffer, which the offsets index (relative to its start). Every field is checked before
anything is allocated: the header fits the file, offsets are ordered, in range and do not overlap, each
tensor's byte count is ``prod(shape) * itemsize``, dtypes are known. Nothing is read beyond the file, and
no more memory is used than the file's size (plus bfloat16's widening to float32).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ...errors import ModelFormatError

# Real headers take about 100 bytes per tensor (the reference implementation accepts up to 100 MB); parsing
# JSON builds several times its size in objects, so the bound is kept well below that.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSOR_DIMS = 32
# safetensors dtype -> NumPy dtype (little-endian). BF16 has none: read as uint16 and widened to float32.
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def looks_like_safetensors(path: str) -> bool:
    """Whether a file starts like a safetensors file: a header size that fits the file, then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
        file_size = os.fstat(f.fileno()).st_size
    if len(head) < 9:
        return False
    header_size = int.from_bytes(head[:8], "little")
    return 2 <= header_size <= file_size - 8 and head[8:9] == b"{"


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a ``.safetensors`` file by name, in the file's order of offsets, and its metadata.

    Arrays are read-only views of one buffer holding the file's data section (bfloat16 widened to float32).
    Raises ``ModelFormatError`` naming the file and the field for anything malformed.
    """
    name = os.path.basename(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ModelFormatError(f"{name}: {file_size} bytes, too short for a safetensors header size")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(file_size - 8, MAX_HEADER_BYTES):
            raise ModelFormatError(f"{name}: the header declares {header_size} bytes; the file has {file_size - 8} "
                                   f"after the size (and headers are at most {MAX_HEADER_BYTES})")
        header_bytes = f.read(header_size)
        entries, metadata = _parse_header(header_bytes, name)
        data_size = file_size - 8 - header_size
        tensors_spec = _check_entries(entries, data_size, name)
        buffer = f.read(data_size)
    if len(buffer) != data_size:
        raise ModelFormatError(f"{name}: the data section holds {len(buffer)} bytes, expected {data_size}")
    tensors: dict[str, np.ndarray] = {}
    for key, dtype, shape, begin, end in tensors_spec:
        array = np.frombuffer(buffer, dtype=DTYPES[dtype], count=(end - begin) // np.dtype(DTYPES[dtype]).itemsize,
                              offset=begin).reshape(shape)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        array.flags.writeable = False
        tensors[key] = array
    return tensors, metadata


def _parse_header(header_bytes: bytes, name: str) -> tuple[dict, dict[str, str]]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{name}: the safetensors header is not valid JSON ({type(exc).__name__}: "
                               f"{str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{name}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ModelFormatError(f"{name}: __metadata__: expected an object of strings")
    return header, metadata


def _check_entries(entries: dict, data_size: int, name: str) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """``(name, dtype, shape, begin, end)`` per tensor, sorted by offset, after checking every field."""
    problems: list[str] = []
    checked = []
    for key, entry in entries.items():
        where = f"tensor {key[:200]!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            problems.append(f"{where}: expected exactly the fields dtype, shape, data_offsets")
            continue
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            problems.append(f"{where}: dtype {str(dtype)[:20]!r} is not one of {', '.join(DTYPES)}")
            continue
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(type(s) is int and 0 <= s <= data_size for s in shape)):
            problems.append(f"{where}: shape: expected a list of at most {MAX_TENSOR_DIMS} integers in "
                            f"[0, {data_size}], got {str(shape)[:80]}")
            continue
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o <= data_size for o in offsets) or offsets[0] > offsets[1]):
            problems.append(f"{where}: data_offsets: expected [begin, end] with 0 <= begin <= end <= {data_size} "
                            f"(the data section's size), got {str(offsets)[:80]}")
            continue
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            problems.append(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; shape {shape} "
                            f"of {dtype} needs {nbytes}")
            continue
        checked.append((key, dtype, tuple(shape), offsets[0], offsets[1]))
    checked.sort(key=lambda t: (t[3], t[4]))
    for previous, current in zip(checked, checked[1:]):
        if current[3] < previous[4]:
            problems.append(f"tensor {current[0][:200]!r}: data_offsets [{current[3]}, {current[4]}] overlap "
                            f"tensor {previous[0][:200]!r} [{previous[3]}, {previous[4]}]")
    if problems:
        raise ModelFormatError(f"{name}: malformed safetensors header ({len(problems)} problem(s)):\n"
                               + "\n".join(f"  - {p}" for p in problems[:20]))
    return checked
