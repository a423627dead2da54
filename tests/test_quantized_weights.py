"""8- and 16-bit gate weights: the one quantizer, the ``weights=`` option, the compiled kernels against the
NumPy reference, the error bound against float32, and the native file's 8-bit scales."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import fastlstm
import fastlstm.backends
import fastlstm.backends.base
from fastlstm import InvalidInputError, ModelFormatError
from fastlstm.quantize import stored_weights
from quantized_models import as_imported_int8, torch_init_stack
from random_models import random_spec, random_stack
from test_native_format import as_version_2, rewrite_manifest


# ------------------------------------------------------------------------------------------------------
# The quantizer


def test_int8_is_symmetric_with_one_scale_per_row():
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 1, (6, 10)) * np.array([1e-3, 0.1, 1, 10, 100, 0.5])[:, None]
    weights[5] = 0.0
    stored = stored_weights(weights, None, "int8")
    assert stored.values.dtype == np.int8 and stored.scale.dtype == np.float32
    np.testing.assert_allclose(stored.scale[:5], np.abs(weights[:5]).max(axis=1) / 127, rtol=1e-6)
    assert np.all(np.abs(stored.values[:5]).max(axis=1) == 127)  # each row's largest weight uses the range
    assert stored.scale[5] == 1 and not stored.values[5].any()
    # Within half a step of its own row's scale: a per-tensor scale would leave the small rows at zero.
    error = np.abs(stored.dequantized() - weights)
    assert np.all(error <= stored.scale[:, None] * 0.5 * (1 + 1e-5) + 1e-12)
    np.testing.assert_array_equal(stored_weights(-weights, None, "int8").values, -stored.values)


def test_bfloat16_rounds_to_nearest_even():
    values = np.array([[1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5, 3.0]], np.float32)
    stored = stored_weights(values, None, "bfloat16")
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1); 1 + 3*2^-8 ties to 1 + 2^-6 (even mantissa).
    expected = np.array([[1.0, 1.0, 1 + 2 ** -6, 1 + 2 ** -7, -2.5, 3.0]], np.float32)
    np.testing.assert_allclose(stored.dequantized(), expected, rtol=0)
    assert stored.values.dtype == np.uint16


def test_bfloat16_overflow_is_refused():
    with pytest.raises(fastlstm.UnsupportedModelError, match="rounds to infinity in bfloat16"):
        stored_weights(np.array([[3.4e38]], np.float32), None, "bfloat16", "layers[0].cells[0].w_ih")


def test_imported_scales_and_integers_are_kept_exactly():
    rng = np.random.default_rng(1)
    spec = as_imported_int8(random_spec(rng, input_size=4, hidden_size=6), rng)
    cell = spec.layers[0].cells[0]
    stored = stored_weights(cell.w_hh, cell.w_hh_scale, "int8")
    np.testing.assert_array_equal(stored.scale, cell.w_hh_scale)
    np.testing.assert_array_equal(stored.dequantized(), cell.w_hh)  # not requantized with max|row| / 127
    assert not np.array_equal(stored.scale, stored_weights(cell.w_hh, None, "int8").scale)


# ------------------------------------------------------------------------------------------------------
# The option


def test_default_format_follows_the_spec():
    rng = np.random.default_rng(2)
    plain = random_spec(rng, input_size=3, hidden_size=4)
    assert fastlstm.Model(plain, backend="numpy").weights == "float32"
    imported = as_imported_int8(plain, rng)
    assert fastlstm.Model(imported, backend="numpy").weights == "int8"
    assert fastlstm.Model(imported, backend="numpy", weights="float32").weights == "float32"
    # float64 runs the imported products exactly, in float64.
    assert fastlstm.Model(imported, backend="numpy", dtype="float64").weights == "float32"
    assert "weights='int8'" in repr(fastlstm.Model(imported, backend="numpy"))


@pytest.mark.parametrize("weights, dtype, message", [
    ("int4", "float32", "weights: expected None or one of"),
    ("int8", "float64", "runs in float32 only"),
    ("bfloat16", "float64", "runs in float32 only"),
])
def test_bad_weight_options_are_refused(weights, dtype, message):
    spec = random_spec(np.random.default_rng(3), input_size=3, hidden_size=4)
    with pytest.raises(InvalidInputError, match=message):
        fastlstm.Model(spec, backend="numpy", dtype=dtype, weights=weights)


# ------------------------------------------------------------------------------------------------------
# The native file keeps the 8-bit scales


def test_native_file_keeps_the_scales(tmp_path):
    rng = np.random.default_rng(4)
    spec = as_imported_int8(random_stack(rng, ["lstm", "gru"], [6, 5], input_size=4,
                                         directions=["bidirectional", "forward"]), rng)
    path = tmp_path / "q.fastlstm"
    fastlstm.Model(spec, backend="numpy").save(path)
    loaded = fastlstm.load(path, backend="numpy")
    assert loaded.weights == "int8"
    for layer, original in zip(loaded.spec.layers, spec.layers):
        for cell, want in zip(layer.cells, original.cells):
            np.testing.assert_array_equal(cell.w_ih_scale, want.w_ih_scale)
            np.testing.assert_array_equal(cell.w_hh_scale, want.w_hh_scale)
    x = rng.normal(size=(2, 7, 4))
    np.testing.assert_array_equal(loaded.predict(x), fastlstm.Model(spec, backend="numpy").predict(x))


def test_version_2_file_still_loads_and_cannot_hold_scales(tmp_path):
    rng = np.random.default_rng(5)
    spec = as_imported_int8(random_spec(rng, input_size=3, hidden_size=4), rng)
    path, old = tmp_path / "v3.fastlstm", tmp_path / "v2.fastlstm"
    fastlstm.Model(spec, backend="numpy").save(path)
    rewrite_manifest(path, old, as_version_2)
    loaded = fastlstm.load(old, backend="numpy")
    assert loaded.spec.layers[0].cells[0].w_ih_scale is None and loaded.weights == "float32"
    x = rng.normal(size=(1, 5, 3))
    np.testing.assert_array_equal(loaded.predict(x), fastlstm.Model(spec, backend="numpy", weights="float32").predict(x))

    def version_2_with_scale(manifest):
        cell = manifest["layers"][0]["cells"][0]
        as_version_2(manifest)
        cell["w_ih_scale"] = "layers/0/cells/0/w_ih_scale"

    bad = tmp_path / "v2scale.fastlstm"
    rewrite_manifest(path, bad, version_2_with_scale)
    with pytest.raises(ModelFormatError, match=r"unknown field\(s\) \['w_ih_scale'\]"):
        fastlstm.load(bad)


def test_native_scales_of_the_wrong_shape_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    spec = as_imported_int8(random_spec(rng, input_size=3, hidden_size=4), rng)
    path, bad = tmp_path / "q.fastlstm", tmp_path / "bad.fastlstm"
    fastlstm.Model(spec, backend="numpy").save(path)
    rewrite_manifest(path, bad, lambda m: m["layers"][0]["cells"][0].update(w_ih_scale="layers/0/cells/0/w_ih"))
    with pytest.raises(ModelFormatError, match=r"w_ih_scale: array 'layers/0/cells/0/w_ih' has shape \(16, 3\)"):
        fastlstm.load(bad)


# ------------------------------------------------------------------------------------------------------
# The compiled kernels against the NumPy reference (which runs the dequantized weights)

COMPILED = [pytest.param(name, marks=pytest.mark.skipif(name not in fastlstm.backends.available_backends(),
                                                        reason=f"backend {name} unavailable"))
            for name in ("cython", "numba")]
FORMATS = ("bfloat16", "int8")
# float32 accumulation in another order than NumPy's: the kernels' tolerance against the reference.
KERNEL_TOLERANCE = 1e-5


def kernel_cases():
    rng = np.random.default_rng(10)
    plain = {
        "lstm stack": torch_init_stack(rng, ["lstm", "lstm"], 6, 20),
        "lstm projection bidirectional": random_spec(rng, input_size=5, hidden_size=9, proj_size=4,
                                                     direction="bidirectional", scale=0.2),
        "lstm gru rnn": random_stack(rng, ["lstm", "gru", "rnn"], [7, 10, 5], input_size=6, scale=0.2),
        "gru reset first": random_stack(rng, ["gru", "gru"], [7, 10], input_size=6, linear_before_reset=False,
                                        scale=0.2),
        "lstm peepholes clip": random_spec(rng, input_size=5, hidden_size=8, peepholes=True, clip=1.5, scale=0.2),
        # Large enough for the threaded split by hidden units (at least 256K gate weights per step).
        "threaded lstm": torch_init_stack(rng, ["lstm"], 64, 224),
        "threaded gru reset first": torch_init_stack(rng, ["gru"], 64, 288),
    }
    gru = plain["threaded gru reset first"]
    plain["threaded gru reset first"] = dataclasses.replace(
        gru, layers=(dataclasses.replace(gru.layers[0], linear_before_reset=False),))
    plain["imported 8-bit"] = as_imported_int8(plain["lstm gru rnn"], rng)
    return plain


CASES = kernel_cases()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_kernels_match_the_reference(backend, weights, case):
    spec = CASES[case]
    rng = np.random.default_rng(11)
    reference = fastlstm.Model(spec, backend="numpy", weights=weights)
    for threads in (1, 2):
        model = fastlstm.Model(spec, backend=backend, weights=weights, num_threads=threads)
        assert model.weights == weights
        for batch in (1, 3):
            x = rng.normal(size=(batch, 12, spec.input_size)).astype(np.float32)
            lengths = np.array([12, 7, 1][:batch])
            np.testing.assert_allclose(model.predict(x), reference.predict(x), atol=KERNEL_TOLERANCE, rtol=0)
            np.testing.assert_allclose(model.predict(x, lengths=lengths), reference.predict(x, lengths=lengths),
                                       atol=KERNEL_TOLERANCE, rtol=0)
            if not spec.is_unidirectional_forward:
                continue
            stream, expected = model.stream(batch), reference.stream(batch)
            for t in range(12):
                np.testing.assert_allclose(stream.step(x[:, t]), expected.step(x[:, t]), atol=KERNEL_TOLERANCE,
                                           rtol=0)


def test_cython_batch_1_reads_the_narrow_weights():
    """With the float copies of the weights zeroed, batch-1 steps and sequences still compute the model: they
    read the 8- and 16-bit weights (and the int8 scales of the right rows), not the float values."""
    pytest.importorskip("fastlstm.backends._cykernels")
    from fastlstm.backends import _cykernels
    from fastlstm.backends._cells import plan_cells
    from fastlstm.backends.cython_backend import pack_for_extension

    spec = CASES["lstm gru rnn"]
    rng = np.random.default_rng(12)
    x = rng.normal(size=(1, 9, spec.input_size)).astype(np.float32)
    for weights in FORMATS:
        cells = [pack_for_extension(plan, np.dtype(np.float32)) for plan in plan_cells(spec, weights)]
        for cell in cells:
            cell["weights"][:] = 0
        kernels = _cykernels.LSTMKernels(np.float32, 1, cells)
        reference = fastlstm.Model(spec, backend="numpy", weights=weights)
        h, c = (np.zeros(n, np.float32) for n in fastlstm.backends.base.flat_state_sizes(spec, 1))
        workspace = kernels.new_workspace(1)
        expected = reference.stream(1)
        for t in range(9):
            kernels.step(np.ascontiguousarray(x[:, t]), h, c, workspace)
            np.testing.assert_allclose(h[-5:], expected.step(x[:, t])[0], atol=KERNEL_TOLERANCE, rtol=0)


def test_numba_batch_1_reads_the_narrow_weights():
    """As above for the Numba packing: the float segments of the gate weights zeroed, a batch-1 step still
    computes the model."""
    from fastlstm.backends import _numba_kernels as kernels
    from fastlstm.backends._cells import plan_cells, plan_head
    from fastlstm.backends.numba_backend import pack_cells

    spec = CASES["gru reset first"]
    rng = np.random.default_rng(13)
    x = rng.normal(size=(1, 9, spec.input_size)).astype(np.float32)
    for weights in FORMATS:
        packed, table, head = pack_cells(plan_cells(spec, weights), plan_head(spec), np.float32, 1)
        for row in table:
            I, H, G = row[kernels.COL_INPUT_SIZE], row[kernels.COL_HIDDEN_SIZE], row[kernels.COL_GATES]
            packed[row[kernels.COL_INPUT]:row[kernels.COL_INPUT] + I * G * H] = 0
            packed[row[kernels.COL_RECURRENT]:row[kernels.COL_RECURRENT] + H * 2 * H] = 0
            packed[row[kernels.COL_RECURRENT_N]:row[kernels.COL_RECURRENT_N] + H * H] = 0
        h, c = (np.zeros(n, np.float32) for n in fastlstm.backends.base.flat_state_sizes(spec, 1))
        scratch = np.zeros(kernels.step_scratch_size(table, head, 1), np.float32)
        y = np.zeros((1, spec.output_size), np.float32)
        expected = fastlstm.Model(spec, backend="numpy", weights=weights).stream(1)
        for t in range(9):
            kernels.step_stack(np.ascontiguousarray(x[:, t]), h, c, y, scratch, packed, table, head)
            np.testing.assert_allclose(y, expected.step(x[:, t]), atol=KERNEL_TOLERANCE, rtol=0)


# ------------------------------------------------------------------------------------------------------
# The error bound against float32 (README, "8- and 16-bit weights"), on 1,000 steps of realistic models

ERROR_BOUND = {"bfloat16": 5e-3, "int8": 1.5e-2}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
STEPS = 1000


def realistic_models():
    rng = np.random.default_rng(14)
    models = [
        ("keyword_spotter.pt", fastlstm.load(EXAMPLES / "keyword_spotter.pt", backend="numpy",
                                             head_activations=["softmax"]).spec, rng.normal(size=(2, STEPS, 32))),
        ("sensor_forecaster.pt", fastlstm.load(EXAMPLES / "sensor_forecaster.pt", backend="numpy").spec,
         rng.normal(size=(2, STEPS, 64))),
        ("intent_tagger.pt", fastlstm.load(EXAMPLES / "intent_tagger.pt", backend="numpy").spec,
         rng.integers(0, 200, size=(2, STEPS))),
    ]
    for kinds, input_size, hidden in ((["lstm"], 32, 64), (["lstm", "lstm"], 64, 128), (["gru"], 64, 128),
                                      (["rnn"], 64, 128), (["lstm"], 256, 512)):
        models.append((f"PyTorch-initialised {'+'.join(kinds)} {input_size}->{hidden}",
                       torch_init_stack(rng, kinds, input_size, hidden), rng.normal(size=(2, STEPS, input_size))))
    return models


@pytest.fixture(scope="module")
def float32_outputs():
    return [(name, spec, x, fastlstm.Model(spec, backend="numpy").predict(x)) for name, spec, x in realistic_models()]


@pytest.mark.parametrize("weights", FORMATS)
def test_error_against_float32_stays_within_the_documented_bound(float32_outputs, weights):
    for name, spec, x, expected in float32_outputs:
        error = np.abs(fastlstm.Model(spec, weights=weights).predict(x) - expected).max()
        assert error <= ERROR_BOUND[weights], f"{name}: {weights} differs from float32 by {error:.2e}"
        assert error > 0, f"{name}: {weights} gave float32's outputs exactly: the weights were not narrowed"


def test_per_tensor_int8_would_break_the_bound():
    """Gate rows of very different magnitudes (as trained models have): one scale per row keeps the bound,
    one scale for the whole matrix (what this test guards against) does not."""
    rng = np.random.default_rng(15)
    spec = torch_init_stack(rng, ["lstm"], 32, 64)
    cell = spec.layers[0].cells[0]
    row_sizes = np.exp(rng.uniform(np.log(0.01), np.log(8.0), (256, 1)))
    layer = dataclasses.replace(spec.layers[0], cells=(dataclasses.replace(
        cell, w_ih=cell.w_ih * row_sizes, w_hh=cell.w_hh * row_sizes),))
    spec = dataclasses.replace(spec, layers=(layer,)).validate()
    x = rng.normal(size=(2, STEPS, 32))
    expected = fastlstm.Model(spec, backend="numpy").predict(x)
    per_row = np.abs(fastlstm.Model(spec, weights="int8").predict(x) - expected).max()
    assert per_row <= ERROR_BOUND["int8"]

    def per_tensor(weights):
        scale = np.abs(weights).max() / 127
        return (np.rint(weights / scale) * scale).astype(np.float32)

    coarse = dataclasses.replace(spec, layers=(dataclasses.replace(layer, cells=(dataclasses.replace(
        layer.cells[0], w_ih=per_tensor(layer.cells[0].w_ih), w_hh=per_tensor(layer.cells[0].w_hh)),)),))
    assert np.abs(fastlstm.Model(coarse, backend="numpy").predict(x) - expected).max() > ERROR_BOUND["int8"]


def test_native_scales_that_do_not_fit_the_weights_are_refused(tmp_path):
    """Scales of the right shape whose products are not the stored weights: the spec's check refuses them."""
    rng = np.random.default_rng(7)
    spec = as_imported_int8(random_spec(rng, input_size=3, hidden_size=4), rng)
    path, bad = tmp_path / "q.fastlstm", tmp_path / "bad.fastlstm"
    fastlstm.Model(spec, backend="numpy").save(path)
    rewrite_manifest(path, bad, lambda m: m["layers"][0]["cells"][0].update(w_hh_scale="layers/0/cells/0/w_ih_scale"))
    with pytest.raises(fastlstm.InvalidModelError, match=r"layers\[0\].cells\[0\].w_hh: weights (are not|divided by)"):
        fastlstm.load(bad)
