"""The main job (`make run`): load the bundled example models, predict, stream, compare latencies.

No framework is needed: the models are PyTorch state_dict files read by fastlstm's own reader, and the
framework's outputs for a reference input were saved beside them by examples/make_examples.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import fastlstm
from fastlstm.backends import available_backends

MODELS = Path(__file__).resolve().parent / "models"

EXAMPLES = [
    # file, load options (what a state_dict cannot say), what it is
    ("keyword_spotter.pt", {"head_activations": ["softmax"]}, "1-layer LSTM 32->64, softmax head of 12 classes"),
    ("sensor_forecaster.pt", {}, "2-layer LSTM 64->128, linear head of 4 values"),
    ("intent_tagger.pt", {}, "token ids -> embedding 200x32 -> GRU 48 -> LSTM 24, linear head of 5 scores"),
]


def median_step_microseconds(stream: fastlstm.Stream, inputs: np.ndarray, repeats: int = 3) -> float:
    """Median over `repeats` passes of the mean time of one `stream.step` call, in microseconds."""
    for x_t in inputs[:50]:  # warm-up
        stream.step(x_t)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x_t in inputs:
            stream.step(x_t)
        timings.append((time.perf_counter() - start) / len(inputs) * 1e6)
    return float(np.median(timings))


def main() -> None:
    backends = available_backends()
    print(f"fastlstm {fastlstm.__version__}; backends available: {', '.join(backends)}\n")
    rng = np.random.default_rng(0)
    for filename, options, description in EXAMPLES:
        reference = np.load(MODELS / filename.replace(".pt", "_reference.npz"))
        x, y_framework = reference["x"], reference["y"]
        model = fastlstm.load(MODELS / filename, **options)
        print(f"{filename}: {description}")
        print(f"  {model}")

        y = model.predict(x)
        print(f"  predict {x.shape} -> {y.shape}; max |fastlstm - PyTorch| = {np.abs(y - y_framework).max():.2e}")

        stream = model.stream()
        streamed = np.stack([stream.step(x_t) for x_t in x[0]])
        print(f"  stream of {len(x[0])} steps; max |stream - predict| = {np.abs(streamed - y[0]).max():.2e}")

        if model.takes_token_ids:
            inputs = rng.integers(0, model.spec.vocab_size, size=2000)
        else:
            inputs = rng.normal(size=(2000, model.input_size)).astype(np.float32)
        latencies = {
            name: median_step_microseconds(fastlstm.load(MODELS / filename, backend=name, **options).stream(), inputs)
            for name in backends
        }
        slowest = max(latencies.values())
        cells = ", ".join(f"{name} {us:.1f} us ({slowest / us:.1f}x)" for name, us in latencies.items())
        print(f"  one streaming step, batch 1: {cells}\n")
    print("Latencies are from this machine and this run; `make bench` compares against PyTorch and ONNX Runtime.")


if __name__ == "__main__":
    main()
