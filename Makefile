# Every target creates .venv on a fresh machine: torch 2.13.0 (the local CPU wheel) first,
# then the package with its test extras.
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/sauce-export
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench lint world-models clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev,formats]"
	touch $(STAMP)

data/world/train.jsonl: | $(STAMP)
	$(CLI) --quiet world build --out data/world

# `run` exits 1 when a gate fails; the demo still shows its table and report then.
demo: $(STAMP) data/world/train.jsonl
	$(CLI) run recipes/demo.yaml --out runs/demo || [ $$? -eq 1 ]

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Figures are ratios measured in one run on this machine; each script writes runs/bench/*.{json,md}.
bench: $(STAMP) data/world/train.jsonl
	$(PY) benchmarks/run.py --out runs/bench
	$(PY) benchmarks/fold_table.py --out runs/bench
	$(PY) benchmarks/export_bench.py --out runs/bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rebuild the shipped demo checkpoints from their seed (about 10 minutes on 2 CPU cores).
world-models: $(STAMP) data/world/train.jsonl
	$(CLI) world train --world data/world --out models

clean:
	rm -rf runs data/world
