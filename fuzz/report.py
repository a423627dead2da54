"""The fuzzing report: ``summary.json`` (everything) and ``summary.md`` (a table per format and the findings)."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("format", "files", "OK", "refused (by class)", "run refused", "outside", "crashes", "hangs",
           "memory limit", "peak RSS MiB max / p99", "s/file p99")


def write_report(summary: dict, out: Path) -> str:
    """Write ``summary.json`` and ``summary.md`` into ``out``; the Markdown text."""
    out = Path(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    markdown = markdown_report(summary)
    (out / "summary.md").write_text(markdown)
    return markdown


def markdown_report(summary: dict) -> str:
    limits = summary["limits"]
    lines = [
        f"# Fuzzing the loaders: {summary['seconds_per_format']:g} s per format, seed {summary['seed']}",
        "",
        f"Each file is loaded, and run once if it loads, in a worker process limited to "
        f"{limits['memory_mib']} MiB of address space and {limits['seconds_per_file']:g} s; "
        f"the bound on a file's peak RSS is {limits['peak_rss_mib']} MiB.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for run in summary["formats"]:
        outcomes = run["outcomes"]
        refused = ", ".join(f"{name} {count}" for name, count in sorted(run["refused_by_class"].items())) or "0"
        peak = run["peak_rss_mib"]
        cells = [run["format"], run["files"], outcomes.get("ok", 0), refused, outcomes.get("predict-refused", 0),
                 outcomes.get("outside", 0), outcomes.get("crash", 0), outcomes.get("hang", 0),
                 outcomes.get("memory", 0), f"{peak['max']:.0f} / {peak['p99']:.0f}",
                 f"{run['seconds_per_file']['p99']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "\"run refused\": loaded, then `predict` refused the input with a FastLSTMError. Peak RSS "
              "includes the worker's own baseline (Python, NumPy, the importers: "
              + ", ".join(f"{r['format']} {r['peak_rss_mib']['worker_baseline']:.0f}" for r in summary["formats"])
              + " MiB)."]
    seeds = [f"{s['file']} ({s['bytes']} bytes): {s['outcome']}" for r in summary["formats"] for s in r["seeds"]
             if s["outcome"] != "ok"]
    if seeds:
        lines += ["", "## Seeds that did not load", ""] + [f"- {s}" for s in seeds]
    findings = [f for r in summary["formats"] for f in r["findings"]]
    lines += ["", f"## Findings ({len(findings)})", ""]
    if not findings:
        lines.append("None.")
    for finding in findings:
        where = finding.get("raised_at") or "?"
        own = finding.get("fastlstm_frame")
        located = where if not own or own == where else f"{where} (last fastlstm frame {own})"
        message = (finding.get("message") or "").strip().splitlines()
        lines.append(f"- **{finding['format']}**: {finding['outcome']} `{finding.get('error') or ''}` in "
                     f"{finding.get('phase')} at {located}, {finding['count']} file(s); repro `repros/"
                     f"{finding.get('minimized') or finding['repro']}` "
                     f"({finding.get('minimized_bytes', finding['repro_bytes'])} bytes, from {finding['seed']}"
                     + (f", differing in {finding['minimized_differs_from_seed_in']}"
                        if "minimized_differs_from_seed_in" in finding else "") + ")"
                     + (f": {message[-1][:300]}" if message else ""))
    lines += ["", "Result: " + ("FAILED\n\n" + "\n".join(f"- {r}" for r in summary["failures"])
                                if summary["failures"] else "passed"), ""]
    return "\n".join(lines)
