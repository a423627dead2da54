"""The thread pool of the threaded Cython kernels (csrc/lstm_parallel.h) in the states a service puts it in:
workers asleep between calls, long runs of steps, models started and dropped, and a busy process on one
core (which sends jobs to the caller's thread alone for a while). The kernels compute each output from the
same operands in the same order whatever the thread count, so every result must equal one thread's exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastlstm
from random_models import random_stack

pytest.importorskip("fastlstm.backends._cykernels", reason="the Cython extension is not built")

# Hidden sizes above the kernels' threading thresholds: a 160-unit LSTM and a 144-unit GRU split their hidden
# units over two threads at batch 1 (meeting once per layer and step) and their rows at batch 3.
INPUT_SIZE = 48


def threaded_and_single(seed: int):
    spec = random_stack(np.random.default_rng(seed), ["lstm", "gru"], [160, 144], input_size=INPUT_SIZE, scale=0.1)
    return (fastlstm.Model(spec, backend="cython", num_threads=2),
            fastlstm.Model(spec, backend="cython", num_threads=1))


def step_both(threaded, single, x, pause_every: int, pause_s: float):
    """Step a stream of each model through ``x`` (B, T, I), sleeping ``pause_s`` after every ``pause_every``
    steps, and assert every output equal."""
    batch = x.shape[0]
    streams = threaded.stream(batch), single.stream(batch)
    for t in range(x.shape[1]):
        got, want = (stream.step(x[:, t]).copy() for stream in streams)
        np.testing.assert_array_equal(got, want, err_msg=f"step {t}")
        if pause_every and t % pause_every == pause_every - 1:
            time.sleep(pause_s)


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_with_workers_asleep_between_them_equal_one_thread(batch):
    # A pause of 2 ms outlasts a worker's spin (100 us): it goes to sleep and the next step must wake it.
    threaded, single = threaded_and_single(1)
    x = np.random.default_rng(2).normal(size=(batch, 120, INPUT_SIZE)).astype(np.float32)
    step_both(threaded, single, x, pause_every=3, pause_s=0.002)


def test_many_steps_back_to_back_equal_one_thread():
    threaded, single = threaded_and_single(3)
    x = np.random.default_rng(4).normal(size=(1, 2000, INPUT_SIZE)).astype(np.float32)
    step_both(threaded, single, x, pause_every=0, pause_s=0)


def test_models_started_and_dropped_between_calls_equal_one_thread():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 30, INPUT_SIZE)).astype(np.float32)
    for seed in range(6):
        threaded, single = threaded_and_single(10 + seed)
        np.testing.assert_array_equal(threaded.predict(x), single.predict(x))
        step_both(threaded, single, x[:, :8], pause_every=4, pause_s=0.001 * seed)
        del threaded, single


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores and Linux affinity")
def test_steps_beside_a_busy_process_equal_one_thread():
    """With a process spinning on one of the cores, the threads of a job lose time slices; the pool then runs
    jobs on the caller's thread alone for a while and tries threads again, switching back and forth within
    this run. Whichever way each step runs, its result is the same."""
    threaded, single = threaded_and_single(6)
    x = np.random.default_rng(7).normal(size=(1, 1500, INPUT_SIZE)).astype(np.float32)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {sorted(os.sched_getaffinity(0))[-1]})
        step_both(threaded, single, x, pause_every=500, pause_s=0.01)
        x3 = np.repeat(x[:, :300], 3, axis=0)
        step_both(threaded, single, x3, pause_every=0, pause_s=0)
        np.testing.assert_array_equal(threaded.predict(x3), single.predict(x3))
    finally:
        spinner.kill()
        spinner.wait()
