"""The benchmark harness: ``python -m bench [--quick] [--out DIR]`` (``make bench``).

Compares every fastlstm backend with PyTorch (``nn.LSTM``, ``nn.LSTMCell``; ``nn.GRU``, ``nn.GRUCell`` for
the GRU rows) and ONNX Runtime (``run`` and IO binding) on this machine, in one run: streaming per-step latency (p50, p99) at batch 1 and batch N, and
whole-sequence time. Fair by construction: the same weights everywhere, outputs checked equal before
timing, the same thread count for every engine, engines interleaved within a streaming run, each
whole-sequence measurement in its own process, set-up and first-call time reported apart. Every network has
a head (a Linear layer of 8 outputs, or 12 classes with softmax where the row says so); the bfloat16 and
int8 rows ask fastlstm for those weight formats (the peers run float32) and say "not available" where this
fastlstm lacks them. ``--contention`` keeps a busy process on one core during the streaming runs.
Writes ``results.json``, ``results.md`` and PNG plots into the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .engines import SEQUENCE_ENGINES, STREAM_ENGINES, engines_available
from .report import write_report

# (input, hidden, layers[, cell[, head[, weights]]]), the fields of bench.engines.Config: an LSTM with a
# Linear(8) head in float32 unless the row says otherwise.
SOFTMAX_HEAD = (32, 64, 1, "lstm", "softmax")
NARROW_WEIGHTS = [(input_size, hidden, 1, "lstm", "linear", weights)
                  for input_size, hidden in ((256, 512), (512, 1024)) for weights in ("bfloat16", "int8")]
FULL_STREAM_CONFIGS = [(32, 64, 1), SOFTMAX_HEAD, (64, 128, 1), (128, 256, 2), (256, 512, 1), (512, 1024, 1),
                       *NARROW_WEIGHTS, (64, 128, 1, "gru"), (128, 256, 2, "gru")]
QUICK_STREAM_CONFIGS = [(32, 64, 1), SOFTMAX_HEAD, (64, 128, 1), (128, 256, 2), (64, 128, 1, "gru"),
                        NARROW_WEIGHTS[1]]
BATCHED_STREAM = [((64, 128, 1), 64), ((128, 256, 2), 64)]
# (batch, steps, input, hidden), one layer
SEQUENCE_SHAPES = [(1, 200, 128, 256), (64, 100, 256, 256), (32, 100, 512, 512)]


def run_worker(task: dict, timeout: float = 900) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(task)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {task}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def advance(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.time() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s  {label[:60]:<60}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


@contextlib.contextmanager
def busy_neighbour():
    """A process spinning on the last core this process may use, for as long as the block runs: the
    neighbour a service machine rarely lacks (the contention mode)."""
    cores = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {cores[-1]})
        yield
    finally:
        spinner.kill()
        spinner.wait()


def plan(quick: bool, contention: bool = False) -> list[dict]:
    stream_engines = engines_available(STREAM_ENGINES)
    sequence_engines = engines_available(SEQUENCE_ENGINES)
    rounds, steps_per_block = (4, 250) if quick else (8, 500)
    thread_counts = [1, 2]
    tasks: list[dict] = [{"mode": "gemm_peak", "threads": t} for t in thread_counts]
    stream_cases = [(c, 1) for c in (QUICK_STREAM_CONFIGS if quick else FULL_STREAM_CONFIGS)] + BATCHED_STREAM
    for config, batch in stream_cases:
        for threads in thread_counts:
            engines = [e for e in stream_engines if e != "torch-lstmcell" or config[2] == 1 or not quick]
            tasks.append({"mode": "streaming", "config": config, "batch": batch, "threads": threads,
                          "engines": engines, "rounds": rounds, "steps_per_block": steps_per_block,
                          "max_seconds_per_block": 0.4, "contention": contention})
    sequence_threads = [2] if quick else thread_counts
    sequence_rounds = 1 if quick else 2
    for round_index in range(sequence_rounds):
        for batch, steps, input_size, hidden in SEQUENCE_SHAPES:
            for threads in sequence_threads:
                for engine in sequence_engines:
                    tasks.append({"mode": "sequence", "config": (input_size, hidden, 1), "batch": batch,
                                  "steps": steps, "threads": threads, "engine": engine, "round": round_index,
                                  "min_calls": 3, "max_calls": 50, "min_seconds": 0.5 if quick else 1.5})
    return tasks


def cold_start_tasks(model_path: str) -> list[dict]:
    # Twice: the first run may compile or populate caches; the second is the cold start users see.
    return [{"mode": "cold_start", "model": model_path, "backend": "auto"} for _ in range(2)]


def machine_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib.metadata as md

    import fastlstm

    kernels = fastlstm.kernel_info()
    info["kernel_level"] = kernels["level"]
    info["numba_cpu"] = (kernels["numba_target"] or {}).get("cpu_name")

    for package in ("numpy", "numba", "scipy", "torch", "onnxruntime"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid that finishes in about 2 minutes")
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    parser.add_argument("--contention", action="store_true",
                        help="a busy process pinned to one core during the streaming runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tasks = plan(args.quick, args.contention)
    example = Path(__file__).resolve().parent.parent / "examples" / "models" / "sensor_forecaster.pt"
    tasks += cold_start_tasks(str(example))
    progress = Progress(len(tasks))
    results = []
    started = time.time()
    for task in tasks:
        label = task["mode"] + " " + " ".join(f"{k}={task[k]}" for k in ("config", "batch", "threads", "engine")
                                             if k in task)
        with busy_neighbour() if task.get("contention") else contextlib.nullcontext():
            results.append(run_worker(task))
        progress.advance(label)
    report = {"machine": machine_info(), "quick": args.quick, "contention": args.contention,
              "seconds": time.time() - started,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    markdown = write_report(report, out)
    print(markdown)
    print(f"\nresults in {out}/ (results.json, results.md, PNG plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
