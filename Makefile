# Two entry points: `make demo` and `make test`. Both create .venv when missing and install the project
# into it; the install is skipped when pyproject.toml has not changed since the last one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheels that lie on this machine's disk; override for a GPU box, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m swirl_vl fit --config configs/sprites.yaml

lint: $(STAMP)
	$(PY) -m ruff check swirl_vl datamodules tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format swirl_vl datamodules tests benchmarks

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider -n 2 --dist worksteal --durations=15

clean:
	rm -rf runs lightning_logs .pytest_cache
