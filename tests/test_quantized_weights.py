"""8- and 16-bit gate weights: the one quantizer, the ``weights=`` option, the compiled kernels against the
NumPy reference, the error bound against float32, and the native file's 8-bit scales."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fastlstm
from fastlstm import InvalidInputError, ModelFormatError
from fastlstm.quantize import stored_weights
from quantized_models import as_imported_int8
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
