"""The compiled kernels of csrc/_cykernels.pyx, as the module of the instruction-set level chosen for this CPU.

The build makes one extension module per level from the same source (``baseline``, ``avx2`` and ``avx512``
on x86-64, ``generic`` elsewhere; see setup.py); ``fastlstm.backends.cpu`` decides which one this process
runs, and this package imports it and answers every attribute from it, so ``_cykernels.LSTMKernels`` is
that level's class.
"""

from __future__ import annotations

import importlib

from ..cpu import KERNEL_LEVEL

kernels = importlib.import_module(f"{__name__}.{KERNEL_LEVEL}")


def __getattr__(name: str):
    return getattr(kernels, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(kernels)))
