"""Reading ``.npy`` data from a user (a file, an ``.npz`` member, a request body) without trusting its header.

``np.load`` allocates the array its header declares before reading the data; a header of a few bytes can
declare terabytes. Here the declared size is checked first against the bytes actually present and against
``fastlstm.allocation_limit()``; pickled (object) arrays are never read.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError
from ..limits import check_allocation


def load_npy(fileobj, size: int, where: str) -> np.ndarray:
    """The array in ``fileobj`` (``size`` bytes from its current position), its header checked first."""
    start = fileobj.tell()
    try:
        version = np.lib.format.read_magic(fileobj)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fileobj)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fileobj)
        else:
            raise InvalidInputError(f"{where}: .npy format version {version} is not read (1.0 and 2.0 are)")
    except InvalidInputError:
        raise
    except Exception as exc:  # NumPy's header parser raises ValueError for anything malformed
        raise InvalidInputError(f"{where}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise InvalidInputError(f"{where}: holds Python objects ({dtype}); only numeric arrays are read")
    declared = math.prod(shape) * dtype.itemsize
    present = size - (fileobj.tell() - start)
    if declared > present:
        raise InvalidInputError(f"{where}: the header declares {declared} bytes of data (shape {shape}, {dtype}) "
                                f"but {present} follow")
    check_allocation(declared, where)
    fileobj.seek(start)
    try:
        return np.load(fileobj, allow_pickle=False)
    except Exception as exc:
        raise InvalidInputError(f"{where}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
