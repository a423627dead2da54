"""fastlstm: low-latency CPU inference for LSTM networks trained in any framework.

    model = fastlstm.load("model.pt")            # a file path or an in-memory framework object
    y = model.predict(x)                          # whole sequences, batch first
    stream = model.stream()                       # one time step per call, state kept
    y_t = stream.step(x_t)
    pool = model.stream_pool(capacity=10_000)     # many live sequences, the ready ones stepped as one batch
    y = pool.step(keys, x)
"""

from __future__ import annotations

import logging

from .backends import kernel_info
from .errors import FastLSTMError, InvalidInputError, InvalidModelError, ModelFormatError, UnsupportedModelError
from .limits import allocation_limit, set_allocation_limit
from .model import Model, Stream
from .pool import StreamPool
from .spec import DenseLayer, LSTMCellWeights, LSTMLayer, ModelSpec

__version__ = "0.1.0"
__all__ = [
    "load", "Model", "Stream", "StreamPool", "ModelSpec", "LSTMLayer", "LSTMCellWeights", "DenseLayer",
    "FastLSTMError", "ModelFormatError", "InvalidModelError", "UnsupportedModelError", "InvalidInputError",
    "allocation_limit", "set_allocation_limit", "kernel_info",
]

logging.getLogger("fastlstm").addHandler(logging.NullHandler())


def load(source, *, backend: str = "auto", dtype="float32", num_threads: int | None = None,
         weights: str | None = None, **options) -> Model:
    """Load a model from a file path or an in-memory object, ready to run.

    ``backend`` is ``"auto"`` (the fastest available; see ``Model.backend``), ``"cython"``, ``"numba"`` or
    ``"numpy"``; ``dtype`` is ``"float32"`` or ``"float64"``; ``num_threads`` caps the threads one call may
    use (default: the cores this process may run on; 1 suits a service stepping many streams in parallel
    threads). ``weights`` stores the recurrent gate weights as ``"float32"``, ``"bfloat16"`` or ``"int8"``
    (one scale per gate row; activations, state and sums stay float32; see ``fastlstm.quantize``); the default
    is ``"int8"`` for a model imported already quantized to 8 bits, else ``"float32"``. Importer options
    (e.g. which parameters form the head of a PyTorch state_dict) are passed as further keywords; see the
    README.
    Loading never executes code from the file.
    """
    from .importers import read_model

    return Model(read_model(source, **options), backend=backend, dtype=dtype, num_threads=num_threads,
                 weights=weights)
