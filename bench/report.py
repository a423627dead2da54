"""Turn the harness's raw results into the Markdown tables and PNG plots (and nothing else)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .engines import Config

PEERS = ("torch-lstm", "torch-lstmcell", "ort-run", "ort-iobinding")
# The PyTorch engines run nn.GRU / nn.GRUCell in the GRU rows (the last field of the row's config says "gru").
PEER_NAMES = {"torch-lstm": "PyTorch nn.LSTM (nn.GRU)", "torch-lstmcell": "PyTorch nn.LSTMCell (nn.GRUCell)",
              "ort-run": "ONNX Runtime run", "ort-iobinding": "ONNX Runtime IO binding"}


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _gemm_peaks(results) -> dict[int, float]:
    return {r["threads"]: r["gflops"] for r in results if r["mode"] == "gemm_peak"}


def streaming_summary(results) -> list[dict]:
    """Per (config, batch): each engine's best p50 over thread counts, and the ratios the targets name. A row
    whose fastlstm engines were all unavailable (a weight format this fastlstm lacks) keeps their reasons."""
    peaks = _gemm_peaks(results)
    cases = defaultdict(dict)
    unavailable = defaultdict(dict)
    for r in results:
        if r["mode"] != "streaming":
            continue
        key = (tuple(r["config"]), r["batch"])
        unavailable[key].update(r.get("unavailable", {}))
        for engine, m in r["engines"].items():
            best = cases[key].get(engine)
            if best is None or m["p50_us"] < best["p50_us"]:
                cases[key][engine] = dict(m, threads=r["threads"])
    rows = []
    for (config, batch), engines in cases.items():
        ours = {e: m for e, m in engines.items() if e.startswith("fastlstm-") and e != "fastlstm-numpy"}
        if not ours:
            rows.append({"config": config, "batch": batch, "fastlstm": None, "engines": engines,
                         "unavailable": unavailable[(config, batch)]})
            continue
        best_ours = min(ours, key=lambda e: ours[e]["p50_us"])
        peers = {e: engines[e] for e in PEERS if e in engines}
        best_peer = min(peers, key=lambda e: peers[e]["p50_us"]) if peers else None
        m = ours[best_ours]
        floor_us = Config(*config).flops_per_step(batch) / (peaks.get(m["threads"], peaks.get(1, 1)) * 1e3)
        rows.append({
            "unavailable": unavailable[(config, batch)],
            "config": config, "batch": batch, "fastlstm": best_ours, "fastlstm_p50_us": m["p50_us"],
            "fastlstm_p99_us": m["p99_us"], "fastlstm_threads": m["threads"], "engines": engines,
            "best_peer": best_peer,
            "speedup_vs_best_peer": peers[best_peer]["p50_us"] / m["p50_us"] if best_peer else None,
            "speedup_vs_ort_iobinding": engines["ort-iobinding"]["p50_us"] / m["p50_us"] if "ort-iobinding" in engines else None,
            "speedup_vs_torch_lstm": engines["torch-lstm"]["p50_us"] / m["p50_us"] if "torch-lstm" in engines else None,
            "floor_us": floor_us, "floor_fraction": floor_us / m["p50_us"],
        })
    return rows


def narrow_weight_ratios(rows: list[dict]) -> list[tuple[tuple, int, float]]:
    """(config, batch, speed-up) of each bfloat16 / int8 row over fastlstm's float32 row of the same network."""
    float32 = {(tuple(Config(*row["config"]).__dict__.items()), row["batch"]): row for row in rows if row["fastlstm"]}
    ratios = []
    for row in rows:
        config = Config(*row["config"])
        if config.weights == "float32" or not row["fastlstm"]:
            continue
        same = dict(config.__dict__, weights="float32")
        base = float32.get((tuple(same.items()), row["batch"]))
        if base:
            ratios.append((row["config"], row["batch"], base["fastlstm_p50_us"] / row["fastlstm_p50_us"]))
    return ratios


