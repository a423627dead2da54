"""How many threads SciPy's BLAS runs a call on: the compiled kernels call BLAS only where that is no more
than the model's ``num_threads``, so that ``num_threads=1`` means one thread.

Both compiled backends multiply through ``scipy.linalg.cython_blas`` (Numba's ``np.dot`` too), and OpenBLAS,
SciPy's usual BLAS, splits a large enough product over its own threads: as many as the library is set to
(``OPENBLAS_NUM_THREADS``, ``threadpoolctl``), by default one per core, whatever the caller asked for.
Changing that setting for a call would change it for the whole process (every other user of SciPy's BLAS,
other threads' calls included), so fastlstm only reads it: the library's own query function, found among
the symbols ``cython_blas`` links to (the library already loaded; nothing is loaded or run from a file).
A BLAS without a known query is assumed to take every core the process may run on.
"""

from __future__ import annotations

import ctypes
import os

# The thread-count queries of the BLAS libraries SciPy is built with: SciPy's own OpenBLAS wheels (prefixed
# symbols), a system OpenBLAS (plain or 64-bit-integer suffixed), Intel MKL.
_THREAD_QUERIES = ("scipy_openblas_get_num_threads", "openblas_get_num_threads", "openblas_get_num_threads64_",
                   "MKL_Get_Max_Threads")


def available_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _thread_query():
    """The ctypes function that returns BLAS's thread count, or None when none of ``_THREAD_QUERIES`` is
    reachable from SciPy's ``cython_blas``."""
    try:
        import scipy.linalg.cython_blas as cython_blas
        library = ctypes.CDLL(cython_blas.__file__)  # already loaded by the import: the same handle
    except (ImportError, OSError, AttributeError):
        return None
    for name in _THREAD_QUERIES:
        try:
            query = getattr(library, name)
        except AttributeError:
            continue
        query.restype = ctypes.c_int
        query.argtypes = []
        return query
    return None


_QUERY = _thread_query()


def thread_query_address() -> int:
    """The address of BLAS's ``int query(void)`` thread count (0 when unknown), for the compiled kernels,
    which ask it on every call that could go to BLAS (a threadpoolctl limit set later is obeyed)."""
    return (ctypes.cast(_QUERY, ctypes.c_void_p).value or 0) if _QUERY is not None else 0


def blas_threads() -> int:
    """The threads a BLAS call may run on now: the library's setting, or every core when it cannot be read."""
    if _QUERY is None:
        return available_cores()
    return max(int(_QUERY()), 1)


def blas_within(num_threads: int) -> bool:
    """Whether a call limited to ``num_threads`` threads may go to BLAS."""
    return blas_threads() <= num_threads
