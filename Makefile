# The two set-up commands of README: `make run` and `make test`. Both build .venv/ from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pricewire up --feed sim --port 8000

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy libs services tests bench

# The fault campaign: every `fault` scenario at full length (the NATS pause 10 s), then the counts as a table.
reliability: $(STAMP)
	rm -f .pricewire/reliability.jsonl && mkdir -p .pricewire
	PRICEWIRE_FAULT_PAUSE_S=10 PRICEWIRE_FAULT_KILLS=3 PRICEWIRE_FAULT_OUTAGE_S=30 PRICEWIRE_RELIABILITY_REPORT=$(CURDIR)/.pricewire/reliability.jsonl \
		$(BIN)/python -m pytest -q -m fault
	$(BIN)/python -m tests.reliability .pricewire/reliability.jsonl

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py --rate 200 --duration 20

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
