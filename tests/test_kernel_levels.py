"""The instruction-set levels of the Cython kernels: each level this machine runs, forced in its own process,
against the NumPy reference; the choice of level from CPU features; the refusal of a level the CPU lacks;
and the Numba backend compiled for a generic CPU.

A level is chosen once per process, when fastlstm is imported, so each forced level runs in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastlstm
from fastlstm.backends import cpu
from fastlstm.errors import InvalidInputError

REPO = Path(__file__).resolve().parent.parent

# Every kind of cell and call shape with a kernel of its own: an LSTM stack at batch 1 and 4, a GRU of each
# reset order, a projection with peepholes, and an LSTM large enough that two threads split it (by hidden
# units at batch 1, by rows above). Each runs as whole sequences and as a stream, in float32 and float64,
# against the NumPy backend in float64, within the tolerance of tests/test_backends.py.
ORACLE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import fastlstm
    from fastlstm.backends import _cykernels

    sys.path.insert(0, "tests")
    from random_models import random_spec, random_stack
    from test_backends import assert_close

    level = sys.argv[1]
    info = fastlstm.kernel_info()
    assert info["level"] == level and info["forced"], info
    assert _cykernels.kernels.__name__ == "fastlstm.backends._cykernels." + level, _cykernels.kernels

    rng = np.random.default_rng(7)
    cases = [  # (spec, batch, num_threads)
        (random_stack(rng, ["lstm", "lstm"], [24, 17], input_size=5), 1, 1),
        (random_stack(rng, ["lstm", "lstm"], [24, 17], input_size=5), 4, 1),
        (random_stack(rng, ["gru", "gru"], [19, 12], input_size=6, linear_before_reset=True), 3, 1),
        (random_stack(rng, ["gru"], [21], input_size=6, linear_before_reset=False), 1, 1),
        (random_spec(rng, input_size=9, hidden_size=20, proj_size=7, peepholes=True), 2, 1),
        (random_spec(rng, input_size=48, hidden_size=160, scale=0.1), 1, 2),
        (random_spec(rng, input_size=48, hidden_size=160, scale=0.1), 3, 2),
    ]
    for index, (spec, batch, threads) in enumerate(cases):
        x = rng.normal(0, 1, (batch, 12, spec.input_size))
        exact = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x)
        for dtype in ("float32", "float64"):
            own = fastlstm.Model(spec, backend="numpy", dtype=dtype).predict(x)
            slack = float(np.max(np.abs(own - exact)))
            model = fastlstm.Model(spec, backend="cython", dtype=dtype, num_threads=threads)
            assert_close(model.predict(x), exact, dtype, slack)
            stream = model.stream(batch)
            stepped = np.stack([stream.step(x[:, t]).copy() for t in range(x.shape[1])], axis=1)
            assert_close(stepped, exact, dtype, slack)
    print("checked", len(cases), "models on", level)
""")


