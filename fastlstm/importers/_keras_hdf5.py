"""Read an HDF5 file with h5py running in a child process, behind a time limit and a memory limit.

The HDF5 C library is not hardened against damaged files: single flipped bits in a legacy Keras ``.h5``
file made it crash the interpreter (a segmentation fault while converting a string attribute) or loop
forever (on a global heap object of size 0), and its deflate filter inflates a chunk for as long as the
stream lasts. So nothing in this process touches the file: ``_keras_hdf5_child`` opens it in a child Python
process and, in a short conversation (described there),

1. describes it: ``attributes`` ``{"/group/path": {"name": value}}`` of every group and dataset (the root is
   ``"/"``), and each dataset's dtype and shape, reading no dataset; a file that reaches outside itself
   (external links, external storage, virtual datasets, filters other than deflate and shuffle) is refused;
2. reads the datasets the caller asks for, once the caller has checked their declared shapes against what
   the model needs: nothing else is ever read.

The child is started isolated (``python -I``: neither the working directory nor the model's directory nor
``PYTHON*`` variables reach its import path), without the ``HDF5_*`` variables that select drivers, plugins
or prefixes for external files, and with HDF5 plugins disabled. Its address space is limited to
``BASE_MEMORY_LIMIT`` plus four times the file's size, raised to let it hold twice the arrays requested; the
whole conversation must end within ``BASE_TIME_LIMIT_S`` plus a second per 10 MB. A crash, a timeout, the
memory limit or any error in the child becomes a ``ModelFormatError``. Starting the child costs about a
quarter of a second per file.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError
from ._keras_hdf5_child import FORMAT_ERROR_EXIT, LENGTH_BYTES, READ_DTYPES, frame

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_keras_hdf5_child.py")
# Run by path (not "-m"), so that the child needs neither this package on its path nor anything it imports.
_RUN_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# Seconds the conversation may take: generous for a healthy file, finite for one the library loops on.
BASE_TIME_LIMIT_S = 10.0
TIME_LIMIT_S_PER_BYTE = 1 / 10e6
# Address space of the child before it reads any dataset: Python, NumPy and h5py take about 150 MB.
BASE_MEMORY_LIMIT = 1 << 30
_MEMORY_PER_FILE_BYTE = 4
# The description of a file (its attributes and datasets) may take at most this many bytes.
_MAX_DESCRIPTION_BYTES = 64 << 20
_CHILD_ENVIRONMENT = {"HDF5_PLUGIN_PRELOAD": "::", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class StoredDataset:
    """A dataset as the file declares it; ``dtype`` is None when it is not floating point (never read)."""

    path: str
    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    declared_dtype: str  # for messages


class Hdf5File:
    """An HDF5 file open in a child process: its description at once, the datasets asked for later.

    Use as a context manager; ``read`` may be called once.
    """

    def __init__(self, name: str, *, path: str | None = None, data: bytes | None = None):
        self.name = name
        size = os.path.getsize(path) if path is not None else len(data)
        self.time_limit = BASE_TIME_LIMIT_S + size * TIME_LIMIT_S_PER_BYTE
        self._deadline = time.monotonic() + self.time_limit
        memory_limit = BASE_MEMORY_LIMIT + _MEMORY_PER_FILE_BYTE * size
        command = [sys.executable, "-I", "-c", _RUN_CHILD, _CHILD_SCRIPT,
                   os.path.abspath(path) if path is not None else "-", str(memory_limit)]
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith(("HDF5_", "PYTHON"))} | _CHILD_ENVIRONMENT
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=environment)
        except OSError as exc:
            raise OSError(f"cannot start a Python process ({sys.executable!r}) to read HDF5 files: {exc}") from None
        self._stdout = bytearray()
        self._stderr = bytearray()
        try:
            if data is not None:
                self._send({}, data)
            description, _ = self._receive(_MAX_DESCRIPTION_BYTES)
            self.attributes: dict[str, dict] = dict(description["attributes"])
            self.datasets: dict[str, StoredDataset] = {
                path: StoredDataset(path, None if shape is None else tuple(shape),
                                    np.dtype(dtype) if dtype in READ_DTYPES else None, dtype)
                for path, (dtype, shape) in description["datasets"].items()}
        except ModelFormatError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise ModelFormatError(f"{name}: could not decode the HDF5 reader's description: {exc}") from None
        except BaseException:  # KeyboardInterrupt: the child must not outlive the call
            self.close()
            raise

    def read(self, paths: list[str]) -> dict[str, np.ndarray]:
        """The float datasets at ``paths`` (all listed in ``datasets``), as read-only arrays."""
        expected = {path: self.datasets[path] for path in paths}
        data_bytes = sum(int(np.prod(d.shape, dtype=np.int64)) * d.dtype.itemsize for d in expected.values())
        self._send({"read": list(expected)})
        header, data = self._receive(_MAX_DESCRIPTION_BYTES, data_bytes)
        try:
            arrays = {}
            for path, (dtype, shape, offset) in header["arrays"].items():
                stored = expected[path]
                if np.dtype(dtype) != stored.dtype or tuple(shape) != stored.shape:
                    raise ValueError(f"{path} came back as {dtype} {shape}")
                count = int(np.prod(shape, dtype=np.int64))
                if offset < 0 or offset + count * stored.dtype.itemsize > len(data):
                    raise ValueError(f"array {path} lies outside the data received")
                arrays[path] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
            if arrays.keys() != expected.keys():
                raise ValueError(f"asked for {len(expected)} arrays, received {len(arrays)}")
        except Exception as exc:
            raise ModelFormatError(f"{self.name}: could not decode the HDF5 reader's answer: {exc}") from None
        self.close()
        return arrays

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            stream.close()

    def __enter__(self) -> Hdf5File:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -------------------------------------------------------------------- the conversation
    def _send(self, header: dict, data: bytes = b"") -> None:
        self._pump(frame(header, len(data)) + data, reply_limit=None)

    def _receive(self, header_limit: int, data_bytes: int | None = 0) -> tuple[dict, bytes]:
        """The child's next message; ``data_bytes`` is the size of the data it must carry (None: any)."""
        end = self._pump(b"", reply_limit=(header_limit, data_bytes))
        header_length = int.from_bytes(self._stdout[:LENGTH_BYTES], "little")
        header = json.loads(self._stdout[LENGTH_BYTES:LENGTH_BYTES + header_length].decode("utf-8"))
        data = bytes(self._stdout[LENGTH_BYTES + header_length:end])
        del self._stdout[:end]
        return header, data

    def _pump(self, outgoing: bytes, reply_limit: tuple[int, int | None] | None) -> int:
        """Write ``outgoing`` to the child and, if ``reply_limit`` is given, read until one whole message has
        arrived (returning its length); the child's death, a message over its limits or the deadline raise."""
        process = self._process
        with selectors.DefaultSelector() as selector:
            if outgoing:
                os.set_blocking(process.stdin.fileno(), False)
                selector.register(process.stdin, selectors.EVENT_WRITE)
            selector.register(process.stdout, selectors.EVENT_READ)
            selector.register(process.stderr, selectors.EVENT_READ)
            sent = 0
            while True:
                if sent == len(outgoing) and outgoing:
                    selector.unregister(process.stdin)
                    outgoing = b""
                if not outgoing and reply_limit is None:
                    return 0
                if reply_limit is not None:
                    end = self._message_end(*reply_limit)
                    if end is not None and not outgoing:
                        return end
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelFormatError(f"{self.name}: the HDF5 library did not finish reading the file in "
                                           f"{self.time_limit:.0f} s (a damaged file can make it loop)")
                for key, _ in selector.select(remaining):
                    if key.fileobj is process.stdin:
                        try:
                            sent += os.write(process.stdin.fileno(), outgoing[sent:sent + (1 << 16)])
                        except BrokenPipeError:
                            self._failed()
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        if key.fileobj is process.stdout:
                            self._failed()
                        selector.unregister(key.fileobj)
                    elif key.fileobj is process.stdout:
                        self._stdout += chunk
                    else:
                        self._stderr += chunk[:1 << 16]

    def _message_end(self, header_limit: int, data_bytes: int | None) -> int | None:
        """Where the first message in the buffer ends, None while it is incomplete; checks its sizes."""
        buffer = self._stdout
        if len(buffer) < LENGTH_BYTES:
            return None
        header_length = int.from_bytes(buffer[:LENGTH_BYTES], "little")
        if header_length > header_limit:
            raise ModelFormatError(f"{self.name}: the HDF5 reader's answer declares a {header_length}-byte "
                                   f"description, more than the limit of {header_limit}")
        if len(buffer) < LENGTH_BYTES + header_length:
            return None
        try:
            declared = json.loads(buffer[LENGTH_BYTES:LENGTH_BYTES + header_length].decode("utf-8"))["data_bytes"]
        except Exception as exc:
            raise ModelFormatError(f"{self.name}: could not decode the HDF5 reader's answer: {exc}") from None
        if data_bytes is not None and declared != data_bytes:
            raise ModelFormatError(f"{self.name}: the HDF5 reader answered with {declared} bytes of data, "
                                   f"expected {data_bytes}")
        end = LENGTH_BYTES + header_length + declared
        return end if len(buffer) >= end else None

    def _failed(self):
        """Raise the ``ModelFormatError`` that says how the child ended."""
        process = self._process
        try:
            returncode = process.wait(max(self._deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            raise ModelFormatError(f"{self.name}: the HDF5 reader stopped answering") from None
        self._stderr += process.stderr.read()[:1 << 16]
        message = self._stderr.decode("utf-8", "replace").strip().splitlines()
        if returncode == FORMAT_ERROR_EXIT:
            raise ModelFormatError(f"{self.name}: {message[-1] if message else 'unreadable HDF5 file'}")
        how = f"crashed (signal {-returncode})" if returncode < 0 else \
            f"failed (exit status {returncode}): " + "\n".join(message[-5:])
        raise ModelFormatError(f"{self.name}: the HDF5 library {how} reading the file; it is damaged or not HDF5")
