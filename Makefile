# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, index SciFact (BM25 + dense), query it, train the LambdaMART ranker on
#                 SciFact train, promote it, evaluate everything on SciFact test, serve it over HTTP
#   make test   - create .venv if needed and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASETS ?= ../shared/datasets
export LTR_SEARCH_HOME ?= $(CURDIR)/.ltr-search
# Everything is read from installed packages; never reach a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

DEMO_PORT ?= 8765

.PHONY: install demo serve test test-es bench clean

# The HTTP part of the demo: wait for /ready, search, report a click, read the metrics.
define DEMO_HTTP
import json, time, urllib.request as http
base = "http://127.0.0.1:$(DEMO_PORT)"
def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = http.Request(base + path, data, {"content-type": "application/json"})
    with http.urlopen(request, timeout=30) as response:
        return response.read().decode()
for _ in range(600):
    try:
        call("/ready"); break
    except OSError:
        time.sleep(0.2)
page = json.loads(call("/search", {"query": "vitamin D deficiency and cancer risk", "size": 5, "explain": True}))
print(f"POST /search ({page['pipeline']}, {page['took_ms']:.1f} ms, request {page['request_id']}):")
for r in page["results"]:
    print(f"  {r['position']}. {r['id']:<10} {r['score']:.4f}  {r['fields']['title'][:80]}")
first = page["results"][0]
if first.get("explain", {}).get("contributions"):
    top = sorted(first["explain"]["contributions"].items(), key=lambda kv: -abs(kv[1]))[:4]
    print("  why #1 (model " + str(page["model_version"]) + "):", ", ".join(f"{k} {v:+.3f}" for k, v in top))
print("POST /events:", call("/events", {"events": [{"request_id": page["request_id"], "type": "click", "doc_id": first["id"], "position": 1}]}))
print("GET /metrics:", [line for line in call("/metrics").splitlines() if line.startswith(("ltr_search_index_generation_info", "ltr_search_model_info"))])
endef
export DEMO_HTTP

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
	$(BIN)/ltr-search search "antibiotic resistance in hospital infections" --name scifact -k 5 --pipeline bm25
	$(BIN)/ltr-search train --dataset $(DATASETS)/scifact --split train --name scifact
	$(BIN)/ltr-search models promote latest --dataset $(DATASETS)/scifact --split test
	$(BIN)/ltr-search models list
	$(BIN)/ltr-search search "vitamin D deficiency and cancer risk" --name scifact -k 5 --pipeline ltr
	$(BIN)/ltr-search eval --dataset $(DATASETS)/scifact --split test --name scifact \
		--pipeline bm25,dense,hybrid,hybrid-convex,hybrid-tuned,model:active --baseline hybrid-convex \
		--json $(LTR_SEARCH_HOME)/reports/scifact-test.json --report $(LTR_SEARCH_HOME)/reports/scifact-test.md
	@echo "--- serving scifact on 127.0.0.1:$(DEMO_PORT): one search and one click through HTTP, then stop (make serve keeps it up)"
	@$(BIN)/ltr-search serve --name scifact --port $(DEMO_PORT) & pid=$$!; trap "kill $$pid" EXIT; \
	$(BIN)/python -c "$$DEMO_HTTP"

serve: install
	$(BIN)/ltr-search serve --name scifact --port $(DEMO_PORT)

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# Integration tests of the Elasticsearch backend against a running cluster (8.8 or later):
#   docker compose up -d elasticsearch && ES_URL=http://127.0.0.1:9200 make test-es
ES_URL ?= http://127.0.0.1:9200
test-es: install
	ES_URL='$(ES_URL)' $(BIN)/python -m pytest -q tests/test_elastic_integration.py

bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench_bm25.py
	$(BIN)/python bench/bench_build.py
	$(BIN)/python bench/bench_encoder.py
	$(BIN)/python bench/bench_ann.py
	$(BIN)/python bench/bench_service.py
	$(BIN)/python bench/bench_ltr.py

clean:
	rm -rf $(VENV) .ltr-search bench/results
