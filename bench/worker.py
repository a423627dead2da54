"""One measurement, run in its own process: ``python -m bench.worker '<json task>'`` prints a JSON result.

Separate processes keep thread pools (PyTorch's OpenMP, ONNX Runtime's, OpenBLAS's) from fighting over the
cores, and let each run start cold so that set-up and first-call (compile) time are measured apart from
the steady state.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time

import numpy as np

from .engines import Config, make_sequence_runner, make_stepper, set_threads, torch_network

# Engines must agree this well with PyTorch before any timing counts: float32 to rounding; 16- and 8-bit
# weights (fastlstm only; the peers run float32) to their quantisation error on these random models.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "int8": 5e-2}


def percentile_us(samples_ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q) / 1e3)


def streaming(task: dict) -> dict:
    """Per-step latency of every engine at one size, batch and thread count, engines interleaved."""
    config = Config(*task["config"])
    batch, threads = task["batch"], task["threads"]
    set_threads(threads)
    module = torch_network(config)
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(4096, batch, config.input_size)).astype(np.float32)

    steppers, setup, unavailable = {}, {}, {}
    for engine in task["engines"]:
        start = time.perf_counter()
        try:
            stepper = make_stepper(engine, module, config, batch, threads)
        except Exception as exc:  # noqa: BLE001 - only 16- and 8-bit rows: a fastlstm without that format
            if config.weights == "float32" or not engine.startswith("fastlstm-"):
                raise
            unavailable[engine] = f"{type(exc).__name__}: {exc}"
            continue
        stepper.step(inputs[0])  # the first call pays any compilation or lazy initialisation
        setup[engine] = time.perf_counter() - start
        steppers[engine] = stepper

    # Equal outputs before timing: every engine from a fresh state over the same 30 steps as PyTorch.
    reference = make_stepper("torch-lstm", module, config, batch, threads)
    expected = np.stack([np.array(reference.step(x)) for x in inputs[1:31]])
    check = {}
    for engine in steppers:
        fresh = make_stepper(engine, module, config, batch, threads)
        got = np.stack([np.array(fresh.step(x)) for x in inputs[1:31]])
        check[engine] = float(np.max(np.abs(got - expected)))

    samples = {engine: [] for engine in steppers}
    order = list(steppers)
    gc.disable()
    try:
        for stepper in steppers.values():  # warm caches and branch predictors
            for x in inputs[:200]:
                stepper.step(x)
        clock = time.perf_counter_ns
        for round_index in range(task["rounds"]):
            random.Random(round_index).shuffle(order)
            for engine in order:
                step = steppers[engine].step
                times = samples[engine]
                budget_end = clock() + int(task["max_seconds_per_block"] * 1e9)
                for x in inputs[: task["steps_per_block"]]:
                    start = clock()
                    step(x)
                    times.append(clock() - start)
                    if start > budget_end:
                        break
    finally:
        gc.enable()
    tolerance = CHECK_TOLERANCE[config.weights]
    return {
        "mode": "streaming", "config": task["config"], "batch": batch, "threads": threads,
        "contention": task.get("contention", False), "unavailable": unavailable,
        "engines": {
            engine: {
                "p50_us": percentile_us(times, 50), "p99_us": percentile_us(times, 99),
                "mean_us": float(np.mean(times) / 1e3), "samples": len(times),
                "setup_s": setup[engine], "max_abs_diff_vs_torch": check[engine],
                "checked": check[engine] <= tolerance,
            }
            for engine, times in samples.items()
        },
    }


def sequence(task: dict) -> dict:
    """Whole-sequence time of one engine at one shape and thread count (one engine per process)."""
    config = Config(*task["config"])
    batch, steps, threads, engine = task["batch"], task["steps"], task["threads"], task["engine"]
    set_threads(threads)
    module = torch_network(config)
    x = np.random.default_rng(0).normal(size=(batch, steps, config.input_size)).astype(np.float32)
    start = time.perf_counter()
    runner = make_sequence_runner(engine, module, config, threads)
    y = np.array(runner.run(x))
    first_call = time.perf_counter() - start
    expected = make_sequence_runner("torch-lstm", module, config, threads).run(x)
    diff = float(np.max(np.abs(y - expected)))
    time.sleep(0.5)  # PyTorch's OpenMP threads spin for a while after a call: let them sleep first

    times = []
    deadline = time.perf_counter() + task["min_seconds"]
    while len(times) < task["min_calls"] or (time.perf_counter() < deadline and len(times) < task["max_calls"]):
        start = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - start)
    return {
        "mode": "sequence", "config": task["config"], "batch": batch, "steps": steps, "threads": threads,
        "engine": engine, "median_ms": float(np.median(times) * 1e3), "min_ms": float(np.min(times) * 1e3),
        "max_ms": float(np.max(times) * 1e3), "calls": len(times), "first_call_s": first_call,
        "max_abs_diff_vs_torch": diff, "checked": diff <= CHECK_TOLERANCE[config.weights],
    }


def gemm_peak(task: dict) -> dict:
    """Best measured SGEMM rate (GFLOP/s) at a thread count, over NumPy's BLAS and PyTorch's: the compute
    floor the report divides by (each library picks its own kernels for this CPU; the faster one counts)."""
    import torch

    n = 1024
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    t = torch.from_numpy(a)
    set_threads(task["threads"])
    rates = {}
    for name, product in (("numpy", lambda: a @ a), ("torch", lambda: t @ t)):
        product()
        rates[name] = 2 * n**3 / min(_timed(product) for _ in range(7)) / 1e9
    return {"mode": "gemm_peak", "threads": task["threads"], "gflops": max(rates.values()), "by_library": rates}


def cold_start(task: dict) -> dict:
    """``import fastlstm`` + ``load`` + first ``predict`` in a fresh process (compiled or cached kernels)."""
    start = time.perf_counter()
    import fastlstm

    model = fastlstm.load(task["model"], backend=task["backend"])
    model.predict(np.zeros((1, 10, model.input_size), np.float32))
    return {"mode": "cold_start", "backend": model.backend, "seconds": time.perf_counter() - start}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


MODES = {"streaming": streaming, "sequence": sequence, "gemm_peak": gemm_peak, "cold_start": cold_start}

if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    json.dump(MODES[task["mode"]](task), sys.stdout)
