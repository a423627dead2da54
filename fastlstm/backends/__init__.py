"""Backend registry: name -> factory, and the ``"auto"`` choice.

Compiled backends are imported lazily, so a missing or unbuilt one costs nothing until asked for, and an
explicit request for it fails with the reason (e.g. how to build the Cython extension).
"""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np

from ..errors import InvalidInputError, UnsupportedModelError
from ..spec import ModelSpec
from .base import PreparedLSTM

logger = logging.getLogger("fastlstm")

# name -> "module:class". "auto" tries them in this order (fastest first, as measured by bench/).
BACKENDS = {
    "cython": "fastlstm.backends.cython_backend:CythonLSTM",
    "numba": "fastlstm.backends.numba_backend:NumbaLSTM",
    "numpy": "fastlstm.backends.numpy_backend:NumpyLSTM",
}


def backend_class(name: str) -> type[PreparedLSTM]:
    """The ``PreparedLSTM`` class of backend ``name``; raises ``ImportError`` saying why it is unavailable."""
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def available_backends() -> list[str]:
    """Names of the backends that import on this machine, fastest first."""
    names = []
    for name in BACKENDS:
        try:
            backend_class(name)
        except ImportError:
            continue
        names.append(name)
    return names


def default_num_threads() -> int:
    """The cores this process may run on (never more threads than that)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare(spec: ModelSpec, backend: str, dtype: np.dtype, num_threads: int | None = None,
            weights: str = "float32") -> PreparedLSTM:
    """Prepare ``spec`` on ``backend`` (a name from ``BACKENDS`` or ``"auto"``) for up to ``num_threads``, its
    gate weights stored as ``weights`` (a format of ``fastlstm.quantize``, already checked)."""
    if num_threads is None:
        num_threads = default_num_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise InvalidInputError(f"num_threads: expected a positive integer or None, got {num_threads!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a name (str), got {type(backend).__name__}")
    if backend == "auto":
        for name in BACKENDS:
            try:
                cls = backend_class(name)
            except ImportError as exc:
                logger.info("backend %r unavailable: %s", name, exc)
                continue
            reason = cls.unsupported(spec)
            if reason:
                logger.info("backend %r cannot run this model: %s", name, reason)
                continue
            logger.info("backend 'auto' chose %r", name)
            return cls(spec, dtype, int(num_threads), weights)
        raise ImportError("no fastlstm backend could be imported")  # unreachable: numpy always imports
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    cls = backend_class(backend)
    reason = cls.unsupported(spec)
    if reason:
        raise UnsupportedModelError([f"backend {backend!r}: {reason}"], hint="backend='auto' picks one that can")
    return cls(spec, dtype, int(num_threads), weights)
