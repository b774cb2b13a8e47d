# Two entry points that work on a fresh machine from nothing (see README).
PY ?= python

.PHONY: install test demo bench

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

test: install
	$(PY) -m pytest tests -q

demo: install
	torchrun --nproc_per_node 2 -m ovr_train.launch --stage all

bench: install
	$(PY) -m pytest benchmarks/ --benchmark-only -q
