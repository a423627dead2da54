"""The streaming server under load: ``python -m bench.serve [--clients 10,100,1000] [--rate 20] [--seconds 10]``.

For each client count K and each ``--max-batch`` (batching on, and off with 1), a ``fastlstm serve`` process
is started on loopback with a model of ``--input-size``/``--hidden-size`` (one LSTM layer and a Linear head,
fixed random weights). K WebSocket clients, spread over ``--client-processes`` processes (one event loop
each, uvloop when installed), each send one frame at ``--rate`` Hz for ``--seconds`` (paced: a client whose
reply comes late sends its next frame at once) and time every round trip. Reported: achieved steps/s,
round-trip p50/p99, the mean batch the server ran (from its /metrics), and CPU use of the server and of all
the client processes together (percent of one core): on a machine with few cores the clients compete with
the server, and their column says how much. Prints a Markdown table; ``--out`` also writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def make_model(path: Path, input_size: int, hidden_size: int, outputs: int) -> None:
    """A one-layer LSTM with a Linear head, fixed random weights, written as a native fastlstm file."""
    from fastlstm import DenseLayer, LSTMCellWeights, LSTMLayer, ModelSpec
    from fastlstm.native import save_native

    rng = np.random.default_rng(0)
    scale = 1 / np.sqrt(hidden_size)
    cell = LSTMCellWeights(w_ih=rng.uniform(-scale, scale, (4 * hidden_size, input_size)).astype(np.float32),
                           w_hh=rng.uniform(-scale, scale, (4 * hidden_size, hidden_size)).astype(np.float32),
                           bias=rng.uniform(-scale, scale, 4 * hidden_size).astype(np.float32))
    head = DenseLayer(weight=rng.uniform(-scale, scale, (outputs, hidden_size)).astype(np.float32),
                      bias=np.zeros(outputs, np.float32))
    save_native(ModelSpec(layers=(LSTMLayer(input_size, hidden_size, (cell,)),), head=(head,)).validate(), path)


class ServerProcess:
    def __init__(self, model: Path, max_batch: int, capacity: int, threads: int):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastlstm", "serve", str(model), "--port", str(self.port), "--max-batch",
             str(max_batch), "--capacity", str(capacity), "--threads", str(threads)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.get("/healthz")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)

    def get(self, path: str) -> bytes:
        with _NO_PROXY.open(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            return response.read()

    def batches(self) -> tuple[float, float]:
        """(batches run, steps in them) so far, from the server's metrics."""
        values = {}
        for line in self.get("/metrics").decode().splitlines():
            name, _, value = line.partition(" ")
            values[name] = value
        return float(values["fastlstm_batch_size_count"]), float(values["fastlstm_batch_size_sum"])

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def client(port: int, stream_id: str, frame: bytes, rate: float, measure_from: float, until: float,
                 round_trips: list) -> None:
    from websockets.asyncio.client import connect

    period = 1 / rate
    async with connect(f"ws://127.0.0.1:{port}/v1/streams/{stream_id}", proxy=None, compression=None,
                       open_timeout=60, ping_interval=None) as ws:
        next_send = time.monotonic() + np.random.default_rng(hash(stream_id) % 2**32).uniform(0, period)
        while True:
            delay = next_send - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.monotonic()
            if start >= until:
                return
            await ws.send(frame)
            await ws.recv()
            if start >= measure_from:
                round_trips.append(time.monotonic() - start)
            next_send += period


async def load(port: int, stream_ids: list, frame: bytes, rate: float, measure_from: float, until: float) -> list:
    """Run one client per stream id until ``until``; the round trips of the frames sent from ``measure_from``."""
    round_trips: list[float] = []
    await asyncio.gather(*(client(port, stream_id, frame, rate, measure_from, until, round_trips)
                           for stream_id in stream_ids))
    return round_trips


def client_process(port: int, stream_ids: list, frame: bytes, rate: float, measure_from: float,
                   until: float) -> tuple[list, float]:
    """One client process (on uvloop when it is installed): its round trips and the CPU seconds it used."""
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    cpu = time.process_time()
    round_trips = run(load(port, stream_ids, frame, rate, measure_from, until))
    return round_trips, time.process_time() - cpu


