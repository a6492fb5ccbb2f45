# Two commands on a fresh machine: `make demo` (private training on digits, ε live) and `make test`.
# Each creates ./.venv if needed and installs what it needs. torch is pinned and installed *first*:
# an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning-dp-installed
# `make test-min`: a second venv with the oldest supported versions (constraints/minimum.txt, torch's pin
# installed first as above) and the short `smoke` test set in it, under both Lightning namespaces.
MIN_VENV ?= .venv-min
MIN_CONSTRAINTS := constraints/minimum.txt
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.lightning-dp-installed

.PHONY: demo test test-min docs install install-min clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg setup.py pyproject.toml lightning_dp/noise/_boxmuller.c | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,examples,docs,hf]"
	touch $(STAMP)

install: $(STAMP)

$(MIN_PY):
	$(PYTHON) -m venv $(MIN_VENV)

$(MIN_STAMP): $(MIN_CONSTRAINTS) setup.cfg setup.py pyproject.toml lightning_dp/noise/_boxmuller.c | $(MIN_PY)
	$(MIN_PY) -m pip install --quiet -c $(MIN_CONSTRAINTS) torch
	$(MIN_PY) -m pip install --quiet -c $(MIN_CONSTRAINTS) -e ".[lightning,pytorch-lightning,hf]" pytest
	touch $(MIN_STAMP)

install-min: $(MIN_STAMP)

demo: $(STAMP)
	$(PY) examples/train_digits.py

# The whole suite under `import lightning as L`, then the Lightning tests again under pytorch_lightning.
# One intra-op thread per process: the tests' models are tiny (thread hand-offs cost more than they save)
# and the distributed tests run several processes at once; tests about threads set their own counts.
# The venv has the test extra, so the independent references (dp-accounting) are required: a check against
# a missing reference fails instead of skipping (tests/dp_accounting_reference.py).
test: $(STAMP)
	OMP_NUM_THREADS=1 LIGHTNING_DP_REQUIRE_REFERENCES=1 $(PY) -m pytest tests
	OMP_NUM_THREADS=1 LIGHTNING_DP_REQUIRE_REFERENCES=1 LIGHTNING_DP_TEST_NAMESPACE=pytorch_lightning $(PY) -m pytest tests -m lightning

# The smoke set (marker `smoke`: the RFC 8439 and SP 800-38A vectors, a secure-mode fit, a 2-process DDP
# step, Hugging Face LoRA and DoRA steps) against the oldest supported versions; the Lightning ones again
# under pytorch_lightning.
test-min: $(MIN_STAMP)
	OMP_NUM_THREADS=1 $(MIN_PY) -m pytest tests -m smoke
	OMP_NUM_THREADS=1 LIGHTNING_DP_TEST_NAMESPACE=pytorch_lightning $(MIN_PY) -m pytest tests -m "smoke and lightning"

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(MIN_VENV) docs/_build lightning_logs .pytest_cache
