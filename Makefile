# noiseprop: `make report` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing and install the package into it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the optional `cluster` extra (dask.distributed), installed for the tests; torch is held
# at the installed version by a constraints file
CLUSTER_STAMP := $(VENV)/.cluster-installed
REPORT_ARGS ?=
# `make paper PAPER_QUICK=1` runs the quick report when report/ is missing
PAPER_QUICK ?=
PYTEST_ARGS ?=

.PHONY: install report test lab paper clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(CLUSTER_STAMP): $(STAMP)
	$(BIN)/python -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt -e ".[cluster]"
	touch $(CLUSTER_STAMP)

report: $(STAMP)
	$(BIN)/noiseprop report $(REPORT_ARGS)

test: $(STAMP) $(CLUSTER_STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lab: $(STAMP)
	$(BIN)/python -m pip install -e ".[notebooks]"
	$(BIN)/jupyter lab notebooks/

paper: $(STAMP)
	command -v latexmk >/dev/null 2>&1 || scripts/install_tex.sh
	test -d report || $(BIN)/noiseprop report $(if $(PAPER_QUICK),--quick) $(REPORT_ARGS)
	$(BIN)/python paper/generate.py --report report --out paper/generated
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex

clean:
	rm -rf $(VENV) report build *.egg-info
