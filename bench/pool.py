"""A service simulation: ``python -m bench.pool [--quick] [--out DIR]``.

N live streams (N = 1, 64, 1,000, 10,000) of one model, an LSTM (I=64, H=128, 1 layer) with a Linear head;
each tick a random subset of them (``--ready`` streams, at most N) has a new frame. Every engine serves the
same schedule of ticks, in interleaved blocks, with the same thread count (``--threads``), from the same
PyTorch weights; outputs are checked equal before anything is timed:

* ``pool.step``: ``fastlstm.StreamPool.step`` with the ready keys, one call per tick;
* ``pool.submit``: ``--callers`` threads each submit their share of the ready steps and wait on the futures;
* ``Stream per key``: one ``fastlstm.Stream`` per live stream, one ``step`` call per ready stream;
* ``ORT IO binding per stream``: what an ONNX Runtime user does today: one session, bound buffers, one run
  per ready stream with that stream's state copied in and out;
* ``ORT batched by hand`` / ``PyTorch batched by hand``: the ready streams' states gathered into one batch,
  one call, scattered back.

A step's latency is the time from the start of its tick until its output is there (for a one-call-per-stream
engine, the streams stepped before it in that tick count); steps/s is all steps over all ticks' time.
Also reported: what gathering and scattering the state costs beside the batch step, and the memory per live
stream of a pool. Writes ``pool.json`` and ``pool.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import fastlstm

from .__main__ import machine_info
from .engines import Config, onnx_bytes, ort_session, set_threads

CONFIG = Config(64, 128, 1)
HEAD_OUTPUTS = 32
STREAM_COUNTS = (1, 64, 1_000, 10_000)
CHECK_TOLERANCE = 1e-4
ENGINES = ("pool.step", "pool.submit", "Stream per key", "ORT IO binding per stream", "ORT batched by hand",
           "PyTorch batched by hand")


def torch_model():
    """``nn.LSTM`` then ``nn.Linear``, batch first; ``forward(x, state) -> (y, state)`` as ``nn.LSTM``'s."""
    import torch

    class LSTMWithHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(CONFIG.input_size, CONFIG.hidden_size, num_layers=CONFIG.num_layers,
                                     batch_first=True)
            self.fc = torch.nn.Linear(CONFIG.hidden_size, HEAD_OUTPUTS)

        def forward(self, x, state=None):
            y, state = self.rnn(x, state)
            return self.fc(y), state

    torch.manual_seed(1234)
    return LSTMWithHead().eval()


class PoolStep:
    def __init__(self, module, streams: int, threads: int, **_):
        self.pool = fastlstm.load(module, num_threads=threads).stream_pool(capacity=streams)

    def tick(self, keys, x, done_at):
        y = self.pool.step(keys, x)
        done_at[:] = time.perf_counter()
        return y


class PoolSubmit:
    """``callers`` threads (the ticking one and ``callers - 1`` started once) each submit an equal share of a
    tick's steps, then wait for their futures."""

    def __init__(self, module, streams: int, threads: int, callers: int, **_):
        self.pool = fastlstm.load(module, num_threads=threads).stream_pool(capacity=streams, max_batch=64,
                                                                           max_delay_us=200)
        self.callers = callers
        # The callers besides the ticking thread, started once: a tick hands each its share.
        self.threads = ThreadPoolExecutor(callers - 1) if callers > 1 else None

    def tick(self, keys, x, done_at):
        y = np.empty((len(keys), HEAD_OUTPUTS), np.float32)

        def call(part):
            futures = [(i, self.pool.submit(keys[i], x[i])) for i in part]
            for i, future in futures:
                y[i] = future.result()
                done_at[i] = time.perf_counter()

        parts = [range(n, len(keys), self.callers) for n in range(self.callers)]
        others = [self.threads.submit(call, part) for part in parts[1:]]
        call(parts[0])
        for other in others:
            other.result()
        return y

    def close(self):
        if self.threads is not None:
            self.threads.shutdown()
        self.pool.close()


class StreamPerKey:
    def __init__(self, module, streams: int, threads: int, **_):
        model = fastlstm.load(module, num_threads=threads)
        self.streams = [model.stream() for _ in range(streams)]

    def tick(self, keys, x, done_at):
        y = np.empty((len(keys), HEAD_OUTPUTS), np.float32)
        for i, key in enumerate(keys):
            self.streams[key].step(x[i], out=y[i])
            done_at[i] = time.perf_counter()
        return y


