"""A Model pickles as its native bytes and load options, and unpickles prepared once per process."""

from __future__ import annotations

import io
import pickle
import pickletools

import numpy as np
import pytest

import fastlstm
from fastlstm import ModelFormatError, model as model_module
from fastlstm.native import native_bytes, spec_from_native_bytes
from random_models import random_spec, random_stack


def _specs():
    rng = np.random.default_rng(3)
    return {
        "lstm stack, head": random_spec(rng, input_size=4, hidden_size=6, num_layers=2, head=[(3, "tanh")]),
        "bidirectional, last step, mask": random_spec(rng, input_size=3, hidden_size=5, direction="bidirectional",
                                                      output="last_step", mask_value=0.0),
        "gru + lstm, final state": random_stack(rng, ["gru", "lstm"], [5, 4], output="final_state"),
        "token ids": random_stack(rng, ["lstm"], [6], input_size=4, vocab_size=11, head=[(2, "identity")]),
    }


SPECS = _specs()


def _input(model, rng):
    if model.takes_token_ids:
        return rng.integers(0, model.spec.vocab_size, (3, 7))
    return rng.normal(size=(3, 7, model.input_size))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("backend,dtype,num_threads", [("cython", "float32", None), ("numba", "float64", 1),
                                                       ("numpy", "float32", 2)])
def test_unpickled_model_predicts_the_same(name, backend, dtype, num_threads):
    model = fastlstm.Model(SPECS[name], backend=backend, dtype=dtype, num_threads=num_threads)
    copy = pickle.loads(pickle.dumps(model))
    assert (copy.backend, copy.dtype, copy.num_threads) == (model.backend, model.dtype, model.num_threads)
    x = _input(model, np.random.default_rng(0))
    lengths = np.array([7, 3, 1])
    np.testing.assert_array_equal(copy.predict(x, lengths=lengths), model.predict(x, lengths=lengths))


