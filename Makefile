# Two entry points: `make demo` (install + quickstart) and `make test` (install + tests).
# Each creates its own virtual environment in $(VENV) and installs torch==2.13.0 first
# (a looser torch spec would pull a multi-GB CUDA build).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/bicql fit --config configs/quickstart.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lightning_logs
