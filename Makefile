# Two entry points that work from a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install bytecode demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo,bench]'
	touch $(STAMP)

# Bytecode for the project's own modules: an editable install has none, and where PYTHONDONTWRITEBYTECODE
# is set every daemon would compile them again at each start (about 2 MB of resident memory per daemon).
# Python still reads the cached files with that variable set; they are refreshed whenever a source changes.
bytecode: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m compileall -q gossipfl daemon >/dev/null

install: $(STAMP) bytecode

demo: $(STAMP) bytecode
	$(BIN)/python -m gossipfl.cli.demo

test: $(STAMP) bytecode
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP) bytecode
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
