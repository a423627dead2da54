"""Reading a caller's value as an array, with fastlstm's error for what cannot be one."""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError


def as_real_array(value, name: str) -> np.ndarray:
    """``value`` as an array of real numbers (bool, integers or floats); ``InvalidInputError`` naming ``name``
    for anything else (complex or object dtypes, ragged lists)."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"{name}: could not be read as an array ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{name}: expected real numbers, got dtype {array.dtype}")
    return array
