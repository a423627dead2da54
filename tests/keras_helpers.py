"""What the Keras tests share: Keras 3 on its torch backend (no TensorFlow), h5py, and the filter for a
deprecation warning Keras' own arrays raise. Import it first in a test module: it skips the module when
either package is missing."""

from __future__ import annotations

import os

import pytest

os.environ["KERAS_BACKEND"] = "torch"  # read when keras is first imported, just below
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")
if keras.backend.backend() != "torch":
    pytest.skip("these tests run Keras on the torch backend", allow_module_level=True)

# Keras' own arrays trip NumPy 2's __array__(copy=...) deprecation on every call; nothing of ours.
KERAS_WARNINGS = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
