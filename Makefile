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

# the main job: the planned method vs FSLoRA and HetLoRA to a mean-accuracy target (configs/demo.yaml)
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/fedlora compare configs/demo.yaml --methods proposed,fslora,hetlora --target mean=0.344 \
		--baseline fslora -o runs/demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

bench: $(STAMP)
	$(PY) bench/engine_overhead.py
	$(PY) bench/sketch_speed.py
	$(PY) bench/memory_clients.py

clean:
	rm -rf $(VENV) runs .pytest_cache