def measure(model: Path, clients: int, max_batch: int, rate: float, seconds: float, input_size: int,
            threads: int, client_processes: int) -> dict:
    server = ServerProcess(model, max_batch, capacity=clients + 10, threads=threads)
    try:
        frame = np.random.default_rng(1).standard_normal(input_size).astype("<f4").tobytes()
        ids = [f"c{n}" for n in range(clients)]
        processes = max(1, min(client_processes, clients))
        batches_before, steps_before = server.batches()
        measure_from = time.monotonic() + 2 + 0.2 * processes  # the clients start and connect meanwhile
        until = measure_from + seconds
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as executor:
            runs = [executor.submit(client_process, server.port, ids[n::processes], frame, rate, measure_from, until)
                    for n in range(processes)]
            # The server's CPU from /proc (an HTTP request would queue behind the load for seconds).
            time.sleep(max(0.0, measure_from - time.monotonic()))
            cpu_server = server.cpu_seconds()
            time.sleep(max(0.0, until - time.monotonic()))
            cpu_server = server.cpu_seconds() - cpu_server
            results = [run.result() for run in runs]
        # The batches of the whole run, connecting included (one step per frame all along).
        batches, steps = (a - b for a, b in zip(server.batches(), (batches_before, steps_before)))
    finally:
        server.stop()
    trips = np.array([trip for round_trips, _ in results for trip in round_trips]) * 1e3
    # The clients' CPU includes the 2 s in which they connect; per second of their whole run.
    client_cpu = sum(cpu for _, cpu in results) / (until - measure_from + 2 + 0.2 * processes)
    return {
        "clients": clients, "rate_hz": rate, "max_batch": max_batch, "seconds": seconds,
        "client_processes": processes,
        "offered_steps_per_s": clients * rate,
        "steps_per_s": len(trips) / seconds,
        "round_trip_p50_ms": float(np.percentile(trips, 50)) if len(trips) else None,
        "round_trip_p99_ms": float(np.percentile(trips, 99)) if len(trips) else None,
        "mean_batch": steps / batches if batches else None,
        "server_cpu_percent": 100 * cpu_server / seconds,
        "client_cpu_percent": 100 * client_cpu,
    }


def table(results: list[dict]) -> str:
    lines = ["| clients | rate (Hz) | batching | offered steps/s | achieved steps/s | round trip p50 (ms) | "
             "p99 (ms) | mean batch | server CPU % | clients CPU % |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        batching = "off (max batch 1)" if r["max_batch"] == 1 else f"on (max batch {r['max_batch']})"
        lines.append(f"| {r['clients']} | {r['rate_hz']:g} | {batching} | {r['offered_steps_per_s']:.0f} | "
                     f"{r['steps_per_s']:.0f} | {r['round_trip_p50_ms']:.2f} | {r['round_trip_p99_ms']:.2f} | "
                     f"{r['mean_batch']:.2f} | {r['server_cpu_percent']:.0f} | {r['client_cpu_percent']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,1000", help="client counts, comma-separated")
    parser.add_argument("--rate", type=float, default=20.0, help="frames per second per client")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run (after 2 s to connect)")
    parser.add_argument("--max-batch", default="64,1", help="server --max-batch values, comma-separated (1: off)")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--outputs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads")
    parser.add_argument("--client-processes", type=int, default=4,
                        help="processes the clients are spread over (each one event loop; default 4)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 sockets on each side of loopback
    results = []
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "bench.fastlstm"
        make_model(model, args.input_size, args.hidden_size, args.outputs)
        for clients in (int(n) for n in args.clients.split(",")):
            for max_batch in (int(n) for n in args.max_batch.split(",")):
                results.append(measure(model, clients, max_batch, args.rate, args.seconds, args.input_size,
                                       args.threads, args.client_processes))
                print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"model: LSTM I={args.input_size}, H={args.hidden_size}, 1 layer, Linear head ({args.outputs} outputs); "
          f"server --threads {args.threads}")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
