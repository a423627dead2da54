"""The child process of ``_keras_hdf5``: open an HDF5 file with h5py and stream out its contents.

Run as ``python <this file> <path>`` (``-`` reads the HDF5 image from stdin). It writes to stdout 8 bytes
(little endian) giving the length of a JSON header, the header, then the bytes of every floating-point
dataset in the header's order::

    {"attributes": {"/": {...}, "/group/path": {"name": value}},
     "arrays": {"/path/to/dataset": [dtype, shape, offset into the data that follows]},
     "other_datasets": {"/path": dtype}}

On any error it writes one line to stderr and exits with ``FORMAT_ERROR_EXIT``. The module imports nothing
from fastlstm, so that running it by path needs only h5py and NumPy.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np

FORMAT_ERROR_EXIT = 3
HEADER_LENGTH_BYTES = 8
# DEFLATE, the only filter a Keras file could use, expands data at most ~1032:1.
MAX_COMPRESSED_EXPANSION = 1100
_MAX_ATTRIBUTE_VALUES = 100_000


def dump(source, file_size: int, out) -> None:
    """Write ``source``'s attributes and floating-point datasets to the binary stream ``out``."""
    import h5py

    attributes: dict[str, dict] = {}
    datasets = []
    other_datasets: dict[str, str] = {}
    with h5py.File(source, "r") as h5file:
        attributes["/"] = _plain_attributes(h5file)

        def visit(relative_path, obj):
            path = "/" + relative_path
            attributes[path] = _plain_attributes(obj)
            if isinstance(obj, h5py.Dataset):
                if obj.dtype.kind == "f" and obj.shape is not None:
                    datasets.append((path, obj))
                else:
                    other_datasets[path] = str(obj.dtype)

        h5file.visititems(visit)  # visits each object once, whatever links point to it
        described, offset = {}, 0
        for path, dataset in datasets:
            # Checked before anything is read: a damaged shape must not drive the allocation.
            capacity = file_size * (MAX_COMPRESSED_EXPANSION if dataset.compression else 1)
            if offset + dataset.nbytes > capacity:
                raise ValueError(f"dataset {path} declares shape {dataset.shape}, more data than the "
                                 f"{file_size}-byte file holds")
            described[path] = (dataset.dtype.str, list(dataset.shape), offset)
            offset += dataset.nbytes
        header = json.dumps({"attributes": attributes, "arrays": described,
                             "other_datasets": other_datasets}).encode("utf-8")
        out.write(len(header).to_bytes(HEADER_LENGTH_BYTES, "little"))
        out.write(header)
        for path, dataset in datasets:
            array = np.ascontiguousarray(dataset[()])
            if array.dtype.str != described[path][0] or array.nbytes != dataset.nbytes:
                raise ValueError(f"dataset {path} read back as {array.dtype} {array.shape}")
            out.write(array.tobytes())


def _plain_attributes(obj) -> dict:
    """An object's attributes as JSON values: text, lists of text, numbers (others are left out)."""
    values = {}
    for key in obj.attrs.keys():
        value = _plain(obj.attrs[key])
        if value is not None:
            values[key] = value
    return values


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, np.ndarray) and value.size <= _MAX_ATTRIBUTE_VALUES:
        if value.dtype.kind in "OSU":
            items = [_plain(item) for item in value.ravel().tolist()]
            return items if all(isinstance(item, str) for item in items) else None
        if value.dtype.kind in "biuf":
            return value.tolist()
    return None


def main(target: str) -> int:
    try:
        if target == "-":
            data = sys.stdin.buffer.read()
            source, size = io.BytesIO(data), len(data)
        else:
            source, size = target, os.path.getsize(target)
        dump(source, size, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except Exception as exc:  # everything h5py raises on a damaged file
        sys.stderr.write(" ".join(f"{type(exc).__name__}: {exc}".split()) + "\n")
        return FORMAT_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[-1]))
