"""Fuzz every loader: ``python -m fuzz [--seconds-per-format 600] [--out fuzz-results]`` (``make fuzz``).

Writes valid seed files of every format (from small torch and Keras models, and fastlstm's own
``Model.save``), then for each format, for the time given, loads damaged copies of them (byte flips,
truncations, splices; see ``fuzz.mutate``) one by one in a memory- and time-limited worker process, and
runs each model that loads once. Counts every outcome per format, keeps a minimised repro of each distinct
failure, and writes ``summary.json`` and ``summary.md`` into the output folder, beside ``seeds/`` and
``repros/``. Exits with status 1 if any file crashed the worker, hung, raised an exception outside
``FastLSTMError``, hit the memory limit, or peaked above the RSS bound, or if a seed did not load.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .report import markdown_report, write_report
from .runner import FAILING_OUTCOMES, Limits, fuzz_format
from .seeds import FORMAT_NAMES, format_named, write_seeds_in_child


def run(names, *, seconds_per_format: float, out: Path, limits: Limits, seed: int = 0,
        minimize_seconds: float = 20.0, progress: bool = False) -> dict:
    """Fuzz the formats ``names``; the summary (also written to ``out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_paths = write_seeds_in_child(out / "seeds", names)
    started = time.time()
    runs = []
    for name in names:
        show = _progress_line(name, seconds_per_format) if progress else None
        runs.append(fuzz_format(name, format_named(name).suffix, seed_paths[name], seconds=seconds_per_format,
                                limits=limits, out_dir=out, rng_seed=seed, minimize_seconds=minimize_seconds,
                                progress=show))
        if progress:
            sys.stderr.write("\n")
        # Written after every format, so that an interrupted run keeps what it found.
        summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
                   "seconds": time.time() - started, "seconds_per_format": seconds_per_format, "seed": seed,
                   "limits": asdict(limits), "formats": [r.summary() for r in runs],
                   "failures": [reason for r in runs for reason in r.failures(limits)]}
        write_report(summary, out)
    return summary


def _progress_line(name: str, seconds: float):
    started = time.monotonic()
    shown = [0.0]

    def show(run) -> None:
        now = time.monotonic()
        if now - shown[0] < 1.0:
            return
        shown[0] = now
        failing = sum(run.outcomes[o] for o in FAILING_OUTCOMES)
        sys.stderr.write(f"\r{name:<14} {now - started:6.0f}/{seconds:.0f} s  {run.files:6d} files  "
                         f"{run.outcomes['ok']:5d} ok  {failing:4d} failing")
        sys.stderr.flush()

    return show


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    defaults = Limits()
    parser.add_argument("--seconds-per-format", type=float, default=60.0,
                        help="fuzzing time per format, not counting repro minimisation (default: 60)")
    parser.add_argument("--out", default="fuzz-results", help="output folder (default: fuzz-results)")
    parser.add_argument("--formats", default=",".join(FORMAT_NAMES),
                        help=f"comma-separated subset of {','.join(FORMAT_NAMES)}")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations (default: 0)")
    parser.add_argument("--memory-limit-mib", type=int, default=defaults.memory_mib,
                        help=f"address-space limit (RLIMIT_AS) of the worker (default: {defaults.memory_mib})")
    parser.add_argument("--peak-rss-bound-mib", type=int, default=defaults.peak_rss_mib,
                        help=f"a file's peak RSS above this fails the run (default: {defaults.peak_rss_mib})")
    parser.add_argument("--timeout", type=float, default=defaults.seconds_per_file,
                        help=f"seconds to load and run one file (default: {defaults.seconds_per_file:g})")
    parser.add_argument("--minimize-seconds", type=float, default=20.0,
                        help="time to minimise each distinct failure's repro (default: 20; 0 keeps it as found)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    if not names:
        parser.error("--formats: name at least one format")
    for name in names:
        format_named(name)
    limits = Limits(memory_mib=args.memory_limit_mib, peak_rss_mib=args.peak_rss_bound_mib,
                    seconds_per_file=args.timeout)
    summary = run(names, seconds_per_format=args.seconds_per_format, out=Path(args.out), limits=limits,
                  seed=args.seed, minimize_seconds=args.minimize_seconds, progress=True)
    print(markdown_report(summary))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