def test_pickle_holds_native_bytes_and_options_only():
    model = fastlstm.Model(SPECS["lstm stack, head"], backend="numba", num_threads=1)
    data = pickle.dumps(model)
    globals_named = [arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    strings = [arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    # One callable (protocol 4+ names it through two strings and STACK_GLOBAL), the bytes and the options dict.
    assert len(globals_named) == 1
    assert strings[:2] == ["fastlstm.model", "restore_model"]
    function, (blob, options) = model.__reduce__()
    assert function is model_module.restore_model
    assert options == {"backend": "numba", "dtype": "float32", "num_threads": 1, "weights": "float32"}
    assert blob == native_bytes(model.spec)
    assert blob in data


def test_auto_backend_pickles_as_the_backend_it_chose():
    model = fastlstm.Model(SPECS["gru + lstm, final state"])
    assert model.__reduce__()[1][1]["backend"] == model.backend != "auto"


def test_the_same_model_is_prepared_once_per_process():
    model = fastlstm.Model(SPECS["bidirectional, last step, mask"], backend="numpy", num_threads=3)
    data = pickle.dumps(model)
    before = model_module.preparation_count()
    copies = [pickle.loads(data) for _ in range(5)]
    assert model_module.preparation_count() == before + 1
    assert all(copy is copies[0] for copy in copies)
    other_options = pickle.loads(pickle.dumps(fastlstm.Model(model.spec, backend="numpy", num_threads=4)))
    assert other_options is not copies[0] and other_options.num_threads == 4
    assert model_module.preparation_count() == before + 2


def test_the_cache_keeps_the_most_recently_used_models():
    rng = np.random.default_rng(9)
    capacity = model_module._PREPARED_CAPACITY
    blobs = [pickle.dumps(fastlstm.Model(random_spec(rng, input_size=2, hidden_size=3), backend="numpy"))
             for _ in range(capacity + 1)]
    first = pickle.loads(blobs[0])
    for blob in blobs[1:capacity]:
        pickle.loads(blob)
    assert pickle.loads(blobs[0]) is first  # used again: now the most recent
    pickle.loads(blobs[capacity])  # one too many: the least recently used (blobs[1]) goes
    assert len(model_module._prepared) == capacity
    before = model_module.preparation_count()
    assert pickle.loads(blobs[0]) is first
    assert model_module.preparation_count() == before
    pickle.loads(blobs[1])
    assert model_module.preparation_count() == before + 1


def _corruptions(blob: bytes):
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    return {"bit flip": bytes(flipped), "truncated": blob[: len(blob) // 2], "garbage": b"not a model",
            "empty": b"", "a zip without a manifest": _zip_without_manifest()}


def _zip_without_manifest() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("other.json", "{}")
    return buffer.getvalue()


@pytest.mark.parametrize("corruption", list(_corruptions(b"x" * 10)))
def test_corrupt_bytes_raise_model_format_error(corruption):
    blob = native_bytes(SPECS["lstm stack, head"])
    bad = _corruptions(blob)[corruption]
    with pytest.raises(ModelFormatError, match="pickled fastlstm model"):
        model_module.restore_model(bad, {"backend": "numpy", "dtype": "float32", "num_threads": None})


@pytest.mark.parametrize("data,options,message", [
    (None, {}, "expected the bytes of a fastlstm native file, got NoneType"),
    (b"", {"colour": "red"}, r"load options \{'colour': 'red'\} are not a dict of"),
    (b"", ["backend"], "load options"),
])
def test_malformed_pickle_arguments_raise_model_format_error(data, options, message):
    with pytest.raises(ModelFormatError, match=message):
        model_module.restore_model(data, options)


@pytest.mark.parametrize("options,error,message", [
    ({"backend": 3, "dtype": "float32", "num_threads": None}, ModelFormatError, "backend: expected a name"),
    ({"backend": "numpy", "dtype": "int8", "num_threads": None}, fastlstm.InvalidInputError, "dtype: expected one of"),
    ({"backend": "numpy", "dtype": "float32", "num_threads": 0}, fastlstm.InvalidInputError, "num_threads"),
])
def test_load_options_of_a_wrong_type_or_value_raise_fastlstm_errors(options, error, message):
    with pytest.raises(error, match=message):
        model_module.restore_model(native_bytes(SPECS["lstm stack, head"]), options)


def test_native_bytes_equal_a_saved_file(tmp_path):
    spec = SPECS["token ids"]
    path = tmp_path / "model.fastlstm"
    fastlstm.Model(spec).save(path)
    assert path.read_bytes() == native_bytes(spec)
    from_bytes = fastlstm.Model(spec_from_native_bytes(native_bytes(spec)), backend="numpy")
    from_file = fastlstm.load(path, backend="numpy")
    x = np.random.default_rng(1).integers(0, 11, (2, 5))
    np.testing.assert_array_equal(from_bytes.predict(x), from_file.predict(x))


def test_native_bytes_declaring_more_than_they_hold_are_refused():
    """The bytes' own size bounds what their arrays may declare, as a file's size on disk does: all-zero
    weights deflated shrink far more than ``MAX_INFLATION``."""
    import zipfile

    zeros = random_spec(np.random.default_rng(0), input_size=64, hidden_size=256, scale=0.0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(native_bytes(zeros))) as source, \
            zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    assert len(buffer.getvalue()) * 16 < zeros.layers[0].cells[0].w_hh.nbytes
    with pytest.raises(ModelFormatError, match="inflation"):
        spec_from_native_bytes(buffer.getvalue())


@pytest.mark.parametrize("name", SPECS)
def test_warmup_runs_the_model_and_changes_nothing(name):
    model = fastlstm.Model(SPECS[name], backend="numba")
    x = _input(model, np.random.default_rng(2))
    before = model.predict(x)
    assert model.warmup() is model
    np.testing.assert_array_equal(model.predict(x), before)


@pytest.mark.parametrize("share, expected", [("1", 1), (" 1 ", 1), ("", None), ("0", None), ("two", None),
                                             ("100000", None)])
def test_default_threads_are_the_process_share_given_in_omp_num_threads(monkeypatch, share, expected):
    """A Dask or Ray worker is given its share in OMP_NUM_THREADS; a model loaded with the default uses it,
    never more than the cores the process may run on, and ignores a value that is not a positive integer."""
    from fastlstm.backends import default_num_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = default_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", share)
    assert default_num_threads() == (cores if expected is None else min(expected, cores))
    model = fastlstm.Model(random_spec(np.random.default_rng(0), 4, 8), backend="numpy")
    assert model.num_threads == default_num_threads()


def test_a_model_with_narrow_weights_pickles_with_its_weight_format():
    """The receiving process runs the same 8-bit kernels, with the same outputs, not the float32 model."""
    spec = SPECS["lstm stack, head"]
    model = fastlstm.Model(spec, backend="cython", weights="int8")
    restored = pickle.loads(pickle.dumps(model))
    assert restored.weights == "int8"
    x = np.random.default_rng(3).normal(size=(2, 7, spec.input_size))
    np.testing.assert_array_equal(restored.predict(x), model.predict(x))
    assert not np.array_equal(fastlstm.Model(spec, backend="cython").predict(x), model.predict(x))
