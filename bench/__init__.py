"""fastlstm's benchmark harness (``python -m bench``) and kernel micro-benchmarks (``pytest bench/``)."""
