"""Drive the fuzzing: a restartable worker process, one time-boxed campaign per format, repro minimisation.

Nothing from a damaged file is ever loaded in this process: every file goes to ``fuzz.worker`` in a child
with a capped address space, and the parent only watches the answers, the clock and the exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .mutate import Mutator, zip_archive, zip_members

FAILING_OUTCOMES = ("outside", "crash", "hang", "memory")
WORKER_START_SECONDS = 120.0  # imports on a loaded two-core machine
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Limits:
    """What one file may cost before it counts as a finding.

    ``memory_mib`` is the worker's ``RLIMIT_AS`` (address space, not resident memory: Python, NumPy, the
    importers and thread stacks take about 0.35 GiB of it before any file is read); an allocation beyond it
    fails with ``MemoryError``, reported as a memory-limit hit. ``peak_rss_mib`` is the bound on a file's
    peak resident set size. ``seconds_per_file`` is the wall clock for loading and running one file; it is
    above the legacy Keras reader's own 10 s limit on its HDF5 child, so that the loader's refusal is seen
    rather than cut short.
    """

    memory_mib: int = 2048
    peak_rss_mib: int = 1024
    seconds_per_file: float = 20.0


class Worker:
    """A ``fuzz.worker`` child that loads files one after another, restarted after a crash or a hang."""

    def __init__(self, limits: Limits, loader: str, log_path: Path):
        self.limits = limits
        self.loader = loader
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.baseline_rss_kib: int | None = None
        self.peak_per_file = True
        self.starts = 0
        self._buffer = b""

    def run(self, path: str) -> dict:
        """The outcome of loading and running ``path`` (see ``fuzz.worker``), or ``crash`` / ``hang``."""
        if self.process is None:
            self._start()
        try:
            self.process.stdin.write((json.dumps({"path": os.fspath(path)}) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:  # died between files; only possible if the previous answer was its last words
            return self._ended(time.monotonic(), "load")
        started = time.monotonic()
        phase = "load"
        while True:
            line = self._read_line(started + self.limits.seconds_per_file)
            if line is None:
                self._kill()
                return {"outcome": "hang", "phase": phase, "seconds": time.monotonic() - started,
                        "message": f"no answer within {self.limits.seconds_per_file:g} s"}
            if not line:
                return self._ended(started, phase)
            answer = json.loads(line)
            if "outcome" in answer:
                return answer
            phase = "predict"  # the worker says the file loaded and it is running the model

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
            self.process = None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return _without_machine_paths("\n".join(lines[-LOG_TAIL_LINES:]))

    # ------------------------------------------------------------------ process handling
    def _start(self) -> None:
        self.starts += 1
        root = str(Path(__file__).resolve().parent.parent)  # "-m" puts it first on the path: this fastlstm
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fuzz.worker", "--memory-limit-mib", str(self.limits.memory_mib),
                 "--loader", self.loader],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=root,
                start_new_session=True)  # its own process group: a hang is killed with whatever it started
        self._buffer = b""
        ready = self._read_line(time.monotonic() + WORKER_START_SECONDS)
        if not ready:
            self._kill()
            raise RuntimeError(f"the fuzz worker did not start:\n{self.log_tail()}")
        hello = json.loads(ready)
        self.baseline_rss_kib = hello["baseline_rss_kib"]
        self.peak_per_file = hello["peak_per_file"]

    def _ended(self, started: float, phase: str) -> dict:
        status = self.process.wait()
        self.process = None
        if status < 0:
            error = signal.Signals(-status).name
        else:
            error = f"exit status {status}"
        tail = self.log_tail()
        return {"outcome": "crash", "phase": phase, "error": error, "message": tail,
                "raised_at": _innermost_frame(tail), "fastlstm_frame": _innermost_frame(tail, "fastlstm/"),
                "seconds": time.monotonic() - started}

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the worker; ``b""`` at end of file; ``None`` if ``deadline`` passes first."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _innermost_frame(fault_log: str, prefix: str = "") -> str | None:
    """The innermost ``file:line`` (under ``prefix``) of the first stack ``faulthandler`` wrote in ``fault_log``."""
    stack = fault_log.split("Current thread", 1)[-1] if "Current thread" in fault_log else fault_log
    for match in re.finditer(r'File "([^"]+)", line (\d+)', stack):
        if match.group(1).startswith(prefix):
            return f"{match.group(1)}:{match.group(2)}"
    return None


def _without_machine_paths(text: str) -> str:
    for entry in sorted({os.path.abspath(p or ".") for p in sys.path}, key=len, reverse=True):
        text = text.replace(entry + os.sep, "")
    return text


# ---------------------------------------------------------------------------------------- one format
@dataclass
class FormatRun:
    """What a campaign on one format saw."""

    name: str
    seeds: list[dict] = field(default_factory=list)  # file name, size, outcome of the untouched seed
    files: int = 0
    outcomes: Counter = field(default_factory=Counter)
    refused_by_class: Counter = field(default_factory=Counter)
    predict_refused_by_class: Counter = field(default_factory=Counter)
    refusal_sites: Counter = field(default_factory=Counter)  # how deep the damage got: which checks refused it
    operations: Counter = field(default_factory=Counter)
    peaks_kib: list[int] = field(default_factory=list)  # of every file loaded, the seeds included
    file_seconds: list[float] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    baseline_rss_kib: int | None = None
    peak_per_file: bool = True
    worker_starts: int = 0
    fuzz_seconds: float = 0.0
    minimize_seconds: float = 0.0

    def failures(self, limits: Limits) -> list[str]:
        """Why this run fails (empty if it passes)."""
        reasons = [f"{self.name}: seed {s['file']} did not load and run ({s['outcome']})"
                   for s in self.seeds if s["outcome"] != "ok"]
        for outcome in FAILING_OUTCOMES:
            if self.outcomes[outcome]:
                reasons.append(f"{self.name}: {self.outcomes[outcome]} file(s) with outcome {outcome!r}")
        if self.peaks_kib and max(self.peaks_kib) > limits.peak_rss_mib * 1024:
            reasons.append(f"{self.name}: peak RSS {max(self.peaks_kib) / 1024:.0f} MiB is above the bound of "
                           f"{limits.peak_rss_mib} MiB")
        return reasons

    def summary(self) -> dict:
        return {
            "format": self.name, "seeds": self.seeds, "files": self.files, "outcomes": dict(self.outcomes),
            "refused_by_class": dict(self.refused_by_class),
            "predict_refused_by_class": dict(self.predict_refused_by_class),
            "refusal_sites": dict(self.refusal_sites.most_common()),
            "operations": dict(self.operations),
            "peak_rss_mib": {"max": _mib(max(self.peaks_kib, default=0)),
                             "p99": _mib(percentile(self.peaks_kib, 99)),
                             "worker_baseline": _mib(self.baseline_rss_kib or 0),
                             "per_file": self.peak_per_file},
            "seconds_per_file": {"p50": percentile(self.file_seconds, 50), "p99": percentile(self.file_seconds, 99),
                                 "max": max(self.file_seconds, default=0.0)},
            "worker_starts": self.worker_starts, "fuzz_seconds": self.fuzz_seconds,
            "minimize_seconds": self.minimize_seconds, "findings": self.findings,
        }


def percentile(values, q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values`` (0 when there are none)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))]


def _mib(kib: float) -> float:
    return round(kib / 1024, 1)


def signature(result: dict) -> tuple:
    """What makes two failing outcomes the same bug: the outcome, the exception type and where fastlstm
    raised it (or let it through)."""
    return (result["outcome"], result.get("phase"), result.get("error"),
            result.get("fastlstm_frame") or result.get("raised_at"))


def fuzz_format(name: str, suffix: str, seed_paths: list[str], *, seconds: float, limits: Limits, out_dir: Path,
                rng_seed: int = 0, loader: str = "fastlstm:load", minimize_seconds: float = 20.0,
                progress: Callable[[FormatRun], None] | None = None) -> FormatRun:
    """Load mutants of ``seed_paths`` for ``seconds`` (plus at most half that minimising repros)."""
    out_dir = Path(out_dir)
    repro_dir = out_dir / "repros"
    repro_dir.mkdir(parents=True, exist_ok=True)
    run = FormatRun(name)
    seeds = [Path(p).read_bytes() for p in seed_paths]
    mutator = Mutator(seeds, random.Random(f"{rng_seed}:{name}"))
    worker = Worker(limits, loader, out_dir / f"worker-{name}.log")
    minimize_budget = seconds / 2
    seen = {_digest(s) for s in seeds}  # each file is tried once; the seeds are tried before the mutants
    with tempfile.TemporaryDirectory(prefix="fastlstm-fuzz-") as work:
        mutant_path = os.path.join(work, f"mutant{suffix}")
        try:
            for path in seed_paths:
                result = worker.run(path)
                if "peak_rss_kib" in result:
                    run.peaks_kib.append(result["peak_rss_kib"])
                run.seeds.append({"file": os.path.basename(path), "bytes": os.path.getsize(path),
                                  "outcome": result["outcome"] if result["outcome"] == "ok"
                                  else f"{result['outcome']} {result.get('error', '')}".strip()})
            started = time.monotonic()
            deadline = started + seconds
            while time.monotonic() < deadline:
                data, base, operations = mutator.mutate()
                digest = _digest(data)
                if digest in seen:
                    continue
                seen.add(digest)
                with open(mutant_path, "wb") as f:
                    f.write(data)
                result = worker.run(mutant_path)
                _count(run, result, operations)
                if result["outcome"] in FAILING_OUTCOMES:
                    spent = _record_finding(run, result, data, seeds[base], os.path.basename(seed_paths[base]),
                                            operations, suffix, repro_dir, worker, mutant_path,
                                            min(minimize_seconds, minimize_budget - run.minimize_seconds))
                    run.minimize_seconds += spent
                    deadline += spent
                if progress is not None:
                    progress(run)
            run.fuzz_seconds = time.monotonic() - started - run.minimize_seconds
        finally:
            run.baseline_rss_kib = worker.baseline_rss_kib
            run.peak_per_file = worker.peak_per_file
            run.worker_starts = worker.starts
            worker.close()
    return run


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _count(run: FormatRun, result: dict, operations: str) -> None:
    run.files += 1
    run.outcomes[result["outcome"]] += 1
    for operation in operations.split("+"):
        run.operations[operation] += 1
    if result["outcome"] == "refused":
        run.refused_by_class[result["error"]] += 1
        run.refusal_sites[f"{result['error']} at {result['raised_at']}"] += 1
    elif result["outcome"] == "predict-refused":
        run.predict_refused_by_class[result["error"]] += 1
    if "peak_rss_kib" in result:
        run.peaks_kib.append(result["peak_rss_kib"])
    run.file_seconds.append(result["seconds"])


def _record_finding(run: FormatRun, result: dict, data: bytes, seed: bytes, seed_name: str, operations: str,
                    suffix: str, repro_dir: Path, worker: Worker, mutant_path: str, minimize_seconds: float) -> float:
    """Count a failing outcome; the first of its kind is saved, minimised, and described. Seconds spent."""
    key = signature(result)
    for finding in run.findings:
        if finding["signature"] == list(key):
            finding["count"] += 1
            return 0.0
    number = len(run.findings) + 1
    label = re.sub(r"[^A-Za-z0-9]+", "-", f"{result['outcome']}-{result.get('error') or ''}").strip("-")
    repro = repro_dir / f"{run.name}-{number:02d}-{label}{suffix}"
    repro.write_bytes(data)
    finding = {"signature": list(key), "format": run.name, "count": 1, "seed": seed_name, "operations": operations,
               "repro": repro.name, "repro_bytes": len(data), **{k: v for k, v in result.items()
                                                                   if k not in ("seconds", "peak_rss_kib")}}
    spent = 0.0
    if result["outcome"] != "hang" and minimize_seconds > 0:
        started = time.monotonic()

        def reproduces(candidate: bytes) -> bool:
            with open(mutant_path, "wb") as f:
                f.write(candidate)
            return signature(worker.run(mutant_path)) == key

        smaller = minimize(data, seed, reproduces, started + minimize_seconds)
        spent = time.monotonic() - started
        minimized = repro.with_name(f"{repro.stem}-min{suffix}")
        minimized.write_bytes(smaller)
        finding.update(minimized=minimized.name, minimized_bytes=len(smaller),
                       minimized_differs_from_seed_in=_difference(smaller, seed))
    run.findings.append(finding)
    return spent


def _difference(data: bytes, seed: bytes) -> str:
    """Where a repro differs from its seed: the archive members, or a count of bytes."""
    members, originals = zip_members(data), zip_members(seed)
    if members and originals:
        original = {info.filename: content for info, content in originals}
        return "members " + ", ".join(info.filename for info, content in members
                                      if original.get(info.filename) != content)
    differing = sum(a != b for a, b in zip(data, seed)) + abs(len(data) - len(seed))
    return f"{differing} byte(s)"


def minimize(data: bytes, seed: bytes, reproduces: Callable[[bytes], bool], deadline: float) -> bytes:
    """A file that still ``reproduces`` the failure, closer to ``seed`` and shorter than ``data``.

    First every byte that differs from the seed is put back, in halving groups (delta debugging), as long
    as the failure stays; then ever smaller chunks are cut out. Stops at ``deadline``. Two zip archives are
    compared member by member instead (see ``_minimize_members``).
    """
    members = _minimize_members(data, seed, reproduces, deadline)
    if members is not None:
        return members
    current = data
    differing = [i for i in range(min(len(current), len(seed))) if current[i] != seed[i]]
    group = max(1, len(differing) // 2)
    while differing and time.monotonic() < deadline:
        for start in range(0, len(differing), group):
            undo = differing[start:start + group]
            candidate = bytearray(current)
            for i in undo:
                candidate[i] = seed[i]
            if reproduces(bytes(candidate)):
                current = bytes(candidate)
                differing = differing[:start] + differing[start + group:]
                break
            if time.monotonic() >= deadline:
                return current
        else:
            if group == 1:
                break
            group = max(1, group // 2)
    chunk = max(1, len(current) // 2)
    while current and time.monotonic() < deadline:
        start, cut = 0, False
        while start < len(current) and time.monotonic() < deadline:
            candidate = current[:start] + current[start + chunk:]
            if reproduces(candidate):
                current, cut = candidate, True
            else:
                start += chunk
        if not cut:
            if chunk == 1:
                break
            chunk //= 2
    return current


def _minimize_members(data: bytes, seed: bytes, reproduces: Callable[[bytes], bool], deadline: float) -> bytes | None:
    """For a damaged member inside an intact archive (positions shift, so bytes cannot be compared): the
    seed's archive with only the members that matter damaged, each of them minimised against the seed's
    member. ``None`` when ``data`` or ``seed`` is not a readable archive or the rewritten archive does not
    reproduce the failure (the damage is in the archive's own structure)."""
    members, originals = zip_members(data), zip_members(seed)
    if not members or not originals:
        return None
    original = {info.filename: content for info, content in originals}
    if not reproduces(zip_archive(members)):
        return None
    for index, (info, content) in enumerate(members):
        if info.filename in original and content != original[info.filename]:
            def with_member(candidate: bytes, index=index, info=info) -> bytes:
                return zip_archive(members[:index] + [(info, candidate)] + members[index + 1:])

            member_reproduces = (lambda candidate, with_member=with_member: reproduces(with_member(candidate)))
            if member_reproduces(original[info.filename]):
                members[index] = (info, original[info.filename])
            else:
                members[index] = (info, _one_json_change(content, original[info.filename], member_reproduces)
                                  or minimize(content, original[info.filename], member_reproduces, deadline))
    return zip_archive(members)


def _one_json_change(document: bytes, original: bytes, reproduces: Callable[[bytes], bool]) -> bytes | None:
    """The ``original`` JSON document with one of the values in which ``document`` differs from it, if that one
    change reproduces the failure; ``None`` otherwise (or if either is not JSON)."""
    try:
        damaged, seed = json.loads(document), json.loads(original)
    except ValueError:
        return None
    for path in _json_differences(seed, damaged):
        candidate = json.dumps(_json_with(seed, path, damaged)).encode()
        if reproduces(candidate):
            return candidate
    return None


def _json_differences(seed, damaged, path: tuple = ()):
    """The paths (tuples of keys and indices) at which ``damaged`` differs from ``seed``, innermost first."""
    if type(seed) is not type(damaged):
        yield path
    elif isinstance(seed, dict):
        for key in [*seed, *(k for k in damaged if k not in seed)]:
            if key in seed and key in damaged:
                yield from _json_differences(seed[key], damaged[key], path + (key,))
            else:
                yield path + (key,)
    elif isinstance(seed, list) and len(seed) == len(damaged):
        for index, (a, b) in enumerate(zip(seed, damaged)):
            yield from _json_differences(a, b, path + (index,))
    elif seed != damaged:
        yield path


def _json_with(seed, path: tuple, damaged):
    """A copy of ``seed`` whose value at ``path`` is ``damaged``'s (removed if ``damaged`` has none there)."""
    if not path:
        return damaged
    copy = json.loads(json.dumps(seed))
    parent, source = copy, damaged
    for key in path[:-1]:
        parent, source = parent[key], source[key]
    key = path[-1]
    if isinstance(source, dict) and key not in source:
        del parent[key]
    else:
        parent[key] = source[key]
    return copy
