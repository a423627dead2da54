# Set-up and go. Each target creates the local virtual environment and installs what it needs first.
#   make run    demo on the bundled example models (no framework needed)
#   make test   the whole test suite
#   make bench  the benchmark harness (BENCH_ARGS="--quick --out DIR")
#   make fuzz   fuzz every loader with damaged files (FUZZ_ARGS="--seconds-per-format 600 --out DIR")
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
SOURCES := pyproject.toml setup.py constraints.txt $(wildcard csrc/*.pyx csrc/*.pxd csrc/*.h)

.PHONY: run test bench fuzz install clean

run: $(VENV)/.installed-base
	$(PY) examples/demo.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-bench
	$(PY) -m bench $(BENCH_ARGS)

# The seed files are written with torch, Keras and ONNX: the test requirements.
fuzz: $(VENV)/.installed-test
	$(PY) -m fuzz $(FUZZ_ARGS)

install: $(VENV)/.installed-base

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip

# Build requirements are installed into the venv and the extension is built against them (no isolated
# build environment to download again); the editable install puts the compiled kernels beside the sources:
# one module per instruction-set level (setup.py), compiled in parallel.
$(VENV)/.installed-base: $(PY) $(SOURCES)
	$(PIP) setuptools wheel Cython numpy scipy numba
	$(PIP) --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PIP) -e ".[test]" --no-build-isolation
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-base
	$(PIP) -e ".[bench]" --no-build-isolation
	touch $@

clean:
	rm -rf build *.egg-info csrc/*.c fastlstm/*.so fastlstm/backends/*.so fastlstm/backends/_cykernels/*.so
