"""What the PyTorch tests share: inputs, torch's own output, and the 1e-5 comparison (import after
``pytest.importorskip("torch")``)."""

from __future__ import annotations

import numpy as np
import torch

TOLERANCE = 1e-5  # float32 agreement with the source framework, the README's contract


def inputs(batch=3, steps=6, features=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


def torch_output(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def assert_close(actual, expected, tolerance=TOLERANCE):
    assert np.shape(actual) == np.shape(expected), (np.shape(actual), np.shape(expected))
    assert np.max(np.abs(np.asarray(actual) - np.asarray(expected))) <= tolerance
