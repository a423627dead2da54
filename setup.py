"""Build the Cython kernels in csrc/ as the extension ``fastlstm._cykernels``.

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

compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
if not portable and sys.platform != "win32":
    compile_args.append("-march=native")

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
        "fastlstm._cykernels",
        ["csrc/_cykernels.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=compile_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
