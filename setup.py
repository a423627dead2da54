"""Build the Cython kernels in csrc/ as the package ``fastlstm.backends._cykernels``: one extension module
per instruction-set level, all compiled from the same csrc/_cykernels.pyx, so that one build (one wheel)
runs at full speed on every CPU of its architecture. ``fastlstm.backends.cpu`` imports the best level the
CPU supports.

* x86-64: ``baseline`` (SSE2, every x86-64 CPU), ``avx2`` (AVX2 + FMA, the vector part of x86-64-v3) and
  ``avx512`` (AVX-512 F/BW/DQ/VL as well, the vector part of x86-64-v4). Each level is enabled by its
  feature flags alone, never by -march=native: the flags are exactly the features checked at import.
* Any other architecture (aarch64, ...): one ``generic`` module, built with the compiler's defaults for
  that target (on aarch64 this includes NEON).

Each level is a tiny stub csrc/level_<name>.pyx that includes _cykernels.pyx: a Cython module's name is
fixed by its source file, and the kernel code is written once. Set FASTLSTM_CYTHON_DEBUG=1 to turn Cython's
bounds and wrap-around checks back on. The levels are compiled in parallel, one per core.
"""

import os
import platform
import sys
import sysconfig

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTLSTM_CYTHON_DEBUG") == "1"

# Of -ffast-math we take only what the kernels need and what keeps results bounded and NaN meaningful:
# no errno, no trapping, FMA contraction, and reassociation (-fassociative-math, which needs
# -fno-signed-zeros), without which gcc cannot vectorise a floating-point sum: the hand-written GEMV is
# then 6x slower. Reassociating a dot product changes only its rounding, as any BLAS does. Left out:
# -ffinite-math-only (NaN and inf inputs must propagate as they do in NumPy) and reciprocal approximations.
compile_args = [
    "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fassociative-math", "-fno-signed-zeros",
]
# The thread pool of the threaded kernels (csrc/lstm_parallel.h) uses POSIX threads.
thread_args = [] if sys.platform == "win32" else ["-pthread"]


def builds_for_x86_64() -> bool:
    """Whether this build targets x86-64 with a gcc-style compiler (the only one given the levels' flags).
    A macOS universal2 build compiles each file for arm64 too, where the x86 flags would not compile."""
    machine = platform.machine().lower()
    return (machine in ("x86_64", "amd64") and sys.platform != "win32"
            and "universal2" not in sysconfig.get_platform())


# Instruction-set level -> its compiler flags; fastlstm/backends/cpu.py checks the same features at import.
AVX2_FLAGS = ["-mavx2", "-mfma"]
X86_64_LEVELS = {
    "baseline": [],
    "avx2": AVX2_FLAGS,
    "avx512": AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mprefer-vector-width=512"],
}
levels = X86_64_LEVELS if builds_for_x86_64() else {"generic": []}

# One set of directives for the whole build; the debug switch turns the safety checks back on.
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}

kernel_sources = ["csrc/_cykernels.pyx", "csrc/lstm_parallel.h", "csrc/activations.pxd", "csrc/blas.pxd",
                  "csrc/cell.pxd", "csrc/head.pxd", "csrc/narrow_weights.h"]
extensions = [
    Extension(
        f"fastlstm.backends._cykernels.{level}",
        [f"csrc/level_{level}.pyx"],
        include_dirs=[np.get_include(), "csrc"],
        depends=kernel_sources,
        extra_compile_args=compile_args + level_flags + thread_args,
        extra_link_args=thread_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for level, level_flags in levels.items()
]

# The levels are independent compilations of the same code: run them side by side (also under pip, which
# passes no -j of its own). csrc/*.pxd: the inline building blocks _cykernels.pyx cimports.
parallel = min(len(levels), os.cpu_count() or 1)
setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["csrc"], nthreads=parallel),
    options={"build_ext": {"parallel": parallel}},
)
