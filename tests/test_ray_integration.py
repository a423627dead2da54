"""fastlstm.integrations.ray: the map_batches class on plain batches, then on a local Ray with 2 CPUs: results
equal model.predict on the whole data, each actor prepares the model once, a corrupt model fails the job."""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastlstm
from fastlstm import InvalidInputError, ModelFormatError
from fastlstm.integrations.ray import Predictor
from fastlstm.model import preparation_count
from random_models import scoring_models


@pytest.fixture(scope="module")
def models():
    return scoring_models(np.random.default_rng(6))


def _sequences(model, rng, count, lengths):
    if model.takes_token_ids:
        return [rng.integers(0, 13, n) for n in lengths[:count]]
    return [rng.normal(size=(n, 4)).astype(np.float32) for n in lengths[:count]]


def _expected(model, sequences):
    """``model.predict`` on each sequence alone: what every row of the output column must hold."""
    return [model.predict(s) for s in sequences]


# ------------------------------------------------------------------ the class alone
@pytest.mark.parametrize("name", ["sequence", "last_step", "tokens"])
def test_fixed_length_batch_is_scored_as_one_array(models, name):
    model = models[name]
    sequences = _sequences(model, np.random.default_rng(0), 5, [7] * 5)
    batch = {"x": np.stack(sequences), "id": np.arange(5)}
    out = Predictor(model)(batch)
    assert out["id"] is batch["id"] and out["y"].dtype == model.dtype
    np.testing.assert_array_equal(out["y"], model.predict(batch["x"]))


@pytest.mark.parametrize("name", ["sequence", "last_step", "tokens"])
def test_ragged_batch_is_padded_and_each_output_cut_to_its_sequence(models, name):
    model = models[name]
    sequences = _sequences(model, np.random.default_rng(1), 6, [1, 9, 4, 4, 2, 7])
    column = np.empty(6, object)
    column[:] = sequences
    out = Predictor(model, input_column="seq", output_column="scores")({"seq": column})["scores"]
    for got, want in zip(out, _expected(model, sequences)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_pandas_batches_and_model_bytes(models):
    pd = pytest.importorskip("pandas")
    model = models["last_step"]
    sequences = _sequences(model, np.random.default_rng(2), 4, [3, 5, 5, 1])
    blob, _ = model.native_bytes_and_options()
    predictor = Predictor(blob, backend="numpy", dtype="float64", num_threads=1)
    assert (predictor.model.backend, predictor.model.dtype, predictor.model.num_threads) == ("numpy", np.float64, 1)
    out = predictor(pd.DataFrame({"x": sequences, "k": list("abcd")}))
    assert list(out.columns) == ["x", "k", "y"]
    for got, want in zip(out["y"], _expected(model, sequences)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bad_arguments_and_batches_are_refused(models):
    with pytest.raises(ModelFormatError, match="pickled fastlstm model: not a fastlstm native file"):
        Predictor(b"not a model")
    with pytest.raises(InvalidInputError, match="expected a fastlstm.Model or the bytes of a native file, got str"):
        Predictor("model.fastlstm")
    with pytest.raises(InvalidInputError, match="are the model's own when a Model is given"):
        Predictor(models["sequence"], dtype="float64")
    predictor = Predictor(models["sequence"])
    with pytest.raises(InvalidInputError, match=r"no column 'x'; it has \['features'\]"):
        predictor({"features": np.zeros((1, 2, 4))})
    ragged = np.empty(2, object)
    ragged[:] = [np.zeros((2, 4)), np.zeros((3, 5))]
    with pytest.raises(InvalidInputError, match="sequences have different feature shapes"):
        predictor({"x": ragged})
    ragged[:] = [np.zeros((2, 4)), np.zeros((0, 4))]
    with pytest.raises(InvalidInputError, match="sequence 1 has no time steps"):
        predictor({"x": ragged})


# ------------------------------------------------------------------ on a local Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    here = os.path.dirname(os.path.abspath(__file__))
    # Workers import fastlstm and this file's classes from the source tree, as the tests do.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


class CountingPredictor(Predictor):
    """Adds each batch's actor process and the preparations that process had made by then."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["pid"] = np.full(len(out["y"]), os.getpid())
        out["preparations"] = np.full(len(out["y"]), preparation_count())
        return out


@pytest.mark.parametrize("ragged", [False, True])
def test_dataset_results_equal_predict_and_each_actor_prepares_once(ray_session, models, ragged):
    model = fastlstm.Model(models["sequence"].spec, num_threads=1)  # new to the actors: a fresh preparation
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 9, 48) if ragged else np.full(48, 6)
    sequences = _sequences(model, rng, 48, lengths)
    dataset = ray_session.data.from_items([{"id": i, "x": s} for i, s in enumerate(sequences)], override_num_blocks=12)
    rows = dataset.map_batches(CountingPredictor, fn_constructor_kwargs={"model": model},
                               compute=ray_session.data.ActorPoolStrategy(size=2), num_cpus=1,
                               batch_size=4).take_all()
    assert sorted(row["id"] for row in rows) == list(range(48))
    for row in rows:
        np.testing.assert_allclose(row["y"], model.predict(sequences[row["id"]]), rtol=0, atol=1e-5)
    per_actor: dict[int, set[int]] = {}
    for row in rows:
        per_actor.setdefault(int(row["pid"]), set()).add(int(row["preparations"]))
    assert 1 <= len(per_actor) <= 2
    # 12 batches over at most 2 actors: every batch an actor scored saw the same preparation count.
    assert all(len(counts) == 1 for counts in per_actor.values()), per_actor


def test_a_corrupt_model_fails_the_job_with_a_format_error(ray_session, models):
    blob = bytearray(models["sequence"].native_bytes_and_options()[0])
    blob[len(blob) // 2] ^= 0xFF
    dataset = ray_session.data.from_items([{"x": np.zeros((3, 4), np.float32)} for _ in range(4)])
    # The actor's constructor fails before any batch is read; Ray reports it as the actor's death, with
    # fastlstm's error and message inside.
    with pytest.raises(ray_session.exceptions.RayActorError,
                       match=r"ModelFormatError: pickled fastlstm model: array .* Bad CRC-32"):
        dataset.map_batches(Predictor, fn_constructor_kwargs={"model": bytes(blob)},
                            compute=ray_session.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
