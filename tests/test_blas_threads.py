"""``num_threads`` caps every thread a call runs on, BLAS's included: the compiled kernels call SciPy's BLAS
(which splits a large product over threads of its own) only while BLAS is set to no more threads than the
model may use, and their hand loops otherwise (fastlstm.backends.blas_threads).

The thread test measures it: CPU time spent by threads other than the caller during a run of calls. A
positive control (SciPy's BLAS alone, on a large product) shows that the measurement sees BLAS's threads
on this machine; without a BLAS that threads here the test is skipped.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest
import scipy.linalg.blas
import scipy.linalg.cython_blas

import fastlstm
from fastlstm.backends.blas_threads import blas_threads, blas_within
from random_models import random_stack

pytest.importorskip("fastlstm.backends._cykernels", reason="the Cython extension is not built")
from fastlstm.backends import _cykernels  # noqa: E402

COMPILED = ("cython", "numba")
# (256, 512): 6.3 MB of float32 gate weights, above the 2 MiB from which a batch-1 product goes to BLAS
# where BLAS may run; a dense head of 16 (a GEMM above 8 rows).
BIG = dict(kinds=["lstm"], hidden_sizes=[512], input_size=256, head=[(16, "tanh")], scale=0.05)
BLAS_IDLE_S = 0.5  # OpenBLAS's threads spin this long at most after a call before they sleep


def big_spec():
    return random_stack(np.random.default_rng(3), **BIG)


def other_threads_share(call, seconds: float = 0.4) -> float:
    """CPU time of every thread but this one over this thread's own, while ``call()`` repeats for
    ``seconds``."""
    call()
    time.sleep(BLAS_IDLE_S)
    own, total, start = time.thread_time(), time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
    own, total = time.thread_time() - own, time.process_time() - total
    return (total - own) / own


def blas_threads_seen() -> bool:
    """Whether SciPy's BLAS alone, on a product it splits over threads, shows in ``other_threads_share``."""
    if blas_threads() < 2:
        return False
    rng = np.random.default_rng(0)
    matrix = np.asfortranarray(rng.standard_normal((2048, 1024), dtype=np.float32))
    vector = rng.standard_normal(1024, dtype=np.float32)
    return other_threads_share(lambda: scipy.linalg.blas.sgemv(1.0, matrix, vector)) > 0.3


@pytest.fixture(scope="module")
def blas_threading():
    if not blas_threads_seen():
        pytest.skip("SciPy's BLAS runs no threads of its own here (one core, or limited to one thread)")


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype, batch", [("float32", 1), ("float32", 64), ("float64", 1), ("float64", 16)])
def test_one_thread_stream_steps_run_on_the_calling_thread_alone(blas_threading, backend, dtype, batch):
    model = fastlstm.Model(big_spec(), backend=backend, dtype=dtype, num_threads=1)
    stream = model.stream(batch)
    x = np.random.default_rng(1).standard_normal((batch, BIG["input_size"])).astype(dtype)
    assert other_threads_share(lambda: stream.step(x)) < 0.05


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_thread_whole_sequences_run_on_the_calling_thread_alone(blas_threading, backend, dtype):
    # 16 rows of 8 steps: the input projection is a product of 128 rows, the head's too.
    model = fastlstm.Model(big_spec(), backend=backend, dtype=dtype, num_threads=1)
    x = np.random.default_rng(2).standard_normal((16, 8, BIG["input_size"])).astype(dtype)
    assert other_threads_share(lambda: model.predict(x)) < 0.05


def test_the_kernels_ask_blas_its_thread_count_on_every_call():
    """A limit set on BLAS after the model is loaded (as threadpoolctl sets it) is obeyed at once."""
    library = ctypes.CDLL(scipy.linalg.cython_blas.__file__)
    if not hasattr(library, "scipy_openblas_set_num_threads"):
        pytest.skip("SciPy's BLAS is not its own OpenBLAS build")
    model = fastlstm.Model(big_spec(), backend="cython", num_threads=1)
    original = blas_threads()
    try:
        library.scipy_openblas_set_num_threads(1)
        assert blas_threads() == 1 and blas_within(1) and _cykernels.blas_allowed(1)
        library.scipy_openblas_set_num_threads(2)
        assert blas_threads() == 2 and not blas_within(1) and not _cykernels.blas_allowed(1)
        # Not with 2 either: the extension's own thread pool would find BLAS's spinning threads on its cores.
        assert blas_within(2) and not _cykernels.blas_allowed(2)
        assert model.num_threads == 1
    finally:
        library.scipy_openblas_set_num_threads(original)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-5), ("float64", 1e-12)])
def test_hand_loops_in_place_of_blas_equal_the_reference(backend, dtype, tolerance):
    """One-thread models where BLAS would thread take the hand loops for every product BLAS would run: batched
    gate products, a projection, the input projection of whole sequences and the head, above 8 rows."""
    rng = np.random.default_rng(4)
    spec = random_stack(rng, ["lstm", "gru"], [40, 24], input_size=12, head=[(10, "relu"), (5, "softmax")],
                        scale=0.2)
    reference = fastlstm.Model(spec, backend="numpy", dtype=dtype)
    model = fastlstm.Model(spec, backend=backend, dtype=dtype, num_threads=1)
    x = rng.standard_normal((20, 15, 12)).astype(dtype)
    np.testing.assert_allclose(model.predict(x), reference.predict(x), atol=tolerance, rtol=0)
    streams = model.stream(20), reference.stream(20)
    for t in range(x.shape[1]):
        got, want = (stream.step(x[:, t]) for stream in streams)
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=0, err_msg=f"step {t}")
