"""The ``fastlstm`` command, run as a real subprocess on the bundled example models: outputs equal
``Model.predict``, and every error is one line on stderr with a non-zero exit status."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastlstm

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
SPOTTER = MODELS / "keyword_spotter.pt"
TAGGER = MODELS / "intent_tagger.pt"


def assert_same_output(actual, expected):
    """Outputs of the same model computed in another process: equal to float32 rounding. A process takes its
    own summation path (BLAS or the hand loops, by its BLAS thread setting; one thread or two), which may
    move a float32 result by an ulp."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fastlstm", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> None:
    assert result.returncode == status
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def spotter_x():
    return np.load(MODELS / "keyword_spotter_reference.npz")["x"]


def test_info_describes_layers_head_and_what_was_inferred():
    out = run_cli("info", SPOTTER).stdout
    assert "input: 32 features per step" in out
    assert "0: LSTM forward, input 32, hidden 64" in out
    assert "head: 1 dense layer(s), found by shape" in out and "0: fc: 64 -> 12, activation identity" in out
    assert "output: sequence, every step: (batch, time, 12)" in out
    assert "state: form 'h_c', (h, c) of shapes (1, batch, 64) and (1, batch, 64)" in out
    assert "streams one step at a time: yes" in out
    assert f"parameters: {4 * 64 * (32 + 64) + 4 * 64 + 12 * 64 + 12:,}" in out
    assert "was found by shape" in out and "--head-activations" in out
    assert "loading said:" in out and "backend 'auto' chose" in out  # the load's log records, shown


def test_info_of_a_token_model_with_options():
    out = run_cli("info", TAGGER, "--head-activations", "softmax", "--output", "last_step", "--backend", "numpy").stdout
    assert "integer token ids in 0..199" in out
    assert "0: GRU forward, input 32, hidden 48" in out and "1: LSTM forward, input 48, hidden 24" in out
    assert "activation softmax" in out
    assert "output: last_step, the last step: (batch, 5)" in out
    assert "state: form 'per_layer'" in out
    assert "backend numpy" in out
    assert "no head activation is recorded" not in out  # it was said on the command line