class OrtPerStream:
    """One session with bound buffers; each stream's state lives in the store and is copied in and out."""

    def __init__(self, module, streams: int, threads: int, **_):
        import onnxruntime as ort

        self.session = ort_session(onnx_bytes(module, CONFIG, 1, steps=1), threads)
        shape = (CONFIG.num_layers, 1, CONFIG.hidden_size)
        self.x = np.zeros((1, 1, CONFIG.input_size), np.float32)
        self.h0, self.c0, self.h1, self.c1 = (np.zeros(shape, np.float32) for _ in range(4))
        self.y = np.zeros((1, 1, HEAD_OUTPUTS), np.float32)
        self.binding = self.session.io_binding()
        for name, array in (("x", self.x), ("h0", self.h0), ("c0", self.c0)):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, array in (("y", self.y), ("h_n", self.h1), ("c_n", self.c1)):
            self.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        self.h = np.zeros((streams,) + shape, np.float32)
        self.c = np.zeros((streams,) + shape, np.float32)

    def tick(self, keys, x, done_at):
        y = np.empty((len(keys), HEAD_OUTPUTS), np.float32)
        for i, key in enumerate(keys):
            self.x[0, 0] = x[i]
            self.h0[...] = self.h[key]
            self.c0[...] = self.c[key]
            self.session.run_with_iobinding(self.binding)
            self.h[key] = self.h1
            self.c[key] = self.c1
            y[i] = self.y[0, 0]
            done_at[i] = time.perf_counter()
        return y


class OrtBatched:
    def __init__(self, module, streams: int, threads: int, **_):
        self.session = ort_session(onnx_bytes(module, CONFIG, 1, steps=None), threads)
        self.h = np.zeros((CONFIG.num_layers, streams, CONFIG.hidden_size), np.float32)
        self.c = np.zeros_like(self.h)

    def tick(self, keys, x, done_at):
        rows = np.asarray(keys)
        y, h, c = self.session.run(None, {"x": x[:, None], "h0": self.h[:, rows], "c0": self.c[:, rows]})
        self.h[:, rows], self.c[:, rows] = h, c
        done_at[:] = time.perf_counter()
        return y[:, 0]


class TorchBatched:
    def __init__(self, module, streams: int, threads: int, **_):
        import torch

        self.torch, self.module = torch, module
        self.h = torch.zeros(CONFIG.num_layers, streams, CONFIG.hidden_size)
        self.c = torch.zeros_like(self.h)

    def tick(self, keys, x, done_at):
        torch = self.torch
        with torch.inference_mode():
            rows = torch.as_tensor(keys)
            state = (self.h.index_select(1, rows), self.c.index_select(1, rows))
            y, (h, c) = self.module(torch.from_numpy(x)[:, None], state)
            self.h.index_copy_(1, rows, h)
            self.c.index_copy_(1, rows, c)
            y = y[:, 0].numpy()
        done_at[:] = time.perf_counter()
        return y


MAKERS = dict(zip(ENGINES, (PoolStep, PoolSubmit, StreamPerKey, OrtPerStream, OrtBatched, TorchBatched)))


def schedule(streams: int, ready: int, ticks: int, seed: int):
    """``ticks`` of (ready keys, their frames): a random subset of ``min(ready, streams)`` keys each tick."""
    rng = np.random.default_rng(seed)
    count = min(ready, streams)
    return [(rng.choice(streams, size=count, replace=False).tolist(),
             rng.normal(size=(count, CONFIG.input_size)).astype(np.float32)) for _ in range(ticks)]


def simulate(streams: int, args) -> dict:
    """Every engine over the same ticks: outputs checked, then timed in interleaved blocks."""
    module = torch_model()
    options = dict(streams=streams, threads=args.threads, callers=args.callers)
    engines, setup = {}, {}
    for name in ENGINES:
        start = time.perf_counter()
        engines[name] = MAKERS[name](module, **options)
        setup[name] = time.perf_counter() - start

    check_ticks = schedule(streams, args.ready, 8, seed=1)
    outputs = {}
    for name, engine in engines.items():
        done_at = np.zeros(len(check_ticks[0][0]))
        outputs[name] = [np.array(engine.tick(keys, x, done_at)) for keys, x in check_ticks]
    reference = outputs["PyTorch batched by hand"]
    agree = {name: float(max(np.max(np.abs(a - b)) for a, b in zip(got, reference))) for name, got in outputs.items()}
    failing = {name: diff for name, diff in agree.items() if not diff <= CHECK_TOLERANCE}
    if failing:
        raise SystemExit(f"engines disagree before timing (max abs diff): {failing}")

    ticks = schedule(streams, args.ready, args.ticks, seed=2)
    latencies = {name: [] for name in engines}
    busy = dict.fromkeys(engines, 0.0)
    block = max(1, len(ticks) // args.blocks)
    for first in range(0, len(ticks), block):
        for name, engine in engines.items():
            for keys, x in ticks[first:first + block]:
                done_at = np.zeros(len(keys))
                start = time.perf_counter()
                engine.tick(keys, x, done_at)
                busy[name] += time.perf_counter() - start
                latencies[name].append(done_at - start)
    for engine in engines.values():
        if hasattr(engine, "close"):
            engine.close()
    result = {"streams": streams, "ready_per_tick": min(args.ready, streams), "ticks": len(ticks), "engines": {}}
    for name in engines:
        samples = np.concatenate(latencies[name]) * 1e6
        result["engines"][name] = {
            "steps_per_second": float(samples.size / busy[name]),
            "p50_us": float(np.percentile(samples, 50)), "p99_us": float(np.percentile(samples, 99)),
            "setup_seconds": setup[name], "max_abs_diff": agree[name],
        }
    return result


def gather_scatter_share(threads: int, repeats: int = 2000) -> dict:
    """At batch 64 of a 10,000-stream pool: the gather and scatter of the state around a step, against the
    step itself (the same internal stream the pool runs)."""
    model = fastlstm.load(torch_model(), num_threads=threads)
    pool = model.stream_pool(capacity=10_000)
    rng = np.random.default_rng(3)
    for first in range(0, 10_000, 1000):
        pool.step(list(range(first, first + 1000)), rng.normal(size=(1000, CONFIG.input_size)))
    runner = pool._runner(64)
    slots = np.sort(rng.choice(10_000, size=64, replace=False)).astype(np.intp)
    x = rng.normal(size=(64, CONFIG.input_size)).astype(np.float32)

    def timed(action) -> float:
        """The median of ``repeats`` single calls in µs (a median: a shared machine preempts some calls)."""
        action()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            action()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples)) * 1e6

    def gather():
        for array, view in zip(pool._slot_arrays, runner.state_views):
            np.take(array, slots, axis=0, out=view, mode="clip")

    def scatter():
        for array, view in zip(pool._slot_arrays, runner.state_views):
            array[slots] = view

    return {"batch": 64, "gather_us": timed(gather), "scatter_us": timed(scatter),
            "step_us": timed(lambda: runner.stream.step(x, out=runner.out)),
            "pool_step_us": timed(lambda: pool.step(slots.tolist(), x))}


