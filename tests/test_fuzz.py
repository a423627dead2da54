"""The loader fuzzing harness (``fuzz/``): a brief run on every format, and the harness itself.

The brief run loads a few seconds' worth of damaged files of each format and asserts that every one was
loaded and run or refused with a ``FastLSTMError``: no crash, no hang, no other exception, no memory-limit
hit, peak RSS under the bound. The harness tests hand the worker a stand-in loader that crashes, hangs,
raises the wrong thing or eats memory on command, and check that each is counted as such and charged to
the right file, so that the brief run can fail.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastlstm.errors import InvalidInputError, ModelFormatError
from fuzz.mutate import Mutator, _encode_protobuf, _protobuf_fields
from fuzz.report import markdown_report
from fuzz.runner import Limits, Worker, fuzz_format, minimize
from fuzz.seeds import FORMAT_NAMES, format_named, write_seeds_in_child

BRIEF_SECONDS_PER_FORMAT = 2.5
# Formats whose brief run may find a loader bug not fixed yet (format -> why), marked xfail; empty when every
# bug the fuzzer found is fixed (each fix has its own test beside the loader's tests).
KNOWN_FAILING: dict[str, str] = {}

FAKE_LOADER = f"{os.path.abspath(__file__)}:misbehaving_loader"
FAKE_SEED = b"ok:" + b"." * 200
BIG_ALLOCATION_MIB = 300


# --------------------------------------------------------------------------- a loader that misbehaves on command
class _StandInModel:
    input_size = 2

    def __init__(self, predict_does: str = ""):
        self.predict_does = predict_does

    def predict(self, x):
        if self.predict_does == "raise":
            raise KeyError("predict went wrong")
        if self.predict_does == "refuse":
            raise InvalidInputError("x: refused")
        if self.predict_does == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.predict_does == "hang":
            time.sleep(3600)
        return np.zeros((x.shape[0], x.shape[1], 1))


def misbehaving_loader(path):
    """Loaded by the worker in place of ``fastlstm.load``: does what the file says.

    Commands: ``ok``, ``refuse``, ``raise``, ``crash``, ``exit``, ``hang``, ``memory``, ``big``,
    ``predict-raise``, ``predict-refuse``, ``predict-crash``, ``predict-hang``. A file starting ``ok:`` stands for a valid file when it is
    at least as long as ``FAKE_SEED`` and for a truncated one (``IndexError``) otherwise; anything else
    is refused.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"ok:"):
        if len(data) < len(FAKE_SEED):
            raise IndexError("truncated")
        return _StandInModel()
    command = data.decode(errors="replace")
    if command == "ok":
        return _StandInModel()
    if command == "raise":
        raise TypeError("the wrong kind of error")
    if command == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if command == "exit":
        os._exit(7)
    if command == "hang":
        time.sleep(3600)
    if command.startswith("predict-"):
        return _StandInModel(command.removeprefix("predict-"))
    if command == "memory":
        return bytearray(8 * 2**30)
    if command == "big":
        block = np.ones(BIG_ALLOCATION_MIB * 2**20 // 8)
        del block
        return _StandInModel()
    raise ModelFormatError(f"{path}: not a stand-in command")


def _line_of(code: str) -> int:
    return next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if line.strip().startswith(code))


