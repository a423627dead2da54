"""Backend registry: name -> factory, and the ``"auto"`` choice.

Compiled backends are imported lazily, so a missing or unbuilt one costs nothing until asked for, and an
explicit request for it fails with the reason (e.g. how to build the Cython extension). The instruction-set
level of the Cython kernels is chosen when this package is imported (``cpu``; a forced level the CPU cannot
run is refused then); ``kernel_info`` reports it.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform

import numpy as np

from ..errors import InvalidInputError, UnsupportedModelError
from ..spec import ModelSpec
from . import cpu
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


def kernel_info() -> dict:
    """What runs on this machine: the Cython kernels' instruction-set level (``level``; ``forced`` when
    FASTLSTM_KERNELS chose it), the levels this CPU can run and those this build holds, the CPU features
    that decided, the target Numba compiles for, and the backends that import (fastest first)."""
    import importlib.util

    built = [level for level in (*cpu.X86_64_LEVELS, cpu.GENERIC_LEVEL)
             if importlib.util.find_spec(f"{__name__}._cykernels.{level}") is not None]
    backends = available_backends()
    numba_target = None
    if "numba" in backends:
        import llvmlite.binding
        import numba

        # As numba.core.codegen decides: NUMBA_CPU_NAME=generic alone means no optional features ("").
        features = numba.config.CPU_FEATURES
        numba_target = {
            "cpu_name": numba.config.CPU_NAME or llvmlite.binding.get_host_cpu_name(),
            "cpu_features": llvmlite.binding.get_host_cpu_features().flatten() if features is None else features,
        }
    return {
        "level": cpu.KERNEL_LEVEL,
        "forced": bool(os.environ.get(cpu.FORCE_VARIABLE, "").strip()),
        "supported_levels": cpu.supported_levels(cpu.FEATURES, cpu.X86_64),
        "built_levels": built,
        "machine": platform.machine(),
        "cpu_features": cpu.deciding_features(),
        "numba_target": numba_target,
        "backends": backends,
    }


def default_num_threads() -> int:
    """The cores this process may run on, capped by ``OMP_NUM_THREADS`` when that is set.

    Worker processes of Dask and Ray may run on every core but are given their share in ``OMP_NUM_THREADS``
    (1 for a one-thread Dask worker, a Ray task's ``num_cpus``), which BLAS libraries honour; so does fastlstm,
    so that workers sharing a machine do not compete for its cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = os.environ.get("OMP_NUM_THREADS", "").strip()
    if share.isdigit() and int(share) >= 1:
        return min(cores, int(share))
    return cores


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