def sequence_summary(results) -> list[dict]:
    """Per (shape, threads): each engine's median over rounds of its per-call median time."""
    peaks = _gemm_peaks(results)
    cases = defaultdict(lambda: defaultdict(list))
    checks = defaultdict(dict)
    for r in results:
        if r["mode"] == "sequence":
            key = (r["batch"], r["steps"], r["config"][0], r["config"][1], r["threads"])
            cases[key][r["engine"]].append(r["median_ms"])
            checks[key][r["engine"]] = r["checked"]
    rows = []
    for key, engines in cases.items():
        batch, steps, input_size, hidden, threads = key
        medians = {e: sorted(v)[len(v) // 2] for e, v in engines.items()}
        ours = {e: t for e, t in medians.items() if e.startswith("fastlstm-")}
        peers = {e: t for e, t in medians.items() if not e.startswith("fastlstm-")}
        best_ours = min(ours, key=ours.get)
        best_peer = min(peers, key=peers.get) if peers else None
        floor_ms = Config(input_size, hidden).flops_per_step(batch) * steps / (peaks.get(threads, 1) * 1e6)
        rows.append({
            "shape": (batch, steps, input_size, hidden), "threads": threads, "medians_ms": medians,
            "checked": checks[key], "fastlstm": best_ours, "best_peer": best_peer,
            "speedup_vs_best_peer": medians[best_peer] / medians[best_ours] if best_peer else None,
            "floor_ms": floor_ms, "floor_fraction": floor_ms / medians[best_ours],
        })
    return rows


def markdown(report) -> str:
    results = report["results"]
    machine = report["machine"]
    peaks = _gemm_peaks(results)
    lines = [
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus')} CPUs; Python {machine['python']}, "
        f"numpy {machine.get('numpy')}, numba {machine.get('numba')}, torch {machine.get('torch')}, "
        f"onnxruntime {machine.get('onnxruntime')}. Run {report['date']}, {report['seconds']:.0f} s"
        + (" (--quick)" if report["quick"] else "") + ".",
        f"Measured SGEMM peak: " + ", ".join(f"{t} thread(s) {g:.0f} GFLOP/s" for t, g in sorted(peaks.items())) + ".",
        f"fastlstm's Cython kernels: the {machine.get('kernel_level', '?')} build; Numba compiles for "
        f"{machine.get('numba_cpu', '?')}.",
    ]
    if report.get("contention"):
        lines.append("**Under contention**: a busy process (`while True: pass`) pinned to one core during every "
                     "streaming run.")
    lines += [
        "",
        "### Streaming: one time step per Python call, latency in µs (p50 / p99), each engine at its best "
        "thread count (1 or 2)",
        "",
        "A Linear head of 8 outputs on every network unless the row names another (softmax: 12 classes); a row "
        "naming bfloat16 or int8 runs fastlstm with those weights and the peers in float32.",
        "",
        "| I, H, layers[, cell, head, weights] | batch | fastlstm (backend) p50 / p99 | "
        + " | ".join(PEER_NAMES[p] for p in PEERS) + " | × vs ORT IO binding | × vs nn.LSTM (nn.GRU) | floor fraction |",
        "|---|---|---|" + "---|" * len(PEERS) + "---|---|---|",
    ]
    summary = streaming_summary(results)
    for row in summary:
        engines = row["engines"]
        peer_cells = " | ".join(f"{_fmt(engines[p]['p50_us'])} / {_fmt(engines[p]['p99_us'])}" if p in engines
                                else "n/a" for p in PEERS)
        if row["fastlstm"] is None:
            reasons = "; ".join(f"{e}: {reason}" for e, reason in row["unavailable"].items())
            lines.append(f"| {', '.join(map(str, row['config']))} | {row['batch']} | not available "
                         f"({_cell_text(reasons)}) | {peer_cells} | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {', '.join(map(str, row['config']))} | {row['batch']} | **{_fmt(row['fastlstm_p50_us'])}** / "
            f"{_fmt(row['fastlstm_p99_us'])} ({row['fastlstm'].split('-')[1]}, {row['fastlstm_threads']}t) | "
            f"{peer_cells} | {_ratio(row['speedup_vs_ort_iobinding'])} | {_ratio(row['speedup_vs_torch_lstm'])} | "
            f"{row['floor_fraction']:.0%} |"
        )
    ratios = narrow_weight_ratios(summary)
    if ratios:
        lines += ["", "Narrow weights, fastlstm's p50 speed-up over its own float32 row: " + ", ".join(
            f"({', '.join(map(str, config))}) b{batch} {_ratio(ratio)}" for config, batch, ratio in ratios) + "."]
    lines += [
        "",
        "### Whole sequences: median ms per call (B, T, I, H; one layer), same thread count for every engine",
        "",
        "| B, T, I, H | threads | " + " | ".join(_sequence_engines(results)) + " | × vs best peer | floor fraction |",
        "|---|---|" + "---|" * len(_sequence_engines(results)) + "---|---|",
    ]
    for row in sequence_summary(results):
        cells = " | ".join(_fmt(row["medians_ms"][e]) if e in row["medians_ms"] else "n/a"
                           for e in _sequence_engines(results))
        lines.append(f"| {', '.join(map(str, row['shape']))} | {row['threads']} | {cells} | "
                     f"{_ratio(row['speedup_vs_best_peer'])} | {row['floor_fraction']:.0%} |")
    cold = [r for r in results if r["mode"] == "cold_start"]
    if cold:
        lines += ["", f"Cold start (`import fastlstm` + `load` + first `predict`, fresh process, backend "
                      f"{cold[-1]['backend']}): {cold[-1]['seconds']:.2f} s (first ever run: {cold[0]['seconds']:.2f} s)."]
    failed = _failed_checks(results)
    lines += ["", "Outputs checked against PyTorch before timing (max abs diff ≤ 1e-4 in float32; 2e-2 with "
              "bfloat16 and 5e-2 with int8 weights): "
              + ("all engines agree." if not failed else "MISMATCH: " + ", ".join(failed))]
    lines += ["", "Floor fraction: the compute floor (gate FLOPs at the measured SGEMM peak for the thread count "
              "used) divided by fastlstm's time; 100% would be the machine's arithmetic limit."]
    lines += ["", "<details><summary>Every engine, every thread count (streaming p50 / p99 µs, set-up s)</summary>",
              "", "| case | threads | engine | p50 | p99 | set-up + first call (s) | max abs diff |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["mode"] == "streaming":
            for engine, m in r["engines"].items():
                lines.append(f"| {r['config']} b{r['batch']} | {r['threads']} | {engine} | {_fmt(m['p50_us'])} | "
                             f"{_fmt(m['p99_us'])} | {m['setup_s']:.2f} | {m['max_abs_diff_vs_torch']:.1e} |")
            for engine, reason in r.get("unavailable", {}).items():
                lines.append(f"| {r['config']} b{r['batch']} | {r['threads']} | {engine} | not available: "
                             f"{_cell_text(reason)} | | | |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def _sequence_engines(results) -> list[str]:
    seen = []
    for r in results:
        if r["mode"] == "sequence" and r["engine"] not in seen:
            seen.append(r["engine"])
    return seen


def _failed_checks(results) -> list[str]:
    failed = []
    for r in results:
        if r["mode"] == "streaming":
            failed += [f"{e} at {r['config']}" for e, m in r["engines"].items() if not m["checked"]]
        elif r["mode"] == "sequence" and not r["checked"]:
            failed.append(f"{r['engine']} sequence at {r['config']}")
    return failed


def _cell_text(text: str, limit: int = 160) -> str:
    """``text`` fit for one Markdown table cell: one line, no column bars, at most ``limit`` characters."""
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.1f}×"


def plots(report, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in streaming_summary(report["results"]) if r["batch"] == 1 and r["fastlstm"]
            and Config(*r["config"]).weights == "float32" and Config(*r["config"]).head == "linear"]
    rows.sort(key=lambda r: r["config"][1])
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        engines = sorted({e for r in rows for e in r["engines"]})
        for engine in engines:
            points = [(r["config"][1], r["engines"][engine]["p50_us"]) for r in rows if engine in r["engines"]]
            ax.plot(*zip(*points), marker="o", label=engine, linewidth=2.5 if engine.startswith("fastlstm") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["config"][1] for r in rows], [", ".join(map(str, r["config"])) for r in rows])
        ax.set_xlabel("I, H, layers")
        ax.set_ylabel("µs per step (p50, batch 1)")
        ax.set_title("Streaming latency per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency_per_step.png", dpi=120)
        plt.close(fig)

    labels, speedups = [], []
    for r in streaming_summary(report["results"]):
        if r["fastlstm"] and r["speedup_vs_best_peer"]:
            labels.append(f"stream {', '.join(map(str, r['config'][1:]))} b{r['batch']}")
            speedups.append(r["speedup_vs_best_peer"])
    for r in sequence_summary(report["results"]):
        if r["speedup_vs_best_peer"]:
            b, t, i, h = r["shape"]
            labels.append(f"seq B{b} T{t} H{h} {r['threads']}t")
            speedups.append(r["speedup_vs_best_peer"])
    if labels:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.5))
        ax.barh(labels, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speed-up of fastlstm over the best peer (×)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "speedup_over_best_peer.png", dpi=120)
        plt.close(fig)


def write_report(report, out: Path) -> str:
    text = markdown(report)
    (out / "results.md").write_text(text + "\n")
    plots(report, out)
    return text
