"""Read an HDF5 file into plain values, with h5py running in a child process.

The HDF5 C library is not hardened against damaged files: single flipped bits in a legacy Keras ``.h5``
file made it crash the interpreter (a segmentation fault while converting a string attribute) or loop
forever (on a global heap object of size 0). So ``_keras_hdf5_child`` parses the file in a child Python
process and streams back

* ``attributes``: ``{"/group/path": {"name": value}}`` for every group and dataset (the root is ``"/"``),
  strings as ``str``, string arrays as lists, small numeric attributes as numbers or lists;
* ``arrays``: ``{"/path/to/dataset": ndarray}`` for every floating-point dataset (other datasets are listed
  in ``other_datasets`` with their dtype, not read).

A crash, a hang (the child is killed after a time limit that grows with the file) or any error in the child
becomes a ``ModelFormatError``; the one endless loop we know is recognised beforehand, so that it fails at
once. The child checks that the bytes each dataset declares fit in the file before reading it, so a damaged
shape cannot drive a huge allocation. Starting the child costs about a quarter of a second per file.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError
from ._keras_hdf5_child import FORMAT_ERROR_EXIT, HEADER_LENGTH_BYTES

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_keras_hdf5_child.py")
# Run by path (not "-m"), so that the child needs neither this package on its path nor anything it imports.
_RUN_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
_ARRAY_DTYPES = ("<f2", "<f4", "<f8", ">f2", ">f4", ">f8")
# Seconds the child may take: generous for a healthy file, finite for one the library loops on.
BASE_TIME_LIMIT_S = 10.0
TIME_LIMIT_S_PER_BYTE = 1 / 10e6


@dataclass
class Hdf5Contents:
    attributes: dict[str, dict]  # every group's and dataset's attributes, by absolute path
    arrays: dict[str, np.ndarray]  # every floating-point dataset, by absolute path
    other_datasets: dict[str, str]  # path -> dtype of datasets that are not floating point (not read)


def read_hdf5(name: str, *, path: str | None = None, data: bytes | None = None) -> Hdf5Contents:
    """Parse the HDF5 file at ``path``, or the HDF5 image ``data``, in a child process; ``name`` is for messages."""
    size = os.path.getsize(path) if path is not None else len(data)
    if path is not None:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
            _refuse_endless_global_heap(image, name)
    else:
        _refuse_endless_global_heap(data, name)
    command = [sys.executable, "-c", _RUN_CHILD, _CHILD_SCRIPT, os.path.abspath(path) if path is not None else "-"]
    timeout = BASE_TIME_LIMIT_S + size * TIME_LIMIT_S_PER_BYTE
    try:
        finished = subprocess.run(command, input=data, capture_output=True, timeout=timeout)
    except OSError as exc:
        raise OSError(f"cannot start a Python process ({sys.executable!r}) to read HDF5 files: {exc}") from None
    except subprocess.TimeoutExpired:
        raise ModelFormatError(f"{name}: the HDF5 library did not finish reading the file in {timeout:.0f} s "
                               "(a damaged file can make it loop)") from None
    if finished.returncode == FORMAT_ERROR_EXIT:
        message = finished.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ModelFormatError(f"{name}: {message[-1] if message else 'unreadable HDF5 file'}")
    if finished.returncode != 0:
        how = f"crashed (signal {-finished.returncode})" if finished.returncode < 0 else \
            f"failed (exit status {finished.returncode}): " + finished.stderr.decode("utf-8", "replace")[-500:]
        raise ModelFormatError(f"{name}: the HDF5 library {how} reading the file; it is damaged or not HDF5")
    return _decode(finished.stdout, name)


def _decode(output: bytes, name: str) -> Hdf5Contents:
    """Rebuild the child's answer, checking every offset and size against the bytes received."""
    try:
        header_length = int.from_bytes(output[:HEADER_LENGTH_BYTES], "little")
        body = HEADER_LENGTH_BYTES + header_length
        header = json.loads(output[HEADER_LENGTH_BYTES:body].decode("utf-8"))
        arrays = {}
        for path, (dtype, shape, offset) in header["arrays"].items():
            if dtype not in _ARRAY_DTYPES or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ValueError(f"bad array description {dtype!r} {shape!r}")
            count = int(np.prod(shape, dtype=np.int64))
            if offset < 0 or body + offset + count * np.dtype(dtype).itemsize > len(output):
                raise ValueError(f"array {path} lies outside the data received")
            arrays[path] = np.frombuffer(output, dtype=dtype, count=count, offset=body + offset).reshape(shape)
        return Hdf5Contents(dict(header["attributes"]), arrays, dict(header["other_datasets"]))
    except Exception as exc:
        raise ModelFormatError(f"{name}: could not decode the HDF5 reader's answer: {exc}") from None


def _refuse_endless_global_heap(image, name: str) -> None:
    """Fail at once, rather than at the time limit, on the one endless loop of the HDF5 library we know.

    Variable-length strings (Keras' ``model_config``, ``layer_names``, ``weight_names``) live in global heap
    collections. HDF5 walks a collection from object to object by each object's declared size, and an object
    of index 0 and size 0 does not advance the walk. Layout (HDF5 file format, "Global Heap"): "GCOL",
    version 1, 3 reserved bytes, the collection size; then objects of index (2 bytes), reference count (2),
    reserved (4), size, data padded to 8 bytes. Sizes are the superblock's "size of lengths" bytes long.
    """
    if len(image) < 16 or image[:8] != b"\x89HDF\r\n\x1a\n":
        return
    length_size = image[14] if image[8] < 2 else image[10]  # superblock versions 0-1 / 2-3
    if length_size not in (2, 4, 8):
        return  # the library refuses such a superblock itself
    object_header_size = 8 + length_size
    start = image.find(b"GCOL\x01\x00\x00\x00")
    while start != -1:
        end = start + int.from_bytes(image[start + 8:start + 8 + length_size], "little")
        position = start + 8 + length_size
        while end <= len(image) and position + object_header_size <= end:
            index = int.from_bytes(image[position:position + 2], "little")
            size = int.from_bytes(image[position + 8:position + 8 + length_size], "little")
            step = object_header_size + -(-size // 8) * 8 if index else size
            if step == 0:
                raise ModelFormatError(f"{name}: damaged HDF5 global heap at byte {position} (an empty entry the "
                                       "HDF5 library would loop on forever)")
            position += step
        start = image.find(b"GCOL\x01\x00\x00\x00", start + 4)