def _write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------------- the harness counts what happens
def test_worker_charges_every_outcome_to_its_file(tmp_path):
    commands = ["ok", "crash", "ok", "hang", "ok", "raise", "refuse", "memory", "exit", "predict-raise",
                "predict-refuse", "predict-crash", "predict-hang", "ok"]
    worker = Worker(Limits(memory_mib=1024, seconds_per_file=1.0), FAKE_LOADER, tmp_path / "worker.log")
    try:
        results = [worker.run(_write(tmp_path, f"{n}-{c}", c.encode())) for n, c in enumerate(commands)]
    finally:
        worker.close()
    outcomes = [r["outcome"] for r in results]
    assert outcomes == ["ok", "crash", "ok", "hang", "ok", "outside", "refused", "memory", "crash", "outside",
                        "predict-refused", "crash", "hang", "ok"]
    assert [results[n]["phase"] for n in (1, 3, 8, 11, 12)] == ["load", "load", "load", "predict", "predict"]
    by_command = dict(zip(commands, results))
    assert by_command["crash"]["error"] == "SIGSEGV"
    assert "test_fuzz.py" in by_command["crash"]["raised_at"]  # faulthandler's stack, quoted from the log
    assert results[8]["error"] == "exit status 7"
    assert by_command["raise"]["error"] == "TypeError" and by_command["raise"]["phase"] == "load"
    assert by_command["raise"]["raised_at"] == f"tests/test_fuzz.py:{_line_of('raise TypeError(')}"
    assert by_command["refuse"]["error"] == "ModelFormatError"
    assert by_command["predict-raise"]["error"] == "KeyError" and by_command["predict-raise"]["phase"] == "predict"
    assert by_command["predict-refuse"]["error"] == "InvalidInputError"
    assert worker.starts == 6  # the first start, then one after each crash and hang


def test_peak_rss_is_measured_per_file(tmp_path):
    worker = Worker(Limits(memory_mib=1024), FAKE_LOADER, tmp_path / "worker.log")
    try:
        peaks = [worker.run(_write(tmp_path, c, c.encode()))["peak_rss_kib"] for c in ("ok", "big", "ok")]
    finally:
        worker.close()
    if not worker.peak_per_file:
        pytest.skip("the peak RSS cannot be reset on this system")
    assert peaks[1] - peaks[0] > 0.9 * BIG_ALLOCATION_MIB * 1024
    assert peaks[2] < peaks[1] - 0.9 * BIG_ALLOCATION_MIB * 1024


def test_campaign_counts_saves_and_minimizes_failures(tmp_path):
    seed = _write(tmp_path, "seed.bin", FAKE_SEED)
    limits = Limits(memory_mib=1024, peak_rss_mib=1024)
    run = fuzz_format("stand-in", ".bin", [seed], seconds=2.0, limits=limits, out_dir=tmp_path / "out",
                      loader=FAKE_LOADER, minimize_seconds=10.0)
    assert run.seeds == [{"file": "seed.bin", "bytes": len(FAKE_SEED), "outcome": "ok"}]
    assert run.files == sum(run.outcomes.values()) >= 20
    assert run.outcomes["outside"] > 0 and run.refused_by_class["ModelFormatError"] > 0
    assert [f["error"] for f in run.findings] == ["IndexError"]
    finding = run.findings[0]
    assert finding["count"] == run.outcomes["outside"]
    assert finding["raised_at"] == f"tests/test_fuzz.py:{_line_of('raise IndexError(')}"
    repro = (tmp_path / "out" / "repros" / finding["repro"]).read_bytes()
    assert repro.startswith(b"ok:") and len(repro) < len(FAKE_SEED)
    assert (tmp_path / "out" / "repros" / finding["minimized"]).read_bytes() == b"ok:"
    failures = run.failures(limits)
    assert failures and "outside" in failures[0]
    markdown = markdown_report({"seconds_per_format": 2.0, "seed": 0, "limits": vars(limits),
                                "formats": [run.summary()], "failures": failures})
    assert "| stand-in |" in markdown and "IndexError" in markdown and "FAILED" in markdown