def test_info_shows_warnings_of_the_load(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.ModuleDict({"lstm": torch.nn.LSTM(3, 4, batch_first=True), "fc1": torch.nn.Linear(4, 5),
                                  "fc2": torch.nn.Linear(5, 2)})
    path = tmp_path / "two_linear.pt"
    torch.save(module.state_dict(), path)
    out = run_cli("info", path).stdout
    assert "warning:" in out and "no activations are known for the head" in out


def test_info_names_the_head_the_importer_found_by_shape_and_what_it_assumed(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    module = torch.nn.ModuleDict({"rnn": torch.nn.GRU(3, 4, batch_first=True), "proj": torch.nn.Linear(4, 5),
                                  "out": torch.nn.Linear(5, 2)})
    torch.save(module.state_dict(), tmp_path / "gru.pt")
    out = run_cli("info", tmp_path / "gru.pt", "--head-activations", "relu,softmax").stdout
    assert "head: 2 dense layer(s), found by shape" in out
    assert "0: proj: 4 -> 5, activation relu" in out and "1: out: 5 -> 2, activation softmax" in out
    assert "the head (2 Linear layer(s): proj, out) was found by shape" in out
    assert ("info: PyTorch state_dict gru.pt: head found by shape: proj (4->5), out (5->2), the Linear layers after "
            "the recurrent module 'rnn' in the file's order") in out
    assert "with the activations given (relu, softmax), and nothing between the recurrent output and the head" in out
    # The importer says it at INFO to any logging setup; a head named by the caller is not inferred: no record.
    with caplog.at_level("INFO", logger="fastlstm"):
        with pytest.warns(UserWarning, match="no activations are known for the head"):
            fastlstm.load(tmp_path / "gru.pt")
        fastlstm.load(tmp_path / "gru.pt", head=["proj", "out"], head_activations=["relu", "softmax"])
    inferred = [r for r in caplog.records if r.name == "fastlstm.importers.pytorch.state_dict"]
    assert len(inferred) == 1 and inferred[0].levelname == "INFO" and inferred[0].inferred_head == ("proj", "out")
    assert "with no activation between or after them (identity, identity" in inferred[0].getMessage()
    torch.save({"rnn." + k: v for k, v in torch.nn.GRU(3, 4).state_dict().items()}, tmp_path / "bare.pt")
    out = run_cli("info", tmp_path / "bare.pt").stdout
    assert "head: none, found by shape" in out
    assert "no head: no Linear layer after the recurrent module 'rnn' in the file's order takes its output size 4" in out


def test_info_of_an_onnx_file_shows_what_the_importer_bound(tmp_path):
    onnx = pytest.importorskip("onnx")
    from test_onnx_import import lstm_model

    onnx.save(lstm_model("bidirectional", hidden=5, input_size=4, lengths=True, states=True), tmp_path / "m.onnx")
    out = run_cli("info", tmp_path / "m.onnx").stdout
    assert "read as: ONNX file m.onnx" in out
    assert "0: LSTM bidirectional, input 4, hidden 5" in out
    assert "streams one step at a time: no" in out
    assert "not recorded in the file" not in out  # an ONNX graph says it all
    assert "info: ONNX file m.onnx: graph input 'lens' (sequence_lens) is predict(x, lengths=...)" in out


def test_convert_writes_a_native_file_that_predicts_the_same(tmp_path, spotter_x):
    out = tmp_path / "spotter.fastlstm"
    run_cli("convert", SPOTTER, out, "--head-activations", "softmax")
    expected = fastlstm.load(SPOTTER, head_activations=["softmax"]).predict(spotter_x)
    np.testing.assert_array_equal(fastlstm.load(out).predict(spotter_x), expected)


@pytest.mark.parametrize("extension", [".npy", ".npz", ".csv"])
def test_predict_equals_model_predict(tmp_path, spotter_x, extension):
    model = fastlstm.load(SPOTTER)
    if extension == ".csv":
        x = spotter_x[0]
        np.savetxt(tmp_path / "x.csv", x, delimiter=",", fmt="%.9g")
        x = np.loadtxt(tmp_path / "x.csv", delimiter=",")
    else:
        x = spotter_x
        np.save(tmp_path / "x.npy", x) if extension == ".npy" else np.savez(tmp_path / "x.npz", x=x)
    run_cli("predict", SPOTTER, tmp_path / f"x{extension}", "-o", tmp_path / f"y{extension}")
    expected = model.predict(x)
    if extension == ".npy":
        assert_same_output(np.load(tmp_path / "y.npy"), expected)
    elif extension == ".npz":
        assert_same_output(np.load(tmp_path / "y.npz")["y"], expected)
    else:  # 9 significant digits hold every float32 exactly
        assert_same_output(np.loadtxt(tmp_path / "y.csv", delimiter=",").astype(np.float32), expected)


def test_predict_with_lengths_and_load_options(tmp_path, spotter_x):
    np.save(tmp_path / "x.npy", spotter_x)
    run_cli("predict", SPOTTER, tmp_path / "x.npy", "--lengths", "7,50", "--output", "last_step",
            "--head-activations", "softmax", "-o", tmp_path / "y.npy")
    model = fastlstm.load(SPOTTER, output="last_step", head_activations=["softmax"])
    expected = model.predict(spotter_x, lengths=[7, 50])
    assert_same_output(np.load(tmp_path / "y.npy"), expected)
    assert expected.shape == (2, 12)


def test_weights_flag_runs_narrow_weights_and_info_names_them_and_the_kernels(tmp_path, spotter_x):
    np.save(tmp_path / "x.npy", spotter_x)
    run_cli("predict", SPOTTER, tmp_path / "x.npy", "--weights", "int8", "-o", tmp_path / "y.npy")
    expected = fastlstm.load(SPOTTER, weights="int8").predict(spotter_x)
    assert_same_output(np.load(tmp_path / "y.npy"), expected)
    assert not np.array_equal(expected, fastlstm.load(SPOTTER).predict(spotter_x))
    out = run_cli("info", SPOTTER, "--weights", "bfloat16").stdout
    assert "bfloat16 gate weights" in out
    assert f"this CPU runs the {fastlstm.kernel_info()['level']} build of the Cython kernels" in out


def test_predict_npz_lengths_and_token_ids_from_csv(tmp_path):
    ids = np.load(MODELS / "intent_tagger_reference.npz")["x"]
    model = fastlstm.load(TAGGER)
    np.savez(tmp_path / "x.npz", x=ids, lengths=np.array([20, 50]))
    run_cli("predict", TAGGER, tmp_path / "x.npz", "-o", tmp_path / "y.npy")
    assert_same_output(np.load(tmp_path / "y.npy"), model.predict(ids, lengths=[20, 50]))
    np.savetxt(tmp_path / "ids.csv", ids[0], fmt="%d")
    out = run_cli("predict", TAGGER, tmp_path / "ids.csv").stdout  # CSV on standard output
    assert_same_output(np.loadtxt(out.splitlines(), delimiter=",").astype(np.float32), model.predict(ids[0]))


def test_bench_measures_fastlstm_beside_the_frameworks():
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    out = run_cli("bench", SPOTTER, "--backend", "cython", "--thread-counts", "1", "--steps", "100",
                  "--seconds", "0.05", "--batch", "2", "--time-steps", "10").stdout
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in out.splitlines()[3:]}
    for engine in ("fastlstm cython", "PyTorch 1", "ONNX Runtime"):
        assert engine in rows, out
    fastlstm_row = rows["fastlstm cython"]
    p50, p99, rate = float(fastlstm_row[3]), float(fastlstm_row[4]), float(fastlstm_row[5])
    assert 0 < p50 <= p99 and rate > 0


@pytest.mark.parametrize("args, fragments, status", [
    (("info", "no_such_model.pt"), ("no such model file",), 1),
    (("info", "README.md"), ("not a model file fastlstm recognises",), 1),
    (("info", SPOTTER, "--head-activations", "relu,softmax"), ("head_activations: 2 given for a head of 1",), 1),
    (("info", SPOTTER, "--head-activations", "nonsense"), ("unknown activation 'nonsense'",), 1),
    (("info", SPOTTER, "--threads", "0"), ("--threads", "positive integer"), 2),
    (("info", SPOTTER, "--dtype", "float16"), ("--dtype",), 2),
    (("info",), ("required: model",), 2),
    (("frobnicate",), ("invalid choice",), 2),
])
def test_errors_are_one_line_with_a_non_zero_status(args, fragments, status):
    assert_one_line_error(run_cli(*args, check=False), *fragments, status=status)


def test_a_multi_problem_error_is_still_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    state = torch.nn.LSTM(3, 4).state_dict()
    state["weight_hh_l0"] = torch.zeros(16, 5)  # the wrong recurrent width
    torch.save(state, tmp_path / "bad.pt")
    assert_one_line_error(run_cli("info", tmp_path / "bad.pt", check=False), "weight_hh_l0")


def test_predict_errors(tmp_path, spotter_x):
    np.save(tmp_path / "x.npy", spotter_x[..., :5])
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "x.npy", check=False), "expected 32 features")
    np.save(tmp_path / "ok.npy", spotter_x)
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "ok.npy", "--lengths", "3,99", check=False),
                          "lengths: expected values in 0..50")
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "ok.npy", "--lengths", "a", check=False),
                          "--lengths: expected whole numbers")
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "ok.npy", "-o", tmp_path / "y.txt", check=False),
                          "expected a file ending in .npy, .npz, .csv")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "bad.npy", check=False), "not a readable .npy array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "objects.npy", check=False), "holds Python objects")
    (tmp_path / "x.csv").write_text("1,2,oops\n")
    assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / "x.csv", check=False), "cannot be read as .csv")
    np.save(tmp_path / "ids.npy", np.array([[1, 500]]))
    assert_one_line_error(run_cli("predict", TAGGER, tmp_path / "ids.npy", check=False), "token ids must lie in 0..199")


