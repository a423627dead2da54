"""Build the Cython kernels in csrc/ as the extension ``fastlstm.backends._cykernels``.

Flags: -O3 and SIMD for the machine it is built on (-march=native). Set FASTLSTM_PORTABLE=1 to build
without -march=native (a binary that runs on any x86-64), and FASTLSTM_CYTHON_DEBUG=1 to turn Cython's
bounds and wrap-around checks back on.
"""

import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

portable = os.environ.get("FASTLSTM_PORTABLE") == "1"
debug = os.environ.get("FASTLSTM_CYTHON_DEBUG") == "1"

# Of -ffast-math we take only what the kernels need and what keeps results bounded and NaN meaningful:
# no errno, no trapping, FMA contraction, and reassociation (-fassociative-math, which needs
# -fno-signed-zeros), without which gcc cannot vectorise a floating-point sum: the hand-written GEMV is
# then 6x slower. Reassociating a dot product changes only its rounding, as any BLAS does. Left out:
# -ffinite-math-only (NaN and inf inputs must propagate as they do in NumPy) and reciprocal approximations.
compile_args = [
    "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fassociative-math", "-fno-signed-zeros",
]
if not portable and sys.platform != "win32":
    compile_args.append("-march=native")
# The thread pool of the threaded kernels (csrc/lstm_parallel.h) uses POSIX threads.
thread_args = [] if sys.platform == "win32" else ["-pthread"]

# One set of directives for the whole build; the debug switch turns the safety checks back on.
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "fastlstm.backends._cykernels",
        ["csrc/_cykernels.pyx"],
        include_dirs=[np.get_include(), "csrc"],
        depends=["csrc/lstm_parallel.h", "csrc/activations.pxd", "csrc/blas.pxd", "csrc/cell.pxd"],
        extra_compile_args=compile_args + thread_args,
        extra_link_args=thread_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

# csrc/*.pxd: the inline building blocks _cykernels.pyx cimports (compiled into the one extension).
setup(ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["csrc"]))
