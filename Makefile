# Two commands on a fresh machine: `make demo` (private training on digits, ε live) and `make test`.
# Each creates ./.venv if needed and installs what it needs. torch is pinned and installed *first*:
# an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning-dp-installed

.PHONY: demo test docs install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg setup.py pyproject.toml lightning_dp/noise/_boxmuller.c | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,examples,docs,hf]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_digits.py

# The whole suite under `import lightning as L`, then the Lightning tests again under pytorch_lightning.
# One intra-op thread per process: the tests' models are tiny (thread hand-offs cost more than they save)
# and the distributed tests run several processes at once; tests about threads set their own counts.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests
	OMP_NUM_THREADS=1 LIGHTNING_DP_TEST_NAMESPACE=pytorch_lightning $(PY) -m pytest tests -m lightning

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build lightning_logs .pytest_cache
