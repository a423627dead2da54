"""StreamPool: many keyed streams stepped as one batch, their snapshots, and submit's batcher thread.

The reference for every pool result is fastlstm's own ``predict`` on the whole sequence or one ``Stream`` per
key, themselves tested against the frameworks elsewhere.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastlstm
import fastlstm.pool
from fastlstm.errors import InvalidInputError
from random_models import random_spec, random_stack

BACKENDS = ("numpy", "numba", "cython")


def _models():
    """Model descriptions that stream: id -> spec."""
    rng = np.random.default_rng(7)
    return {
        "lstm2_head": random_spec(rng, input_size=4, hidden_size=6, num_layers=2, head=[(3, "tanh")]),
        "lstm_proj_peep": random_spec(rng, input_size=3, hidden_size=5, proj_size=2, peepholes=True),
        "gru": random_stack(rng, ["gru"], [6], input_size=4, head=[(2, "identity")]),
        "mixed": random_stack(rng, ["lstm", "gru", "rnn"], [5, 4, 3], input_size=4, head=[(2, "sigmoid")]),
        "tokens": random_stack(rng, ["lstm"], [6], input_size=5, vocab_size=11, head=[(3, "softmax")]),
        "last_step": random_spec(rng, input_size=4, hidden_size=5, output="last_step"),
    }


MODELS = _models()


def _inputs(model, rng, batch, steps):
    if model.takes_token_ids:
        return rng.integers(0, model.spec.vocab_size, size=(batch, steps))
    return rng.normal(size=(batch, steps, model.input_size))


def _tolerance(model):
    return 1e-5 if model.dtype == np.float32 else 1e-12


def _per_step_reference(model, x):
    """Each sequence's output at every step, from ``predict`` on the prefix when the model outputs the last
    step only, from one ``predict`` otherwise: ``(B, T, O)``."""
    if model.spec.output == "sequence":
        return model.predict(x)
    return np.stack([model.predict(x[:, :t + 1]) for t in range(x.shape[1])], axis=1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_streaming_through_the_pool_equals_predict_on_the_whole_sequence(name, backend, dtype):
    model = fastlstm.Model(MODELS[name], backend=backend, dtype=dtype)
    rng = np.random.default_rng(1)
    count, steps = 7, 6
    x = _inputs(model, rng, count, steps)
    expected = _per_step_reference(model, x)
    pool = model.stream_pool(capacity=count, max_batch=4)  # batches of 1..7 rows: padded runners, two batches
    got = np.full(expected.shape, np.nan, model.dtype)
    position = np.zeros(count, int)
    while position.min() < steps:
        # A random subset of the unfinished streams is ready, in a random order.
        ready = [k for k in rng.permutation(count) if position[k] < steps and rng.random() < 0.6]
        if not ready:
            continue
        y = pool.step([f"stream-{k}" for k in ready], x[ready, position[ready]])
        got[ready, position[ready]] = y
        position[ready] += 1
    assert len(pool) == count
    np.testing.assert_allclose(got, expected, rtol=0, atol=_tolerance(model))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_never_share_state_under_random_interleavings(backend):
    model = fastlstm.Model(MODELS["mixed"], backend=backend)
    rng = np.random.default_rng(2)
    keys = [("user", n) for n in range(12)] + [n for n in range(5)] + ["a", b"a", 3.5]
    references = {key: model.stream() for key in keys}
    pool = model.stream_pool(capacity=len(keys), max_batch=8)
    stepped = set()
    for _ in range(60):
        chosen = [keys[i] for i in rng.choice(len(keys), size=rng.integers(1, 12), replace=False)]
        if rng.random() < 0.1:
            victim = chosen[0]
            pool.reset(victim)
            references[victim].reset()
        x = rng.normal(size=(len(chosen), model.input_size)).astype(np.float32)
        y = pool.step(chosen, x)
        expected = np.stack([references[key].step(row) for key, row in zip(chosen, x)])
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
        stepped.update(chosen)
    assert set(pool.keys()) == stepped


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_do_not_depend_on_batch_companions_or_their_order(backend):
    model = fastlstm.Model(MODELS["lstm2_head"], backend=backend)
    rng = np.random.default_rng(3)
    target = rng.normal(size=(5, model.input_size))
    outputs = []
    for companions in (0, 1, 6, 30, 63):
        pool = model.stream_pool(capacity=64, max_batch=64)
        keys = ["target"] + [f"other-{n}" for n in range(companions)]
        ys = []
        for t in range(5):
            x = rng.normal(size=(len(keys), model.input_size))
            x[0] = target[t]
            order = rng.permutation(len(keys))
            y = pool.step([keys[i] for i in order], x[order])
            ys.append(y[np.flatnonzero(order == 0)[0]])
        outputs.append(np.stack(ys))
    for other in outputs[1:]:
        # Not bit for bit in general: the batch size changes the kernels' blocking; within 1e-6.
        np.testing.assert_allclose(other, outputs[0], rtol=0, atol=1e-6)


def test_a_masked_model_keeps_the_state_of_masked_rows_as_a_stream_does():
    spec = random_stack(np.random.default_rng(4), ["lstm"], [5], input_size=3, head=[(2, "tanh")], mask_value=0.0)
    for backend in BACKENDS:
        model = fastlstm.Model(spec, backend=backend)
        rng = np.random.default_rng(5)
        references = [model.stream() for _ in range(6)]
        pool = model.stream_pool(capacity=6)
        for _ in range(8):
            x = rng.normal(size=(6, 3))
            x[rng.random(6) < 0.4] = 0.0  # masked rows anywhere in the sequence
            y = pool.step(list(range(6)), x)
            expected = np.stack([stream.step(row) for stream, row in zip(references, x)])
            np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
        for key, stream in enumerate(references):
            other = model.stream()
            other.restore(pool.snapshot(key))
            np.testing.assert_allclose(other.state[0], stream.state[0], rtol=0, atol=1e-6)


def test_a_token_id_model_takes_ids_per_key():
    model = fastlstm.Model(MODELS["tokens"], backend="cython")
    pool = model.stream_pool(capacity=4)
    ids = np.array([[3, 0, 10], [7, 7, 1]])
    expected = model.predict(ids)
    for t in range(3):
        np.testing.assert_allclose(pool.step(["a", "b"], ids[:, t]), expected[:, t], atol=1e-5)
    with pytest.raises(InvalidInputError, match="0..10"):
        pool.step(["a", "b"], [3, 11])


# ---------------------------------------------------------------------------- refusals change nothing
@pytest.fixture
def filled_pool():
    model = fastlstm.Model(MODELS["lstm2_head"], backend="numba")
    pool = model.stream_pool(capacity=3)
    pool.step(["a", "b"], np.ones((2, model.input_size)))
    return pool


def _pool_state(pool):
    return {key: pool.snapshot(key) for key in pool.keys()}


@pytest.mark.parametrize("keys, x, message", [
    (["a", "a"], np.ones((2, 4)), "repeated: \\['a'\\]"),
    (["a", "new"], np.ones((3, 4)), "expected shape \\(2, 4\\)"),
    (["a", "new"], np.ones((2, 5)), "expected shape \\(2, 4\\)"),
    (["a", "new"], np.ones(2), "expected shape \\(2, 4\\)"),
    (["a", "new"], np.ones((2, 4), complex), "real numbers"),
    (["a", "new"], [[1, 2, 3, 4], [1, 2]], "could not be read"),
    (["a", ["unhashable"]], np.ones((2, 4)), "hashable"),
    ("ab", np.ones((2, 4)), "sequence of hashable keys"),
    ([], np.ones((0, 4)), "at least one key"),
])
def test_a_refused_step_changes_nothing(filled_pool, keys, x, message):
    before = _pool_state(filled_pool)
    with pytest.raises(InvalidInputError, match=message):
        filled_pool.step(keys, x)
    assert _pool_state(filled_pool) == before
    assert filled_pool.keys() == ["a", "b"]


def test_capacity_refuses_new_keys_and_never_drops_a_stream(filled_pool):
    filled_pool.step(["c"], np.ones((1, 4)))
    before = _pool_state(filled_pool)
    with pytest.raises(InvalidInputError, match="capacity 3.*no existing stream is dropped"):
        filled_pool.step(["a", "d"], np.ones((2, 4)))
    assert _pool_state(filled_pool) == before
    filled_pool.step(["a", "b", "c"], np.ones((3, 4)))  # the streams that are in still step
    filled_pool.close("b")
    assert "b" not in filled_pool and len(filled_pool) == 2
    filled_pool.step(["d"], np.ones((1, 4)))  # a closed key's slot is free again, and starts from zero
    zero = filled_pool.model.stream()
    assert filled_pool.snapshot("d") == _after_one_step(zero)


def _after_one_step(stream):
    stream.step(np.ones(stream.model.input_size))
    return stream.snapshot()


def test_the_pool_arguments_and_its_memory_are_checked():
    model = fastlstm.Model(MODELS["lstm2_head"], backend="numpy")
    for bad in (dict(capacity=0), dict(capacity=2.5), dict(max_batch=0), dict(max_idle_seconds=-1),
                dict(max_delay_us=float("nan")), dict(on_evict="park")):
        with pytest.raises(InvalidInputError):
            model.stream_pool(**bad)
    previous = fastlstm.set_allocation_limit(1 << 20)
    try:
        with pytest.raises(InvalidInputError, match="stream_pool\\(capacity=1000000000"):
            model.stream_pool(capacity=10**9)
        model.stream_pool(capacity=1000)  # slots grow on demand, so a modest capacity is not allocated up front
    finally:
        fastlstm.set_allocation_limit(previous)
    bidirectional = fastlstm.Model(random_spec(np.random.default_rng(0), direction="bidirectional"))
    with pytest.raises(InvalidInputError, match="bidirectional"):
        bidirectional.stream_pool()


def test_more_keys_than_max_batch_run_as_several_batches():
    model = fastlstm.Model(MODELS["gru"], backend="cython")
    pool = model.stream_pool(capacity=100, max_batch=8)
    x = np.random.default_rng(0).normal(size=(37, 2, model.input_size))
    expected = model.predict(x)
    for t in range(2):
        np.testing.assert_allclose(pool.step(list(range(37)), x[:, t]), expected[:, t], atol=1e-5)
    sizes = {runner.size for runner in pool._runners.values()}
    assert sizes == {8}  # 37 rows: four batches of 8, and 5 rows padded to 8
    pool.step([0, 1, 2], x[:3, 0])
    assert {runner.size for runner in pool._runners.values()} == {4, 8}


# ---------------------------------------------------------------------------- snapshots
@pytest.mark.parametrize("name", ["lstm2_head", "mixed", "tokens"])
def test_a_snapshot_resumes_exactly_in_another_pool_backend_or_stream(name):
    rng = np.random.default_rng(8)
    x = _inputs(fastlstm.Model(MODELS[name], backend="numpy"), rng, 1, 6)
    expected = fastlstm.Model(MODELS[name], backend="numba").predict(x)[0]
    first = fastlstm.Model(MODELS[name], backend="numba").stream_pool(capacity=2)
    for t in range(3):
        first.step(["k"], x[:, t])
    blob = first.snapshot("k")
    second = fastlstm.Model(MODELS[name], backend="cython").stream_pool(capacity=2)
    second.restore("moved", blob)
    stream = fastlstm.Model(MODELS[name], backend="numba").stream()
    stream.restore(blob)
    for t in range(3, 6):
        np.testing.assert_allclose(second.step(["moved"], x[:, t])[0], expected[t], atol=1e-5)
        np.testing.assert_array_equal(stream.step(x[0, t]), first.step(["k"], x[:, t])[0])
    assert stream.snapshot() == first.snapshot("k")  # one format for a pool key and a stream of batch 1


def test_a_float64_snapshot_restores_into_a_float32_model():
    spec = MODELS["lstm2_head"]
    wide = fastlstm.Model(spec, dtype="float64").stream(batch_size=2)
    wide.step(np.ones((2, 4)))
    narrow = fastlstm.Model(spec, dtype="float32").stream(batch_size=2)
    narrow.restore(wide.snapshot())
    np.testing.assert_allclose(narrow.state[0], wide.state[0], atol=1e-7)


def _bad_blobs(blob: bytes):
    other_model = fastlstm.Model(random_spec(np.random.default_rng(99), input_size=4, hidden_size=6, num_layers=2,
                                             head=[(3, "tanh")])).stream()
    flipped = bytearray(blob)
    flipped[60] ^= 1
    version = bytearray(blob)
    version[8] = 7
    return {
        "not bytes": ("not bytes", "expected the bytes"),
        "empty": (b"", "not a fastlstm state snapshot"),
        "truncated": (blob[:-5], "corrupt or truncated"),
        "corrupt": (bytes(flipped), "corrupt or truncated"),
        "other version": (bytes(version), "version 7"),
        "other model": (other_model.snapshot(), "another model"),
        "two sequences": (fastlstm.Model(MODELS["lstm2_head"]).stream(batch_size=2).snapshot(), "holds 2"),
        "garbage": (b"\0" * 200, "not a fastlstm state snapshot"),
    }


@pytest.mark.parametrize("case", ["not bytes", "empty", "truncated", "corrupt", "other version", "other model",
                                  "two sequences", "garbage"])
def test_a_bad_snapshot_is_refused_and_changes_nothing(filled_pool, case):
    blob, message = _bad_blobs(filled_pool.snapshot("a"))[case]
    before = _pool_state(filled_pool)
    with pytest.raises(InvalidInputError, match=message):
        filled_pool.restore("a", blob)
    with pytest.raises(InvalidInputError, match=message):
        filled_pool.restore("new", blob)
    assert _pool_state(filled_pool) == before
    stream = filled_pool.model.stream()
    stream.step(np.ones(4))
    state = stream.snapshot()
    with pytest.raises(InvalidInputError, match=message):
        stream.restore(blob)
    assert stream.snapshot() == state


def test_the_fingerprint_is_the_models_not_the_loads(tmp_path):
    spec = MODELS["mixed"]
    fastlstm.Model(spec).save(tmp_path / "mixed.fastlstm")
    assert fastlstm.load(tmp_path / "mixed.fastlstm").fingerprint == fastlstm.Model(spec).fingerprint
    assert fastlstm.Model(spec, backend="numpy").fingerprint == fastlstm.Model(spec, backend="cython",
                                                                                  dtype="float64").fingerprint
    changed = random_stack(np.random.default_rng(7), ["lstm", "gru", "rnn"], [5, 4, 3], input_size=4)
    assert fastlstm.Model(changed).fingerprint != fastlstm.Model(spec).fingerprint


# ---------------------------------------------------------------------------- idle eviction
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_idle_streams_are_evicted_to_on_evict_and_resume_exactly_when_restored(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fastlstm.pool, "_now", clock)
    model = fastlstm.Model(MODELS["lstm2_head"], backend="cython")
    parked = {}
    pool = model.stream_pool(capacity=3, max_idle_seconds=10, on_evict=lambda key, blob: parked.update({key: blob}))
    x = np.random.default_rng(9).normal(size=(3, 6, 4))
    expected = model.predict(x)
    pool.step(["a", "b", "c"], x[:, 0])
    clock.now += 6
    pool.step(["a"], x[:1, 1])
    clock.now += 6  # b and c idle 12 s, a 6 s
    assert pool.keys() == ["a"] and sorted(parked) == ["b", "c"]
    pool.step(["a", "d"], np.stack([x[0, 2], x[0, 0]]))  # capacity freed by the eviction
    pool.close("d")
    pool.restore("b", parked.pop("b"))
    for t in (1, 2):
        np.testing.assert_allclose(pool.step(["b"], x[1:2, t])[0], expected[1, t], atol=1e-5)
    np.testing.assert_allclose(pool.step(["a"], x[:1, 3])[0], expected[0, 3], atol=1e-5)


def test_an_on_evict_that_raises_keeps_its_stream(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fastlstm.pool, "_now", clock)
    model = fastlstm.Model(MODELS["gru"], backend="numpy")

    def refuse(key, blob):
        raise RuntimeError("storage down")

    pool = model.stream_pool(capacity=2, max_idle_seconds=1, on_evict=refuse)
    pool.step(["a"], np.ones((1, 4)))
    before = pool.snapshot("a")
    clock.now += 5
    with pytest.raises(RuntimeError, match="storage down"):
        pool.step(["b"], np.ones((1, 4)))
    pool.on_evict = None
    assert "b" not in pool and len(pool) == 0  # evicted now that nothing refuses


# ---------------------------------------------------------------------------- submit
@pytest.mark.parametrize("backend", BACKENDS)
def test_submitted_steps_from_many_threads_equal_one_stream_per_key(backend):
    model = fastlstm.Model(MODELS["lstm2_head"], backend=backend)
    rng = np.random.default_rng(10)
    keys_per_thread, steps, threads = 3, 8, 4
    x = rng.normal(size=(threads * keys_per_thread, steps, model.input_size))
    expected = model.predict(x)
    results = {}
    with model.stream_pool(capacity=threads * keys_per_thread, max_batch=5, max_delay_us=500) as pool:
        def caller(first_key):
            futures = []
            for t in range(steps):
                for key in range(first_key, first_key + keys_per_thread):
                    # Every step of a key is queued before the one before it has run: order is the pool's job.
                    futures.append((key, t, pool.submit(key, x[key, t])))
            for key, t, future in futures:
                results[key, t] = future.result(timeout=60)

        workers = [threading.Thread(target=caller, args=(n * keys_per_thread,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    got = np.array([[results[key, t] for t in range(steps)] for key in range(threads * keys_per_thread)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_a_batch_never_holds_two_steps_of_one_key_and_keeps_their_order():
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    pool = model.stream_pool(capacity=4, max_batch=4)
    with pool._pending_ready:  # queue without the batcher running
        for t, key in enumerate(["a", "a", "b", "a", "c", "b", "d", "e"]):
            pool._enqueue(key, t, None)
        batches = []
        while pool._waiting:
            batches.append([(key, t) for key, t, _, _ in pool._take_batch()])
    assert batches == [[("a", 0), ("b", 2), ("c", 4), ("d", 6)], [("a", 1), ("b", 5), ("e", 7)], [("a", 3)]]


def test_taking_a_batch_does_not_read_the_queue_of_keys_it_cannot_take():
    import time

    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    pool = model.stream_pool(capacity=4, max_batch=4)
    steps = 20_000  # one client's long message, queued at once: each batch can take one of its steps
    with pool._pending_ready:
        for t in range(steps):
            pool._enqueue("long", t, None)
        pool._enqueue("other", -1, None)
        started = time.perf_counter()
        first = pool._take_batch()
        taken = [t for _ in range(steps - 1) for _, t, _, _ in pool._take_batch()]
        elapsed = time.perf_counter() - started
    assert [(key, t) for key, t, _, _ in first] == [("long", 0), ("other", -1)]
    assert taken == list(range(1, steps)) and pool._waiting == 0
    # Reading the whole queue per batch takes minutes here (20,000 batches x 20,000 steps); a heap, milliseconds.
    assert elapsed < 5


def test_an_error_reaches_only_its_callers_future_and_close_finishes_the_queue():
    model = fastlstm.Model(MODELS["lstm2_head"], backend="numba")
    pool = model.stream_pool(capacity=2, max_batch=8, max_delay_us=100_000)
    x = np.random.default_rng(11).normal(size=(2, 4, 4))
    good = [pool.submit(k, x[k, t]) for t in range(4) for k in range(2)]
    bad_shape = pool.submit(0, np.ones(5))
    bad_key = pool.submit(["unhashable"], np.ones(4))
    no_room = pool.submit("third", np.ones(4))
    pool.close()  # long before max_delay_us: close runs what waits
    assert all(f.done() for f in good)
    expected = model.predict(x)
    got = np.array([[good[2 * t + k].result() for t in range(4)] for k in range(2)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(InvalidInputError, match="expected shape \\(4,\\)"):
        bad_shape.result()
    with pytest.raises(InvalidInputError, match="hashable"):
        bad_key.result()
    with pytest.raises(InvalidInputError, match="capacity 2"):
        no_room.result()
    with pytest.raises(InvalidInputError, match="closed"):
        pool.submit(0, x[0, 0]).result()
    with pytest.raises(InvalidInputError, match="closed"):
        pool.step([0], x[:1, 0])
    assert len(pool) == 0


def test_a_batch_runs_when_max_batch_steps_wait_or_the_oldest_waited_max_delay():
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    with model.stream_pool(capacity=8, max_batch=3, max_delay_us=30_000_000) as pool:
        first = [pool.submit(key, np.ones(4)) for key in ("a", "b")]
        with pytest.raises(TimeoutError):
            first[0].result(timeout=0.3)  # two of three wait, and the delay is 30 s
        third = pool.submit("c", np.ones(4))
        assert [f.result(timeout=20).shape for f in first + [third]] == [(2,)] * 3
    with model.stream_pool(capacity=8, max_batch=64, max_delay_us=1000) as pool:
        assert pool.submit("a", np.ones(4)).result(timeout=20).shape == (2,)  # alone, after 1 ms


def test_the_pool_runs_a_keras_model_with_masking_as_keras_does():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    L = keras.layers
    source = keras.Sequential([keras.Input((None, 3)), L.Masking(0.0), L.LSTM(4, return_sequences=True),
                               L.Dense(2, activation="tanh")])
    rng = np.random.default_rng(12)
    source.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in source.get_weights()])
    x = rng.normal(size=(3, 7, 3)).astype(np.float32)
    x[0, [0, 3, 4]] = 0.0  # masked steps at the start and in the middle
    x[2, [5, 6]] = 0.0
    expected = keras.ops.convert_to_numpy(source(x, training=False))
    for backend in BACKENDS:
        pool = fastlstm.load(source, backend=backend).stream_pool(capacity=3)
        got = np.stack([pool.step(["x", "y", "z"], x[:, t]) for t in range(7)], axis=1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_on_evict_may_not_call_the_pool(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fastlstm.pool, "_now", clock)
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    seen = []

    def reenter(key, blob):
        for call in (lambda: pool.step(["x"], np.ones((1, 4))), lambda: pool.close(), lambda: pool.close("a")):
            with pytest.raises(InvalidInputError, match="on_evict may not call the pool"):
                call()
        seen.append(key)

    pool = model.stream_pool(capacity=2, max_idle_seconds=1, on_evict=reenter)
    pool.step(["a"], np.ones((1, 4)))
    clock.now += 5
    pool.step(["b"], np.ones((1, 4)))
    assert seen == ["a"] and pool.keys() == ["b"]
    pool.close()


def test_a_step_allocates_nothing_proportional_to_the_live_streams():
    import tracemalloc

    model = fastlstm.Model(MODELS["mixed"], backend="cython")
    pool = model.stream_pool(capacity=20_000, max_idle_seconds=3600)
    x = np.ones((1000, model.input_size), model.dtype)
    for first in range(0, 20_000, 1000):
        pool.step(range(first, first + 1000), x)
    assert pool._slot_arrays[0].nbytes >= 20_000 * 5 * 4  # the live state: hundreds of KiB
    keys, rows = [3, 17_000, 9_999, 42], x[:4]
    pool.step(keys, rows)
    tracemalloc.start()
    pool.step(keys, rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8_000  # the output, the slot indices and small temporaries


# ---------------------------------------------------------------------------- on_batch: observing the batches
def test_on_batch_hears_every_batch_of_step_and_of_the_batcher():
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    heard = []
    pool = model.stream_pool(capacity=100, max_batch=8, on_batch=lambda size, seconds: heard.append((size, seconds)))
    pool.step(list(range(37)), np.ones((37, 4)))
    assert [size for size, _ in heard] == [8, 8, 8, 8, 5]  # one call per kernel batch, its real row count
    assert all(0 < seconds < 10 for _, seconds in heard)
    heard.clear()
    with pool:
        futures = [pool.submit(key, np.ones(4)) for key in ("a", "b", "a")]
        [future.result(timeout=20) for future in futures]
    assert sum(size for size, _ in heard) == 3 and all(size <= 2 for size, _ in heard)  # a's two steps: two batches
    with pytest.raises(InvalidInputError, match="on_batch: expected a callable"):
        fastlstm.StreamPool(model, on_batch=3)


def test_an_on_batch_that_raises_is_logged_and_the_step_stands(caplog):
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    reference = model.stream()

    def broken(size, seconds):
        raise RuntimeError("metrics down")

    pool = fastlstm.StreamPool(model, capacity=4, on_batch=broken)
    x = np.random.default_rng(13).normal(size=(3, 4))
    with caplog.at_level("ERROR", logger="fastlstm.pool"):
        for row in x:  # each step's result is returned and its state kept, once
            np.testing.assert_allclose(pool.step(["a"], row[None])[0], reference.step(row), atol=1e-6)
        with pool:
            np.testing.assert_allclose(pool.submit("a", x[0]).result(timeout=20), reference.step(x[0]), atol=1e-6)
    assert sum("on_batch raised" in record.getMessage() for record in caplog.records) == 4


# ---------------------------------------------------------------------------- hold and release
def test_a_held_stream_is_never_evicted_and_its_idle_time_counts_from_release(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fastlstm.pool, "_now", clock)
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    evicted = []
    pool = model.stream_pool(capacity=3, max_idle_seconds=10, on_evict=lambda key, blob: evicted.append(key))
    pool.hold("silent")  # a new key: a stream from zero state, held before its first step
    assert "silent" in pool and pool.held("silent") == 1
    pool.step(["silent", "busy"], np.ones((2, 4)))
    clock.now += 100  # far past max_idle_seconds: only the stream no one holds goes
    assert pool.keys() == ["silent"] and evicted == ["busy"]
    pool.hold("silent")  # holds are counted: one release leaves it held
    pool.release("silent")
    clock.now += 100
    assert "silent" in pool and pool.held("silent") == 1
    pool.release("silent")  # idle from now, not from its last step 200 s ago
    clock.now += 9
    assert "silent" in pool
    pool.step(["silent"], np.ones((1, 4)))  # a step after the release restarts the idle time
    clock.now += 9
    assert "silent" in pool and evicted == ["busy"]
    clock.now += 1
    assert "silent" not in pool and evicted == ["busy", "silent"] and pool.held("silent") == 0


def test_hold_and_release_refusals_change_nothing(monkeypatch):
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    pool = model.stream_pool(capacity=2, max_idle_seconds=10)
    pool.step(["a", "b"], np.ones((2, 4)))
    pool.hold("a")
    before = _pool_state(pool)
    with pytest.raises(InvalidInputError, match="capacity 2"):
        pool.hold("c")
    with pytest.raises(InvalidInputError, match="not held"):
        pool.release("b")
    with pytest.raises(InvalidInputError, match="is held \\(1 hold\\(s\\)\\); release it first"):
        pool.close("a")
    assert _pool_state(pool) == before and pool.held("a") == 1 and pool.held("b") == 0
    pool.release("a")
    pool.close("a")
    assert pool.keys() == ["b"]
    pool.close()
    pool.release("b")  # after close() nothing is held: nothing to do


# ---------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("call", ["reset", "snapshot", "close", "hold", "release", "restore"])
def test_an_unhashable_key_is_an_invalid_input_error(filled_pool, call):
    before = _pool_state(filled_pool)
    arguments = (["unhashable"], filled_pool.snapshot("a")) if call == "restore" else (["unhashable"],)
    with pytest.raises(InvalidInputError, match="must be hashable"):
        getattr(filled_pool, call)(*arguments)
    assert _pool_state(filled_pool) == before


def test_a_step_refused_for_memory_adds_no_stream():
    model = fastlstm.Model(MODELS["lstm2_head"], backend="numpy")
    pool = model.stream_pool(capacity=1000, max_batch=8)
    pool.step(list(range(8)), np.ones((8, 4)))  # 16 slots, the internal stream of 8 rows
    pool.step([0, 1, 2], np.ones((3, 4)))       # the internal stream of 4 rows
    before = _pool_state(pool)
    previous = fastlstm.set_allocation_limit(300)
    try:
        # 20 new keys: 8 free slots, then the slot arrays must grow (16 x 96 bytes), which the limit refuses.
        with pytest.raises(InvalidInputError, match="growing the stream pool to 32 streams"):
            pool.step(list(range(100, 120)), np.ones((20, 4)))
        # A new key fits in a free slot, but a batch of 2 rows needs an internal stream of its own.
        with pytest.raises(InvalidInputError, match="stream\\(batch_size=2\\)"):
            pool.step([0, 200], np.ones((2, 4)))
    finally:
        fastlstm.set_allocation_limit(previous)
    assert _pool_state(pool) == before and len(pool) == 8
    pool.step(list(range(100, 120)), np.ones((20, 4)))  # with memory, the same call runs
    assert len(pool) == 28


def test_close_from_a_futures_callback_runs_the_queue_on_the_live_state():
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    x = np.random.default_rng(14).normal(size=(3, 4))
    reference = model.stream()
    expected = [reference.step(row) for row in x]
    pool = model.stream_pool(capacity=2, max_batch=4, max_delay_us=50_000)
    futures = [pool.submit("a", row) for row in x]  # three steps of one key: three batches
    futures[0].add_done_callback(lambda future: pool.close())  # runs on the batcher thread
    got = [future.result(timeout=20) for future in futures]
    np.testing.assert_allclose(got, expected, atol=1e-6)  # the queued steps continued the stream, not zero state
    pool._batcher.join(timeout=20)
    assert not pool._batcher.is_alive() and len(pool) == 0
    with pytest.raises(InvalidInputError, match="closed"):
        pool.step(["a"], x[:1])


def test_on_evict_may_read_the_pool_without_evicting_again(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fastlstm.pool, "_now", clock)
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    seen = []
    pool = model.stream_pool(capacity=3, max_idle_seconds=1,
                             on_evict=lambda key, blob: seen.append((key, len(pool), key in pool, pool.keys())))
    pool.step(["a", "b"], np.ones((2, 4)))
    clock.now += 5
    assert len(pool) == 0  # each stream handed over once, the pool as it stood
    assert seen == [("a", 2, True, ["a", "b"]), ("b", 1, True, ["b"])]


def test_an_idle_batcher_ends_so_a_pool_dropped_without_close_leaves_no_thread(monkeypatch):
    import gc
    import time
    import weakref

    monkeypatch.setattr(fastlstm.pool, "_BATCHER_IDLE_SECONDS", 0.05)
    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    reference = model.stream()
    pool = model.stream_pool(capacity=2, max_delay_us=0)
    for row in np.random.default_rng(15).normal(size=(2, 4)):
        future = pool.submit("a", row)
        batcher = pool._batcher  # the thread that runs this step
        np.testing.assert_allclose(future.result(timeout=20), reference.step(row), atol=1e-6)
        batcher.join(timeout=20)  # idle: the thread ends, and the next submit starts another on the same state
        assert not batcher.is_alive() and pool._batcher is None
    future = pool.submit("a", np.ones(4))
    batcher, dropped = pool._batcher, weakref.ref(pool)
    future.result(timeout=20)
    del pool, future
    batcher.join(timeout=20)
    gc.collect()
    assert not batcher.is_alive() and dropped() is None


# ---------------------------------------------------------------------------- submit_async
def test_submit_async_from_many_coroutines_equals_one_stream_per_key_and_shares_batches_with_submit():
    import asyncio

    model = fastlstm.Model(MODELS["lstm2_head"], backend="numba")
    rng = np.random.default_rng(16)
    keys, steps = 12, 6
    x = rng.normal(size=(keys + 1, steps, model.input_size))
    expected = model.predict(x)
    sizes = []
    pool = model.stream_pool(capacity=keys + 1, max_batch=8, max_delay_us=2000,
                             on_batch=lambda size, seconds: sizes.append(size))

    async def one_key(key):
        # Every step of a key queued before the one before it has run: order is the pool's job.
        futures = [pool.submit_async(key, x[key, t]) for t in range(steps)]
        return await asyncio.gather(*futures)

    async def main():
        from_thread = [pool.submit(keys, x[keys, t]) for t in range(steps)]  # a thread's key in the same queue
        got = await asyncio.gather(*(one_key(key) for key in range(keys)))
        return got + [[future.result(timeout=60) for future in from_thread]]

    with pool:
        got = np.array(asyncio.run(main()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert sum(sizes) == (keys + 1) * steps and max(sizes) > 1  # batched: (13 keys x 6 steps) in shared batches


def test_submit_async_errors_reach_only_their_awaiter_and_leave_the_state():
    import asyncio

    model = fastlstm.Model(MODELS["tokens"], backend="numpy")
    reference = model.stream()
    expected = [reference.step(np.array(t)) for t in (3, 4)]

    async def main(pool):
        good = pool.submit_async("a", 3)
        out_of_range = pool.submit_async("a", 11)        # refused: "a"'s state does not move
        unhashable = pool.submit_async(["a"], 3)
        no_room = [pool.submit_async(key, 1) for key in ("b", "c")]  # capacity 2: "a" and "b" only
        results = await asyncio.gather(good, out_of_range, unhashable, *no_room, return_exceptions=True)
        return results + [await pool.submit_async("a", 4)]

    with model.stream_pool(capacity=2, max_batch=4, max_delay_us=1000) as pool:
        first, out_of_range, unhashable, b, c, second = asyncio.run(main(pool))
    np.testing.assert_allclose([first, second], expected, atol=1e-6)
    assert isinstance(out_of_range, InvalidInputError) and "token ids must lie in 0..10" in str(out_of_range)
    assert isinstance(unhashable, InvalidInputError) and "submit_async(): the key must be hashable" in str(unhashable)
    assert b.shape == (3,) and isinstance(c, InvalidInputError) and "capacity 2" in str(c)


def test_a_cancelled_submit_async_step_waiting_for_its_batch_is_withdrawn():
    import asyncio

    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    reference = model.stream()
    x = np.random.default_rng(17).normal(size=(2, 4))

    async def main(pool):
        withdrawn = pool.submit_async("a", x[0])
        withdrawn.cancel()  # long before the 50 ms the batch waits for
        return await pool.submit_async("a", x[1])

    with model.stream_pool(capacity=2, max_batch=8, max_delay_us=50_000) as pool:
        got = asyncio.run(main(pool))
    np.testing.assert_allclose(got, reference.step(x[1]), atol=1e-6)  # from zero state: x[0] never ran


def test_submit_async_needs_a_running_loop_and_an_open_pool():
    import asyncio

    model = fastlstm.Model(MODELS["gru"], backend="numpy")
    pool = model.stream_pool(capacity=2)
    with pytest.raises(RuntimeError, match="no running event loop"):
        pool.submit_async("a", np.ones(4))
    pool.close()

    async def main():
        return await pool.submit_async("a", np.ones(4))

    with pytest.raises(InvalidInputError, match="submit_async\\(\\): the stream pool is closed"):
        asyncio.run(main())
