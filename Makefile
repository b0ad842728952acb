# Set-up and entry points. `make test` and `make demo` create .venv when missing,
# install triageseg into it, then run. torch/torchvision are resolved together by pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test test-slow demo install bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/triageseg demo --out demo_out

bench: $(STAMP)
	$(PY) benchmarks/bench_postprocess.py
	$(PY) benchmarks/bench_evaluator.py
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo_out