def test_an_array_header_is_checked_before_anything_is_allocated(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**6, 10**6, 32)})
    (tmp_path / "huge.npy").write_bytes(header.getvalue() + bytes(16))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(16))
    for name in ("huge.npy", "huge.npz"):
        assert_one_line_error(run_cli("predict", SPOTTER, tmp_path / name, check=False),
                              "declares 128000000000000 bytes of data", "but 16 follow")
    # honest about its size, but more than the allocation limit allows
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (2**20,)})
            member.write(bytes(4 * 2**20))
    result = subprocess.run([sys.executable, "-m", "fastlstm", "predict", str(SPOTTER), str(tmp_path / "bomb.npz")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "FASTLSTM_MAX_ALLOCATION_BYTES": str(2**20)})
    assert_one_line_error(result, "bomb.npz", "would allocate about 4.0 MiB")


def test_keras_and_onnx_refuse_pytorch_options(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert_one_line_error(run_cli("info", tmp_path / "m.onnx", "--output", "last_step", check=False),
                          "do not apply to ONNX models")


def test_help_everywhere():
    for command in ((), ("info",), ("convert",), ("predict",), ("bench",), ("serve",)):
        out = run_cli(*command, "--help").stdout
        assert out.startswith("usage: fastlstm")
        if command:
            assert "--head-activations" in out and "--backend" in out
