# Two commands on a fresh machine: `make demo` (private training on digits, ε live) and `make test`.
# Each creates ./.venv if needed and installs what it needs. torch is pinned and installed *first*:
# an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# `make test` runs the suite in this many worker processes (pytest-xdist; one intra-op thread each).
TEST_WORKERS ?= 2
STAMP := $(VENV)/.lightning-dp-installed
# `make test-min`: a second venv with the oldest supported versions (constraints/minimum.txt, torch's pin
# installed first as above) and the short `smoke` test set in it, under both Lightning namespaces.
MIN_VENV ?= .venv-min
MIN_CONSTRAINTS := constraints/minimum.txt
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.lightning-dp-installed
# `make example-litgpt`: a third venv for examples/fabric_litgpt_lora.py (LitGPT's model code in a Fabric loop)
# and its test. litgpt 0.5.13 needs lightning>=2.6.1 (above .venv-min's 2.4.0) and its extras pin
# transformers<4.57 (below the main venv's 5.x), so it gets a venv of its own: torch's pin first (and again with
# each later install, so that nothing moves it), then litgpt and pytest, then this repository.
LITGPT_VENV ?= .venv-litgpt
LITGPT ?= litgpt==0.5.13
LITGPT_PY := $(LITGPT_VENV)/bin/python
LITGPT_STAMP := $(LITGPT_VENV)/.lightning-dp-installed

.PHONY: demo test test-min example-litgpt docs install install-min install-litgpt clean

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

$(LITGPT_PY):
	$(PYTHON) -m venv $(LITGPT_VENV)

$(LITGPT_STAMP): setup.cfg setup.py pyproject.toml lightning_dp/noise/_boxmuller.c | $(LITGPT_PY)
	$(LITGPT_PY) -m pip install --quiet "$(TORCH)"
	$(LITGPT_PY) -m pip install --quiet "$(LITGPT)" "$(TORCH)" pytest
	$(LITGPT_PY) -m pip install --quiet -e ".[lightning]" "$(TORCH)"
	touch $(LITGPT_STAMP)

install-litgpt: $(LITGPT_STAMP)

demo: $(STAMP)
	$(PY) examples/train_digits.py

# The whole suite under `import lightning as L`, then the Lightning tests again under pytorch_lightning.
# One intra-op thread per process: the tests' models are tiny (thread hand-offs cost more than they save)
# and the distributed tests run several processes at once; tests about threads set their own counts.
# The venv has the test extra, so the independent references (dp-accounting) are required: a check against
# a missing reference fails instead of skipping (tests/dp_accounting_reference.py).
test: $(STAMP)
	OMP_NUM_THREADS=1 LIGHTNING_DP_REQUIRE_REFERENCES=1 $(PY) -m pytest -n $(TEST_WORKERS) tests
	OMP_NUM_THREADS=1 LIGHTNING_DP_REQUIRE_REFERENCES=1 LIGHTNING_DP_TEST_NAMESPACE=pytorch_lightning $(PY) -m pytest -n $(TEST_WORKERS) tests -m lightning

# The smoke set (marker `smoke`: the RFC 8439 and SP 800-38A vectors, a secure-mode fit, a 2-process DDP
# step, Hugging Face LoRA and DoRA steps) against the oldest supported versions; the Lightning ones again
# under pytorch_lightning.
test-min: $(MIN_STAMP)
	OMP_NUM_THREADS=1 $(MIN_PY) -m pytest tests -m smoke
	OMP_NUM_THREADS=1 LIGHTNING_DP_TEST_NAMESPACE=pytorch_lightning $(MIN_PY) -m pytest tests -m "smoke and lightning"

# Private LoRA fine-tuning of LitGPT's GPT (pythia-14m config, 2 layers, random init, offline) in a Fabric loop:
# the example runs inside its test, which checks the budget, the held-out loss and the checkpoint's privacy
# state (-rP prints the example's output: the privacy report).
example-litgpt: $(LITGPT_STAMP)
	$(LITGPT_PY) -m pytest tests/test_examples.py -k litgpt -rP

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(MIN_VENV) $(LITGPT_VENV) docs/_build lightning_logs .pytest_cache
