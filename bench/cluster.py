"""Scoring on a cluster: ``python -m bench.cluster [--quick] [--out DIR]``.

Sequences per second with 1 and 2 workers on Dask (``LocalCluster``, one thread per worker process) and on
Ray Data (one actor per worker, one CPU each), beside plain ``model.predict`` in one process over the same
chunks; and the per-task overhead of each engine (what one more one-sequence, one-step task adds to a run,
model already prepared, minus the time ``predict`` itself takes on it). The model is the bundled sensor
forecaster (2-layer LSTM 64->128, linear head of 4). Outputs are checked equal to plain ``predict`` before
anything is timed; each engine's first run (cluster start, model preparation, kernel loading) is reported
apart from the timed runs (median of ``--repeats``). Writes ``cluster.json`` and ``cluster.md`` into
``--out`` and prints the table.

The machine is shared in development: run ``--quick`` there (a correctness-sized run, seconds per engine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import fastlstm

MODEL = Path(__file__).resolve().parent.parent / "examples" / "models" / "sensor_forecaster.pt"


def _timed(run, repeats: int) -> tuple[float, float, list[float]]:
    """(first call seconds, median of the next ``repeats``, all of them)."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def _plain(model, x: np.ndarray, chunk: int, repeats: int) -> dict:
    want = np.concatenate([model.predict(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    first, median, times = _timed(lambda: [model.predict(x[i:i + chunk]) for i in range(0, len(x), chunk)], repeats)
    return {"first_s": first, "median_s": median, "times_s": times}, want


def _tiny_predict_seconds(model, features: int, calls: int = 200) -> float:
    tiny = np.zeros((1, 1, features), np.float32)
    model.predict(tiny)
    start = time.perf_counter()
    for _ in range(calls):
        model.predict(tiny)
    return (time.perf_counter() - start) / calls


def _dask(model, x, want, chunk, workers, repeats, tasks) -> dict:
    import dask.array as da
    from dask.distributed import Client, LocalCluster

    from fastlstm.integrations.dask import predict_array

    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        started = time.perf_counter() - start
        data = da.from_array(x, chunks=(chunk, -1, -1)).persist()  # on the workers, as data read there would be
        y = predict_array(model, data)
        np.testing.assert_allclose(y.compute(), want, rtol=0, atol=1e-5)
        first, median, times = _timed(lambda: y.compute(), repeats)

        def tiny(count):
            ones = da.zeros((count, 1, x.shape[2]), chunks=(1, 1, x.shape[2]), dtype=np.float32).persist()
            scored = predict_array(model, ones)
            return lambda: scored.compute()

        per_task = _per_task_seconds(tiny, tasks, repeats)
    return {"cluster_start_s": started, "first_s": first, "median_s": median, "times_s": times,
            "per_task_s": per_task}


def _ray(model, x, want, chunk, workers, repeats, tasks) -> dict:
    import ray

    from fastlstm.integrations.ray import Predictor

    # Column "data": one (T, F) sequence per row, in blocks of ``chunk`` rows (one block would feed one actor only).
    dataset = ray.data.from_numpy([x[i:i + chunk] for i in range(0, len(x), chunk)]).materialize()

    def run(data, batch_size):
        return data.map_batches(Predictor, fn_constructor_kwargs={"model": model, "input_column": "data"},
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                                batch_size=batch_size).take_all()

    rows = run(dataset, chunk)
    np.testing.assert_allclose(np.stack([row["y"] for row in rows]), want, rtol=0, atol=1e-5)
    first, median, times = _timed(lambda: run(dataset, chunk), repeats)

    def tiny(count):
        ones = ray.data.from_numpy(np.zeros((count, 1, x.shape[2]), np.float32)).materialize()
        return lambda: run(ones, 1)

    return {"first_s": first, "median_s": median, "times_s": times, "per_task_s": _per_task_seconds(tiny, tasks,
                                                                                                      repeats)}


def _per_task_seconds(make_run, tasks: int, repeats: int) -> float:
    """What one more task costs: runs of ``tasks`` and ``2 * tasks`` one-step, one-sequence tasks, the
    difference divided by ``tasks`` (what every run pays once, such as starting actors, cancels out)."""
    _, single, _ = _timed(make_run(tasks), repeats)
    _, double, _ = _timed(make_run(2 * tasks), repeats)
    return (double - single) / tasks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a correctness-sized run (seconds per engine)")
    parser.add_argument("--out", type=Path, default=None, help="folder for cluster.json and cluster.md")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sequences, steps, chunk, tasks = (400, 20, 50, 20) if args.quick else (10_000, 100, 500, 200)

    model = fastlstm.load(MODEL).warmup()
    x = np.random.default_rng(0).normal(size=(sequences, steps, model.input_size)).astype(np.float32)
    results = {"machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs",
               "sequences": sequences, "steps": steps, "chunk": chunk, "quick": args.quick, "engines": {}}
    tiny = _tiny_predict_seconds(model, model.input_size)
    for threads in (1, 2):
        plain_model = fastlstm.load(MODEL, num_threads=threads).warmup()
        results["engines"][f"plain predict, {threads} thread(s)"], want = _plain(plain_model, x, chunk, args.repeats)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Blocks may finish out of order on two actors; the outputs are compared with plain predict row by row.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        for workers in (1, 2):
            engines = results["engines"]
            engines[f"Dask, {workers} worker(s)"] = _dask(model, x, want, chunk, workers, args.repeats, tasks)
            engines[f"Ray Data, {workers} actor(s)"] = _ray(model, x, want, chunk, workers, args.repeats, tasks)
    finally:
        ray.shutdown()
    results["tiny_predict_s"] = tiny
    table = markdown(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cluster.json").write_text(json.dumps(results, indent=1))
        (args.out / "cluster.md").write_text(table + "\n")


def markdown(results: dict) -> str:
    quick = " (--quick)" if results["quick"] else ""
    lines = [f"{results['sequences']} sequences of {results['steps']} steps (64 features; 2-layer LSTM 64->128, "
             f"head 4), chunks of {results['chunk']}; {results['machine']}{quick}",
             "",
             "| engine | sequences/s (median) | first run, s | per-task overhead, ms |",
             "|---|---|---|---|"]
    for name, r in results["engines"].items():
        overhead = f"{(r['per_task_s'] - results['tiny_predict_s']) * 1e3:.2f}" if "per_task_s" in r else ""
        first = f"{r['first_s']:.2f}"
        if "cluster_start_s" in r:
            first += f" (+{r['cluster_start_s']:.1f} cluster start)"
        lines.append(f"| {name} | {results['sequences'] / r['median_s']:,.0f} | {first} | {overhead} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