def memory_per_stream(streams: int = 10_000) -> dict:
    """Bytes a pool holds per live stream (state slots plus bookkeeping), by tracemalloc over ``streams`` keys."""
    model = fastlstm.load(torch_model(), num_threads=1)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, CONFIG.input_size)).astype(np.float32)
    result = {}
    for idle in (None, 60.0):
        pool = model.stream_pool(capacity=streams, max_idle_seconds=idle)
        pool.step(list(range(64)), x[:64])  # the internal streams exist before measuring
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for first in range(0, streams, 1000):
            pool.step(list(range(first, first + 1000)), x)
        total = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        result["with max_idle_seconds" if idle else "without max_idle_seconds"] = total / streams
    result["state_bytes"] = pool.bytes_per_stream
    return result


def markdown(report: dict) -> str:
    lines = [f"Service simulation: LSTM (I={CONFIG.input_size}, H={CONFIG.hidden_size}, {CONFIG.num_layers} layer) "
             f"+ Linear({CONFIG.hidden_size}, {HEAD_OUTPUTS}), float32, {report['threads']} thread(s) for every "
             f"engine, {report['callers']} submitting threads; {report['ready']} ready streams per tick (all when "
             "fewer are live). Steps per second (p50 / p99 per-step latency in µs).", "",
             "| live streams | " + " | ".join(ENGINES) + " | pool.step × ORT per stream |",
             "|---" * (len(ENGINES) + 2) + "|"]
    for row in report["simulations"]:
        cells = []
        for name in ENGINES:
            m = row["engines"][name]
            cells.append(f"{m['steps_per_second']:,.0f} ({m['p50_us']:,.0f} / {m['p99_us']:,.0f})")
        rates = {name: m["steps_per_second"] for name, m in row["engines"].items()}
        ratio = rates["pool.step"] / rates["ORT IO binding per stream"]
        lines.append(f"| {row['streams']:,} | " + " | ".join(cells) + f" | {ratio:.1f}× |")
    share = report["gather_scatter"]
    memory = report["memory"]
    lines += ["", f"At batch 64 of a 10,000-stream pool: gather {share['gather_us']:.2f} µs + scatter "
              f"{share['scatter_us']:.2f} µs around a {share['step_us']:.1f} µs batch step (a whole pool.step: "
              f"{share['pool_step_us']:.1f} µs).",
              f"Memory per live stream: {memory['state_bytes']} bytes of state; measured in all "
              f"{memory['without max_idle_seconds']:.0f} bytes ({memory['with max_idle_seconds']:.0f} with "
              "max_idle_seconds), keys excluded."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few ticks and streams: a correctness run")
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every engine (default 1)")
    parser.add_argument("--callers", type=int, default=4, help="threads calling pool.submit (default 4)")
    parser.add_argument("--ready", type=int, default=64, help="streams with a frame per tick (default 64)")
    parser.add_argument("--ticks", type=int, default=400, help="ticks per stream count (default 400)")
    parser.add_argument("--blocks", type=int, default=8, help="interleaved blocks per engine (default 8)")
    args = parser.parse_args(argv)
    counts = STREAM_COUNTS
    if args.quick:
        args.ticks, args.blocks = 20, 2
        counts = (1, 64, 1_000)
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"machine": machine_info(), "threads": args.threads, "callers": args.callers, "ready": args.ready,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "simulations": [simulate(n, args) for n in counts],
              "gather_scatter": gather_scatter_share(args.threads, repeats=200 if args.quick else 2000),
              "memory": memory_per_stream(1_000 if args.quick else 10_000)}
    report["seconds"] = time.time() - started
    (out / "pool.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "pool.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
