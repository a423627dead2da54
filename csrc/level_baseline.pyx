# The kernels of _cykernels.pyx as the module fastlstm.backends._cykernels.baseline, compiled for any x86-64 CPU (SSE2 only)
# (flags in setup.py).
include "_cykernels.pyx"
