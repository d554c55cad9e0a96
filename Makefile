# Quickstart targets. Each installs what it needs into a virtual environment in the clone (.venv).
# Without CUDA (no nvidia-smi) PyTorch is pinned to the CPU wheel already on the machine
# (torch==2.13.0) instead of pulling a multi-GB CUDA build; override with TORCH_SPEC=...

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: install test bench demo info clean

$(VENV)/.installed: $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.18" ninja
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,train,integration]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest python_tests -ra $(PYTEST_ARGS)
	DPO_BENCH_SMOKE=1 $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable

# The benchmark suite at its CPU shapes (peers that are installed: pip install -e ".[bench]"):
# benchmarks/results/cpu-DATE.json, its table cpu-DATE.md and plots cpu-DATE-*.png (benchmarks/report.py).
# A row that disagrees with the float64 oracle fails; the report still covers the others.
bench: install
	mkdir -p benchmarks/results
	json=benchmarks/results/cpu-$$(date +%Y-%m-%d).json; \
	DPO_BENCH_DEVICE=cpu $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-json=$$json; \
	status=$$?; \
	$(PY) benchmarks/report.py $$json && exit $$status

# a new demo run each time: --overwrite replaces the previous one in demo_output (a run directory holds one run)
demo: install
	$(VENV)/bin/dpo-kernels train --output-dir demo_output --overwrite

info: install
	$(PY) -m dpo_kernels.info

clean:
	rm -rf build dist *.egg-info dpo_kernels/_C*.so
