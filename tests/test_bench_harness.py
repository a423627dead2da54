"""The benchmark harness's networks and report (not its timings): every engine must run the same network,
head included, and the report must show a row whose fastlstm lacks a weight format as "not available"
rather than dropping it or dying."""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib", reason="the harness's report draws plots")
engines = pytest.importorskip("bench.engines")
report = pytest.importorskip("bench.report")


@pytest.mark.parametrize("config", [
    engines.Config(32, 64, 1),
    engines.Config(32, 64, 1, "lstm", "softmax"),
    engines.Config(16, 24, 2, "gru"),
    engines.Config(16, 24, 1, "lstm", "none"),
])
def test_fastlstm_runs_the_harness_network_head_included(config):
    network = engines.torch_network(config)
    x = np.random.default_rng(0).normal(size=(2, 7, config.input_size)).astype(np.float32)
    with torch.inference_mode():
        expected = network(torch.from_numpy(x))[0].numpy()
    assert expected.shape == (2, 7, config.output_size)
    if config.head == "softmax":
        np.testing.assert_allclose(expected.sum(axis=-1), 1.0, rtol=1e-5)
    model = fastlstm.load(network, backend="numpy")
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)


def test_config_refuses_unknown_heads_and_weight_formats():
    with pytest.raises(ValueError, match="head 'conv'"):
        engines.Config(8, 8, 1, "lstm", "conv")
    with pytest.raises(ValueError, match="weights 'int4'"):
        engines.Config(8, 8, 1, "lstm", "linear", "int4")


def streaming_result(config, engine_p50, unavailable=None):
    return {"mode": "streaming", "config": list(config), "batch": 1, "threads": 1, "contention": False,
            "unavailable": unavailable or {},
            "engines": {engine: {"p50_us": p50, "p99_us": 2 * p50, "mean_us": p50, "samples": 10, "setup_s": 0.1,
                                 "max_abs_diff_vs_torch": 0.0, "checked": True}
                        for engine, p50 in engine_p50.items()}}


def test_report_shows_unavailable_formats_and_narrow_weight_ratios():
    results = [
        {"mode": "gemm_peak", "threads": 1, "gflops": 100.0},
        streaming_result((256, 512, 1), {"fastlstm-cython": 90.0, "ort-iobinding": 120.0}),
        streaming_result((256, 512, 1, "lstm", "linear", "bfloat16"), {"fastlstm-cython": 60.0, "ort-iobinding": 120.0}),
        streaming_result((256, 512, 1, "lstm", "linear", "int8"), {"ort-iobinding": 118.0},
                         unavailable={"fastlstm-cython": "TypeError: unknown option(s) weights"}),
    ]
    text = report.markdown({"machine": {"python": "3", "kernel_level": "avx2", "numba_cpu": "generic"},
                            "quick": True, "contention": True, "seconds": 1.0, "date": "today", "results": results})
    assert "| 256, 512, 1, lstm, linear, int8 | 1 | not available (fastlstm-cython: TypeError: unknown option(s) " \
           "weights) | n/a | n/a | n/a | 118 / 236 |" in text
    assert "(256, 512, 1, lstm, linear, bfloat16) b1 1.5×" in text
    assert "| **90** / 180 (cython, 1t) |" in text and "1.3×" in text
    assert "the avx2 build" in text and "**Under contention**" in text
