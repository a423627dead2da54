# The kernels of _cykernels.pyx as the module fastlstm.backends._cykernels.avx512, compiled for x86-64 CPUs with AVX-512 F, BW, DQ and VL
# (flags in setup.py).
include "_cykernels.pyx"
