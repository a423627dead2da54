# The kernels of _cykernels.pyx as the module fastlstm.backends._cykernels.generic, compiled for any CPU of an architecture other than x86-64, with the compiler's defaults for it
# (flags in setup.py).
include "_cykernels.pyx"
