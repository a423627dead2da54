"""Which build of the compiled kernels this process runs: the best instruction-set level the CPU supports.

The Cython kernels are built once per level from the same source (setup.py): on x86-64 ``baseline`` (any
x86-64 CPU), ``avx2`` (AVX2 + FMA) and ``avx512`` (AVX-512 F, BW, DQ and VL as well); on any other
architecture a single ``generic`` build. The CPU's features are NumPy's own runtime detection, which for
AVX and AVX-512 also checks that the operating system saves the wider registers (XCR0), so a feature it
reports is one a kernel may use.

``FASTLSTM_KERNELS=baseline|avx2|avx512`` (or ``generic``) forces a level, e.g. to compare them or to test
the slower paths on a fast machine; a level this CPU or architecture cannot run is refused when
``fastlstm`` is imported, naming the features it lacks.

The Numba backend needs nothing of this: it compiles for the host CPU at run time, and its on-disk cache
is keyed on the CPU name and features as well as the code (``numba.core.codegen``'s ``magic_tuple``), so
cached code never runs on another CPU. ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` choose its target
instead (``NUMBA_CPU_NAME=generic`` compiles for any CPU of the architecture).
"""

from __future__ import annotations

import os
import platform

from ..errors import InvalidInputError

FORCE_VARIABLE = "FASTLSTM_KERNELS"

# Level -> the features (NumPy's names) its build was compiled for; setup.py's flags enable exactly these.
X86_64_LEVELS = {
    "avx512": ("AVX", "AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL"),
    "avx2": ("AVX", "AVX2", "FMA3"),
    "baseline": (),
}  # best first
GENERIC_LEVEL = "generic"


def is_x86_64(machine: str | None = None) -> bool:
    """Whether the interpreter runs on x86-64 (the architecture with several levels)."""
    return (platform.machine() if machine is None else machine).lower() in ("x86_64", "amd64")


def cpu_features() -> dict[str, bool]:
    """NumPy's runtime CPU feature flags (name -> present)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def supported_levels(features: dict[str, bool], x86_64: bool) -> list[str]:
    """The levels a CPU with ``features`` can run, best first."""
    if not x86_64:
        return [GENERIC_LEVEL]
    return [level for level, needed in X86_64_LEVELS.items() if all(features.get(name) for name in needed)]


def choose_level(features: dict[str, bool], x86_64: bool, forced: str | None) -> str:
    """The level to run: ``forced`` (the value of FASTLSTM_KERNELS, refused if the CPU cannot run it) or else
    the best the CPU supports."""
    supported = supported_levels(features, x86_64)
    if not forced:
        return supported[0]
    known = tuple(X86_64_LEVELS) if x86_64 else (GENERIC_LEVEL,)
    if forced not in known:
        raise InvalidInputError(
            f"{FORCE_VARIABLE}={forced!r}: not a kernel level of this {'x86-64' if x86_64 else 'non-x86-64'} "
            f"build; expected one of {', '.join(known)} (this CPU runs {', '.join(supported)})")
    if forced not in supported:
        missing = [name for name in X86_64_LEVELS[forced] if not features.get(name)]
        raise InvalidInputError(
            f"{FORCE_VARIABLE}={forced!r}: this CPU lacks {', '.join(missing)} (or the operating system does not "
            f"enable them); it runs {', '.join(supported)}")
    return forced


FEATURES = cpu_features()
X86_64 = is_x86_64()
KERNEL_LEVEL = choose_level(FEATURES, X86_64, os.environ.get(FORCE_VARIABLE, "").strip() or None)


def deciding_features() -> dict[str, bool]:
    """The features the choice among the levels looked at, with this CPU's answer for each."""
    names = sorted({name for needed in X86_64_LEVELS.values() for name in needed}) if X86_64 else []
    return {name: bool(FEATURES.get(name)) for name in names}
