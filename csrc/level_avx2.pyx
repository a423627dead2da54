# The kernels of _cykernels.pyx as the module fastlstm.backends._cykernels.avx2, compiled for x86-64 CPUs with AVX2 and FMA
# (flags in setup.py).
include "_cykernels.pyx"
