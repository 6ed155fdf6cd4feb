# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedlora run configs/quickstart.yaml -o runs/quickstart --overwrite

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

bench: $(STAMP)
	$(PY) bench/engine_overhead.py
	$(PY) bench/sketch_speed.py
	$(PY) bench/memory_clients.py

clean:
	rm -rf $(VENV) runs .pytest_cache
