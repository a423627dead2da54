"""pytest-benchmark micro-benchmarks of each backend's hot paths, for regression tracking.

Not part of ``make test`` (timings are not tests): run ``pytest bench/ --benchmark-only`` and compare runs
with ``--benchmark-autosave`` / ``--benchmark-compare``.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from fastlstm.backends import available_backends
from fastlstm.spec import LSTMCellWeights, LSTMLayer, ModelSpec

SIZES = [(32, 64, 1), (64, 128, 1), (128, 256, 2)]


def spec_for(input_size, hidden, layers):
    rng = np.random.default_rng(0)
    built, layer_input = [], input_size
    for _ in range(layers):
        cell = LSTMCellWeights(rng.normal(0, 0.1, (4 * hidden, layer_input)), rng.normal(0, 0.1, (4 * hidden, hidden)),
                               rng.normal(0, 0.1, 4 * hidden))
        built.append(LSTMLayer(layer_input, hidden, (cell,)))
        layer_input = hidden
    return ModelSpec(tuple(built))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "I{}-H{}-L{}".format(*s))
@pytest.mark.parametrize("backend", available_backends())
def test_stream_step(benchmark, backend, size):
    stream = fastlstm.Model(spec_for(*size), backend=backend).stream()
    x = np.random.default_rng(1).normal(size=size[0]).astype(np.float32)
    out = np.empty(size[1], np.float32)
    benchmark(stream.step, x, out)


@pytest.mark.parametrize("backend", available_backends())
def test_predict_sequence(benchmark, backend):
    model = fastlstm.Model(spec_for(128, 256, 1), backend=backend)
    x = np.random.default_rng(2).normal(size=(1, 200, 128)).astype(np.float32)
    benchmark(model.predict, x)
