# Quick start: `make demo` runs the main job, `make test` runs the tests. Each creates .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch / torchvision versions this project is developed and tested against.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[vision,dev]'
	touch $(STAMP)

# the embedded shapes ResNet on 4 bundled images; writes the README figure docs/demo/flow_grid.png
demo: $(STAMP)
	$(VENV)/bin/naflow demo --out docs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -n 2 --durations=15

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) naflow-demo naflow-out .pytest_cache .ruff_cache .hypothesis
