"""fastlstm.integrations.dask on a real two-process LocalCluster: results equal model.predict on the whole
data, the model is prepared once per worker process, malformed data and corrupt models fail the job with
fastlstm's errors."""

from __future__ import annotations

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")

import fastlstm  # noqa: E402
from fastlstm import InvalidInputError, ModelFormatError  # noqa: E402
from fastlstm.integrations.dask import predict_array, predict_dataframe  # noqa: E402
from fastlstm.model import preparation_count  # noqa: E402
from random_models import random_spec, scoring_models  # noqa: E402

FEATURES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def models():
    return scoring_models(np.random.default_rng(5))


def _long_frame(x: np.ndarray, lengths: np.ndarray, rng) -> "pd.DataFrame":
    """One row per valid step of each sequence of ``x``, ids 1000 + 7 * n, time steps as timestamps, rows
    shuffled."""
    sequence = np.repeat(np.arange(len(x)), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    frame = pd.DataFrame(x[sequence, position].reshape(len(sequence), -1),
                         columns=FEATURES if x.ndim == 3 else ["token"])
    frame.insert(0, "time", pd.Timestamp("2026-01-01") + pd.to_timedelta(position * 10, unit="s"))
    frame.insert(0, "sensor", 1000 + 7 * sequence)
    return frame.sample(frac=1.0, random_state=int(rng.integers(1000))).reset_index(drop=True)


@pytest.mark.parametrize("name", ["sequence", "last_step", "tokens"])
def test_array_results_equal_predict_on_the_whole_data(client, models, name):
    model = models[name]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 13, (23, 9)) if model.takes_token_ids else rng.normal(size=(23, 9, 4))
    lengths = rng.integers(0, 10, 23)
    chunks = (5, 9) if model.takes_token_ids else (5, 4, 2)  # split along time and features: rechunked
    y = predict_array(model, da.from_array(x, chunks=chunks), lengths=da.from_array(lengths, chunks=7))
    assert y.chunks[0] == (5, 5, 5, 5, 3)
    got = y.compute()
    want = model.predict(x, lengths=lengths)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(predict_array(model, da.from_array(x, chunks=(5, *x.shape[1:]))).compute(),
                               model.predict(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sequence", "last_step", "tokens"])
@pytest.mark.parametrize("id_as_index", [True, False])
def test_dataframe_results_equal_predict_on_the_whole_data(client, models, name, id_as_index):
    model = models[name]
    rng = np.random.default_rng(2)
    x = rng.integers(0, 13, (17, 8)) if model.takes_token_ids else rng.normal(size=(17, 8, 4))
    lengths = rng.integers(1, 9, 17)
    frame = _long_frame(x, lengths, rng)
    if id_as_index:
        ddf = dd.from_pandas(frame, npartitions=4).set_index("sensor")
    else:  # grouped by id, not indexed by it: the check gathers each partition's ids before scoring
        ddf = dd.from_pandas(frame, npartitions=4).shuffle("sensor")
    features = ["token"] if model.takes_token_ids else FEATURES
    scored = predict_dataframe(model, ddf, id_column="sensor", time_column="time", feature_columns=features)
    got = scored.compute()
    want = model.predict(x, lengths=lengths)
    ids = got.index.to_numpy() if id_as_index or model.spec.output != "sequence" else got["sensor"].to_numpy()
    sequence = (ids - 1000) // 7
    outputs = got[[f"output_{i}" for i in range(model.output_size)]].to_numpy()
    if model.spec.output == "sequence":
        assert len(got) == len(frame)
        position = ((got["time"] - pd.Timestamp("2026-01-01")).dt.total_seconds().to_numpy() // 10).astype(int)
        np.testing.assert_allclose(outputs, want[sequence, position], rtol=0, atol=1e-5)
        if not id_as_index:  # the input's rows, index and order are kept
            assert got.index.equals(ddf.index.compute())
    else:
        assert sorted(sequence) == list(range(17))
        np.testing.assert_allclose(outputs, want[sequence], rtol=0, atol=1e-5)


def test_a_sequence_split_across_partitions_fails_the_job(client, models):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5, 4))
    frame = _long_frame(x, np.full(6, 5), rng)  # shuffled rows: every id in several partitions
    ddf = dd.from_pandas(frame, npartitions=3, sort=False)
    scored = predict_dataframe(models["last_step"], ddf, id_column="sensor", time_column="time",
                               feature_columns=FEATURES)
    with pytest.raises(InvalidInputError, match=r"occur in more than one partition.*df.shuffle\('sensor'\)"):
        scored.compute()
    # Regrouped by id, the same data scores.
    regrouped = predict_dataframe(models["last_step"], ddf.shuffle("sensor"), id_column="sensor",
                                  time_column="time", feature_columns=FEATURES).compute()
    np.testing.assert_allclose(regrouped.sort_index().to_numpy(), models["last_step"].predict(x), atol=1e-5)


def test_a_time_step_given_twice_is_refused(client, models):
    frame = pd.DataFrame({"sensor": [1, 1, 1], "time": [0, 1, 1], **{f: [0.1, 0.2, 0.3] for f in FEATURES}})
    scored = predict_dataframe(models["sequence"], dd.from_pandas(frame, npartitions=1), id_column="sensor",
                               time_column="time", feature_columns=FEATURES)
    with pytest.raises(InvalidInputError, match="sequence 1 has two rows at time = 1"):
        scored.compute()


def test_wrong_columns_are_refused_before_any_work(models):
    ddf = dd.from_pandas(pd.DataFrame({"sensor": [1], "time": [0], "a": [0.0]}), npartitions=1)
    with pytest.raises(InvalidInputError, match=r"no column\(s\) \['b', 'c', 'd'\]"):
        predict_dataframe(models["sequence"], ddf, id_column="sensor", time_column="time", feature_columns=FEATURES)
    with pytest.raises(InvalidInputError, match="the model takes 4 features per step, got 1 columns"):
        predict_dataframe(models["sequence"], ddf, id_column="sensor", time_column="time", feature_columns=["a"])
    with pytest.raises(InvalidInputError, match=r"expected a Dask array of shape \(N, T, 4\)"):
        predict_array(models["sequence"], da.zeros((3, 4)))


def test_the_model_is_prepared_once_per_worker_however_many_tasks_use_it(client):
    """... and never by the scheduler, which unpickles task graphs (LocalCluster runs it in this process)."""
    model = fastlstm.Model(random_spec(np.random.default_rng(11), input_size=4, hidden_size=5))  # new to the workers
    before = client.run(preparation_count)
    scheduler_before = client.run_on_scheduler(preparation_count)
    x = np.random.default_rng(4).normal(size=(40, 6, 4))
    y = predict_array(model, da.from_array(x, chunks=(2, 6, 4))).persist()  # 20 tasks
    distributed.wait(y)
    after = client.run(preparation_count)
    assert client.run_on_scheduler(preparation_count) == scheduler_before
    workers_with_results = {worker for workers in client.who_has(y).values() for worker in workers}
    prepared = {worker: after[worker] - before[worker] for worker in after}
    assert workers_with_results and sum(prepared.values()) <= len(prepared) < 20
    assert all(prepared[worker] == 1 for worker in workers_with_results), prepared
    np.testing.assert_allclose(y.compute(), model.predict(x), atol=1e-5)


def test_a_corrupt_model_fails_the_job_with_a_format_error(client, models):
    model = fastlstm.Model(models["sequence"].spec)
    blob = bytearray(model.__reduce__()[1][0])
    blob[len(blob) // 2] ^= 0xFF
    model._native = bytes(blob)  # what travels is damaged on the way
    scored = predict_array(model, da.from_array(np.zeros((4, 3, 4)), chunks=(2, 3, 4)))
    with pytest.raises(ModelFormatError, match="pickled fastlstm model: .*Bad CRC-32"):
        scored.compute(timeout=60)

