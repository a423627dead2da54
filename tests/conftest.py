"""Fixtures shared by the test files: the small model the API contract tests run on every backend.

``random_models`` (beside this file) builds every other model description the tests use.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from random_models import random_spec

BACKENDS = ("numpy", "numba", "cython")


@pytest.fixture(scope="module")
def spec():
    """Two LSTM layers (4 -> 6 -> 6) and a tanh head of 3; a test file may define its own ``spec``."""
    return random_spec(np.random.default_rng(0), input_size=4, hidden_size=6, num_layers=2, head=[(3, "tanh")])


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, spec):
    """``spec`` prepared on each backend in turn."""
    return fastlstm.Model(spec, backend=request.param)