def run_python(code: str, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the source tree, with ``environment`` added."""
    env = {**os.environ, **environment}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


LEVELS_HERE = cpu.supported_levels(cpu.FEATURES, cpu.X86_64)


def test_the_build_holds_every_level_of_this_architecture():
    """A build without one of its levels would silently run a slower one on the CPUs that need it."""
    expected = list(cpu.X86_64_LEVELS) if cpu.X86_64 else [cpu.GENERIC_LEVEL]
    assert fastlstm.kernel_info()["built_levels"] == expected


@pytest.mark.parametrize("level", LEVELS_HERE)
def test_each_level_this_cpu_runs_matches_the_numpy_reference(level):
    result = run_python(ORACLE_SCRIPT, level, FASTLSTM_KERNELS=level)
    assert result.returncode == 0, result.stderr
    assert f"checked 7 models on {level}" in result.stdout


def test_unforced_choice_is_the_best_level_of_this_cpu():
    info = fastlstm.kernel_info()
    if os.environ.get(cpu.FORCE_VARIABLE):
        pytest.skip("FASTLSTM_KERNELS is set for this run")
    assert info["level"] == LEVELS_HERE[0] and not info["forced"]
    assert fastlstm.backends._cykernels.kernels.__name__.endswith("." + LEVELS_HERE[0])
    assert info["backends"][0] == "cython"


AVX2_ONLY = {"AVX": True, "AVX2": True, "FMA3": True, "AVX512F": True, "AVX512BW": True, "AVX512DQ": True}
SSE_ONLY = {"SSE2": True, "SSE42": True, "AVX": True}


@pytest.mark.parametrize("features, best", [
    ({**AVX2_ONLY, "AVX512VL": True}, "avx512"),
    (AVX2_ONLY, "avx2"),  # AVX-512 without VL is not enough
    ({**AVX2_ONLY, "FMA3": False}, "baseline"),  # AVX2 without FMA neither
    (SSE_ONLY, "baseline"),
])
def test_the_best_level_needs_every_feature_it_was_compiled_for(features, best):
    assert cpu.choose_level(features, True, None) == best


def test_other_architectures_run_the_generic_build_whatever_the_flags():
    assert cpu.supported_levels({**AVX2_ONLY, "AVX512VL": True}, False) == ["generic"]
    assert cpu.choose_level({}, False, None) == "generic"
    assert cpu.choose_level({}, False, "generic") == "generic"
    with pytest.raises(InvalidInputError, match=r"'avx2': not a kernel level of this non-x86-64 build"):
        cpu.choose_level({}, False, "avx2")


def test_a_forced_level_the_cpu_lacks_is_refused_naming_the_missing_features():
    with pytest.raises(InvalidInputError, match=r"FASTLSTM_KERNELS='avx512': this CPU lacks AVX512VL .*runs avx2, "
                                                r"baseline"):
        cpu.choose_level(AVX2_ONLY, True, "avx512")
    with pytest.raises(InvalidInputError, match=r"lacks AVX, AVX2, FMA3 .*runs baseline"):
        cpu.choose_level({"SSE2": True}, True, "avx2")
    assert cpu.choose_level(AVX2_ONLY, True, "baseline") == "baseline"


@pytest.mark.parametrize("value, message", [
    ("avx9", r"FASTLSTM_KERNELS='avx9': not a kernel level of this x86-64 build; expected one of avx512, avx2, "
             r"baseline"),
    ("generic", r"FASTLSTM_KERNELS='generic': not a kernel level of this x86-64 build"),
])
def test_a_forced_level_that_cannot_run_stops_the_import(value, message):
    if not cpu.X86_64:
        pytest.skip("the x86-64 level names")
    result = run_python("import fastlstm", FASTLSTM_KERNELS=value)
    assert result.returncode != 0
    assert "InvalidInputError" in result.stderr
    assert re.search(message, result.stderr), result.stderr


NUMBA_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import fastlstm

    sys.path.insert(0, "tests")
    from random_models import random_stack
    from test_backends import assert_close

    target = fastlstm.kernel_info()["numba_target"]
    assert target == {"cpu_name": "generic", "cpu_features": ""}, target
    rng = np.random.default_rng(3)
    spec = random_stack(rng, ["lstm", "gru"], [14, 9], input_size=4)
    x = rng.normal(0, 1, (2, 10, 4))
    exact = fastlstm.Model(spec, backend="numpy", dtype="float64").predict(x)
    own = fastlstm.Model(spec, backend="numpy", dtype="float32").predict(x)
    model = fastlstm.Model(spec, backend="numba", dtype="float32")
    stream = model.stream(2)
    stepped = np.stack([stream.step(x[:, t]).copy() for t in range(10)], axis=1)
    for got in (model.predict(x), stepped):
        assert_close(got, exact, "float32", float(np.max(np.abs(own - exact))))
    print("numba generic ok")
""")


def test_numba_compiled_for_a_generic_cpu_matches_the_numpy_reference():
    """NUMBA_CPU_NAME=generic compiles the Numba kernels without optional CPU features (the path of the
    oldest CPU). Its on-disk cache entries are keyed on the target, so they neither reuse nor replace the
    host's: a run for the host afterwards still gets host code."""
    result = run_python(NUMBA_SCRIPT, NUMBA_CPU_NAME="generic")
    assert result.returncode == 0, result.stderr
    assert "numba generic ok" in result.stdout
