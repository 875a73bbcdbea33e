# Two commands from a fresh clone: `make app` (set up, serve the Space on :7860) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned torch first: on a CPU machine this is the CPU build; an open range would pull CUDA (GBs)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: setup app test bench
setup: $(VENV)/.installed

app: setup
	$(PY) app.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/embedded_demo.py