def test_a_peak_above_the_bound_fails_the_run(tmp_path):
    seed = _write(tmp_path, "big", b"big")
    limits = Limits(memory_mib=1024, peak_rss_mib=BIG_ALLOCATION_MIB // 2)
    run = fuzz_format("stand-in", "", [seed], seconds=0.0, limits=limits, out_dir=tmp_path, loader=FAKE_LOADER)
    assert run.seeds[0]["outcome"] == "ok"
    assert any(f"above the bound of {BIG_ALLOCATION_MIB // 2} MiB" in r for r in run.failures(limits))


def test_minimize_undoes_edits_then_cuts():
    seed = bytes(range(100))
    damaged = bytearray(seed)
    damaged[10] = damaged[20] = damaged[90] = 0xFF
    # The failure needs byte 20 damaged and at least 50 bytes.
    smaller = minimize(bytes(damaged), seed, lambda d: len(d) >= 50 and d[20] == 0xFF, time.monotonic() + 10)
    assert len(smaller) == 50 and smaller[20] == 0xFF and smaller.count(0xFF) == 1


def _zip_with_json(config=None, weights: bytes = bytes(range(64))) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", json.dumps(config or {"layers": [{"units": 4, "name": "lstm"}], "version": 1},
                                                   indent=1))
        archive.writestr("weights.bin", weights)
    return buffer.getvalue()


def test_minimize_keeps_one_json_change_in_an_intact_archive():
    seed = _zip_with_json()
    damaged = _zip_with_json({"layers": [{"units": [[]], "name": "lst"}], "version": 1, "extra": 7}, bytes(64))

    def config_units_is_a_list(data: bytes) -> bool:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return isinstance(json.loads(archive.read("config.json"))["layers"][0]["units"], list)

    smaller = minimize(damaged, seed, config_units_is_a_list, time.monotonic() + 10)
    with zipfile.ZipFile(io.BytesIO(smaller)) as archive:
        assert json.loads(archive.read("config.json")) == {"layers": [{"units": [[]], "name": "lstm"}], "version": 1}
        assert archive.read("weights.bin") == bytes(range(64))


def test_mutator_is_reproducible_and_damages():
    seeds = [FAKE_SEED, _zip_with_json()]
    a, b = Mutator(seeds, random.Random(5)), Mutator(seeds, random.Random(5))
    made = [a.mutate() for _ in range(300)]
    assert made == [b.mutate() for _ in range(300)]
    assert sum(data not in seeds for data, _, _ in made) > 250
    assert {op for _, _, ops in made for op in ops.split("+")} == {"flip", "truncate", "splice", "member"}


def test_member_damage_keeps_the_zip_readable():
    seed = _zip_with_json()
    mutator = Mutator([seed], random.Random(1))
    changed_json = 0
    for _ in range(50):
        damaged = mutator.member(seed)
        with zipfile.ZipFile(io.BytesIO(damaged)) as archive:
            assert archive.testzip() is None  # every CRC matches: the parsers inside are reached
            assert archive.namelist() == ["config.json", "weights.bin"]
            changed_json += archive.read("config.json") != zipfile.ZipFile(io.BytesIO(seed)).read("config.json")
    assert 10 < changed_json < 50


def test_protobuf_field_damage_keeps_the_wire_format():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=4)], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", 1, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    seed = helper.make_model(graph).SerializeToString()
    assert _encode_protobuf(_protobuf_fields(seed)) == seed
    mutator = Mutator([seed], random.Random(2))
    assert "field" in mutator.operations
    damaged = [mutator.protobuf_field(seed) for _ in range(100)]
    assert all(_protobuf_fields(d) is not None for d in damaged)  # the enclosing lengths were rewritten
    assert sum(d != seed for d in damaged) > 80


# --------------------------------------------------------------------------- a brief run on every format
@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    return write_seeds_in_child(tmp_path_factory.mktemp("seeds"), FORMAT_NAMES)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILING[n], strict=False)) if n in KNOWN_FAILING else n
    for n in FORMAT_NAMES])
def test_brief_fuzz_run(name, seed_files, tmp_path):
    limits = Limits()
    run = fuzz_format(name, format_named(name).suffix, seed_files[name], seconds=BRIEF_SECONDS_PER_FORMAT,
                      limits=limits, out_dir=tmp_path, minimize_seconds=0)
    assert run.files >= 3
    findings = "\n".join(f"{f['outcome']} {f.get('error')} at {f.get('raised_at')}: {f.get('message')}"
                         for f in run.findings)
    assert run.failures(limits) == [], findings
    assert max(run.peaks_kib) < limits.peak_rss_mib * 1024
